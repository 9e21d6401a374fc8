"""Hardening of the engine (issue 35): one bad sequence fails alone, a scheduler failure
frees the stages' caches, a rejection with nothing else running is an error, requests
take turns. The scheduler runs against a stand-in pipeline and a test socket for its
first stage (no Ray), which answers each step as a last stage would."""

from __future__ import annotations

import time
from concurrent.futures import CancelledError
from types import SimpleNamespace

import pytest
import zmq

from llm_shard.cluster import wire
from llm_shard.cluster.messages import Free, Result, Step
from llm_shard.cluster.types import SamplingParams
from llm_shard.coordinator.pipeline import StageCores
from llm_shard.coordinator.scheduler import RequestError, Scheduler

GREEDY = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)


class Stage:
    """The scheduler's first stage and its results socket, answered by hand."""

    def __init__(self, **kw) -> None:
        self.ctx = zmq.Context()
        self.first, results = self.ctx.socket(zmq.PULL), self.ctx.socket(zmq.PULL)
        self.reply = self.ctx.socket(zmq.PUSH)
        for sock in (self.first, results, self.reply):
            sock.setsockopt(zmq.LINGER, 0)
        self.first.setsockopt(zmq.RCVTIMEO, 10_000)
        port = self.first.bind_to_random_port("tcp://127.0.0.1")
        self.reply.connect(f"tcp://127.0.0.1:{results.bind_to_random_port('tcp://127.0.0.1')}")
        self.results = results
        pipeline = SimpleNamespace(
            epoch=0, keys=None, first_address=f"tcp://127.0.0.1:{port}",
            cache_capacity=1 << 30,
            store=SimpleNamespace(arch=SimpleNamespace(name="llama"),
                                  config=SimpleNamespace(vocab_size=100,
                                                         cache_bytes_per_token=4)),
            plan=SimpleNamespace(stages=[None]), dead=lambda: [],
            stage_cores=[StageCores(0, "m", 1, 2, False)])
        self.sched = Scheduler(pipeline, None, results, max_len=None, micro_batches=1, **kw)
        self.frees: list[Free] = []

    def next_step(self) -> Step:
        while True:
            msg = wire.recv(self.first)
            if isinstance(msg, Step):
                return msg
            self.frees.append(msg)

    def answer(self, step: Step, token: int = 7, rejected: dict | None = None) -> None:
        seqs = [i for i in step.seqs if i not in (rejected or {})]
        wire.send(self.reply, Result(0, step.mb, seqs, [token] * len(seqs), [None] * len(seqs),
                                     [None] * len(seqs), rejected=rejected or {}))

    def close(self) -> None:
        self.sched.close()
        for sock in (self.first, self.results, self.reply):
            sock.close()
        self.ctx.term()


@pytest.fixture
def stage():
    s = Stage()
    yield s
    s.close()


def test_an_unsendable_step_fails_that_sequence_alone(stage):
    """A sequence whose params cannot go on the wire (a bug past SamplingParams' bounds)
    fails alone: the others in its group run on, no scheduler failure, nothing else fails."""
    bad = SamplingParams(max_tokens=2, temperature=0)
    object.__setattr__(bad, "top_k", 2**64)  # what SamplingParams itself now refuses
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=2**64)
    good = stage.sched.submit([1, 2], SamplingParams(max_tokens=8, temperature=0,
                                                     ignore_eos=True))
    doomed = stage.sched.submit([3], bad)
    step, answered = stage.next_step(), 0
    while not doomed.done():  # good may go out alone before doomed joins its group
        stage.answer(step)
        answered += 1
        step = stage.next_step()
    with pytest.raises(RequestError, match="cannot be sent.*not msgpack-able"):
        doomed.result(timeout=10)
    assert step.seqs == (1,) and answered < 8
    for k in range(answered, 8):  # good's 8 tokens: a step each
        if k > answered:
            step = stage.next_step()
        stage.answer(step)
    assert good.result(timeout=10).token_ids == [7] * 8
    assert stage.sched.metrics()["scheduler_failures_total"] == 0
    assert stage.sched.failed is None


