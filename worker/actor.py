"""The Ray actor that hosts one pipeline stage: a thin shell around `StageRunner`.

Control (configure, calibrate, stats, free) comes as Ray actor calls; activations come and
go over ZeroMQ in a loop on its own thread: PULL from the previous stage (or the
coordinator), PUSH to the next stage (or, from the last, the coordinator's results
socket). Messages of an older epoch (sent before a re-plan) are dropped; a malformed one
is logged, counted and dropped, and the loop keeps serving.

Ray starts it as `ray.remote(Worker)` so the dashboard and `ray list actors` say Worker.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time

import torch
import zmq

from llm_shard.cluster import wire
from llm_shard.models.base import Part
from llm_shard.models.cache import Batch, Prefix, SequenceCache
from llm_shard.models.store import Store

from .stage import FREE, STEP, StageError, StageRunner

log = logging.getLogger("llm_shard.worker")

ERROR = "error"
_POLL_MS = 100


class Worker:
    """One stage of the pipeline on one node, within the budget it was given."""

    def __init__(self, store_path: str, *, threads: int, compute_dtype: str = "fp32",
                 wire_dtype: str = "bf16", host: str | None = None) -> None:
        # Ray sets OMP_NUM_THREADS to the actor's num_cpus; the budget says otherwise.
        torch.set_num_threads(int(threads))
        self.threads = int(threads)
        self.store = Store.open(store_path)
        self.dtype = wire.activation_dtype(compute_dtype)
        self.wire_dtype = wire.activation_dtype(wire_dtype)
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        if host is None:
            import ray

            host = ray.util.get_node_ip_address()
        port = self.pull.bind_to_random_port(f"tcp://{host}")
        self._address = f"tcp://{host}:{port}"
        self.next: zmq.Socket | None = None
        self.report: zmq.Socket | None = None
        self.runner: StageRunner | None = None
        self.epoch = -1
        self.malformed = 0
        self.last_error: str | None = None
        self.steps = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.loop = threading.Thread(target=self._loop, name="stage-loop", daemon=True)
        self.loop.start()

    # ------------------------------------------------------------------ control
    def info(self) -> dict:
        import ray

        return {"address": self._address, "pid": os.getpid(), "threads": self.threads,
                "node_id": ray.get_runtime_context().get_node_id()}

    def calibrate(self, repeats: int = 5) -> float:
        """Bytes of weights per second this worker computes from RAM: one real block of
        the model, one token at a time (what decoding does)."""
        block = self.store.load(Part("block", 0), self.dtype)
        x = torch.randn(1, self.store.config.hidden_size, dtype=self.dtype)

        def one_token():  # a fresh one-token sequence (a GLM prefix for ChatGLM's blocks)
            return Batch.of([1], [SequenceCache()], prefixes=[Prefix(1, 0)])

        with torch.inference_mode():
            block(x, one_token())  # warm up: first touch, kernel choice
            t0 = time.perf_counter()
            for _ in range(repeats):
                block(x, one_token())
            seconds = (time.perf_counter() - t0) / repeats
        return self.store.part_bytes(Part("block", 0)) / max(seconds, 1e-9)

    def configure(self, epoch: int, start: int | None = None, end: int | None = None, *,
                  cache_budget: int = 0, next_address: str | None = None,
                  result_address: str | None = None) -> dict:
        """Host blocks [start, end) (None: none) for `epoch`, sending on to next_address.
        Every cache is dropped: after a re-plan the coordinator replays its sequences."""
        with self.lock:
            self.epoch = epoch
            self.runner = None
            gc.collect()
            for sock in (self.next, self.report):
                if sock is not None:
                    sock.close(linger=0)
            self.next = self.report = None
            if start is None:
                return {"cache_budget": 0}
            self.runner = StageRunner(self.store, start, end, cache_budget=cache_budget,
                                      dtype=self.dtype, wire_dtype=self.wire_dtype)
            self.next = self._push(next_address)
            self.report = self._push(result_address)
            return {"cache_budget": self.runner.cache_budget}

    def stats(self) -> dict:
        with self.lock:
            r = self.runner
            return {"epoch": self.epoch, "steps": self.steps, "malformed": self.malformed,
                    "last_error": self.last_error,
                    "sequences": sorted(r.sequences) if r else [],
                    "blocks": [r.start, r.end] if r else None}

    def watch(self) -> None:
        """Returns only when the worker shuts down: the coordinator holds this call's
        result, which Ray fails the moment the actor dies."""
        self.stopping.wait()

    def shutdown(self) -> None:
        self.stopping.set()
        self.loop.join(timeout=5)
        with self.lock:
            self.runner = None
            for sock in (self.next, self.report, self.pull):
                if sock is not None:
                    sock.close(linger=0)
        self.ctx.term()

    # ------------------------------------------------------------------ transport
    def _push(self, address: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        return sock

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        while not self.stopping.is_set():
            try:
                if not poller.poll(_POLL_MS):
                    continue
                frames = self.pull.recv_multipart(copy=False)
            except zmq.ZMQError:
                if self.stopping.is_set():
                    return
                raise
            try:
                msg = wire.decode(frames)
            except wire.WireError as e:
                self._malformed(f"malformed message: {e}")
                continue
            with self.lock:
                self._handle(msg)

    def _malformed(self, why: str) -> None:
        self.malformed += 1
        self.last_error = why
        log.error("worker at %s dropped a %s", self._address, why)

    def _handle(self, msg: wire.Message) -> None:
        if msg.fields.get("epoch") != self.epoch or self.runner is None:
            return  # sent before a re-plan: its sequences are being replayed
        if msg.kind == FREE:
            self.runner.free(msg.fields.get("seqs", ()))
            if not self.runner.last:
                wire.send(self.next, wire.encode(FREE, msg.fields))
            return
        if msg.kind != STEP:
            self._malformed(f"message of unknown kind {msg.kind!r}")
            return
        try:
            kind, fields, tensors = self.runner.step(msg.fields, msg.tensors)
        except (StageError, KeyError, TypeError, ValueError) as e:
            self._malformed(f"step it cannot run: {e}")
            self._error(msg, e)
            return
        except Exception as e:  # a bug or an OOM: the coordinator fails these requests
            log.exception("stage [%s, %s) failed", self.runner.start, self.runner.end)
            self._error(msg, e)
            return
        self.steps += 1
        wire.send(self.next, wire.encode(kind, fields, tensors))

    def _error(self, msg: wire.Message, e: Exception) -> None:
        fields = {"epoch": self.epoch, "mb": msg.fields.get("mb"),
                  "error": f"{type(e).__name__}: {e}",
                  "blocks": [self.runner.start, self.runner.end]}
        try:
            wire.send(self.report, wire.encode(ERROR, fields))
        except (wire.WireError, zmq.ZMQError):
            log.exception("could not report an error to the coordinator")
