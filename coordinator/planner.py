"""The planner: which worker hosts which contiguous block range, and in which memory tier.

`plan` is a pure function (no Ray, torch or I/O) from a model's byte costs (`ModelCost`)
and the workers' budgets, runtime overheads and measured speeds (`WorkerSpec`) to a `Plan`
and the `PlanReport` of estimates behind it; `format_plan` prints the two as a table, and
`prediction_errors` compares the estimates with measured stage times.

A worker's `ram` budget is its whole process (docs/budgets.md): the runtime's own resident
set, measured when the worker starts (`WorkerSpec.overhead`), comes out of it first, and
the planner places the model in what is left.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import NamedTuple

from llm_shard.cluster.placement import STAGING_SLOTS, disk_fill, gpu_end
from llm_shard.cluster.types import CACHE_CHUNK, Capacity, Memory, Plan, StageAssignment, Tier

__all__ = ["DEFAULT_HOP_SECONDS", "DISK_STAGING_SLOTS", "MIN_CACHE_TOKENS", "STREAM_SLOTS",
           "ModelCost", "PlanError", "PlanReport", "StageReport", "WorkerSpec", "format_plan",
           "plan", "prediction_errors", "streams_to_gpu"]

DISK_STAGING_SLOTS = STAGING_SLOTS  # disk blocks staged in RAM: computing and prefetching
# A GPU worker keeps two streamed blocks on the GPU: the one computing and the one copying.
STREAM_SLOTS = 2
# Per-hop cost of handing activations to the next stage (ZeroMQ on a LAN), latency objective.
DEFAULT_HOP_SECONDS = 0.5e-3
# Relative tolerance when comparing float costs, so that ties go to the secondary key.
_REL_TOL = 1e-9
_OBJECTIVES = ("latency", "throughput")
# KV-cache tokens per block a plan reserves while choosing ranges when the cache is sized
# from what is left (`ModelCost.cache_tokens` None): one sequence's first cache chunk.
MIN_CACHE_TOKENS = CACHE_CHUNK
_BLOCK_FILE = re.compile(r"^blocks/(\d+)\.safetensors$")


class PlanError(ValueError):
    """No plan fits; the message says which resource is short and by how much."""


def _count(name: str, v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
    return int(v)  # plain ints: the planner's sums may go negative, a Memory may not


@dataclass(frozen=True)
class ModelCost:
    """Bytes of each block (global order), the embedding and head; KV cache per token per
    block (one int for all blocks) and how many tokens of cache to reserve per block
    (None: as many as the RAM left after the weights holds, `PlanReport.cache_tokens`;
    MIN_CACHE_TOKENS are reserved while placing).

    `tied_bytes`: bytes the embedding and head share (a tied LM head is the embedding
    matrix): a stage holding both holds them once. `head_read_bytes`: bytes the head reads
    per token, its compute cost (None: `head_bytes`; less where the head reads an int8
    screen of a float matrix)."""

    block_bytes: tuple[int, ...]
    embed_bytes: int = 0
    head_bytes: int = 0
    cache_bytes_per_token: tuple[int, ...] | int = 0
    cache_tokens: int | None = 0
    tied_bytes: int = 0
    head_read_bytes: int | None = None

    def __post_init__(self) -> None:
        blocks = tuple(_count("block bytes", b) for b in self.block_bytes)
        if not blocks:
            raise ValueError("a model needs at least one block")
        cache = self.cache_bytes_per_token
        cache = (cache,) * len(blocks) if isinstance(cache, int) else tuple(cache)
        if len(cache) != len(blocks):
            raise ValueError(f"{len(cache)} cache sizes for {len(blocks)} blocks")
        object.__setattr__(self, "block_bytes", blocks)
        object.__setattr__(self, "cache_bytes_per_token",
                           tuple(_count("cache bytes per token", c) for c in cache))
        for name in ("embed_bytes", "head_bytes", "tied_bytes"):
            object.__setattr__(self, name, _count(name, getattr(self, name)))
        for name in ("cache_tokens", "head_read_bytes"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _count(name, getattr(self, name)))
        if self.tied_bytes > min(self.embed_bytes, self.head_bytes):
            raise ValueError(f"tied_bytes {self.tied_bytes} is more than the embedding "
                             f"({self.embed_bytes}) or the head ({self.head_bytes}) holds")

    @property
    def n_blocks(self) -> int:
        return len(self.block_bytes)

    @property
    def reserved_tokens(self) -> int:
        """KV-cache tokens per block that placing reserves."""
        return MIN_CACHE_TOKENS if self.cache_tokens is None else self.cache_tokens

    @property
    def head_read(self) -> int:
        return self.head_bytes if self.head_read_bytes is None else self.head_read_bytes

    def cache_bytes(self, block: int) -> int:
        return self.cache_bytes_per_token[block] * self.reserved_tokens

    def outside_bytes(self, first: bool, last: bool) -> int:
        """RAM a stage holds for the embedding (`first`) and head (`last`): a tied matrix
        once."""
        both = self.tied_bytes if first and last else 0
        return self.embed_bytes * first + self.head_bytes * last - both

    @classmethod
    def from_manifest(cls, manifest: Mapping, cache_tokens: int | None,
                      cache_bytes_per_token_per_block: int, *, tied: bool = False,
                      head_read_bytes: int | None = None) -> ModelCost:
        """From a store manifest's "n_blocks" and "files" ({"name", "bytes"}) entries.
        `tied`: the head is the embedding's matrix, which both files hold (the smaller
        file's bytes are counted once where a stage holds both)."""
        n, sizes, blocks = manifest["n_blocks"], {}, {}
        for entry in manifest["files"]:
            name, size = entry["name"], entry["bytes"]
            if m := _BLOCK_FILE.match(name):
                blocks[int(m.group(1))] = size
            elif name in ("embed.safetensors", "head.safetensors"):
                sizes[name] = size
        missing = [f"blocks/{i:03d}.safetensors" for i in range(n) if i not in blocks]
        missing += [f for f in ("embed.safetensors", "head.safetensors") if f not in sizes]
        if missing:
            raise ValueError(f"manifest of {n} blocks lists no {', '.join(missing)}")
        embed, head = sizes["embed.safetensors"], sizes["head.safetensors"]
        return cls(tuple(blocks[i] for i in range(n)), embed, head,
                   cache_bytes_per_token_per_block, cache_tokens,
                   min(embed, head) if tied else 0, head_read_bytes)


