"""The Ray actor that hosts one pipeline stage: a thin shell around `StageRunner`.

Control (configure, calibrate, stats, free) comes as Ray actor calls; activations come and
go over ZeroMQ in a loop on its own thread: PULL from the previous stage (or the
coordinator), PUSH to the next stage (or, from the last, the coordinator's results
socket). Messages of an older epoch (sent before a re-plan) are dropped; a malformed one
is logged, counted and dropped, and the loop keeps serving.

All of a worker's torch compute runs on that one loop thread, control calls' too
(`_on_loop`): libgomp gives each thread that starts parallel work its own pool of
threads, and two pools on one small machine stop spinning between parallel regions,
which halves decode speed. That team is bound to CPUs (`cpu_offset`): thread i to the
i-th CPU from the worker's first, the loop thread with ZeroMQ's I/O thread to that
first one; an unbound team woken after its idle gap could share one CPU for
milliseconds. Each step says how many threads to compute it with (its share of the
machine, or all the machine's CPUs when no other stage there is busy: the scheduler
knows); the team is resized and bound again only when that count changes.

Ray starts it as `ray.remote(Worker)` so the dashboard and `ray list actors` say Worker.
"""

from __future__ import annotations

import ctypes
import gc
import glob
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future

import torch
import zmq

from llm_shard.cluster import links, ray_glue, transfer, wire
from llm_shard.cluster.messages import Error, Free, Step
from llm_shard.cluster.types import Tier
from llm_shard.cluster.wake import Wake
from llm_shard.models.base import Part, on_meta
from llm_shard.models.cache import Batch, Prefix, SequenceCache
from llm_shard.models.checkpoint.catalog import home
from llm_shard.models.checkpoint.store import Store, record_verified
from llm_shard.models.kernels import decode, w8a16

from .stage import StageError, StageRunner
from .tiers import Streamer, cold_read_seconds

log = logging.getLogger("llm_shard.worker")

# A bound on a worker's runtime: Python, torch, Ray, ZeroMQ and the model code of an idle
# worker (a test pins it). Each worker measures its own (info()["overhead"]), which its RAM
# budget pays first (docs/budgets.md): ~290 MiB at start, ~400 after its first compute,
# with torch 2.13 CPU and Ray 2.60.
WORKER_OVERHEAD = 512 * 2**20
# The share added to the runtime measured after calibrating: serving maps pages of torch's
# library that calibrating did not (docs/budgets.md).
RUNTIME_GROWTH = 0.05
_POLL_MS = 100
CALIBRATE_SECONDS = 0.3  # timing one block: at least this long (and `repeats` calls)


