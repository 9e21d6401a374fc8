"""The distributed pipeline on a real Ray cluster with ZeroMQ between stages, on the real
SmolLM2-135M weights: splits, continuous batching, recovery from killed workers."""

from __future__ import annotations

import os
import signal
import threading
import time

import msgpack
import psutil
import pytest
import torch
import zmq
from conftest import PROMPTS

from llm_shard import LLM, RequestError, SamplingParams
from llm_shard.cluster.ray_glue import GOMP_SPINCOUNT
from llm_shard.models.runner import LocalModel

GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def store(smollm2_stores):
    return smollm2_stores["fp32"]


@pytest.fixture(scope="module")
def reference(store):
    """Each prompt alone, unsplit, in this process: the tokens every run must give."""
    tok, model = store.tokenizer(), LocalModel(store)
    return [model.greedy(tok.encode(p), GREEDY.max_tokens, tok.eos_ids) for p in PROMPTS]


def llm(store, n, **kw):
    kw.setdefault("wire_dtype", "fp32")
    return LLM(str(store.path), workers=kw.pop("workers", ["ram=1GiB"] * n),
               use_all_workers=True, cache_tokens=kw.pop("cache_tokens", 2048), **kw)


def assert_threads_bound(model):
    """Workers on this machine take consecutive CPUs of the ones this process may use
    (wrapping around) as their own share; each binds the team it computes with now (its
    share, or all the machine's CPUs when it is the only busy stage) to CPUs from its first
    on. Each set our GOMP_SPINCOUNT before torch loaded libgomp
    (ray_glue.worker_process_env), with no Ray runtime_env (a fresh process per worker
    start)."""
    import ray

    allowed = sorted(os.sched_getaffinity(0))
    offset = 0
    for w in model.pipeline.workers:
        cpus = [allowed[(offset + i) % len(allowed)] for i in range(w.threads)]
        assert w.info["cpus"] == cpus, (w.index, w.info)
        assert w.info["machine_cpus"] == len(allowed)
        spin = os.environ.get("GOMP_SPINCOUNT", GOMP_SPINCOUNT)  # the raylet's, if set
        assert w.info["omp_env"] == {"GOMP_SPINCOUNT": spin, "applied": True}, w.info
        team = ray.get(w.actor.stats.remote())["threads"]
        now = {allowed[(offset + i) % len(allowed)] for i in range(team)}
        offset += w.threads
        bound = [os.sched_getaffinity(t.id) for t in psutil.Process(w.info["pid"]).threads()]
        single = {c for b in bound if len(b) == 1 for c in b}
        assert now <= single <= set(allowed), (w.index, team, bound)


def test_step_threads_follow_what_is_in_flight():
    """Co-located stages compute on all their machine's CPUs while one micro-batch is in
    flight, on their own shares while several are; a stage alone on its machine always
    has all of it; a SPEC's threads= is never changed."""
    from llm_shard.coordinator.pipeline import StageCores
    from llm_shard.coordinator.scheduler import step_threads

    two = [StageCores(0, "a", 1, 2, False), StageCores(15, "a", 1, 2, False)]
    assert step_threads(two, 1) == {0: 2, 15: 2}
    assert step_threads(two, 2) == step_threads(two, 5) == {0: 1, 15: 1}
    three = [StageCores(0, "a", 2, 4, False), StageCores(10, "a", 2, 4, False),
             StageCores(20, "b", 8, 8, False)]
    assert step_threads(three, 1) == {0: 4, 10: 4, 20: 8}
    assert step_threads(three, 3) == {0: 2, 10: 2, 20: 8}
    fixed = [StageCores(0, "a", 1, 2, True), StageCores(15, "a", 1, 2, False)]
    assert step_threads(fixed, 1) == {0: 1, 15: 2}