def test_a_scheduler_failure_frees_every_cache_and_is_counted(stage, monkeypatch):
    """A failure in the loop fails the requests in flight, sends a Free of every cache
    (the stages would otherwise hold them with nothing running), is counted for /metrics;
    the scheduler then serves the next request."""
    a = stage.sched.submit([1, 2], GREEDY)
    stage.next_step()
    real = stage.sched._admit
    calls = []

    def broken():
        if not calls:
            calls.append(1)
            raise RuntimeError("boom")
        real()

    monkeypatch.setattr(stage.sched, "_admit", broken)
    with pytest.raises(RequestError, match="scheduler failed: RuntimeError: boom"):
        a.result(timeout=10)
    b = stage.sched.submit([5], GREEDY)
    step = stage.next_step()
    assert [f.everything for f in stage.frees] == [True]
    assert step.reset == step.seqs and len(step.seqs) == 1
    stage.answer(step)
    stage.answer(stage.next_step())
    assert b.result(timeout=10).token_ids == [7, 7]
    m = stage.sched.metrics()
    assert m["scheduler_failures_total"] == 1 and stage.sched.failed is None


def test_failing_again_and_again_marks_the_scheduler_failed(stage, monkeypatch):
    """A failure that repeats every loop is not retried forever: the scheduler is
    marked failed (LLM.not_ready, so /health says 503 and why) and refuses requests."""
    def broken():
        raise RuntimeError("always")

    monkeypatch.setattr(stage.sched, "_admit", broken)
    for _ in range(200):
        if stage.sched.failed:
            break
        stage.sched.stopping.wait(0.02)
    assert "always" in stage.sched.failed and "5 times in a row" in stage.sched.failed
    with pytest.raises(RequestError, match="always"):
        stage.sched.submit([1], GREEDY).result(timeout=10)


def test_cache_full_with_nothing_else_running_is_an_error_not_a_loop(stage):
    """A stage that rejects a sequence for cache room while no other sequence runs would
    reject it forever: it fails, once, rather than being requeued thousands of times."""
    f = stage.sched.submit([1, 2, 3], GREEDY)
    step = stage.next_step()
    stage.answer(step, rejected={step.seqs[0]: "cache full: blocks [0, 30) hold 9 of 10"})
    with pytest.raises(RequestError, match="no other request running: cache full"):
        f.result(timeout=10)
    stage.first.setsockopt(zmq.RCVTIMEO, 300)
    with pytest.raises(zmq.Again):
        stage.next_step()  # not sent again
    assert stage.frees and stage.frees[-1].seqs == step.seqs


def test_a_big_batch_does_not_starve_a_small_request():
    """400 prompts of one request (max_running 8 at a time) queued, then a 2-token request:
    it is admitted at the first free slot and finishes within a few steps, while most of
    the batch still waits. Counted in steps, not wall time."""
    stage = Stage(max_running=8)
    try:
        batch = object()
        big = [stage.sched.submit([1, 2], SamplingParams(max_tokens=4, temperature=0,
                                                         ignore_eos=True), request=batch)
               for _ in range(400)]
        step = stage.next_step()  # the first may go out before the rest are queued
        for _ in range(3):
            if len(step.seqs) == 8:
                break
            stage.answer(step)
            step = stage.next_step()
        assert len(step.seqs) == 8
        small = stage.sched.submit([9], GREEDY)
        steps = 0
        while not small.done():
            stage.answer(step)
            steps += 1
            assert steps <= 10, "the small request is starved"
            step = stage.next_step()
        assert small.result().token_ids == [7, 7]
        assert sum(f.done() for f in big) <= 16
    finally:
        stage.close()


# --- a live worker's socket ------------------------------------------------------------

