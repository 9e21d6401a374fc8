"""The scheduler: continuous batching over a pipeline of stages, and recovery.

One thread owns the ZeroMQ sockets: a PUSH to stage 0 and a PULL where the last stage
sends sampled tokens. Running sequences are spread over `micro_batches` groups (one per
stage by default), each group is at most one step in flight, so with S stages S groups
keep every stage busy. A request joins the emptiest idle group at its next step (its
prompt as prefill rows beside the others' decode rows) and leaves when it finishes,
its caches freed by the group's next message, or kept for the prefix cache.

Prefix cache (coordinator/prefix.py): a finished sequence's caches stay on every stage,
within the cache budget, and a new prompt that starts with the same tokens starts from a
copy of them (its first step's `reuse`), prefilling the rest; entries are freed least
recently used first when a new sequence needs the room. Its reused rows have the bits of
the row-by-row path (decode; prefills up to layers.ROW_BY_ROW_ROWS rows), which a longer
whole prefill (SDPA) does not give: greedy output may then differ at a near-tie.

Threads: with one micro-batch in flight only one stage computes at a time, so a stage
that shares its machine with others computes on all of the machine's CPUs; with several
in flight, co-located stages keep their own shares (`step_threads`, a step's `threads`).

Recovery: a worker's death (its Ray `watch` call fails) or a step that does not come
back within `step_timeout` makes the pipeline replace the lost workers and re-plan;
every running sequence is then replayed and goes on. A replay repeats the steps that
built the sequence's caches, in their shapes: its prompt as one prefill, then each token
generated so far as one decode row, the samples of those steps dropped (a step whose
`steps` index is below the tokens already generated). The int8 kernels give a row the
same bits whatever its company (models/quant.py, batch invariance), but attention and
BLAS over 1 query row and over n rows do not sum in the same order, and bf16 rounding of
activations can turn that 1e-7 into a different token at a near-tie: so a replay that
prefilled prompt + generated in one step would not be exact, and this one is, at the
cost of one pipeline step per token generated so far. Sampling draws depend only on
(seed, step), and every request gets a seed, so replayed output is the same as
undisturbed output.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import torch
import zmq

from llm_shard.cluster import links, wire
from llm_shard.cluster.messages import MAX_STEP_ROWS, Error, Free, Result, Step
from llm_shard.cluster.types import Completion, SamplingParams, sequence_bytes
from llm_shard.cluster.wake import Wake
from llm_shard.models.text.sampling import finish_reason, truncate_at_stop
from llm_shard.models.text.tokenizer import StreamDecoder, Tokenizer

from .pipeline import Pipeline, StageCores
from .planner import PlanError
from .prefix import prefix_index, prefix_metrics

log = logging.getLogger("llm_shard.coordinator")


class RequestError(RuntimeError):
    """A request that cannot be served (too long for the cache, or no plan fits)."""


@dataclass
class Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    decoder: StreamDecoder | None  # None: a store with no tokenizer (ids only, no text)
    future: Future
    on_text: Callable[[str], None] | None = None
    generated: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    text: str = ""
    sent_chars: int = 0  # text handed to on_text so far
    group: int | None = None
    fresh: bool = True  # its next step is a prefill of its prompt (new or replayed)
    fed: int = 0  # tokens of `generated` whose K/V the caches hold (fed as decode rows)
    sent_step: int = 0  # the `steps` index of its step in flight: < len(generated): replay
    reserved: int = 0  # cache bytes per block (types.sequence_bytes)
    waited: bool = False  # it waited in the queue for cache room
    request: object = None  # the request it belongs to (WaitQueue's turns); None: itself
    reuse: tuple[int, int] | None = None  # its first step starts from (entry, rows), pinned

    def __post_init__(self) -> None:
        if self.request is None:
            self.request = self.future


class WaitQueue:
    """Sequences waiting to run, taken fairly between requests: round-robin, one sequence
    of each request in turn (in submit order within a request), so a batch of thousands
    cannot starve a small request submitted after it."""

    def __init__(self) -> None:
        self.requests: dict[object, deque[Sequence]] = {}  # in turn order
        self.count = 0  # kept, not summed: metrics() reads it from other threads

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return bool(self.requests)

    def __iter__(self):
        return (seq for q in list(self.requests.values()) for seq in list(q))

    def append(self, seq: Sequence) -> None:
        self.requests.setdefault(seq.request, deque()).append(seq)
        self.count += 1

    def appendleft(self, seq: Sequence) -> None:
        """Requeue (a rejected or displaced sequence): first of its request, whose turn
        is next."""
        q = self.requests.pop(seq.request, deque())
        q.appendleft(seq)
        self.requests = {seq.request: q, **self.requests}
        self.count += 1

    def peek(self) -> Sequence:
        return self.requests[next(iter(self.requests))][0]

    def popleft(self) -> Sequence:
        """The next sequence; its request goes to the back of the turn."""
        key = next(iter(self.requests))
        q = self.requests.pop(key)
        seq = q.popleft()
        if q:
            self.requests[key] = q
        self.count -= 1
        return seq

    def remove(self, seq: Sequence) -> None:
        q = self.requests[seq.request]
        q.remove(seq)
        self.count -= 1
        if not q:
            del self.requests[seq.request]

    def clear(self) -> None:
        self.requests.clear()
        self.count = 0


@dataclass
class Group:
    """A micro-batch: sequences stepped together, at most one step in flight."""

    id: int
    seqs: list[int] = field(default_factory=list)
    in_flight: list[int] | None = None  # sequences of the step in flight
    sent_at: float = 0.0
    free: list[int] = field(default_factory=list)  # to free with the next message


# How often the loop asks Ray whether a worker died: ray.wait costs ~0.2 ms (measured
# here), ~1% of SmolLM2's decode when asked between every two steps, as it was.
_WATCH_SECONDS = 0.05
# How long the loop waits for a result before it looks for dead workers and late steps,
# with sequences running and without; a submit or cancel wakes it at once (its pipe).
BUSY_POLL_MS, IDLE_POLL_MS = 20, 50
_EMA = 0.2  # weight of the newest step in the moving averages of step times
# Loop iterations failing in a row after which the scheduler gives up (a bug that repeats):
# every request fails from then on and /health says why.
_FAILURES_IN_A_ROW = 5


def _average(old: float | None, new: float) -> float:
    """The moving average `old` (None: no sample yet) updated with `new`. A sample of 0.0
    (a wire share of nothing) is a sample, not a restart."""
    return new if old is None else old + _EMA * (new - old)


def _averages(old: list[float], new_ms: list[float] | None) -> list[float]:
    """Per-stage moving averages (seconds) updated with a step's milliseconds; restarted
    when the number of stages changes (a re-plan)."""
    new = [m / 1e3 for m in new_ms or ()]
    return new if len(old) != len(new) else [_average(o, n) for o, n in zip(old, new)]


def step_threads(stages: list[StageCores], in_flight: int) -> dict[int, int]:
    """{first block of each stage: threads it computes a step with} while `in_flight`
    micro-batches are in flight. The stages of a machine that may be busy at once (as many
    as are in flight, at most as many as it hosts) keep their own shares of its CPUs; the
    only one there computes on all of them. A SPEC's threads= stays as given."""
    hosted = Counter(s.machine for s in stages)
    return {s.start: s.share if s.fixed or min(in_flight, hosted[s.machine]) > 1
            else s.machine_cpus for s in stages}