def test_each_step_carries_the_threads_of_what_is_in_flight():
    """The scheduler, with a stand-in pipeline of 2 co-located stages and sockets for its
    first stage and its results (no Ray): a step sent while no other is in flight says all
    the machine's CPUs; once a second micro-batch is in flight, each stage's share; alone
    again, all of them."""
    from types import SimpleNamespace

    from llm_shard.cluster import wire
    from llm_shard.cluster.messages import Free, Result, Step
    from llm_shard.coordinator.pipeline import StageCores
    from llm_shard.coordinator.scheduler import Scheduler

    ctx = zmq.Context()
    first, results, reply = ctx.socket(zmq.PULL), ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    for sock in (first, results, reply):
        sock.setsockopt(zmq.LINGER, 0)
    first.setsockopt(zmq.RCVTIMEO, 10_000)
    port = first.bind_to_random_port("tcp://127.0.0.1")
    reply.connect(f"tcp://127.0.0.1:{results.bind_to_random_port('tcp://127.0.0.1')}")
    pipeline = SimpleNamespace(
        epoch=0, keys=None, first_address=f"tcp://127.0.0.1:{port}", cache_capacity=1 << 30,
        store=SimpleNamespace(arch=SimpleNamespace(name="llama"),
                              config=SimpleNamespace(vocab_size=100, cache_bytes_per_token=4)),
        plan=SimpleNamespace(stages=[None, None]), dead=lambda: [],
        stage_cores=[StageCores(0, "m", 1, 2, False), StageCores(15, "m", 1, 2, False)])
    sched = Scheduler(pipeline, None, results, max_len=None)

    def next_step() -> Step:
        while True:
            msg = wire.recv(first)
            if not isinstance(msg, Free):
                return msg

    def answer(step: Step, token: int) -> None:
        wire.send(reply, Result(0, step.mb, step.seqs, [token] * len(step.seqs),
                                [None] * len(step.seqs), [None] * len(step.seqs)))

    try:
        greedy = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        a = sched.submit([1, 2, 3], greedy)
        step_a = next_step()
        assert step_a.threads == {0: 2, 15: 2} and step_a.lens == (3,)
        b = sched.submit([4, 5], SamplingParams(max_tokens=1, temperature=0))
        step_b = next_step()
        assert step_b.threads == {0: 1, 15: 1} and step_b.mb != step_a.mb
        answer(step_a, 7)
        step_a = next_step()  # b still in flight
        assert step_a.threads == {0: 1, 15: 1} and step_a.tokens.tolist() == [7]
        answer(step_b, 9)
        assert b.result(timeout=10).token_ids == [9]
        answer(step_a, 8)
        step_a = next_step()  # alone again
        assert step_a.threads == {0: 2, 15: 2} and step_a.tokens.tolist() == [8]
        answer(step_a, 6)
        assert a.result(timeout=10).token_ids == [7, 8, 6]
    finally:
        sched.close()
        for sock in (first, results, reply):
            sock.close()
        ctx.term()


def test_cpu_offsets_are_per_machine_and_can_be_turned_off(monkeypatch):
    from llm_shard.cluster.ray_glue import Node
    from llm_shard.coordinator.pipeline import cpu_offsets

    a1, a2, b = (Node(f"n{i}", ip, 2, 1 << 30, {}) for i, ip in
                 enumerate(["10.0.0.1", "10.0.0.1", "10.0.0.2"]))
    assert cpu_offsets([a1, b, a2, a1], [2, 4, 1, 2]) == [0, 0, 2, 3]
    monkeypatch.setenv("LLM_SHARD_PIN_THREADS", "0")
    assert cpu_offsets([a1, b], [2, 4]) == [None, None]


def test_a_step_time_of_zero_is_averaged_in_not_a_restart():
    """The scheduler's moving averages: the first sample starts them; a later 0.0 (a
    step with no wire share) is averaged in, and the next sample averaged with it."""
    from llm_shard.coordinator.scheduler import _EMA, _average, _averages

    assert _average(None, 0.0) == 0.0
    assert _average(0.0, 1.0) == pytest.approx(_EMA)
    assert _averages([0.0, 2.0], [1000.0, 1000.0]) == pytest.approx([_EMA, 2 - _EMA])
    assert _averages([1.0], [3000.0, 4000.0]) == [3.0, 4.0]  # a re-plan restarts them


def assert_step_times_add_up(m: dict, n: int):
    """Per stage, the worker held each step at least as long as it computed; the round
    trip is the stages' hold times plus the wire's share."""
    assert len(m["stage_seconds"]) == len(m["busy_seconds"]) == n, m
    assert all(0 < c <= b for c, b in zip(m["stage_seconds"], m["busy_seconds"])), m
    assert m["wire_seconds"] > 0, m
    assert m["step_seconds"] == pytest.approx(sum(m["busy_seconds"]) + m["wire_seconds"]), m


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2, 3])
def test_split_gives_the_unsplit_tokens_and_logits(ray_cluster, store, reference, n):
    with llm(store, n) as model:
        assert len(model.plan.stages) == n
        outs = model.generate(PROMPTS[:2], SamplingParams(max_tokens=12, temperature=0,
                                                          logprobs=5))
        assert_threads_bound(model)
        assert_step_times_add_up(model.metrics(), n)
    assert [o.token_ids for o in outs] == reference[:2]
    tok = store.tokenizer()
    for o, prompt in zip(outs, PROMPTS):
        assert o.prompt == prompt and o.finish_reason in ("stop", "length")
        assert o.text == tok.decode([t for t in o.token_ids if t not in tok.eos_ids])
        # the first step's log-probs against the unsplit model's logits
        # (both with fp16 KV caches, the default: rows rounded to fp16 where each path
        # prefills them, so the log-probs agree to ~1e-4, not to the bit)
        want = torch.log_softmax(LocalModel(store, kv_dtype="fp16").logits(
            o.prompt_token_ids)[-1], -1)
        for token, lp in o.logprobs[0].items():
            assert abs(lp - float(want[token])) < 1e-3