@dataclass(frozen=True)
class WorkerSpec:
    """A worker's budget, its calibrated speed per tier in bytes of weights per second,
    and `overhead`: the resident bytes of its runtime (Python, torch, Ray) measured when it
    started, which its RAM budget pays first.

    A tier missing from `speed` holds no blocks on this worker.
    """

    capacity: Capacity
    speed: Mapping[Tier, float]
    overhead: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.capacity, Capacity):
            raise ValueError(f"capacity must be a Capacity, got {self.capacity!r}")
        object.__setattr__(self, "overhead", _count("overhead", self.overhead))
        speed = {Tier(k): float(v) for k, v in dict(self.speed).items()}
        for tier, v in speed.items():
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"speed of tier {tier} must be a finite number > 0, got {v!r}")
        object.__setattr__(self, "speed", speed)

    @property
    def ram(self) -> int:
        """RAM left for the model once the runtime is paid (negative: not even that)."""
        return int(self.capacity.ram) - self.overhead


def streams_to_gpu(w: WorkerSpec) -> bool:
    """Whether `w` computes every block on its GPU, streaming the RAM and disk ones there."""
    return Tier.GPU in w.speed and int(w.capacity.gpu_mem) > 0


@dataclass(frozen=True)
class StageReport:
    """One stage's estimate: blocks and bytes per tier (`resident`: embed, head, KV cache;
    `buffers`: disk staging in RAM; `stream_buffers`: a GPU worker's stream slots;
    `overhead`: the worker's runtime, in RAM). `seconds`: compute and disk reads of one
    token, less `hidden`, the read of its first disk block done while it waited."""

    worker: int
    start: int
    end: int
    blocks: dict[Tier, int]
    weights: dict[Tier, Memory]
    resident: dict[Tier, Memory]
    buffers: Memory  # disk staging, in RAM
    seconds: float
    stream_buffers: Memory = Memory(0)  # blocks streamed to a GPU, in GPU memory
    overhead: Memory = Memory(0)  # the worker's runtime, in RAM
    hidden: float = 0.0  # seconds of disk reads done while the stage waited

    def used(self, tier: Tier) -> Memory:
        """All bytes this stage keeps in `tier`: weights, residents and buffers (and in
        RAM the runtime's overhead)."""
        extra = {Tier.RAM: self.buffers + self.overhead,
                 Tier.GPU: self.stream_buffers}.get(tier, 0)
        return self.weights[tier] + self.resident[tier] + extra


