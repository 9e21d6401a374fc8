"""Per-sequence caches and the batch descriptor that blocks receive.

Whoever runs the blocks (a worker, or a local runner) owns the caches; a block only
receives them through a `Batch`. Layer indices are the model's global ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

CHUNK = 256  # cache rows grow in steps of this many tokens (fewer reallocations)


class CacheFull(RuntimeError):
    """A cache could not grow within its byte budget."""


class KVCache:
    """K and V of one layer of one sequence, stored (kv_heads, capacity, head_dim)."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.offset = 0

    def update_and_fetch(self, k: torch.Tensor, v: torch.Tensor):
        """Append k, v (kv_heads, n, head_dim); return all keys and values so far."""
        n = k.shape[1]
        end = self.offset + n
        if self.k is None or end > self.k.shape[1]:
            cap = -(-end // CHUNK) * CHUNK
            shape = (k.shape[0], cap, k.shape[2])
            new_k, new_v = k.new_empty(shape), v.new_empty(shape)
            if self.k is not None:
                new_k[:, : self.offset] = self.k[:, : self.offset]
                new_v[:, : self.offset] = self.v[:, : self.offset]
            self.k, self.v = new_k, new_v
        self.k[:, self.offset : end] = k
        self.v[:, self.offset : end] = v
        self.offset = end
        return self.k[:, :end], self.v[:, :end]

    def trim(self, n: int) -> None:
        """Forget the last n tokens."""
        self.offset = max(0, self.offset - n)

    @property
    def nbytes(self) -> int:
        if self.k is None:
            return 0
        return 2 * self.k.numel() * self.k.element_size()


@dataclass
class SequenceCache:
    """All cached state of one sequence on one stage: a KVCache per global layer index."""

    layers: dict[int, KVCache] = field(default_factory=dict)

    def layer(self, index: int) -> KVCache:
        cache = self.layers.get(index)
        if cache is None:
            cache = self.layers[index] = KVCache()
        return cache

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers.values())

    def trim(self, n: int) -> None:
        for c in self.layers.values():
            c.trim(n)


@dataclass
class Batch:
    """Layout of the rows a stage computes: several sequences' new tokens, flattened.

    Rows are grouped by sequence in order: sequence i owns `seq_lens[i]` consecutive
    rows. `positions` (rows,) holds each row's absolute position in its sequence.
    """

    seq_lens: list[int]
    positions: torch.Tensor
    caches: list[SequenceCache]

    def __post_init__(self) -> None:
        if len(self.seq_lens) != len(self.caches):
            raise ValueError(f"{len(self.seq_lens)} sequences but {len(self.caches)} caches")
        if sum(self.seq_lens) != self.positions.numel():
            raise ValueError(f"seq_lens sum to {sum(self.seq_lens)}, positions has "
                             f"{self.positions.numel()} rows")

    @classmethod
    def of(cls, seq_lens: list[int], caches: list[SequenceCache]) -> Batch:
        """Positions continue each sequence from its cache's current length."""
        starts = [_cache_len(c) for c in caches]
        pos = [torch.arange(s, s + n) for s, n in zip(starts, seq_lens)]
        return cls(list(seq_lens), torch.cat(pos) if pos else torch.zeros(0, dtype=torch.long),
                   caches)

    @property
    def last_rows(self) -> torch.Tensor:
        """Index of each sequence's last row (where its next token is predicted)."""
        return torch.tensor(self.seq_lens).cumsum(0) - 1


def _cache_len(cache: SequenceCache) -> int:
    return max((c.offset for c in cache.layers.values()), default=0)
