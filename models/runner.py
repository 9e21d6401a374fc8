"""Running a range of a model on tensors: the compute a pipeline stage does, with no transport.

`StageModel` holds the parts of one stage (stage 0 also the embedding, the last stage also
the head) keyed by global block index, and chooses how its blocks run: decode.run_blocks
takes each run of them that C can in one call, the others through their modules' forward
(plain module code). A worker wraps it in ZeroMQ and Ray; tests and `LocalModel` call it
directly.
"""

from __future__ import annotations

import torch
from torch import nn

from llm_shard.models.base import Part
from llm_shard.models.cache import Batch, SequenceCache
from llm_shard.models.checkpoint.store import Store
from llm_shard.models.kernels import decode


class StageModel(nn.Module):
    def __init__(self, store: Store, start: int, end: int, *, embed: bool | None = None,
                 head: bool | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", load_blocks: bool = True) -> None:
        super().__init__()
        n = store.n_blocks
        if not 0 <= start < end <= n:
            raise ValueError(f"block range [{start}, {end}) is not inside [0, {n})")
        self.start, self.end = start, end
        self.has_embed = start == 0 if embed is None else embed
        self.has_head = end == n if head is None else head
        self.embed = store.load(Part("embed"), dtype, device) if self.has_embed else None
        # load_blocks=False: the caller keeps the blocks (a worker's memory tiers) and
        # passes `run_blocks` to forward, which chooses their path as decode.run_blocks
        self.blocks = nn.ModuleDict({str(i): store.load(Part("block", i), dtype, device)
                                     for i in range(start, end)} if load_blocks else {})
        self.head = store.load(Part("head"), dtype, device) if self.has_head else None
        self.greedy: list[int] | None = None  # the last forward's argmax of each row
        # the embedding reads its tokens' rows from its memory map (RowEmbedding), a tied
        # head's layer where this stage holds both: one copy of the table
        if self.embed is not None and self.head is not None:
            store.share_tied(self.embed, self.head)

    @torch.inference_mode()
    def forward(self, inputs: torch.Tensor, batch: Batch, all_logits: bool = False,
                run_blocks=None):
        """inputs: token ids (rows,) on the first stage, else hidden (rows, hidden).
        `run_blocks(x, batch)`, if given, runs the blocks instead of self.blocks.

        Returns hidden (rows, hidden), or on the last stage logits: (sequences, vocab)
        for each sequence's last row, or (rows, vocab) with all_logits. `self.greedy`:
        each row's argmax where the head ran in one C call (decode.run_head), else None.
        """
        x = self.embed(inputs, batch) if self.embed is not None else inputs
        if run_blocks is not None:
            x = run_blocks(x, batch)
        if self.blocks:
            x = decode.run_blocks(self.blocks.values(), x, batch)
        self.greedy = None
        if self.head is None:
            return x
        if not all_logits and x.shape[0] != len(batch.seq_lens):  # else one row each
            x = x[batch.last_rows]
        found = decode.run_head(self.head, x)
        if found is None:
            return self.head(x).float()
        logits, self.greedy = found
        return logits


class LocalModel:
    """A whole model in this process: for tests, conversion checks and quick generation.
    Its caches are `kv_dtype` (fp32: the reference numerics, unlike a served model's fp16)."""

    def __init__(self, store: Store | str, dtype: torch.dtype = torch.float32,
                 kv_dtype: str = "fp32") -> None:
        self.store = store if isinstance(store, Store) else Store.open(store)
        self.stage = StageModel(self.store, 0, self.store.n_blocks, dtype=dtype)
        self.kv_dtype = kv_dtype

    def logits(self, ids: list[int]) -> torch.Tensor:
        """(len(ids), vocab) logits of a full forward pass over one sequence."""
        cache = SequenceCache(kv_dtype=self.kv_dtype)
        return self.stage(torch.tensor(ids), Batch.of([len(ids)], [cache]), all_logits=True)

    def stream(self, ids: list[int], max_tokens: int, eos: tuple[int, ...] = ()):
        """Greedy continuation with the cache: prefill once, then one token per step."""
        cache, step = SequenceCache(kv_dtype=self.kv_dtype), list(ids)
        for _ in range(max_tokens):
            logits = self.stage(torch.tensor(step), Batch.of([len(step)], [cache]))
            greedy = self.stage.greedy
            token = greedy[0] if greedy is not None else int(logits[0].argmax())
            yield token
            if token in eos:
                return
            step = [token]

    def greedy(self, ids: list[int], max_tokens: int, eos: tuple[int, ...] = ()) -> list[int]:
        return list(self.stream(ids, max_tokens, eos))