def _rate(seconds: float) -> float:
    return 1 / seconds if seconds > 0 else math.inf


@dataclass(frozen=True)
class PlanReport:
    """The plan's estimates. Per token: `seconds_per_token` for one sequence through every
    stage and hop; `bottleneck_seconds` for the slowest stage, which sets the pace once a
    micro-batch is in flight per stage (`pipeline_tokens_per_second`). `cache_tokens`:
    the KV-cache tokens per block every stage holds (sized from the memory left when the
    model's `cache_tokens` is None)."""

    objective: str
    hop_seconds: float
    stages: tuple[StageReport, ...]
    cache_tokens: int = 0

    @property
    def seconds_per_token(self) -> float:
        return sum(s.seconds for s in self.stages) + self.hop_seconds * (len(self.stages) - 1)

    @property
    def tokens_per_second(self) -> float:
        return _rate(self.seconds_per_token)

    @property
    def bottleneck_seconds(self) -> float:
        return max(s.seconds for s in self.stages)

    @property
    def pipeline_tokens_per_second(self) -> float:
        return _rate(self.bottleneck_seconds)


class _Model(NamedTuple):
    cost: ModelCost
    weights: list[int]  # prefix sums: blocks [s, e) weigh weights[e] - weights[s]
    cache: list[int]  # prefix sums of reserved KV-cache bytes


def _model(cost: ModelCost) -> _Model:
    cache = [cost.cache_bytes(b) for b in range(cost.n_blocks)]
    return _Model(cost, list(accumulate(cost.block_bytes, initial=0)),
                  list(accumulate(cache, initial=0)))


def _stages_from(m: _Model, w: WorkerSpec, s: int):
    """Yield (end, seconds, gpu_end, ram_end, gpu_resident, ram_resident, buffers,
    stream_buffers, hidden) for `w` hosting blocks [s, end), end = s+1, s+2, ... while it
    fits; `hidden`: the most seconds of its first disk block's read that waiting can hide.

    Blocks [s, gpu_end) sit on GPU, [gpu_end, ram_end) in RAM, [ram_end, end) on DISK
    (cluster.placement's rule). Once a range misfits every longer one does.
    """
    cost, P, C = m.cost, m.weights, m.cache
    n, blocks = cost.n_blocks, cost.block_bytes
    speed, disk = w.speed, int(w.capacity.disk)
    i_gpu, i_ram, i_disk = (1 / speed[t] if t in speed else 0.0 for t in Tier)  # s/byte
    i_head_ram = 1 / speed.get(Tier.RAM, min(speed.values(), default=1.0))
    # a disk block computes at RAM speed once read; the rest of its time is the read
    i_read = i_disk - min(i_disk, i_ram) if Tier.RAM in speed else 0.0
    stream = streams_to_gpu(w)
    fill = disk_fill(P, blocks, s, ram_ok=Tier.RAM in speed, disk_ok=Tier.DISK in speed)
    gpu = int(w.capacity.gpu_mem) if Tier.GPU in speed else 0
    ram = w.ram
    largest = streamed = 0  # largest block of the range (sizes the stream slots)
    for e in range(s + 1, n + 1):
        outside = cost.outside_bytes(s == 0, e == n)
        head = cost.head_read if e == n else 0
        if stream:  # every cache on the GPU; the resident prefix gets what is left
            largest = max(largest, blocks[e - 1])
            room_gpu = gpu - (C[e] - C[s])
            if P[e] - P[s] <= room_gpu:
                g, streamed = e, 0
            else:
                streamed = STREAM_SLOTS * largest
                if room_gpu < streamed:
                    return
                g = gpu_end(P, s, e, room_gpu - streamed)
            cache_gpu, cache_ram = C[e] - C[s], 0
        else:  # no GPU budget: everything computes on the CPU
            g, cache_gpu, cache_ram = s, 0, C[e] - C[s]
        placed = fill(g, ram - outside - cache_ram)  # RAM weights + staging buffers
        if placed is None or P[e] - P[placed[0]] > disk:
            return
        r, staging = placed
        seconds = ((P[g] - P[s]) * i_gpu + (P[r] - P[g]) * i_ram + (P[e] - P[r]) * i_disk
                   + head * i_head_ram)
        hidden = blocks[r] * i_read if r < e else 0.0
        yield (e, seconds, g, r, cache_gpu, outside + cache_ram, staging, streamed, hidden)


