"""The compute of one pipeline stage on decoded messages: its blocks, its sequences'
caches, and on the last stage the sampler. No ZeroMQ and no Ray: `StageRunner.step`
takes a message's fields and tensors and returns the next message's, so tests chain
stages in one process and the actor (worker/actor.py) only moves bytes.

A step carries, for each sequence in a micro-batch, its new token rows (`lens`), and
`tokens` (the input ids, also forwarded to later stages so the last one keeps each
sequence's history for the repetition penalty). A sequence named in `reset` starts a
fresh cache: a new request, or one replayed after a failure. `free` drops caches.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from llm_shard.cluster import wire
from llm_shard.cluster.types import SamplingParams, Tier, sequence_bytes
from llm_shard.models.cache import Batch, Prefix, SequenceCache
from llm_shard.models.checkpoint.store import Store
from llm_shard.models.runner import StageModel
from llm_shard.models.text.sampling import sample

from .tiers import TieredBlocks

log = logging.getLogger(__name__)

STEP, RESULT, FREE = "step", "result", "free"
CACHE_FULL = "cache full"


class StageError(ValueError):
    """A step this stage cannot run (an unknown sequence, rows that do not add up)."""


@dataclass
class _Sequence:
    cache: SequenceCache
    tokens: int = 0  # tokens held in the cache
    params: SamplingParams | None = None  # last stage only
    history: list[int] = field(default_factory=list)  # last stage only


class StageRunner:
    """Blocks [start, end) of a store, the caches of the sequences passing through, and
    (last stage) the sampler. `cache_budget` (float32 bytes per block, see
    `block_cache_budget`) bounds the caches; a sequence that would overflow it is rejected
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

    def free(self, seq_ids) -> None:
        for i in seq_ids:
            self.sequences.pop(int(i), None)

    def _admit(self, seqs: list[int], lens: list[int], reset: set[int]) -> dict[int, str]:
        """Make room for this step's rows; return {seq: reason} for those rejected."""
        rejected: dict[int, str] = {}
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
            grow = self._cost((held or 0) + n) - now
            if used + grow > self.cache_budget:
                rejected[i] = (f"{CACHE_FULL}: blocks [{self.start}, {self.end}) hold "
                               f"{used} of {self.cache_budget} cache bytes per block; "
                               f"sequence {i} needs {grow} more")
                self.sequences.pop(i, None)
                used -= now
                continue
            used += grow
            if i not in self.sequences:
                self.sequences[i] = _Sequence(SequenceCache())
        return rejected

    # ------------------------------------------------------------------ compute
    def step(self, fields: dict, tensors: dict[str, torch.Tensor]) -> tuple[str, dict, dict]:
        """Run one step message; returns (kind, fields, tensors) of the message to send on:
        another step for the next stage, or the result (sampled tokens) from the last."""
        seqs, lens = [int(i) for i in fields["seqs"]], [int(n) for n in fields["lens"]]
        if len(seqs) != len(lens) or len(set(seqs)) != len(seqs):
            raise StageError(f"step names sequences {seqs} with row counts {lens}")
        if any(n < 1 for n in lens):
            raise StageError(f"every sequence needs at least one row, got {lens}")
        tokens = tensors.get("tokens")
        if tokens is None or tokens.dim() != 1 or tokens.numel() != sum(lens):
            raise StageError(f"step needs `tokens` of {sum(lens)} rows, got "
                             f"{None if tokens is None else tuple(tokens.shape)}")
        hidden = None
        if not self.first:
            hidden = tensors.get("hidden")
            if hidden is None or hidden.dim() != 2 or hidden.shape[0] != sum(lens):
                raise StageError(f"step needs `hidden` of {sum(lens)} rows, got "
                                 f"{None if hidden is None else tuple(hidden.shape)}")
        self.free(fields.get("free", ()))
        reset = {int(i) for i in fields.get("reset", ())}
        rejected = dict(fields.get("rejected", {}))
        new_rejects = self._admit(seqs, lens, reset)
        rejected.update({str(k): v for k, v in new_rejects.items()})
        if new_rejects:  # drop the rejected sequences' rows before computing
            keep = [j for j, i in enumerate(seqs) if i not in new_rejects]
            rows = torch.cat([torch.arange(sum(lens[:j]), sum(lens[:j + 1])) for j in keep]) \
                if keep else torch.zeros(0, dtype=torch.long)
            tokens = tokens[rows]
            hidden = hidden[rows] if hidden is not None else None
            seqs, lens = [seqs[j] for j in keep], [lens[j] for j in keep]
        out_fields = {k: v for k, v in fields.items() if k != "rejected"}
        if new_rejects and "steps" in fields:
            out_fields["steps"] = [fields["steps"][j] for j in keep]
        out_fields.update(seqs=seqs, lens=lens, rejected=rejected)
        if not seqs:
            return self._empty(out_fields, tokens)

        known = fields.get("prefixes") or {}  # GLM prompt contexts, from the first stage
        prefixes = [Prefix(*known[str(i)]) if str(i) in known else None for i in seqs]
        batch = Batch.of(lens, [self.sequences[i].cache for i in seqs],
                         prefixes if any(prefixes) else None)
        x = tokens if self.first else wire.from_wire(hidden, self.dtype)
        if self.device.type != "cpu":
            x = x.to(self.device)
        t0 = time.perf_counter()
        out = self.model(x, batch, run_blocks=self.blocks.run)
        out_fields["stage_ms"] = [*fields.get("stage_ms", ()), (time.perf_counter() - t0) * 1e3]
        for i, n in zip(seqs, lens):
            self.sequences[i].tokens += n
        if self.first and batch.prefixes is not None:
            out_fields["prefixes"] = {str(i): [p.length, p.mask_pos]
                                      for i, p in zip(seqs, batch.prefixes)
                                      if p is not None and i in reset}
        if not self.last:
            hidden = wire.to_wire(out, self.wire_dtype)
            return STEP, out_fields, {"tokens": tokens, "hidden": hidden}
        return RESULT, self._sample(out, out_fields, tokens, reset), {}

    def _empty(self, out_fields: dict, tokens: torch.Tensor) -> tuple[str, dict, dict]:
        """Every sequence was rejected: pass the rejections on with no rows."""
        if not self.last:
            return STEP, out_fields, {"tokens": tokens,
                                      "hidden": torch.zeros(0, 0, dtype=self.wire_dtype)}
        out_fields.pop("params", None), out_fields.pop("steps", None)
        out_fields.update(sampled=[], logprobs=[], top=[])
        return RESULT, out_fields, {}

    def _sample(self, logits: torch.Tensor, out_fields: dict, tokens: torch.Tensor,
                reset: set[int]) -> dict:
        seqs, lens = out_fields["seqs"], out_fields["lens"]
        params_in = out_fields.pop("params", {}) or {}
        ids = tokens.tolist()
        offset = 0
        for i, n in zip(seqs, lens):
            s = self.sequences[i]
            if i in reset:
                p = params_in.get(str(i))
                if p is None:
                    raise StageError(f"sequence {i} starts without sampling params")
                s.params, s.history = SamplingParams.from_dict(p), []
            s.history.extend(ids[offset:offset + n])
            offset += n
        steps = [int(k) for k in out_fields.pop("steps")]
        picked = sample(logits, [self.sequences[i].params for i in seqs],
                        [self.sequences[i].history for i in seqs], steps)
        out_fields.update(sampled=[p.token for p in picked],
                          logprobs=[p.logprob for p in picked],
                          top=[[list(t) for t in p.top_logprobs] if p.top_logprobs is not None
                               else None for p in picked])
        return out_fields