class Scheduler:
    def __init__(self, pipeline: Pipeline, tokenizer: Tokenizer | None, results: zmq.Socket, *,
                 micro_batches: int | None = None, max_len: int | None,
                 step_timeout: float = 120.0, max_running: int = 256,
                 prefix_cache: bool = True) -> None:
        """`max_running`: the most sequences generated at once (the rest wait their turn,
        WaitQueue). `prefix_cache`: keep finished sequences' caches for prompts that
        start the same (off where the architecture's caches cannot be reused: logged)."""
        self.pipeline, self.tok, self.results = pipeline, tokenizer, results
        self.max_len, self.step_timeout, self.max_running = max_len, step_timeout, max_running
        self.n_groups = micro_batches or len(pipeline.plan.stages)
        self.eos = tuple(tokenizer.eos_ids) if tokenizer is not None else ()
        self.inbox: queue.Queue = queue.Queue()
        self.wake = Wake()  # set when the inbox gains an item: the loop's poll returns
        self.waiting = WaitQueue()
        self.running: dict[int, Sequence] = {}
        self.groups = [Group(i) for i in range(self.n_groups)]
        self.ids = 0
        self.failed: str | None = None  # set when no plan fits: every request fails
        self.failures = 0  # loop failures (each failed the requests in flight, freed caches)
        self.last_failure: str | None = None
        self.tokens_total = 0
        self.finished_total: dict[str, int] = {}
        # Moving averages of a step's time: its round trip through every stage; per stage,
        # its compute, and how long the worker held it (compute, decoding, cache
        # bookkeeping, sampling); the rest of the round trip is the wire's: every hop's
        # ZeroMQ and network time, the coordinator's receive and, with several micro-batches
        # in flight, the time a step queues for a stage busy with another. Each worker times
        # itself, so machines' clocks need not agree.
        self.step_seconds: float | None = None  # moving averages; None: no step yet
        self.stage_seconds: list[float] = []
        self.busy_seconds: list[float] = []
        self.wire_seconds: float | None = None
        self.recoveries = 0
        self.cache_waits = 0  # sequences that waited for cache room
        self.watched_at = 0.0  # monotonic time of the last look for dead workers
        self.prefix = prefix_index(pipeline.store, prefix_cache)
        self.stopping = threading.Event()
        self.push = self._connect(pipeline.first_address)
        self.thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ API
    def submit(self, prompt: list[int], params: SamplingParams,
               on_text: Callable[[str], None] | None = None, request: object = None) -> Future:
        """Queue one prompt; the Future gives its Completion (or raises RequestError).
        `on_text` receives text pieces as they are generated (from the scheduler thread).
        Prompts submitted with the same `request` (any hashable: a batch's prompts) take
        turns with other requests as one (None: a request of its own)."""
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        if self.stopping.is_set():
            raise RequestError("the LLM was shut down")
        vocab = self.pipeline.store.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if len(prompt) > MAX_STEP_ROWS:
            raise ValueError(f"a prompt of {len(prompt)} tokens is over the {MAX_STEP_ROWS} "
                             "one step carries")
        if self.max_len is not None and len(prompt) + params.max_tokens > self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} "
                             f"is longer than the model's {self.max_len}-token context")
        if params.seed is None and not params.greedy:  # a seed makes a replay draw the same
            params = replace(params, seed=secrets.randbits(63))
        future: Future = Future()
        self.inbox.put((list(prompt), params, on_text, request, future))
        self.wake.set()
        return future

    def cancel(self, future: Future) -> None:
        """Stop a request (a client went away): it leaves its group, its caches are freed
        with the group's next message, and its Future is cancelled."""
        self.inbox.put(("cancel", future))
        self.wake.set()

    def metrics(self) -> dict:
        """Counters and gauges for /metrics (read from any thread; approximate)."""
        return {"requests_total": self.ids, "tokens_total": self.tokens_total,
                "finished_total": dict(self.finished_total), "waiting": len(self.waiting),
                "running": len(self.running), "recoveries_total": self.recoveries,
                "cache_waits_total": self.cache_waits,
                "scheduler_failures_total": self.failures,
                "step_seconds": self.step_seconds or 0.0,
                "stage_seconds": list(self.stage_seconds),
                "busy_seconds": list(self.busy_seconds),
                "wire_seconds": self.wire_seconds or 0.0, **prefix_metrics(self.prefix)}

    def close(self) -> None:
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout=10)
        self.push.close(linger=0)
        if not self.thread.is_alive():
            self.wake.close()

    # ------------------------------------------------------------------ loop
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.results, zmq.POLLIN)
        poller.register(self.wake.fd, zmq.POLLIN)
        in_a_row = 0
        while not self.stopping.is_set():
            if self.failed:  # every request fails: only answer new ones
                self._take_new()
                self.stopping.wait(0.05)
                continue
            try:
                self._take_new()
                self._admit()
                self._send_steps()
                ready = dict(poller.poll(BUSY_POLL_MS if self.running else IDLE_POLL_MS))
                if self.wake.fd in ready:
                    self.wake.clear()
                if self.results in ready:
                    self._receive()
                self._watch()
                in_a_row = 0
            except Exception as e:  # never let a bug hang every request
                log.exception("scheduler failed")
                why = f"scheduler failed: {type(e).__name__}: {e}"
                self.failures, self.last_failure, in_a_row = self.failures + 1, why, in_a_row + 1
                if in_a_row >= _FAILURES_IN_A_ROW:
                    self.failed = f"{why} ({in_a_row} times in a row)"
                self._fail_all(why)
                self._free_everything()
        self._fail_all("the LLM was shut down")

    def _take_new(self) -> None:
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "cancel":
                self._cancel(item[1])
                continue
            prompt, params, on_text, request, future = item
            if self.failed:
                future.set_exception(RequestError(self.failed))
                continue
            self.ids += 1
            decoder = StreamDecoder(self.tok) if self.tok is not None else None
            seq = Sequence(self.ids, prompt, params, decoder, future, on_text,
                           request=request)
            seq.reserved = sequence_bytes(self.pipeline.store.config,
                                          len(prompt) + params.max_tokens)
            self.waiting.append(seq)

    def _admit(self) -> None:
        """Move waiting sequences into groups, one request's in turn (WaitQueue), while every
        stage's cache has room and fewer than max_running run."""
        capacity = self.pipeline.cache_capacity
        used = sum(s.reserved for s in self.running.values())
        used += self.prefix.nbytes if self.prefix is not None else 0
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting.peek()
            if seq.reserved > capacity:
                self.waiting.popleft()
                self._finish_error(seq, f"the request needs {seq.reserved} cache bytes per "
                                   f"block (prompt {len(seq.prompt)} + max_tokens "
                                   f"{seq.params.max_tokens}) but the stages hold {capacity}: "
                                   "ask for fewer tokens or give the workers more cache")
                continue
            reuse = self.prefix.match(seq.prompt) if self.prefix is not None else None
            if used + seq.reserved > capacity:
                used -= self._evict(used + seq.reserved - capacity)
            idle = [g for g in self.groups if g.in_flight is None]
            group = min(idle or self.groups, key=lambda g: len(g.seqs))
            rows = len(seq.prompt) - (reuse[1] if reuse else 0)
            if used + seq.reserved > capacity or self._rows(group) + rows > MAX_STEP_ROWS:
                if reuse:
                    self.prefix.unpin(reuse[0])
                if used + seq.reserved > capacity and not seq.waited:
                    seq.waited, self.cache_waits = True, self.cache_waits + 1
                return  # waits for a running sequence to finish, or the group's next step
            self.waiting.popleft()
            group.seqs.append(seq.id)
            seq.group, seq.fresh, seq.reuse = group.id, True, reuse
            self.running[seq.id] = seq
            used += seq.reserved

    def _rows(self, g: Group) -> int:
        """The rows of group g's next step: a fresh sequence's prompt (less the rows it
        reuses), one for the others."""
        return sum(len(s.prompt) - (s.reuse[1] if s.reuse else 0) if s.fresh else 1
                   for s in map(self.running.get, g.seqs))

    def _evict(self, need: int) -> int:
        """Free at least `need` bytes of retained prefixes where there are (least recently
        used first; their Free reaches every stage before any later step); returns the
        bytes freed."""
        if self.prefix is None:
            return 0
        held = self.prefix.nbytes
        gone = self.prefix.evict(need)
        if gone:
            wire.send(self.push, Free(self.pipeline.epoch, gone))
        return held - self.prefix.nbytes

    def _retain(self, seq: Sequence) -> bool:
        """Keep finished seq's caches for the prefix cache (False: the cache is off)."""
        if self.prefix is None:
            return False
        tokens = seq.prompt + seq.generated[:seq.fed]  # the last token was never fed
        cfg = self.pipeline.store.config
        dropped = self.prefix.retain(seq.id, tokens, sequence_bytes(cfg, len(tokens)))
        if dropped:
            wire.send(self.push, Free(self.pipeline.epoch, dropped))
        return True

    def _send_steps(self) -> None:
        epoch = self.pipeline.epoch
        ready = [g for g in self.groups if g.in_flight is None and g.seqs]
        busy = len(ready) + sum(g.in_flight is not None for g in self.groups)
        threads = step_threads(self.pipeline.stage_cores, busy)
        for g in self.groups:
            if g.in_flight is None and not g.seqs and g.free:
                wire.send(self.push, Free(epoch, g.free))
                g.free = []
        for g in ready:
            try:
                frames = wire.encode(self._step(g, g.seqs, threads))
            except (wire.WireError, ValueError) as e:
                self._fail_unsendable(g, e)
                continue
            for i in g.seqs:
                s = self.running[i]
                if s.fresh:  # the prompt (a replay feeds the generated tokens one by one)
                    s.fed, s.fresh = 0, False
                    if s.reuse:  # every stage copies the entry before it reads a later Free
                        self.prefix.sent(*s.reuse)
                        s.reuse = None
                else:
                    s.fed += 1
                s.sent_step = s.fed  # this step samples token number s.fed
            sent_at = time.monotonic()  # before the send: a stage may hold it at once
            self.push.send_multipart(frames, copy=False)
            g.in_flight, g.sent_at, g.free = list(g.seqs), sent_at, []

    def _step(self, g: Group, seqs: list[int], threads: dict[int, int]) -> Step:
        """Group g's next step for `seqs` (its sequences are changed only once it is sent)."""
        ids, lens, reset, params, steps, reuse = [], [], [], {}, [], {}
        for i in seqs:
            s = self.running[i]
            if s.fresh:  # the prompt (a replay feeds the generated tokens one by one)
                rows, fed = s.prompt[s.reuse[1]:] if s.reuse else s.prompt, 0
                reset.append(i)
                params[i] = s.params
                if s.reuse:
                    reuse[i] = s.reuse
            else:
                rows, fed = s.generated[s.fed:s.fed + 1], s.fed + 1
            ids += rows
            lens.append(len(rows))
            steps.append(fed)
        return Step(self.pipeline.epoch, g.id, seqs, lens, steps, torch.tensor(ids),
                    reset=reset, params=params, free=g.free, reuse=reuse, threads=threads)

    def _fail_unsendable(self, g: Group, e: Exception) -> None:
        """A step that cannot be built or encoded fails the sequences that make it so (each
        tried alone), never the rest of the group or other requests."""
        bad = []
        for i in g.seqs:
            try:
                wire.encode(self._step(g, [i], {}))
            except (wire.WireError, ValueError) as alone:
                bad.append((i, alone))
        if not bad:  # no one sequence is the cause: the group's step as a whole is
            bad = [(i, e) for i in g.seqs]
        for i, why in bad:
            log.error("sequence %d failed: its step cannot be sent: %s", i, why)
            seq = self.running.pop(i)
            self._drop(seq, free=True)
            self._finish_error(seq, f"its step cannot be sent: {why}")

    def _receive(self) -> None:
        while True:
            try:
                frames = self.results.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = wire.decode(frames)
            except wire.WireError as e:
                log.error("coordinator dropped a malformed result: %s", e)
                continue
            if msg.epoch != self.pipeline.epoch:
                continue  # from before a re-plan
            if not isinstance(msg, (Result, Error)):
                log.error("coordinator got a %r message on its results socket", msg.KIND)
                continue
            if msg.mb >= len(self.groups):
                log.error("result names micro-batch %r, not one of ours", msg.mb)
                continue
            g = self.groups[msg.mb]
            if g.in_flight is None:
                continue
            stepped, g.in_flight = g.in_flight, None
            if isinstance(msg, Error):
                for i in stepped:
                    if i in self.running:
                        self._drop(self.running[i], free=True)
                        self._finish_error(self.running.pop(i), "worker holding blocks "
                                           f"{list(msg.blocks)} failed the step: {msg.error}")
                continue
            self._apply(g, msg)

    def _apply(self, g: Group, r: Result) -> None:
        step = time.monotonic() - g.sent_at
        self.step_seconds = _average(self.step_seconds, step)
        self.stage_seconds = _averages(self.stage_seconds, r.stage_ms)
        self.busy_seconds = _averages(self.busy_seconds, r.busy_ms)
        if len(r.busy_ms) == len(self.pipeline.plan.stages):
            self.wire_seconds = _average(self.wire_seconds,
                                         max(0.0, step - sum(r.busy_ms) / 1e3))
        others = len(self.running.keys() - r.rejected.keys())
        for key, why in r.rejected.items():
            seq = self.running.pop(key, None)
            if seq is None:
                continue
            if not others:  # no other sequence holds the room: it would never fit
                self._drop(seq, free=True)
                self._finish_error(seq, f"a stage rejected it with no other request running: "
                                   f"{why}")
                log.error("sequence %s failed: rejected with nothing else running: %s",
                          key, why)
                continue
            log.warning("sequence %s requeued: %s", key, why)
            self._drop(seq, free=True)
            seq.fresh = True
            self.waiting.appendleft(seq)
        for i, token, lp, top in zip(r.seqs, r.sampled, r.logprobs, r.top):
            seq = self.running.get(i)
            if seq is None:
                continue
            if seq.sent_step < len(seq.generated):  # a replayed step: the token is known
                if token != seq.generated[seq.sent_step]:
                    log.warning("sequence %d: replayed step %d sampled %d, not %d as before "
                                "the failure; keeping %d", i, seq.sent_step, token,
                                seq.generated[seq.sent_step], seq.generated[seq.sent_step])
                continue
            seq.generated.append(token)
            self.tokens_total += 1
            if seq.params.logprobs is not None:
                step = {int(t): float(v) for t, v in (top or [])}
                step[token] = float(lp)
                seq.logprobs.append(step)
            piece = seq.decoder.push(token) if seq.decoder else ""
            reason = finish_reason(token, seq.text + piece, seq.params, self.eos,
                                   len(seq.generated))
            if reason is None:
                seq.text += piece
                self._emit(seq, final=False)
                continue
            stopped_by_id = token in seq.params.stop_token_ids or (
                token in self.eos and not seq.params.ignore_eos)
            if reason == "stop" and not stopped_by_id:
                seq.text = truncate_at_stop(seq.text + piece, seq.params.stop)
            elif not stopped_by_id:
                seq.text += piece + (seq.decoder.flush() if seq.decoder else "")
            self._emit(seq, final=True)
            self.running.pop(i)
            self._drop(seq, free=not self._retain(seq))
            self._count(seq, reason)
            seq.future.set_result(Completion(
                text=seq.text, token_ids=list(seq.generated), prompt_token_ids=seq.prompt,
                finish_reason=reason,
                logprobs=seq.logprobs if seq.params.logprobs is not None else None))

    def _emit(self, seq: Sequence, final: bool) -> None:
        """Hand new text to the listener, holding back what may yet become a stop string."""
        if seq.on_text is None:
            return
        hold = 0 if final else max((len(s) - 1 for s in seq.params.stop), default=0)
        upto = max(seq.sent_chars, len(seq.text) - hold)
        if upto > seq.sent_chars:
            piece, seq.sent_chars = seq.text[seq.sent_chars:upto], upto
            try:
                seq.on_text(piece)
            except Exception:
                log.exception("on_text listener of sequence %d failed", seq.id)

    def _cancel(self, future: Future) -> None:
        for seq in list(self.running.values()) + list(self.waiting):
            if seq.future is future:
                if seq.id in self.running:
                    self.running.pop(seq.id)
                    self._drop(seq, free=True)
                else:
                    self.waiting.remove(seq)
                self._count(seq, "cancelled")
                future.cancel()
                return

    def _count(self, seq: Sequence, reason: str) -> None:
        self.finished_total[reason] = self.finished_total.get(reason, 0) + 1

    def _drop(self, seq: Sequence, free: bool) -> None:
        """Take seq out of its group (and free its caches with the group's next message)."""
        if seq.reuse is not None:  # admitted, its first step unsent: the entry may go
            self.prefix.unpin(seq.reuse[0])
            seq.reuse = None
        if seq.group is None:
            return
        g = self.groups[seq.group]
        if seq.id in g.seqs:
            g.seqs.remove(seq.id)
        if free:
            g.free.append(seq.id)
        seq.group = None

    def _finish_error(self, seq: Sequence, why: str) -> None:
        self._count(seq, "error")
        if not seq.future.done():
            seq.future.set_exception(RequestError(why))

    def _fail_all(self, why: str) -> None:
        for seq in list(self.running.values()) + list(self.waiting):
            self._finish_error(seq, why)
        self.running.clear()
        self.waiting.clear()
        if self.prefix is not None:  # the stages' caches are dropped, or the LLM shut down
            self.prefix.clear()
        for g in self.groups:
            g.seqs, g.in_flight, g.free = [], None, []
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if item[0] != "cancel":
                item[-1].set_exception(RequestError(why))

    def _free_everything(self) -> None:
        """After a failure: drop every cache on every stage (the scheduler no longer knows
        which sequences they hold), in order behind any step in flight."""
        try:
            wire.send(self.push, Free(self.pipeline.epoch, (), everything=True))
        except (zmq.ZMQError, wire.WireError) as e:
            self.failed = f"the stages' caches could not be freed after a failure: {e}"
            log.error(self.failed)

    # ------------------------------------------------------------------ recovery
    def _watch(self) -> None:
        now = time.monotonic()
        lost = []
        if now - self.watched_at >= _WATCH_SECONDS:
            lost, self.watched_at = self.pipeline.dead(), now
        late = [g for g in self.groups
                if g.in_flight is not None and now - g.sent_at > self.step_timeout]
        if late and not lost:
            log.warning("micro-batch %d has been in flight for %.0f s; probing the workers",
                        late[0].id, now - late[0].sent_at)
            lost = self.pipeline.probe()
        if lost or late:
            self._recover(lost)

    def _recover(self, lost) -> None:
        names = ", ".join(f"worker {w.index} (pid {w.info.get('pid')})" for w in lost)
        log.warning("recovering from the loss of %s", names or "a step that never came back")
        self.recoveries += 1
        try:
            self.pipeline.replan(lost)
        except PlanError as e:
            self.failed = f"no plan fits the workers left after a failure: {e}"
            log.error(self.failed)
            self._fail_all(self.failed)
            return
        self.push.close(linger=0)
        self.push = self._connect(self.pipeline.first_address)
        for g in self.groups:
            g.in_flight, g.free = None, []
        if self.prefix is not None:  # configuring the workers dropped every cache
            self.prefix.clear()
        for seq in self.running.values():
            seq.fresh, seq.reuse = True, None
        for g in self.groups:  # every prompt is prefilled again: a step holds so many rows
            while self._rows(g) > MAX_STEP_ROWS:
                seq = self.running.pop(g.seqs[-1])
                self._drop(seq, free=False)
                self.waiting.appendleft(seq)
        # the cache may now be smaller: requeue, youngest first, what no longer fits
        capacity = self.pipeline.cache_capacity
        while sum(s.reserved for s in self.running.values()) > capacity and self.running:
            seq = self.running.pop(max(self.running))
            self._drop(seq, free=False)
            self.waiting.appendleft(seq)

    def _connect(self, address: str) -> zmq.Socket:
        sock = self.results.context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        wire.limit_frames(sock, wire.MAX_HEADER_BYTES)  # it receives nothing
        links.client(sock, self.pipeline.keys)
        sock.connect(address)
        return sock
