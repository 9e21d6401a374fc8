"""The compute of one pipeline stage on decoded messages: its blocks, its sequences'
caches, and on the last stage the sampler. No ZeroMQ and no Ray: `StageRunner.step`
takes a Step (cluster/messages.py) and returns the message to send on, so tests chain
stages in one process and the actor (worker/actor.py) only moves bytes.

A step carries, for each sequence in a micro-batch, its new token rows (`lens`), and
`tokens` (the input ids, also forwarded to later stages so the last one keeps each
sequence's history for the repetition penalty). A sequence named in `reset` starts a
fresh cache: a new request, or one replayed after a failure; one also named in `reuse`
starts from a copy of the first rows of a finished sequence's caches, which the
coordinator kept for it (the prefix cache) until a `free` drops them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import torch

from llm_shard.cluster import wire
from llm_shard.cluster.messages import Result, Step
from llm_shard.cluster.types import SamplingParams, Tier, sequence_bytes
from llm_shard.models.cache import Batch, Prefix, SequenceCache, copy_prefix
from llm_shard.models.checkpoint.store import Store
from llm_shard.models.runner import StageModel
from llm_shard.models.text.sampling import sample

from .tiers import TieredBlocks

log = logging.getLogger(__name__)

CACHE_FULL = "cache full"


class StageError(ValueError):
    """A step this stage cannot run (an unknown sequence, rows that do not add up)."""


@dataclass
class _Sequence:
    cache: SequenceCache
    tokens: int = 0  # tokens held in the cache
    params: SamplingParams | None = None  # last stage only
    history: list[int] = field(default_factory=list)  # last stage only


def _held(msg: Step, received: float | None) -> tuple[float, ...]:
    """The step's `busy_ms`, with this stage's (ms since `received`) where it is given."""
    if received is None:
        return msg.busy_ms
    return (*msg.busy_ms, (time.perf_counter() - received) * 1e3)


class StageRunner:
    """Blocks [start, end) of a store, the caches of the sequences passing through, and
    (last stage) the sampler. `cache_budget` (bytes per block in the store's kv_dtype,
    see `block_cache_budget`) bounds the caches; a sequence that would overflow it is rejected
    with CACHE_FULL (its cache freed), never half-computed."""

    def __init__(self, store: Store, start: int, end: int, *, cache_budget: int,
                 dtype: torch.dtype = torch.float32,
                 wire_dtype: torch.dtype = wire.DEFAULT_ACTIVATION_DTYPE,
                 device: str | torch.device = "cpu", tiers: list[Tier] | None = None,
                 stream_to: str | torch.device | None = None) -> None:
        """`tiers`: each block's tier (None: all in RAM); `stream_to`: the device every
        block computes on, RAM and disk blocks streamed there (see worker/tiers.py)."""
        self.model = StageModel(store, start, end, dtype=dtype, device=device,
                                load_blocks=False)
        self.blocks = TieredBlocks(store, start, end, tiers or [Tier.RAM] * (end - start),
                                   dtype=dtype, stream_to=stream_to)
        self.start, self.end = start, end
        self.first, self.last = self.model.has_embed, self.model.has_head
        self.dtype, self.wire_dtype, self.device = dtype, wire_dtype, torch.device(device)
        self.cfg = store.config
        self.cache_budget = int(cache_budget)
        self.sequences: dict[int, _Sequence] = {}

    def close(self) -> None:
        self.blocks.close()

    # ------------------------------------------------------------------ caches
    def _cost(self, n_tokens: int) -> int:
        return sequence_bytes(self.cfg, n_tokens)

    def free(self, seq_ids, everything: bool = False) -> None:
        """Drop the caches of `seq_ids` (every cache with `everything`)."""
        if everything:
            self.sequences.clear()
        for i in seq_ids:
            self.sequences.pop(int(i), None)

    def _admit(self, seqs: list[int], lens: list[int], reset: set[int],
               reuse: dict[int, tuple[int, int]] | None = None) -> dict[int, str]:
        """Make room for this step's rows; return {seq: reason} for those rejected.
        `reuse`: {sequence of `reset`: (finished sequence, rows)} to start from a copy of."""
        reuse = reuse or {}
        rejected: dict[int, str] = {}
        for i, (source, rows) in reuse.items():
            held = self.sequences[source].tokens if source in self.sequences else 0
            if rows > held:
                raise StageError(f"sequence {i} would start from {rows} rows of sequence "
                                 f"{source}, which holds {held} on blocks [{self.start}, "
                                 f"{self.end})")
        for i in reset:
            self.sequences.pop(i, None)
        for i in seqs:
            if i not in reset and i not in self.sequences:
                raise StageError(f"sequence {i} has no cache on blocks [{self.start}, "
                                 f"{self.end}) and is not marked reset")
        used = sum(self._cost(s.tokens) for s in self.sequences.values())
        for i, n in zip(seqs, lens):
            held = self.sequences[i].tokens if i in self.sequences else None
            now = self._cost(held) if held is not None else 0
            grow = self._cost((held or reuse.get(i, (0, 0))[1]) + n) - now
            if used + grow > self.cache_budget:
                rejected[i] = (f"{CACHE_FULL}: blocks [{self.start}, {self.end}) hold "
                               f"{used} of {self.cache_budget} cache bytes per block; "
                               f"sequence {i} needs {grow} more")
                self.sequences.pop(i, None)
                used -= now
                continue
            used += grow
            if i in reuse:
                source, rows = reuse[i]
                src = self.sequences[source]
                self.sequences[i] = _Sequence(copy_prefix(src.cache, rows), rows,
                                              history=src.history[:rows])
            elif i not in self.sequences:
                self.sequences[i] = _Sequence(SequenceCache(kv_dtype=self.cfg.kv_dtype))
        return rejected

    # ------------------------------------------------------------------ compute
    def step(self, msg: Step, received: float | None = None) -> Step | Result:
        """Run one step; returns the message to send on: the step for the next stage, or
        the Result (sampled tokens) from the last. The Step arrives validated (its rows add
        up); what depends on this stage (its caches, `hidden` past stage 0) is checked here.
        `received` (time.perf_counter() when the worker got it): the message gains
        `busy_ms`, how long this stage held the step, so that it is built once."""
        if not self.first and msg.hidden is None:
            raise StageError(f"blocks [{self.start}, {self.end}) need the step's `hidden` "
                             "activations")
        self.free(msg.free)
        reset = set(msg.reset)
        seqs, lens, steps = list(msg.seqs), list(msg.lens), list(msg.steps)
        tokens, hidden = msg.tokens, msg.hidden
        new_rejects = self._admit(seqs, lens, reset, msg.reuse)
        if new_rejects:  # drop the rejected sequences' rows before computing
            keep = [j for j, i in enumerate(seqs) if i not in new_rejects]
            rows = torch.cat([torch.arange(sum(lens[:j]), sum(lens[:j + 1])) for j in keep]) \
                if keep else torch.zeros(0, dtype=torch.long)
            tokens = tokens[rows]
            hidden = hidden[rows] if hidden is not None else None
            seqs, lens, steps = ([v[j] for j in keep] for v in (seqs, lens, steps))
        rejected = {**msg.rejected, **new_rejects}
        if not seqs:
            return self._empty(msg, tokens, rejected, received)

        # GLM prompt contexts: found by the first stage, passed on to the others
        prefixes = [Prefix(*msg.prefixes[i]) if i in msg.prefixes else None for i in seqs]
        batch = Batch.of(lens, [self.sequences[i].cache for i in seqs],
                         prefixes if any(prefixes) else None)
        x = tokens if self.first else wire.from_wire(hidden, self.dtype)
        if self.device.type != "cpu":
            x = x.to(self.device)
        t0 = time.perf_counter()
        out = self.model(x, batch, run_blocks=self.blocks.run)
        stage_ms = (*msg.stage_ms, (time.perf_counter() - t0) * 1e3)
        for i, n in zip(seqs, lens):
            self.sequences[i].tokens += n
        found = msg.prefixes
        if self.first and batch.prefixes is not None:
            found = {i: (p.length, p.mask_pos) for i, p in zip(seqs, batch.prefixes)
                     if p is not None and i in reset}
        if not self.last:
            hidden = wire.to_wire(out, self.wire_dtype)
            return replace(msg, seqs=seqs, lens=lens, steps=steps, tokens=tokens,
                           hidden=hidden, rejected=rejected, prefixes=found,
                           stage_ms=stage_ms, busy_ms=_held(msg, received))
        picked = self._sample(out, msg, seqs, lens, steps, tokens, reset)
        return Result(msg.epoch, msg.mb, seqs, [p.token for p in picked],
                      [p.logprob for p in picked], [p.top_logprobs for p in picked],
                      rejected=rejected, stage_ms=stage_ms, busy_ms=_held(msg, received))

    def _empty(self, msg: Step, tokens: torch.Tensor, rejected: dict[int, str],
               received: float | None) -> Step | Result:
        """Every sequence was rejected: pass the rejections on with no rows."""
        if not self.last:
            return replace(msg, seqs=(), lens=(), steps=(), tokens=tokens,
                           hidden=torch.zeros(0, 0, dtype=self.wire_dtype), rejected=rejected,
                           busy_ms=_held(msg, received))
        return Result(msg.epoch, msg.mb, (), (), (), (), rejected=rejected,
                      stage_ms=msg.stage_ms, busy_ms=_held(msg, received))

    def _sample(self, logits: torch.Tensor, msg: Step, seqs: list[int], lens: list[int],
                steps: list[int], tokens: torch.Tensor, reset: set[int]) -> list:
        """Each sequence's next token (models/text/sampling.py's picks), its history first
        extended by this step's rows (a reset one starts with its params)."""
        ids = tokens.tolist()
        offset = 0
        for i, n in zip(seqs, lens):
            s = self.sequences[i]
            if i in reset:
                if i not in msg.params:
                    raise StageError(f"sequence {i} starts without sampling params")
                s.params = msg.params[i]  # its history: none, or the rows it reused
            s.history.extend(ids[offset:offset + n])
            offset += n
        return sample(logits, [self.sequences[i].params for i in seqs],
                      [self.sequences[i].history for i in seqs], steps, self.model.greedy)
