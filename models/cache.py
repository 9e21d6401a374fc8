"""Per-sequence caches and the batch descriptor that blocks receive.

Whoever runs the blocks (a worker, or a local runner) owns the caches; a block only
receives them through a `Batch`. Layer indices are the model's global ones. A layer keeps
either keys/values that grow with the sequence (`KVCache`, attention models) or a
fixed-size recurrent state that each step replaces (`StateCache`, RWKV).
"""

from __future__ import annotations

import copy
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

    def reserve(self, n: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Room for n more tokens past `offset`, in buffers of k's and v's dtype and device
        (k, v: (kv_heads, ..., head_dim)); `offset` is left as it is."""
        end = self.offset + n
        if self.k is None or end > self.k.shape[1]:
            cap = -(-end // CHUNK) * CHUNK
            shape = (k.shape[0], cap, k.shape[-1])
            new_k, new_v = k.new_empty(shape), v.new_empty(shape)
            if self.k is not None:
                new_k[:, : self.offset] = self.k[:, : self.offset]
                new_v[:, : self.offset] = self.v[:, : self.offset]
            self.k, self.v = new_k, new_v

    def update_and_fetch(self, k: torch.Tensor, v: torch.Tensor):
        """Append k, v (kv_heads, n, head_dim); return all keys and values so far."""
        n = k.shape[1]
        end = self.offset + n
        self.reserve(n, k, v)
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


class StateCache:
    """Recurrent state of one layer of one sequence (RWKV): a fixed-size tensor that each
    step replaces; `offset` counts the tokens folded into it."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None
        self.offset = 0

    def update(self, value: torch.Tensor, n: int) -> None:
        """Replace the state by `value`, which has absorbed n more tokens."""
        self.value = value
        self.offset += n

    def trim(self, n: int) -> None:
        if n:
            raise ValueError(f"a recurrent state cannot forget its last {n} tokens: replay "
                             "the sequence into a fresh cache instead")

    @property
    def nbytes(self) -> int:
        return 0 if self.value is None else self.value.numel() * self.value.element_size()


@dataclass(frozen=True)
class Prefix:
    """GLM's prompt context (ChatGLM-6B), one per sequence. Rows before `length` (the index
    of <sop>) attend to each other in both directions; from <sop> on, every row's position
    id is `mask_pos` (the index of [gMASK]/[MASK]) and its block position counts 1, 2, 3..."""

    length: int
    mask_pos: int


@dataclass
class SequenceCache:
    """All cached state of one sequence on one stage, by global layer index: a KVCache per
    attention layer, a StateCache per recurrent layer, and the sequence's GLM prefix."""

    layers: dict[int, KVCache] = field(default_factory=dict)
    states: dict[int, StateCache] = field(default_factory=dict)
    prefix: Prefix | None = None

    def layer(self, index: int) -> KVCache:
        cache = self.layers.get(index)
        if cache is None:
            cache = self.layers[index] = KVCache()
        return cache

    def state(self, index: int) -> StateCache:
        cache = self.states.get(index)
        if cache is None:
            cache = self.states[index] = StateCache()
        return cache

    @property
    def nbytes(self) -> int:
        return (sum(c.nbytes for c in self.layers.values())
                + sum(c.nbytes for c in self.states.values()))

    def trim(self, n: int) -> None:
        for c in self.layers.values():
            c.trim(n)
        for s in self.states.values():
            s.trim(n)


@dataclass
class Batch:
    """Layout of the rows a stage computes: several sequences' new tokens, flattened.

    Rows are grouped by sequence in order: sequence i owns `seq_lens[i]` consecutive
    rows. `positions` (rows,) holds each row's absolute position in its sequence.
    `prefixes` (optional, one per sequence, None where unknown) carries GLM prompt
    contexts to stages that never see the tokens; a sequence's cache remembers its prefix
    after the first step, so it is only needed when a sequence starts.
    """

    seq_lens: list[int]
    positions: torch.Tensor
    caches: list[SequenceCache]
    prefixes: list[Prefix | None] | None = None
    # values derived from the batch alone, shared by its layers (rotary tables)
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.seq_lens) != len(self.caches):
            raise ValueError(f"{len(self.seq_lens)} sequences but {len(self.caches)} caches")
        if sum(self.seq_lens) != self.positions.numel():
            raise ValueError(f"seq_lens sum to {sum(self.seq_lens)}, positions has "
                             f"{self.positions.numel()} rows")
        if self.prefixes is not None and len(self.prefixes) != len(self.seq_lens):
            raise ValueError(f"{len(self.seq_lens)} sequences but {len(self.prefixes)} prefixes")

    @classmethod
    def of(cls, seq_lens: list[int], caches: list[SequenceCache],
           prefixes: list[Prefix | None] | None = None) -> Batch:
        """Positions continue each sequence from its cache's current length."""
        starts = [_cache_len(c) for c in caches]
        pos = [torch.arange(s, s + n) for s, n in zip(starts, seq_lens)]
        return cls(list(seq_lens), pos[0] if len(pos) == 1 else torch.cat(pos) if pos
                   else torch.zeros(0, dtype=torch.long), caches, prefixes)

    @property
    def last_rows(self) -> torch.Tensor:
        """Index of each sequence's last row (where its next token is predicted)."""
        return torch.tensor(self.seq_lens).cumsum(0) - 1


def _cache_len(cache: SequenceCache) -> int:
    return max((c.offset for c in (*cache.layers.values(), *cache.states.values())),
               default=0)


def copy_prefix(cache: SequenceCache, n: int) -> SequenceCache:
    """A new SequenceCache holding the first n tokens of `cache` (the prefix cache: a new
    sequence starts from a finished one's rows). K/V rows are copied, in the source's
    dtype and device; the source is left as it is, for others to start from. A recurrent
    state folds all its tokens together: it is copied only whole (n == its length). A GLM
    prefix makes every prompt row depend on the whole prompt: such a cache is refused."""
    held = _cache_len(cache)
    if not 0 < n <= held:
        raise ValueError(f"cannot start a sequence from {n} rows of a cache that holds {held}")
    if cache.prefix is not None:
        raise ValueError("a cache with a GLM prompt context (Prefix) cannot start another "
                         "sequence: its rows depend on the whole prompt")
    if cache.states and n != held:
        raise ValueError(f"a recurrent state holds all {held} tokens folded together: a "
                         f"sequence can start from it whole, not from its first {n}")
    out = SequenceCache()
    for index, src in cache.layers.items():
        dst = out.layers[index] = copy.copy(src)  # keeps whatever else a KVCache records
        if src.k is not None:
            shape = (src.k.shape[0], -(-n // CHUNK) * CHUNK, src.k.shape[-1])
            dst.k, dst.v = src.k.new_empty(shape), src.v.new_empty(shape)
            dst.k[:, :n] = src.k[:, :n]
            dst.v[:, :n] = src.v[:, :n]
        dst.offset = n
    for index, src in cache.states.items():
        dst = out.states[index] = copy.copy(src)
        dst.value = None if src.value is None else src.value.clone()
    return out
