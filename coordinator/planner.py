"""The planner: which worker hosts which contiguous block range, and in which memory tier.

`plan` is a pure function (no Ray, torch or I/O) from a model's byte costs (`ModelCost`)
and the workers' budgets and measured speeds (`WorkerSpec`) to a `Plan` and the
`PlanReport` of estimates behind it; `format_plan` prints the two as a table.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import NamedTuple

from llm_shard.cluster.placement import STAGING_SLOTS, disk_fill, gpu_end
from llm_shard.cluster.types import Capacity, Memory, Plan, StageAssignment, Tier

__all__ = ["DEFAULT_HOP_SECONDS", "DISK_STAGING_SLOTS", "STREAM_SLOTS", "ModelCost", "PlanError",
           "PlanReport", "StageReport", "WorkerSpec", "format_plan", "plan", "streams_to_gpu"]

DISK_STAGING_SLOTS = STAGING_SLOTS  # disk blocks staged in RAM: computing and prefetching
# A GPU worker keeps two streamed blocks on the GPU: the one computing and the one copying.
STREAM_SLOTS = 2
# Per-hop cost of handing activations to the next stage (ZeroMQ on a LAN), latency objective.
DEFAULT_HOP_SECONDS = 0.5e-3
# Relative tolerance when comparing float costs, so that ties go to the secondary key.
_REL_TOL = 1e-9
_OBJECTIVES = ("latency", "throughput")
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
    block (one int for all blocks) and how many tokens of cache to reserve per block."""

    block_bytes: tuple[int, ...]
    embed_bytes: int = 0
    head_bytes: int = 0
    cache_bytes_per_token: tuple[int, ...] | int = 0
    cache_tokens: int = 0

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
        for name in ("embed_bytes", "head_bytes", "cache_tokens"):
            object.__setattr__(self, name, _count(name, getattr(self, name)))

    @property
    def n_blocks(self) -> int:
        return len(self.block_bytes)

    def cache_bytes(self, block: int) -> int:
        return self.cache_bytes_per_token[block] * self.cache_tokens

    @classmethod
    def from_manifest(cls, manifest: Mapping, cache_tokens: int,
                      cache_bytes_per_token_per_block: int) -> ModelCost:
        """From a store manifest's "n_blocks" and "files" ({"name", "bytes"}) entries."""
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
        return cls(tuple(blocks[i] for i in range(n)), sizes["embed.safetensors"],
                   sizes["head.safetensors"], cache_bytes_per_token_per_block, cache_tokens)


@dataclass(frozen=True)
class WorkerSpec:
    """A worker's budget and its calibrated speed per tier, in bytes of weights per second.

    A tier missing from `speed` holds no blocks on this worker.
    """

    capacity: Capacity
    speed: Mapping[Tier, float]

    def __post_init__(self) -> None:
        if not isinstance(self.capacity, Capacity):
            raise ValueError(f"capacity must be a Capacity, got {self.capacity!r}")
        speed = {Tier(k): float(v) for k, v in dict(self.speed).items()}
        for tier, v in speed.items():
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"speed of tier {tier} must be a finite number > 0, got {v!r}")
        object.__setattr__(self, "speed", speed)


def streams_to_gpu(w: WorkerSpec) -> bool:
    """Whether `w` computes every block on its GPU, streaming the RAM and disk ones there."""
    return Tier.GPU in w.speed and int(w.capacity.gpu_mem) > 0


@dataclass(frozen=True)
class StageReport:
    """One stage's estimate: blocks and bytes per tier (`resident`: embed, head, KV cache;
    `buffers`: disk staging in RAM; `stream_buffers`: a GPU worker's stream slots)."""

    worker: int
    start: int
    end: int
    blocks: dict[Tier, int]
    weights: dict[Tier, Memory]
    resident: dict[Tier, Memory]
    buffers: Memory  # disk staging, in RAM
    seconds: float
    stream_buffers: Memory = Memory(0)  # blocks streamed to a GPU, in GPU memory

    def used(self, tier: Tier) -> Memory:
        """All bytes this stage keeps in `tier`: weights, residents and buffers."""
        extra = {Tier.RAM: self.buffers, Tier.GPU: self.stream_buffers}.get(tier, 0)
        return self.weights[tier] + self.resident[tier] + extra