@pytest.fixture(scope="module")
def pangu_store(tmp_path_factory):
    from conftest import random_hf_state, write_hf_port

    from llm_shard.models.checkpoint.convert import convert

    root = tmp_path_factory.mktemp("pangu")
    write_hf_port(root / "hf", random_hf_state(seed=11))
    return convert(root / "hf", root / "store", dtype="fp32", progress=False)


def _raw(kind: str, fields: dict, tensors: list | None = None) -> list[bytes]:
    import msgpack

    return [msgpack.packb({"v": wire.WIRE_VERSION, "kind": kind, "fields": fields,
                           "tensors": tensors or []})]


def _good_step(seq: int, reset: bool = True) -> Step:
    import torch

    return Step(0, 0, [seq], [3], [0], torch.tensor([3, 14, 15]), reset=[seq] * reset,
                params={seq: SamplingParams(max_tokens=4, temperature=0)} if reset else {})


@pytest.fixture
def live(pangu_store):
    """A worker in this process (no encryption) hosting every block, its results socket,
    and a PUSH connected to its loop: (worker, results, push, context)."""
    from llm_shard.worker.actor import Worker

    worker = Worker(str(pangu_store.path), threads=1, host="127.0.0.1")
    ctx = zmq.Context()
    results, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    for sock in (results, push):
        sock.setsockopt(zmq.LINGER, 0)
    results.setsockopt(zmq.RCVTIMEO, 20_000)
    address = f"tcp://127.0.0.1:{results.bind_to_random_port('tcp://127.0.0.1')}"
    worker.configure(0, 0, pangu_store.n_blocks, cache_budget=1 << 30,
                     next_address=address, result_address=address)
    push.connect(worker._address)
    yield worker, results, push, ctx
    worker.shutdown()
    for sock in (results, push):
        sock.close()
    ctx.term()


def test_hostile_messages_of_every_kind_are_dropped_and_the_worker_serves_on(live):
    """A worker (in this process, no encryption) fed hostile messages of every kind logs
    and drops each: its loop lives on, and a normal step after them is answered."""
    from llm_shard.cluster.messages import Error

    worker, results, push, _ = live
    step = wire.encode(_good_step(1))
    header = msgpack_header(step[0])
    hostile = [
        _raw("free", {"epoch": 0, "seqs": ["x"], "everything": False}),
        _raw("free", {"epoch": 0, "seqs": [1], "everything": "yes"}),
        _raw("free", {"epoch": 0}),
        _raw("free", {"epoch": 0, "seqs": [[1]], "everything": False}),
        _raw("step", {**header["fields"], "seqs": ["x"]}, header["tensors"]) + step[1:],
        _raw("step", {**header["fields"], "threads": {0: 10**9}}, header["tensors"])
        + step[1:],
        _raw("step", {**header["fields"], "params": {1: {"top_k": 2**64 - 1}}},
             header["tensors"]) + step[1:],
        _raw("step", {**header["fields"], "mb": -1}, header["tensors"]) + step[1:],
        wire.encode(_good_step(5, reset=False)),  # a sequence with no cache
        _raw("result", {"epoch": 0, "mb": 0, "seqs": [1], "sampled": [1],
                        "logprobs": [None], "top": [None], "rejected": {},
                        "stage_ms": [], "busy_ms": []}),
        _raw("error", {"epoch": 0, "mb": 0, "error": "x", "blocks": [0, 1]}),
        _raw("nonsense", {}),
        [b"\xc1garbage"],
        [b""],
    ]
    for frames in hostile:
        push.send_multipart(frames)
    push.send_multipart(wire.encode(_good_step(2)))
    answers = []
    while not answers or getattr(answers[-1], "seqs", None) != (2,):
        answers.append(wire.recv(results))  # the clamped-threads step runs: a Result
    assert len(answers[-1].sampled) == 1
    assert all(isinstance(a, (Error, Result)) for a in answers)
    assert worker.loop.is_alive()
    st = worker.stats()
    assert st["malformed"] >= len(hostile) - 2 and st["steps"] >= 1


