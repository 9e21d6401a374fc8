"""CURVE on the ZeroMQ links: only holders of the cluster's key get through; a foreign
client's well-formed step never reaches a worker's stage loop, and is logged."""

from __future__ import annotations

import time

import pytest
import ray
import torch
import zmq

from llm_shard import LLM, SamplingParams
from llm_shard.cluster import links, wire
from llm_shard.cluster.messages import Step

GREEDY = SamplingParams(max_tokens=6, temperature=0)


def _received(sock: zmq.Socket, wait: float) -> list[bytes]:
    got, deadline = [], time.monotonic() + wait
    while time.monotonic() < deadline:
        if sock.poll(50):
            got.append(sock.recv())
    return got


def _push(ctx, address: str, keys: links.LinkKeys | None) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    links.client(sock, keys)
    sock.connect(address)
    return sock


def test_only_the_cluster_key_gets_through():
    keys = links.LinkKeys.generate()
    assert keys.secret not in repr(keys)
    ctx = zmq.Context()
    guard = links.Guard(ctx, keys, "test server")
    pull = guard.server(ctx.socket(zmq.PULL))
    pull.setsockopt(zmq.LINGER, 0)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    address = f"tcp://127.0.0.1:{port}"
    senders = []
    try:
        for who, k in (("plain", None), ("foreign key", links.LinkKeys.generate()),
                       ("cluster key", keys)):
            s = _push(ctx, address, k)
            senders.append(s)
            s.send(who.encode())  # queued until the handshake succeeds, which it may not
        assert _received(pull, 2.0) == [b"cluster key"]
        deadline = time.monotonic() + 5
        while guard.refused < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert guard.refused >= 2  # the plain and the foreign-key client, logged
    finally:
        for s in senders + [pull]:
            s.close(linger=0)
        guard.close()
        ctx.term()


def _foreign_step(address: str, epoch: int) -> None:
    """A well-formed first-stage step, sent by a process that has no key."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    wire.send(sock, Step(epoch, 99, [12345], [3], [0], torch.tensor([1, 2, 3]),
                         reset=[12345], params={12345: GREEDY}))
    time.sleep(1.5)
    sock.close(linger=0)
    ctx.term()


@pytest.mark.parametrize("encrypt", [True, False])
def test_a_foreign_client_step_is_ignored_and_logged(ray_cluster, smollm2_stores, encrypt):
    """With CURVE (the default) a foreign step is refused at the handshake: the worker
    counts a refused connection and runs no step. Without it (--no-encrypt) the same step
    is run: the test tells the two apart."""
    # room for the foreign sequence beside the prefix cache's finished one and the next
    with LLM(str(smollm2_stores["int8"].path), workers=["ram=1GiB"], cache_tokens=1024,
             encrypt=encrypt) as model:
        want = model.generate(["The capital of France is"], GREEDY)[0].token_ids
        (stage,) = model.plan.stages
        worker = model.pipeline.workers[stage.worker]
        before = ray.get(worker.actor.stats.remote())
        _foreign_step(worker.info["address"], model.pipeline.epoch)
        after = ray.get(worker.actor.stats.remote())
        if encrypt:
            assert after["steps"] == before["steps"]
            assert after["refused_connections"] > before["refused_connections"]
        else:
            assert after["steps"] == before["steps"] + 1
            assert after["refused_connections"] == 0
            # unencrypted, every worker here: links bind loopback only
            assert worker.info["address"].startswith("tcp://127.0.0.1:")
        # still serving, same tokens
        assert model.generate(["The capital of France is"], GREEDY)[0].token_ids == want