def _cache_bytes() -> int:
    """Twice the largest CPU cache this machine reports (32 MiB where it reports none)."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG") or 0) * scale)
    return 2 * max(sizes, default=16 * 2**20)


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so RSS shows what is in use."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def rss_bytes() -> int:
    """This process's resident set now, from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class Worker:
    """One stage of the pipeline on one node, within the budget it was given."""

    def __init__(self, store_path: str, *, threads: int, compute_dtype: str = "fp32",
                 wire_dtype: str = "bf16", host: str | None = None,
                 store_source: transfer.StoreSource | None = None,
                 link_keys: links.LinkKeys | None = None,
                 cpu_offset: int | None = None, kv_dtype: str = "fp16") -> None:
        # Ray sets OMP_NUM_THREADS to the actor's num_cpus; the budget says otherwise.
        torch.set_num_threads(int(threads))
        self.threads = int(threads)
        self.omp_env = ray_glue.worker_process_env()
        if not self.omp_env["applied"]:
            log.warning("torch was loaded in this worker process before llm_shard, so libgomp "
                        "keeps its own spin count, not GOMP_SPINCOUNT=%s: workers sharing a "
                        "machine may slow each other; export GOMP_SPINCOUNT in the "
                        "environment of `ray start`", self.omp_env["GOMP_SPINCOUNT"])
        allowed = os.sched_getaffinity(0)
        self.allowed, self.cpu_offset = sorted(allowed), cpu_offset
        self.cpus = self._cpus(self.threads)
        self.computing = self.threads  # the threads the team has now (a step may change it)
        self.steps_by_threads: dict[int, int] = {}
        if self.cpus:  # what this thread starts next (ZeroMQ's I/O thread, the loop) is
            os.sched_setaffinity(0, self.cpus[:1])  # bound to the loop's CPU
        # -- store transfer (cluster/transfer.py) ------------------------------------
        # With `store_source` (the coordinator's StoreServer), a node whose store root
        # ($LLM_SHARD_HOME) differs from the coordinator's keeps its own copy there; a
        # worker fetches the manifest now and each part's file before it loads it.
        self.store_source, self.store_path = store_source, store_path
        self.fetched: list[dict] = []  # FetchStats.to_dict() of each fetch that copied files
        if store_source is not None:
            transfer.log_to_stderr()
            self.store_path = str(transfer.local_store_path(store_path, store_source.home,
                                                            home()))
            self._fetch([])
        # -- end store transfer ------------------------------------------------------
        self.store = Store.open(self.store_path, kv_dtype=kv_dtype)  # its caches' dtype
        self.dtype = wire.activation_dtype(compute_dtype)
        self.wire_dtype = wire.activation_dtype(wire_dtype)
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.max_frame = wire.max_step_bytes(self.store.config.hidden_size)
        wire.limit_frames(self.pull, self.max_frame)
        if host is None:
            import ray

            host = ray.util.get_node_ip_address()
        # CURVE (cluster/links.py): only holders of the cluster's key reach the loop
        self.keys = link_keys
        self.guard = links.Guard(self.ctx, link_keys, f"worker pid {os.getpid()}")
        self.guard.server(self.pull)
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
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # (future, fn, args) for the loop
        self.wake = Wake()  # set: the loop leaves its poll to run a job
        self.loop = threading.Thread(target=self._loop, name="stage-loop", daemon=True)
        self.loop.start()
        if self.cpus:
            self._on_loop(self._bind, self.cpus)
            if self.cpus is None:  # binding failed: this thread is unbound too
                os.sched_setaffinity(0, allowed)
        with on_meta():  # import and initialise the model code: no weights
            self.store.arch.build(self.store.config, Part("embed"))
        self.baseline_rss = rss_bytes()  # Python, torch, Ray, ZeroMQ, model code: no weights
        self.overhead = self.baseline_rss  # and once calibrated, what computing added

    # -- store transfer (cluster/transfer.py) ----------------------------------------
    def _fetch(self, parts: list[Part]) -> None:
        """Fetch the manifest and the files of `parts` that this node's store lacks."""
        src = self.store_source
        if src is None:
            return
        stats = transfer.fetch(self.store_path, src.address, [p.file for p in parts],
                               manifest_sha256=src.manifest_sha256, keys=src.keys,
                               verified=record_verified)
        if stats.files:
            self.fetched.append(stats.to_dict())

    def _fetch_stage(self, start: int, end: int) -> None:
        n = self.store.n_blocks
        # a tied head reads its table from the embedding's file (store v2): both come
        head = [Part("head")] + [Part("embed")] * bool(self.store.tied) if end == n else []
        parts = ([Part("embed")] * (start == 0) + [Part("block", i) for i in range(start, end)]
                 + head)
        self._fetch(list(dict.fromkeys(parts)))
    # -- end store transfer ----------------------------------------------------------

    def _cpus(self, n: int) -> list[int] | None:
        """The CPUs a team of n threads binds to: n of those this process may use, from the
        worker's `cpu_offset` on (wrapping around); None to leave them unbound."""
        if self.cpu_offset is None:
            return None
        if n > len(self.allowed):
            log.warning("threads not bound to CPUs: %d threads on %d CPUs", n,
                        len(self.allowed))
            return None
        try:
            w8a16.load()  # binding runs in the kernel's library
        except (RuntimeError, OSError) as e:
            log.warning("threads not bound to CPUs: %s", e)
            return None
        return [self.allowed[(self.cpu_offset + i) % len(self.allowed)] for i in range(n)]

    def _compute_with(self, n: int) -> None:
        """On the loop thread: compute with n threads from now, bound to n CPUs from the
        worker's first (its own share, or more of the machine's) where its threads are
        bound. Resizes and binds the team only when n changes."""
        if n == self.computing:
            return
        cpus = self._cpus(n) if self.cpus else None
        if cpus:
            self._bind(cpus)
        else:
            torch.set_num_threads(n)
        self.computing = n

    def _bind(self, cpus: list[int]) -> None:
        """On the loop thread: a team of len(cpus) threads, thread i bound to cpus[i]; where
        that fails, unbound (self.cpus None) rather than not at all."""
        try:
            w8a16.pin_threads(cpus)
        except OSError as e:
            log.warning("threads not bound to CPUs: %s", e)
            os.sched_setaffinity(0, self.allowed)
            torch.set_num_threads(len(cpus))
            self.cpus = None

    # ------------------------------------------------------------------ control
    def info(self) -> dict:
        import ray

        return {"address": self._address, "pid": os.getpid(), "threads": self.threads,
                "cpus": self.cpus, "machine_cpus": len(self.allowed),
                "baseline_rss": self.baseline_rss, "overhead": self.overhead,
                "omp_env": self.omp_env,
                "node_id": ray.get_runtime_context().get_node_id()}

    def calibrate(self, repeats: int = 5, stream: bool = False) -> dict[str, float]:
        """Bytes of weights per second, per tier this worker can use: "ram" from one real
        block of the model run one token at a time (what decoding does), its weights out of
        the CPU caches; "disk" that block streamed through a staging buffer as a disk block
        runs (prefetch overlaps reading and computing), no faster than a cold read of its
        file;
        "gpu" the same block on the GPU, where there is one. With `stream` (a GPU budget:
        the planner's streams_to_gpu) on a GPU, "ram" is that block streamed from pinned
        RAM to the GPU and run there, as such a worker runs its RAM and disk blocks."""
        part = Part("block", 0)
        self._fetch([part])  # store transfer
        speeds = self._on_loop(self._calibrate, part, repeats, stream)
        self.overhead = self._on_loop(self._settled_rss)
        return speeds

    def _settled_rss(self) -> int:
        """The resident set once calibration's tensors are freed: the runtime with its
        compute libraries and thread pools warm (the budget's overhead), and RUNTIME_GROWTH
        more for the pages of torch's library that serving maps later."""
        gc.collect()
        _malloc_trim()
        return int(max(self.baseline_rss, rss_bytes()) * (1 + RUNTIME_GROWTH))

    def _calibrate(self, part: Part, repeats: int, stream: bool) -> dict[str, float]:
        size = self.store.part_bytes(part)
        speeds = {"ram": size / self._time_block(self.store.load(part, self.dtype), repeats)}
        if torch.cuda.is_available():
            block = self.store.load(part, self.dtype, "cuda")
            speeds["gpu"] = size / self._time_block(block, repeats, "cuda")
            if stream:
                streamer = Streamer.from_store(self.store, [part.index], self.dtype,
                                               held=[part.index], device="cuda")
                try:
                    speeds["ram"] = size / self._time_block(
                        lambda x, batch: streamer.run(part.index, x, batch), repeats, "cuda")
                finally:
                    streamer.close()
        cold = cold_read_seconds(self.store._checked(part.file))
        # a disk block as decode runs it: read into a staging buffer while the previous
        # one computes, with the streaming kernel (no packed copy); no faster than a cold
        # read of its file (the page cache may hold it here, not on a node short of RAM)
        streamed = cold
        if not stream:
            streamer = Streamer.from_store(self.store, [part.index], self.dtype)
            try:
                streamed = self._time_block(
                    lambda x, batch: streamer.run(part.index, x, batch), repeats)
            finally:
                streamer.close()
        speeds["disk"] = min(speeds["ram"], size / max(cold, streamed, 1e-9))
        return speeds

    def _time_block(self, block, repeats: int, device: str = "cpu") -> float:
        """Seconds of one decode step of `block` as a decode streams it: with its weights
        out of the CPU caches (a block is read once per token, and a model's blocks
        together outgrow the caches), the median of at least `repeats` calls and
        CALIBRATE_SECONDS. One block timed over and over from a warm cache would read
        several times faster than decoding does."""
        x = torch.randn(1, self.store.config.hidden_size, dtype=self.dtype, device=device)
        evict = torch.ones(_cache_bytes() // 4) if device == "cpu" else None

        def one_token():  # a fresh one-token sequence (a GLM prefix for ChatGLM's blocks)
            return Batch.of([1], [SequenceCache()], prefixes=[Prefix(1, 0)])

        def timed() -> float:
            if evict is not None:
                evict.add_(1.0)  # touches 2x the last-level cache: the block is out of it
            t0 = time.perf_counter()
            decode.run_block(block, x, one_token())
            if device != "cpu":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        with torch.inference_mode():
            for _ in range(3):  # warm up: first touch, kernel choice, thread pools
                timed()
            times, t_end = [], time.perf_counter() + CALIBRATE_SECONDS
            while len(times) < repeats or (time.perf_counter() < t_end and len(times) < 1000):
                times.append(timed())
        times.sort()
        return max(times[len(times) // 2], 1e-9)

    def configure(self, epoch: int, start: int | None = None, end: int | None = None, *,
                  tiers: list[str] | None = None, cache_budget: int = 0,
                  next_address: str | None = None, result_address: str | None = None,
                  stream_to: str | None = None) -> dict:
        """Host blocks [start, end) (None: none) in `tiers` for `epoch`, sending on to
        next_address; with `stream_to` (a device), every block computes there, RAM and disk
        blocks streamed. Every cache is dropped: after a re-plan the coordinator replays
        its sequences."""
        if start is not None:  # store transfer: fetch missing files first, outside the lock
            self._fetch_stage(start, end)
        return self._on_loop(self._configure, epoch, start, end, tiers, cache_budget,
                             next_address, result_address, stream_to)

    def _configure(self, epoch: int, start: int | None, end: int | None,
                   tiers: list[str] | None, cache_budget: int, next_address: str | None,
                   result_address: str | None, stream_to: str | None) -> dict:
        with self.lock:
            self.epoch = epoch
            if self.runner is not None:
                self.runner.close()
            self.runner = None
            gc.collect()
            for sock in (self.next, self.report):
                if sock is not None:
                    sock.close(linger=0)
            self.next = self.report = None
            if start is None:
                return {"cache_budget": 0}
            self.runner = StageRunner(self.store, start, end, cache_budget=cache_budget,
                                      dtype=self.dtype, wire_dtype=self.wire_dtype,
                                      tiers=[Tier(t) for t in tiers] if tiers else None,
                                      stream_to=stream_to)
            self.next = self._push(next_address)
            self.report = self._push(result_address)
            return {"cache_budget": self.runner.cache_budget, "rss": rss_bytes()}

    def stats(self) -> dict:
        with self.lock:
            r = self.runner
            streamer = r.blocks.streamer if r else None
            return {"epoch": self.epoch, "steps": self.steps, "malformed": self.malformed,
                    "threads": self.computing, "steps_by_threads": dict(self.steps_by_threads),
                    "refused_connections": self.guard.refused,
                    "last_error": self.last_error,
                    "sequences": sorted(r.sequences) if r else [],
                    "blocks": [r.start, r.end] if r else None,
                    "bytes_by_tier": r.blocks.bytes_by_tier(self.store) if r else {},
                    "staging_bytes": streamer.staging_bytes if streamer else 0,
                    "swap_bytes_read": streamer.bytes_read if streamer else 0,
                    "swap_read_seconds": streamer.read_seconds if streamer else 0.0,
                    "gpu_stream_bytes": (streamer.bytes_copied
                                         if streamer and streamer.cuda else 0),
                    "rss": rss_bytes(), "peak_rss": peak_rss_bytes(),
                    "store_path": self.store_path, "fetched": self.fetched}  # store transfer

    def watch(self) -> None:
        """Returns only when the worker shuts down: the coordinator holds this call's
        result, which Ray fails the moment the actor dies."""
        self.stopping.wait()

    def shutdown(self) -> None:
        self.stopping.set()
        self.wake.set()
        self.loop.join(timeout=5)
        with self.lock:
            self.runner = None
            for sock in (self.next, self.report, self.pull):
                if sock is not None:
                    sock.close(linger=0)
        self.guard.close()
        self.ctx.term()
        if not self.loop.is_alive():
            self.wake.close()

    # ------------------------------------------------------------------ transport
    def _push(self, address: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        wire.limit_frames(sock, self.max_frame)
        links.client(sock, self.keys)
        sock.connect(address)
        return sock

    def _on_loop(self, fn, *args):
        """fn(*args) run on the loop thread (the worker's one compute thread); its result
        or its exception, here."""
        if threading.current_thread() is self.loop:
            return fn(*args)
        if self.stopping.is_set():
            raise RuntimeError("the worker is shutting down")
        future: Future = Future()
        self._jobs.put((future, fn, args))
        self.wake.set()
        if self.stopping.is_set():  # the loop may have drained its jobs before this one
            self._run_jobs()  # fails it (and any other left) rather than wait forever
        return future.result()

    def _run_jobs(self) -> None:
        while True:
            try:
                future, fn, args = self._jobs.get_nowait()
            except queue.Empty:
                return
            if self.stopping.is_set():
                future.set_exception(RuntimeError("the worker is shutting down"))
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                future.set_exception(e)

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        poller.register(self.wake.fd, zmq.POLLIN)
        try:
            self._serve(poller)
        finally:
            self.stopping.set()
            self._run_jobs()  # fails what is left: nothing waits forever

    def _serve(self, poller: zmq.Poller) -> None:
        while not self.stopping.is_set():
            try:
                events = dict(poller.poll(_POLL_MS))
                if self.wake.fd in events:
                    self.wake.clear()
                    self._run_jobs()
                if self.pull not in events:
                    continue
                frames = self.pull.recv_multipart(copy=False)
                received = time.perf_counter()
            except zmq.ZMQError:
                if self.stopping.is_set():
                    return
                raise
            try:
                msg = wire.decode(frames)
            except wire.WireError as e:
                self._malformed(f"malformed message: {e}")
                continue
            try:
                with self.lock:
                    self._handle(msg, received)
            except Exception as e:  # noqa: BLE001 - one bad message never ends the loop
                log.exception("worker at %s failed to handle a %s message", self._address,
                              msg.KIND)
                self._malformed(f"{msg.KIND} message it could not handle: {e}")

    def _malformed(self, why: str) -> None:
        self.malformed += 1
        self.last_error = why
        log.error("worker at %s dropped a %s", self._address, why)

    def _handle(self, msg, received: float) -> None:
        """Run a step (or free caches) and send it on; the step gains `busy_ms`, how long
        this worker held it, from receiving it to sending it on: with the round trip, the
        coordinator tells the wire's share (Scheduler.wire_seconds)."""
        if msg.epoch != self.epoch or self.runner is None:
            return  # sent before a re-plan: its sequences are being replayed
        if isinstance(msg, Free):
            self.runner.free(msg.seqs, msg.everything)
            if not self.runner.last:
                wire.send(self.next, msg)
            return
        if not isinstance(msg, Step):
            self._malformed(f"{msg.KIND} message, which no stage runs")
            return
        # never more threads than this process may use: a count from a hostile or
        # misconfigured peer (Ray told of more CPUs than there are) would exhaust memory
        threads = min(msg.threads.get(self.runner.start, self.computing), len(self.allowed))
        try:
            self._compute_with(threads)
            out = self.runner.step(msg, received)
        except (StageError, KeyError, TypeError, ValueError) as e:
            self._malformed(f"step it cannot run: {e}")
            self._error(msg, e)
            return
        except Exception as e:  # a bug or an OOM: the coordinator fails these requests
            log.exception("stage [%s, %s) failed", self.runner.start, self.runner.end)
            self._error(msg, e)
            return
        self.steps += 1
        self.steps_by_threads[threads] = self.steps_by_threads.get(threads, 0) + 1
        wire.send(self.next, out)

    def _error(self, msg: Step, e: Exception) -> None:
        err = Error(self.epoch, msg.mb, f"{type(e).__name__}: {e}",
                    (self.runner.start, self.runner.end))
        try:
            wire.send(self.report, err)
        except (wire.WireError, zmq.ZMQError):
            log.exception("could not report an error to the coordinator")