def msgpack_header(frame) -> dict:
    import msgpack

    return msgpack.unpackb(bytes(frame), strict_map_key=False)


def test_a_frame_over_the_largest_step_is_dropped_unread(live, pangu_store):
    """ZMQ_MAXMSGSIZE on a worker's socket, from the largest legal step of its model: a
    raw peer's larger frame closes that peer's connection, the worker never receives it,
    and a normal step from another peer is answered."""
    worker, results, push, ctx = live
    limit = wire.max_step_bytes(pangu_store.config.hidden_size)
    assert worker.pull.getsockopt(zmq.MAXMSGSIZE) == limit
    rogue = ctx.socket(zmq.PUSH)
    rogue.setsockopt(zmq.LINGER, 0)
    try:
        rogue.connect(worker._address)
        rogue.send(bytes(limit + 1))
        push.send_multipart(wire.encode(_good_step(3)))
        assert wire.recv(results).seqs == (3,)
        stats = worker.stats()
        assert stats["malformed"] == 0 and stats["steps"] == 1
    finally:
        rogue.close()


def test_unencrypted_links_bind_loopback_when_every_worker_is_here(caplog):
    """--no-encrypt (keys None) with every worker on this machine: links on 127.0.0.1;
    with a worker elsewhere: each node's address, and a loud warning; encrypted: as is."""
    from llm_shard.cluster.links import LinkKeys
    from llm_shard.cluster.ray_glue import Node
    from llm_shard.coordinator.pipeline import link_host

    here, twin, other = (Node(f"n{i}", ip, 2, 1 << 30, {}) for i, ip in
                         enumerate(["10.0.0.1", "10.0.0.1", "10.0.0.2"]))
    assert link_host([here, twin], None, here) == "127.0.0.1"
    assert not caplog.records
    assert link_host([here, other], None, here) is None
    assert "UNENCRYPTED links between machines" in caplog.text and "10.0.0.2" in caplog.text
    if zmq.has("curve"):
        assert link_host([here], LinkKeys.generate(), here) is None


def test_a_request_to_an_idle_scheduler_starts_at_once(monkeypatch):
    """A submit wakes the loop from its poll: with the idle poll made a minute long, the
    first step still goes out (it used to wait out the poll, up to 50 ms of every
    request's time to first token), and so does a cancel's Free."""
    from llm_shard.coordinator import scheduler

    monkeypatch.setattr(scheduler, "IDLE_POLL_MS", 60_000)
    monkeypatch.setattr(scheduler, "BUSY_POLL_MS", 60_000)
    s = Stage()
    try:
        time.sleep(0.2)  # the loop is in its poll
        done = s.sched.submit([1, 2], GREEDY)
        step = s.next_step()  # 10 s receive timeout: zmq.Again had the poll not woken
        assert step.seqs == (1,) and step.reset == (1,)
        s.answer(step)
        s.answer(s.next_step())
        assert done.result(timeout=10).token_ids == [7, 7]
        time.sleep(0.2)
        doomed = s.sched.submit([3], GREEDY)
        step = s.next_step()
        s.sched.cancel(doomed)  # its step in flight: only the wake-up runs the cancel
        with pytest.raises(CancelledError):
            doomed.result(timeout=10)
        s.answer(step)  # the cancelled sequence's result is dropped
    finally:
        s.close()


def test_a_submit_after_close_is_refused_and_wakes_nothing():
    """Once closed, the scheduler refuses a request with a clear error (it used to wait
    forever), and its wake-up writes nothing more: its pipe's numbers may belong to
    another file by then."""
    import os

    s = Stage()
    s.close()
    with pytest.raises(RequestError, match="shut down"):
        s.sched.submit([1], GREEDY)
    r, w = os.pipe()  # may take the closed pipe's numbers
    try:
        s.sched.wake.set()
        s.sched.cancel(object())
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 1)
    finally:
        os.close(r)
        os.close(w)