def _wins(x0: float, x1: float, lo: float, hi: float, c1: float) -> bool:
    """(x0, x1) beats the best so far, whose primary cost is within [lo, hi] and second c1."""
    return x0 < lo or (x0 <= hi and x1 < c1 - _REL_TOL * c1)


def plan(model: ModelCost, workers: Sequence[WorkerSpec], *, objective: str = "latency",
         hop_seconds: float = DEFAULT_HOP_SECONDS,
         use_all_workers: bool = False) -> tuple[Plan, PlanReport]:
    """The optimal contiguous plan under this cost model; raises PlanError if none fits.

    For a worker hosting blocks [s, e):
    - The embedding (stage 0) and head (last stage) are in RAM, where the worker computes
      them. The blocks take a GPU prefix, then RAM, the rest disk (cluster.placement); a
      tier with no measured speed holds no blocks. Disk blocks stream through
      DISK_STAGING_SLOTS RAM buffers the size of the largest disk block.
    - A block's KV cache (cache_bytes_per_token x cache_tokens) sits where it computes. A
      worker with a GPU (`streams_to_gpu`) computes every block there: RAM and disk blocks
      stream through STREAM_SLOTS device buffers the size of the range's largest block
      (their speed is the streaming speed), every KV cache is in GPU memory, and the
      GPU-resident prefix gets what is left. Any other worker computes on the CPU.
    - Stage seconds = sum of block_bytes / speed[tier], plus head_bytes / the RAM speed;
      the embedding is a gather and costs nothing.
    - "latency" minimises the sum of stage seconds + hop_seconds per hop (one sequence's
      seconds per token); "throughput" the slowest stage, ties broken by latency.

    Dynamic programming over (worker, first block): the exact optimum in O(W·N²), each
    scan ending at the first range that misfits. Workers keep the caller's order; one that
    does not help gets no stage (unless `use_all_workers`). Stage `worker` ids index
    `workers`.
    """
    if objective not in _OBJECTIVES:
        raise ValueError(f"objective must be one of {_OBJECTIVES}, got {objective!r}")
    if not (math.isfinite(hop_seconds) and hop_seconds >= 0):
        raise ValueError(f"hop_seconds must be a finite number >= 0, got {hop_seconds!r}")
    if not workers:
        raise PlanError(f"cannot place {model.n_blocks} blocks on no workers")
    n, nw, m = model.n_blocks, len(workers), _model(model)
    P = m.weights
    latency, inf = objective == "latency", (math.inf, math.inf)
    # best[w][s]: cost of blocks [s, n) on workers w.., as (primary, tie-break) seconds;
    # end[w][s]: where worker w's stage from s ends (None: w is skipped).
    best = [[inf] * (n + 1) for _ in range(nw + 1)]
    end: list[list[int | None]] = [[None] * (n + 1) for _ in range(nw + 1)]
    best[nw][n] = (0.0, 0.0)
    for w in reversed(range(nw)):
        spec, after = workers[w], best[w + 1]
        bound = 1 / max(spec.speed.values(), default=1.0)  # fewest seconds per byte
        if not use_all_workers:
            best[w][n] = (0.0, 0.0)
        for s in range(n):
            c0 = c1 = lo = hi = math.inf  # best (primary, tie-break); [lo, hi]: ties with c0
            pick = None
            for p in _stages_from(m, spec, s):
                e, t = p[0], p[1]
                if not latency and (P[e] - P[s]) * bound > hi:
                    break  # a lower bound of this and every longer stage loses already
                r0, r1 = after[e]
                if r0 == math.inf:
                    continue
                hop = hop_seconds if e < n else 0.0
                if latency:
                    t -= _hidden(p[8], e, n, hop, r0)
                    x0, x1 = t + hop + r0, (t if t > r1 else r1)
                else:
                    x0, x1 = (t if t > r0 else r0), t + hop + r1
                if _wins(x0, x1, lo, hi, c1):
                    c0, c1, pick = x0, x1, e
                    lo, hi = c0 * (1 - _REL_TOL), c0 * (1 + _REL_TOL)
            skip = not use_all_workers and _wins(*after[s], lo, hi, c1)  # ties: w works
            best[w][s], end[w][s] = (after[s], None) if skip else ((c0, c1), pick)
    if best[0][0][0] == math.inf:
        raise _infeasible(m, workers)
    stages, reports, s = [], [], 0
    for w in range(nw):
        if s == n or (e := end[w][s]) is None:
            continue
        _, seconds, g, r, gpu_res, ram_res, buffers, streamed, hidden = next(
            p for p in _stages_from(m, workers[w], s) if p[0] == e)
        hidden = _hidden(hidden, e, n, hop_seconds, best[w + 1][e][0]) if latency else 0.0
        bounds = {Tier.GPU: (s, g), Tier.RAM: (g, r), Tier.DISK: (r, e)}
        stages.append(StageAssignment(w, s, e, sum(((t,) * (b - a) for t, (a, b)
                                                    in bounds.items()), ())))
        reports.append(StageReport(
            w, s, e, {t: b - a for t, (a, b) in bounds.items()},
            {t: Memory(P[b] - P[a]) for t, (a, b) in bounds.items()},
            {Tier.GPU: Memory(gpu_res), Tier.RAM: Memory(ram_res), Tier.DISK: Memory(0)},
            Memory(buffers), seconds - hidden, Memory(streamed),
            Memory(workers[w].overhead), hidden))
        s = e
    reports, tokens = _size_caches(model, workers, reports)
    return Plan(tuple(stages), n), PlanReport(objective, hop_seconds, tuple(reports), tokens)