def _rate(seconds: float) -> float:
    return 1 / seconds if seconds > 0 else math.inf


@dataclass(frozen=True)
class PlanReport:
    """The plan's estimates. Per token: `seconds_per_token` for one sequence through every
    stage and hop; `bottleneck_seconds` for the slowest stage, which sets the pace once a
    micro-batch is in flight per stage (`pipeline_tokens_per_second`)."""

    objective: str
    hop_seconds: float
    stages: tuple[StageReport, ...]

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
    stream_buffers) for `w` hosting blocks [s, end), end = s+1, s+2, ... while it fits.

    Blocks [s, gpu_end) sit on GPU, [gpu_end, ram_end) in RAM, [ram_end, end) on DISK
    (cluster.placement's rule). Once a range misfits every longer one does.
    """
    cost, P, C = m.cost, m.weights, m.cache
    n, blocks = cost.n_blocks, cost.block_bytes
    speed, disk = w.speed, int(w.capacity.disk)
    i_gpu, i_ram, i_disk = (1 / speed[t] if t in speed else 0.0 for t in Tier)  # s/byte
    i_head_ram = 1 / speed.get(Tier.RAM, min(speed.values(), default=1.0))
    stream = streams_to_gpu(w)
    fill = disk_fill(P, blocks, s, ram_ok=Tier.RAM in speed, disk_ok=Tier.DISK in speed)
    gpu = int(w.capacity.gpu_mem) if Tier.GPU in speed else 0
    embed = cost.embed_bytes if s == 0 else 0
    ram = int(w.capacity.ram) - embed
    largest = streamed = 0  # largest block of the range (sizes the stream slots)
    for e in range(s + 1, n + 1):
        head = cost.head_bytes if e == n else 0
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
        placed = fill(g, ram - head - cache_ram)  # RAM weights + staging buffers
        if placed is None or P[e] - P[placed[0]] > disk:
            return
        r, staging = placed
        seconds = ((P[g] - P[s]) * i_gpu + (P[r] - P[g]) * i_ram + (P[e] - P[r]) * i_disk
                   + head * i_head_ram)
        yield (e, seconds, g, r, cache_gpu, embed + head + cache_ram, staging, streamed)


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
        _, seconds, g, r, gpu_res, ram_res, buffers, streamed = next(
            p for p in _stages_from(m, workers[w], s) if p[0] == e)
        bounds = {Tier.GPU: (s, g), Tier.RAM: (g, r), Tier.DISK: (r, e)}
        stages.append(StageAssignment(w, s, e, sum(((t,) * (b - a) for t, (a, b)
                                                    in bounds.items()), ())))
        reports.append(StageReport(
            w, s, e, {t: b - a for t, (a, b) in bounds.items()},
            {t: Memory(P[b] - P[a]) for t, (a, b) in bounds.items()},
            {Tier.GPU: Memory(gpu_res), Tier.RAM: Memory(ram_res), Tier.DISK: Memory(0)},
            Memory(buffers), seconds, Memory(streamed)))
        s = e
    return Plan(tuple(stages), n), PlanReport(objective, hop_seconds, tuple(reports))


def _one_block_short(m: _Model, w: WorkerSpec) -> tuple[int, int, int]:
    """(bytes short, block, cache + buffers) for the block `w` comes closest to hosting alone."""
    speed, options = w.speed, []
    gpu, ram, disk = int(w.capacity.gpu_mem), int(w.capacity.ram), int(w.capacity.disk)
    stream = streams_to_gpu(w)
    for b, size in enumerate(m.cost.block_bytes):
        cache = m.cost.cache_bytes(b)
        # a GPU worker keeps every cache and the stream slots on its GPU
        on_gpu = max(0, cache + STREAM_SLOTS * size - gpu) if stream else 0
        cache_ram, extra = (0, STREAM_SLOTS * size) if stream else (cache, 0)
        if Tier.GPU in speed:
            options.append((max(0, size + cache - gpu), b, cache))
        if Tier.RAM in speed:
            options.append((max(0, size + cache_ram - ram) + on_gpu, b, cache + extra))
        if Tier.DISK in speed:
            buffers = DISK_STAGING_SLOTS * size
            options.append((max(0, size - disk) + max(0, buffers + cache_ram - ram) + on_gpu,
                            b, cache + buffers + extra))
    return min(options, default=(m.weights[-1], 0, 0))


def _infeasible(m: _Model, workers: Sequence[WorkerSpec]) -> PlanError:
    cost, n = m.cost, m.cost.n_blocks
    need = m.weights[-1] + m.cache[-1] + cost.embed_bytes + cost.head_bytes
    offer = sum(int(w.capacity.ram) + int(w.capacity.gpu_mem) * (Tier.GPU in w.speed)
                + int(w.capacity.disk) * (Tier.DISK in w.speed) for w in workers)
    what = (f"cannot place {n} blocks ({Memory(m.weights[-1])}) on {len(workers)} "
            f"worker{'s' * (len(workers) != 1)}")
    if need > offer:
        parts = [f"{what}: short of {Memory(need - offer)} of memory (weights, embedding, "
                 f"head and KV cache need {Memory(need)}, the workers offer {Memory(offer)})"]
    else:
        reach = 0
        for w in workers:
            reach = max((p[0] for p in _stages_from(m, w, reach)), default=reach)
        why = (f"with staging buffers and contiguous ranges, in order they reach only block "
               f"{reach} of {n}" if reach < n else "not with a stage on every worker")
        parts = [f"{what}: the workers offer {Memory(offer)} for the {Memory(need)} of "
                 f"weights, embedding, head and KV cache, but {why}"]
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
        short, b, extra = _one_block_short(m, w)
        if short:
            parts.append(f"worker {i} ({w.capacity}) cannot hold even block {b} "
                         f"({Memory(cost.block_bytes[b])}) plus its KV cache and buffers "
                         f"({Memory(extra)}): short of {Memory(short)}")
    return PlanError("; ".join(parts))


def format_plan(plan: Plan, report: PlanReport, model: ModelCost) -> str:
    """The partition table `llm-shard plan` prints: a row per stage, then the totals."""
    if [(s.worker, s.start, s.end) for s in plan] != \
            [(r.worker, r.start, r.end) for r in report.stages]:
        raise ValueError("the report does not describe this plan")
    tiers = (Tier.GPU, Tier.RAM, Tier.DISK)
    rows = [f"{'stage':>5}  {'worker':>6}  {'blocks':<10}"
            + "".join(f"  {t.value:>19}" for t in tiers) + f"  {'ms/token':>9}"]
    for i, r in enumerate(report.stages):
        cells = "".join(f"  {f'{r.blocks[t]} blk {r.used(t)}' if r.used(t) else '-':>19}"
                        for t in tiers)
        rows.append(f"{i:>5}  {r.worker:>6}  {f'[{r.start}, {r.end})':<10}{cells}"
                    f"  {r.seconds * 1e3:>9.3f}")
    cache = sum(model.cache_bytes(b) for b in range(model.n_blocks))
    rows.append(f"total: {model.n_blocks} blocks on {len(plan)} stages; weights "
                f"{Memory(sum(model.block_bytes))}, embed+head "
                f"{Memory(model.embed_bytes + model.head_bytes)}, KV cache {Memory(cache)}")
    rows.append(f"est. {report.seconds_per_token * 1e3:.3f} ms/token "
                f"({report.tokens_per_second:.1f} tokens/s) for one sequence; bottleneck "
                f"{report.bottleneck_seconds * 1e3:.3f} ms ({report.pipeline_tokens_per_second:.1f}"
                f" tokens/s) with the pipeline full; objective {report.objective}")
    return "\n".join(rows)