@pytest.mark.slow
def test_threads_follow_the_work_and_tokens_stay(ray_cluster, store, reference):
    """Two workers sharing this machine, each given its share of the CPUs: one sequence
    (one micro-batch in flight) runs every step on all the machine's CPUs in both stages;
    two sequences in two micro-batches run on the shares. Greedy tokens are the unsplit
    model's either way."""
    import ray

    cpus = len(os.sched_getaffinity(0))
    share = max(1, cpus // 2)

    def counts():
        return [ray.get(w.actor.stats.remote())["steps_by_threads"] for w in workers]

    with llm(store, 2) as model:
        workers = [model.pipeline.workers[s.worker] for s in model.plan.stages]
        assert len(workers) == 2 and [w.threads for w in workers] == [share, share]
        assert model.generate(PROMPTS[:1], GREEDY)[0].token_ids == reference[0]
        alone = counts()
        assert all(list(c) == [cpus] for c in alone), alone
        both = SamplingParams(max_tokens=GREEDY.max_tokens, temperature=0, ignore_eos=True)
        outs = model.generate(PROMPTS[:2], both)
        for o, want in zip(outs, reference):
            assert o.token_ids[:len(want)] == want
        after = counts()
        assert all(set(c) <= {share, cpus} for c in after), after
        # every step but maybe the first (the two requests may arrive apart) on the shares
        assert all(a.get(share, 0) >= 2 * GREEDY.max_tokens - 1 for a in after), after
        assert_threads_bound(model)


@pytest.mark.slow
def test_continuous_batching_gives_each_prompt_its_own_tokens(ray_cluster, store, reference):
    with llm(store, 2) as model:
        outs = model.generate(PROMPTS, GREEDY)
        ids = model.generate(prompt_token_ids=[o.prompt_token_ids for o in outs[:2]],
                             params=GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert [o.index for o in outs] == list(range(len(PROMPTS)))
    assert [o.token_ids for o in ids] == reference[:2]


LONG = 150


@pytest.mark.slow
def test_a_request_joins_while_others_decode(ray_cluster, store):
    with llm(store, 2) as model:
        tok = store.tokenizer()
        started = threading.Event()
        pieces = []

        def on_text(piece):
            pieces.append(piece)
            if len(pieces) >= 3:
                started.set()

        # long enough (about 15 s here) that the short one, a prefill and 3 tokens, is
        # done well before it unless it waits for it
        long = model.submit(tok.encode(PROMPTS[1]),
                            SamplingParams(max_tokens=LONG, temperature=0, ignore_eos=True),
                            on_text)
        assert started.wait(60)
        short = model.submit(tok.encode(PROMPTS[0]), SamplingParams(max_tokens=3,
                                                                    temperature=0))
        assert short.result(timeout=60).token_ids
        assert not long.done()  # the short one did not wait for the long one
        done = long.result(timeout=300)
        assert len(done.token_ids) == LONG and done.finish_reason == "length"
        assert "".join(pieces) == done.text


def _kill(model, worker, how):
    import ray

    if how == "pid":
        os.kill(worker.info["pid"], signal.SIGKILL)
    else:
        ray.kill(worker.actor)


def _submit_and_start(model, store):
    """The first four prompts submitted; returns their futures once text is coming."""
    tok = store.tokenizer()
    started = threading.Event()
    futures = [model.submit(tok.encode(p), GREEDY,
                            (lambda piece: started.set()) if i == 0 else None)
               for i, p in enumerate(PROMPTS[:4])]
    assert started.wait(60)
    return futures


@pytest.mark.slow
@pytest.mark.parametrize("how,restarts", [("pid", 3), ("ray.kill", 0)])
def test_a_killed_worker_costs_no_request(ray_cluster, store, reference, how, restarts):
    """With restarts (the default) the lost worker is replaced on its node and the plan
    keeps its 3 stages; with max_restarts=0 the re-plan runs over the 2 workers left."""
    with llm(store, 3, max_restarts=restarts) as model:
        futures = _submit_and_start(model, store)
        middle = model.pipeline.workers[model.plan.stages[1].worker]
        old_pid = middle.info["pid"]
        _kill(model, middle, how)
        outs = [f.result(timeout=300) for f in futures]
        assert [o.token_ids for o in outs] == reference[:4]
        stats = model.stats()
        assert stats["recoveries"] >= 1 and stats["epoch"] >= 1
        workers = stats["workers"]
        if restarts:
            assert [w["restarts"] for w in workers] == [int(w["index"] == middle.index)
                                                        for w in workers]
            assert all(w["alive"] for w in workers) and len(model.plan.stages) == 3
            assert workers[middle.index]["pid"] != old_pid
            assert not psutil.pid_exists(old_pid) or \
                psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
        else:
            assert [w["alive"] for w in workers].count(False) == 1
            assert [w["restarts"] for w in workers] == [0, 0, 0]
            assert len(model.plan.stages) == 2
        # and it keeps serving
        assert model.generate(PROMPTS[:1], GREEDY)[0].token_ids == reference[0]


@pytest.mark.slow
def test_a_worker_that_dies_during_the_re_plan_is_replaced_too(ray_cluster, store,
                                                                reference):
    """Kill one stage, then another while the first one's replacement starts (~3 s):
    the second death surfaces only when the re-plan configures it, and must lead to
    another re-plan, not to failed requests."""
    with llm(store, 3) as model:
        futures = _submit_and_start(model, store)
        first, second = (model.pipeline.workers[s.worker] for s in model.plan.stages[:2])
        _kill(model, first, "pid")
        deadline = time.monotonic() + 60
        while model.stats()["recoveries"] == 0:  # the scheduler is now replacing `first`
            assert time.monotonic() < deadline, "the first kill was never noticed"
            time.sleep(0.01)
        _kill(model, second, "pid")
        outs = [f.result(timeout=300) for f in futures]
        assert [o.token_ids for o in outs] == reference[:4]
        workers = model.stats()["workers"]
        assert all(w["alive"] for w in workers) and len(model.plan.stages) == 3
        assert sorted(w["restarts"] for w in workers) == [0, 1, 1]
        assert workers[first.index]["restarts"] == workers[second.index]["restarts"] == 1
        assert model.generate(PROMPTS[:1], GREEDY)[0].token_ids == reference[0]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_removed_node_costs_no_request(ray_cluster, store, reference):
    """The node of a stage leaves the cluster mid-generation: its worker cannot be replaced
    there, so the re-plan runs over the worker left, and every request completes."""
    node = ray_cluster.add_node(num_cpus=1)
    try:
        ray_cluster.wait_for_nodes()
        with llm(store, 2, workers=["ram=1GiB", f"ram=1GiB,node={node.node_id}"]) as model:
            assert len(model.plan.stages) == 2
            assert model.stats()["workers"][1]["node_id"] == node.node_id
            futures = _submit_and_start(model, store)
            ray_cluster.remove_node(node)
            node = None
            outs = [f.result(timeout=240) for f in futures]
            assert [o.token_ids for o in outs] == reference[:4]
            workers = model.stats()["workers"]
            assert [w["alive"] for w in workers] == [True, False]
            assert [w["restarts"] for w in workers] == [0, 0]  # its node is gone
            assert [s.worker for s in model.plan.stages] == [0]
            assert model.generate(PROMPTS[:1], GREEDY)[0].token_ids == reference[0]
    finally:
        if node is not None:
            ray_cluster.remove_node(node)


@pytest.mark.slow
def test_no_plan_left_fails_requests_clearly(ray_cluster, store, worker_runtime):
    total = sum(f["bytes"] for f in store.manifest["files"])
    ram = f"ram={int(total * 0.75) + worker_runtime}"
    with llm(store, 2, workers=[ram, ram], cache_tokens=1024, max_restarts=0) as model:
        assert len(model.plan.stages) == 2
        tok = store.tokenizer()
        started = threading.Event()
        future = model.submit(tok.encode(PROMPTS[1]),
                              SamplingParams(max_tokens=300, temperature=0, ignore_eos=True),
                              lambda piece: started.set())
        assert started.wait(60)
        _kill(model, model.pipeline.workers[0], "ray.kill")
        with pytest.raises(RequestError, match="no plan fits"):
            future.result(timeout=120)
        with pytest.raises(RequestError, match="no plan fits"):
            model.generate(PROMPTS[:1], GREEDY)


@pytest.mark.slow
def test_malformed_messages_are_dropped_and_the_worker_keeps_serving(ray_cluster, store,
                                                                     reference):
    import ray

    from llm_shard.cluster import links, wire
    from llm_shard.cluster.messages import Step

    with llm(store, 1) as model:
        worker = model.pipeline.workers[0]
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 1000)
        links.client(sock, model.keys)  # a peer holding the cluster's key, gone wrong
        sock.connect(worker.info["address"])
        sock.send_multipart([b"\x93not a header"])
        header = wire.pack("step", {"epoch": model.pipeline.epoch})[0]
        sock.send_multipart([header.replace(b"\x02", b"\x07", 1)])  # another wire version
        # a step whose rows do not add up: 3 rows, 2 tokens
        fields = msgpack.unpackb(wire.encode(Step(model.pipeline.epoch, 99, [5], [2], [0],
                                                  torch.tensor([1, 2])))[0])["fields"]
        sock.send_multipart(wire.pack("step", {**fields, "lens": [3]},
                                      {"tokens": torch.tensor([1, 2])}))
        sock.close()
        ctx.term()
        deadline = time.monotonic() + 30
        while ray.get(worker.actor.stats.remote())["malformed"] < 3:
            assert time.monotonic() < deadline, "the worker never saw the bad messages"
            time.sleep(0.1)
        assert model.generate(PROMPTS[:1], GREEDY)[0].token_ids == reference[0]
        stats = ray.get(worker.actor.stats.remote())
        assert stats["malformed"] == 3, stats
        assert "tokens must be int64 of shape (3,)" in stats["last_error"]


@pytest.mark.slow
def test_bad_requests_are_refused_by_name(ray_cluster, store):
    with llm(store, 1) as model:
        with pytest.raises(ValueError, match="exactly one of"):
            model.generate()
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model.generate(prompt_token_ids=[[10**7]])
        with pytest.raises(ValueError, match="context"):
            model.generate(PROMPTS[:1], SamplingParams(max_tokens=10**6))
        with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
            model.generate(PROMPTS[:1], [GREEDY, GREEDY])


@pytest.mark.slow
def test_cancel_frees_the_caches_on_every_stage(ray_cluster, store):
    import ray

    with llm(store, 2) as model:
        tok = store.tokenizer()
        started = threading.Event()
        future = model.submit(tok.encode(PROMPTS[1]),
                              SamplingParams(max_tokens=400, temperature=0, ignore_eos=True),
                              lambda piece: started.set())
        assert started.wait(60)
        model.cancel(future)
        deadline = time.monotonic() + 30
        while not future.cancelled():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        workers = [model.pipeline.workers[s.worker] for s in model.plan.stages]
        while any(ray.get(w.actor.stats.remote())["sequences"] for w in workers):
            assert time.monotonic() < deadline, "caches were not freed"
            time.sleep(0.1)
        assert model.metrics()["finished_total"] == {"cancelled": 1}
        assert model.metrics()["running"] == 0


@pytest.mark.slow
def test_multi_node_plan_respects_each_advertised_budget(ray_cluster, store, reference,
                                                         worker_runtime):
    """Three nodes advertise different budgets (as `llm-shard node-resources` makes them);
    LLM() with no workers finds them, the plan fits each, and each actor runs on its node."""
    import ray

    from llm_shard.cluster.resources import to_ray_resources
    from llm_shard.cluster.types import Capacity, Memory, Tier

    total = sum(f["bytes"] for f in store.manifest["files"])
    budgets = [Capacity(ram=Memory(int(total * share) + worker_runtime))
               for share in (0.3, 0.45, 0.6)]
    nodes = [ray_cluster.add_node(num_cpus=1, resources=to_ray_resources(c)) for c in budgets]
    try:
        ray_cluster.wait_for_nodes()
        with LLM(str(store.path), wire_dtype="fp32", cache_tokens=512) as model:
            workers = model.pipeline.workers
            assert sorted(w.capacity.ram for w in workers) == [c.ram for c in budgets]
            assert len(model.plan.stages) >= 2  # no node holds the whole model
            for stage, report in zip(model.plan.stages, model.plan_report.stages):
                w = workers[stage.worker]
                assert w.info["node_id"] == w.capacity.node  # on the node the plan names
                assert report.used(Tier.RAM) <= w.capacity.ram
            assert len({workers[s.worker].info["node_id"] for s in model.plan.stages}) == \
                len(model.plan.stages)
            outs = model.generate(PROMPTS[:2], GREEDY)
            assert [o.token_ids for o in outs] == reference[:2]
            assert ray.get(workers[0].actor.info.remote())["threads"] == 1
    finally:
        for node in nodes:
            ray_cluster.remove_node(node)