def _hidden(most: float, end: int, n: int, hop: float, after: float) -> float:
    """Seconds of a stage's first disk read hidden while it waits for the next token: at
    most `most`, and no more than the time the stages after it take (a lower bound of its
    wait; the last stage gets none). The stage prefetches that block once its last disk
    block is under way (worker/tiers.py `next_after`)."""
    return min(most, hop + after) if end < n else 0.0


def _size_caches(model: ModelCost, workers: Sequence[WorkerSpec],
                 reports: list[StageReport]) -> tuple[tuple[StageReport, ...], int]:
    """The stages' reports with their KV caches sized, and the tokens per block: as the
    model asks, or (cache_tokens None) the most every stage holds in the memory left
    (the GPU's for a worker that computes there, else RAM), in whole CACHE_CHUNKs."""
    if model.cache_tokens is not None:
        return tuple(reports), model.cache_tokens
    room = []
    for r in reports:
        per_token = sum(model.cache_bytes_per_token[r.start:r.end])
        if not per_token:
            continue
        w = workers[r.worker]
        tier = Tier.GPU if streams_to_gpu(w) else Tier.RAM
        budget = int(w.capacity.gpu_mem) if tier is Tier.GPU else int(w.capacity.ram)
        left = budget - r.used(tier) + per_token * model.reserved_tokens
        room.append(int(left) // per_token)
    if not room:
        return tuple(reports), model.reserved_tokens
    tokens = max(model.reserved_tokens, min(room) // CACHE_CHUNK * CACHE_CHUNK)
    out = []
    for r in reports:
        extra = sum(model.cache_bytes_per_token[r.start:r.end]) * (tokens - model.reserved_tokens)
        tier = Tier.GPU if streams_to_gpu(workers[r.worker]) else Tier.RAM
        resident = dict(r.resident)
        resident[tier] = Memory(resident[tier] + extra)
        out.append(dataclasses.replace(r, resident=resident))
    return tuple(out), tokens


def _one_block_short(m: _Model, w: WorkerSpec, room: int) -> tuple[int, int, int]:
    """(bytes short, block, cache + buffers) for the block `w` comes closest to hosting alone
    with `room` bytes of RAM."""
    speed, options = w.speed, []
    gpu, disk = int(w.capacity.gpu_mem), int(w.capacity.disk)
    stream = streams_to_gpu(w)
    for b, size in enumerate(m.cost.block_bytes):
        cache = m.cost.cache_bytes(b)
        # a GPU worker keeps every cache and the stream slots on its GPU
        on_gpu = max(0, cache + STREAM_SLOTS * size - gpu) if stream else 0
        cache_ram, extra = (0, STREAM_SLOTS * size) if stream else (cache, 0)
        if Tier.GPU in speed:
            options.append((max(0, size + cache - gpu), b, cache))
        if Tier.RAM in speed:
            options.append((max(0, size + cache_ram - room) + on_gpu, b, cache + extra))
        if Tier.DISK in speed:
            buffers = DISK_STAGING_SLOTS * size
            options.append((max(0, size - disk) + max(0, buffers + cache_ram - room) + on_gpu,
                            b, cache + buffers + extra))
    return min(options, default=(m.weights[-1], 0, 0))


def _runtime(w: WorkerSpec) -> str:
    return f"its runtime's {Memory(w.overhead)} (measured at start)" if w.overhead else ""


def _parts_short(m: _Model, w: WorkerSpec, first: bool, last: bool,
                 whole: bool = False) -> str | None:
    """Why `w` cannot host the smallest stage that holds the embedding (`first`) and the
    head (`last`), or with `whole` every block: its RAM's parts in order (runtime,
    embedding, head, KV cache, blocks), the first that does not fit and by how much; None
    when they fit."""
    cost = m.cost
    parts = [("its runtime", w.overhead)]
    if first:
        parts.append(("the embedding", cost.embed_bytes))
    if last:
        tied = first and cost.tied_bytes
        parts.append(("the head" + (" (tied: the embedding's matrix counted once)"
                                    if tied else ""), cost.head_bytes - tied))
    if whole and not streams_to_gpu(w):
        weights, disk = m.weights[-1], int(w.capacity.disk) * (Tier.DISK in w.speed)
        parts.append((f"the KV cache of {cost.n_blocks} blocks", m.cache[-1]))
        staging = DISK_STAGING_SLOTS * max(cost.block_bytes) if disk else 0
        in_ram = max(0, weights - disk)
        parts.append((f"{cost.n_blocks} blocks" + (f" ({Memory(in_ram)} of them beyond disk "
                      f"{Memory(disk)}, and staging buffers)" if disk else ""),
                      in_ram + staging))
    else:
        short, b, _ = _one_block_short(m, w, 0)
        parts.append((f"block {b} with its KV cache and buffers", short))  # alone, no room
    parts = [(what, size) for what, size in parts if size]
    ram, total = int(w.capacity.ram), 0
    for i, (what, size) in enumerate(parts):
        total += size
        if total > ram:
            rest = sum(size for _, size in parts[i + 1:])
            listed = " + ".join(f"{what} {Memory(size)}" for what, size in parts)
            return (f"{what} does not fit: short of {Memory(total + rest - ram)} (ram "
                    f"{w.capacity.ram} for {listed})")
    return None


def _infeasible(m: _Model, workers: Sequence[WorkerSpec]) -> PlanError:
    cost, n = m.cost, m.cost.n_blocks
    need = m.weights[-1] + m.cache[-1] + cost.outside_bytes(True, True)
    offer = sum(max(0, w.ram) + int(w.capacity.gpu_mem) * (Tier.GPU in w.speed)
                + int(w.capacity.disk) * (Tier.DISK in w.speed) for w in workers)
    overhead = sum(w.overhead for w in workers)
    after = f" after their runtimes' {Memory(overhead)}" if overhead else ""
    what = (f"cannot place {n} blocks ({Memory(m.weights[-1])}) on {len(workers)} "
            f"worker{'s' * (len(workers) != 1)}")
    if need > offer:
        parts = [f"{what}: short of {Memory(need - offer)} of memory (weights, embedding, "
                 f"head and KV cache need {Memory(need)}, the workers offer {Memory(offer)}"
                 f"{after})"]
    else:
        reach = 0
        for w in workers:
            reach = max((p[0] for p in _stages_from(m, w, reach)), default=reach)
        why = (f"with staging buffers and contiguous ranges, in order they reach only block "
               f"{reach} of {n}" if reach < n else "not with a stage on every worker")
        parts = [f"{what}: the workers offer {Memory(offer)}{after} for the {Memory(need)} "
                 f"of weights, embedding, head and KV cache, but {why}"]
    if len(workers) == 1 and workers[0].speed and (
            why := _parts_short(m, workers[0], True, True, whole=True)
            or _parts_short(m, workers[0], True, True)):
        parts = [f"{what}: worker 0 ({workers[0].capacity}): {why}"]
    elif len(workers) > 1:
        for first, last, part in ((True, False, "embedding"), (False, True, "head")):
            whys = [_parts_short(m, w, first, last) for w in workers if w.speed]
            if whys and all(whys):
                size = cost.embed_bytes if first else cost.head_bytes
                parts.append(f"no worker holds the {part} ({Memory(size)}) with a block: "
                             f"worker 0 ({workers[0].capacity}): {whys[0]}")
    slots = STREAM_SLOTS * max(cost.block_bytes)
    stream_need = slots + min(map(cost.cache_bytes, range(n)))  # to stream any one block
    for i, w in enumerate(workers):
        if not w.speed:
            parts.append(f"worker {i} has no measured speed for any tier")
            continue
        if streams_to_gpu(w) and stream_need > int(w.capacity.gpu_mem):
            parts.append(f"worker {i} computes on its GPU, whose {w.capacity.gpu_mem} cannot "
                         f"hold the {Memory(slots)} of buffers that stream blocks to it, "
                         f"plus their KV caches: give it more GPU memory or gpu=0 (compute on "
                         f"the CPU)")
        if len(workers) == 1:
            continue  # _parts_short said it
        short, b, extra = _one_block_short(m, w, w.ram)
        if short:
            runtime = f" beside {_runtime(w)}" if w.overhead else ""
            parts.append(f"worker {i} ({w.capacity}) cannot hold even block {b} "
                         f"({Memory(cost.block_bytes[b])}) plus its KV cache and buffers "
                         f"({Memory(extra)}){runtime}: short of {Memory(short)}")
    return PlanError("; ".join(parts))


def prediction_errors(report: PlanReport, measured: Sequence[float]) -> list[float]:
    """Per stage, how far the measured seconds of one decode step are from the plan's
    estimate: measured / estimated - 1 (0.2: 20 % slower than planned)."""
    if len(measured) != len(report.stages):
        raise ValueError(f"{len(measured)} measured stage times for a plan of "
                         f"{len(report.stages)} stages")
    return [float(t) / s.seconds - 1 if s.seconds > 0 else math.inf
            for s, t in zip(report.stages, measured)]


def format_plan(plan: Plan, report: PlanReport, model: ModelCost) -> str:
    """The partition table `llm-shard plan` prints: a row per stage (the worker's runtime
    overhead in its own column, outside the ram column), then the totals."""
    if [(s.worker, s.start, s.end) for s in plan] != \
            [(r.worker, r.start, r.end) for r in report.stages]:
        raise ValueError("the report does not describe this plan")
    tiers = (Tier.GPU, Tier.RAM, Tier.DISK)
    rows = [f"{'stage':>5}  {'worker':>6}  {'blocks':<10}  {'runtime':>10}"
            + "".join(f"  {t.value:>19}" for t in tiers) + f"  {'ms/token':>9}"]
    for i, r in enumerate(report.stages):
        used = {t: r.used(t) - (r.overhead if t is Tier.RAM else 0) for t in tiers}
        cells = "".join(f"  {f'{r.blocks[t]} blk {used[t]}' if used[t] else '-':>19}"
                        for t in tiers)
        rows.append(f"{i:>5}  {r.worker:>6}  {f'[{r.start}, {r.end})':<10}  "
                    f"{str(r.overhead) if r.overhead else '-':>10}{cells}"
                    f"  {r.seconds * 1e3:>9.3f}")
    per_token = sum(model.cache_bytes_per_token)
    tied = " (tied: one matrix)" if model.tied_bytes else ""
    sized = " sized from the memory left" if model.cache_tokens is None else ""
    rows.append(f"total: {model.n_blocks} blocks on {len(plan)} stages; weights "
                f"{Memory(sum(model.block_bytes))}, embed+head "
                f"{Memory(model.outside_bytes(True, True))}{tied}, KV cache "
                f"{report.cache_tokens} tokens per block{sized} "
                f"({Memory(per_token * report.cache_tokens)})")
    rows.append(f"est. {report.seconds_per_token * 1e3:.3f} ms/token "
                f"({report.tokens_per_second:.1f} tokens/s) for one sequence; bottleneck "
                f"{report.bottleneck_seconds * 1e3:.3f} ms ({report.pipeline_tokens_per_second:.1f}"
                f" tokens/s) with the pipeline full; objective {report.objective}")
    return "\n".join(rows)
