"""Per-sequence caches and the batch descriptor that blocks receive.

Whoever runs the blocks (a worker, or a local runner) owns the caches; a block only
receives them through a `Batch`. Layer indices are the model's global ones. A layer keeps
either keys/values that grow with the sequence (`KVCache`, attention models) or a
fixed-size recurrent state that each step replaces (`StateCache`, RWKV).

K/V are stored in the sequence's `kv_dtype` (KV_DTYPES: fp16 by default, fp32, or int8
with a float32 scale per head and token) and read back in the dtype attention computes in.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

CHUNK = 256  # cache rows grow in steps of this many tokens (fewer reallocations)

# What a KVCache stores K and V in. int8 rows come with a float32 scale per head and token
# (symmetric, amax / 127 over the head's d values): kv_heads x 4 bytes a token for each.
KV_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "int8": torch.int8}
DEFAULT_KV_DTYPE = "fp16"


def kv_dtype_of(name: str) -> torch.dtype:
    if name not in KV_DTYPES:
        raise ValueError(f"unknown KV cache dtype {name!r}; choose one of "
                         f"{', '.join(KV_DTYPES)}")
    return KV_DTYPES[name]


def kv_bytes_per_token(heads: int, head_dim: int, kv_dtype: str) -> int:
    """Bytes one token's K and V take in one layer: `heads` vectors of `head_dim` each."""
    dtype = kv_dtype_of(kv_dtype)
    scale = 4 if dtype == torch.int8 else 0
    return 2 * heads * (head_dim * dtype.itemsize + scale)


class CacheFull(RuntimeError):
    """A cache could not grow within its byte budget."""


class KVCache:
    """K and V of one layer of one sequence, stored (kv_heads, capacity, head_dim) in
    `dtype` (KV_DTYPES' name); int8 with `k_scales`, `v_scales` (kv_heads, capacity)."""

    def __init__(self, dtype: str = DEFAULT_KV_DTYPE) -> None:
        self.dtype = kv_dtype_of(dtype)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.k_scales: torch.Tensor | None = None
        self.v_scales: torch.Tensor | None = None
        self.offset = 0

    def reserve(self, n: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Room for n more tokens past `offset`, in buffers of the cache's dtype on k's
        device (k, v: (kv_heads, ..., head_dim)); `offset` is left as it is."""
        end = self.offset + n
        if self.k is None or end > self.k.shape[1]:
            cap = -(-end // CHUNK) * CHUNK
            shape = (k.shape[0], cap, k.shape[-1])
            new_k, new_v = (k.new_empty(shape, dtype=self.dtype) for _ in "kv")
            if self.k is not None:
                new_k[:, : self.offset] = self.k[:, : self.offset]
                new_v[:, : self.offset] = self.v[:, : self.offset]
            self.k, self.v = new_k, new_v
            if self.dtype == torch.int8:
                new_ks, new_vs = (k.new_empty(shape[:2], dtype=torch.float32) for _ in "kv")
                if self.k_scales is not None:
                    new_ks[:, : self.offset] = self.k_scales[:, : self.offset]
                    new_vs[:, : self.offset] = self.v_scales[:, : self.offset]
                self.k_scales, self.v_scales = new_ks, new_vs

    def update_and_fetch(self, k: torch.Tensor, v: torch.Tensor):
        """Append k, v (kv_heads, n, head_dim); return all keys and values so far, in k's
        dtype (a float32 model attends in float32 over an fp16 or int8 cache)."""
        n = k.shape[1]
        end = self.offset + n
        self.reserve(n, k, v)
        if self.dtype == torch.int8:
            self.k[:, self.offset : end], self.k_scales[:, self.offset : end] = _rows_int8(k)
            self.v[:, self.offset : end], self.v_scales[:, self.offset : end] = _rows_int8(v)
        else:
            self.k[:, self.offset : end] = k
            self.v[:, self.offset : end] = v
        self.offset = end
        return (_read(self.k, self.k_scales, end, k.dtype),
                _read(self.v, self.v_scales, end, v.dtype))

    def trim(self, n: int) -> None:
        """Forget the last n tokens."""
        self.offset = max(0, self.offset - n)

    @property
    def nbytes(self) -> int:
        if self.k is None:
            return 0
        scales = 0 if self.k_scales is None else 2 * self.k_scales.numel() * 4
        return 2 * self.k.numel() * self.k.element_size() + scales


def _rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (kv_heads, n, d) as int8 rows and a float32 scale per head and token."""
    x = x.float()
    amax = x.abs().amax(dim=-1)
    scales = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(x / scales[..., None]).clamp_(-127, 127).to(torch.int8), scales


def _read(buf: torch.Tensor, scales: torch.Tensor | None, end: int,
          dtype: torch.dtype) -> torch.Tensor:
    """The first `end` tokens of a cache buffer in `dtype` (the buffer itself where its
    dtype is that already)."""
    rows = buf[:, :end]
    if scales is None:
        return rows if rows.dtype == dtype else rows.to(dtype)
    return rows.to(dtype) * scales[:, :end, None].to(dtype)


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
    kv_dtype: str = DEFAULT_KV_DTYPE  # what its KVCaches store K/V in (KV_DTYPES)

    def __post_init__(self) -> None:
        kv_dtype_of(self.kv_dtype)

    def layer(self, index: int) -> KVCache:
        cache = self.layers.get(index)
        if cache is None:
            cache = self.layers[index] = KVCache(self.kv_dtype)
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
    out = SequenceCache(kv_dtype=cache.kv_dtype)
    for index, src in cache.layers.items():
        dst = out.layers[index] = copy.copy(src)  # keeps whatever else a KVCache records
        if src.k is not None:
            shape = (src.k.shape[0], -(-n // CHUNK) * CHUNK, src.k.shape[-1])
            dst.k, dst.v = src.k.new_empty(shape), src.v.new_empty(shape)
            dst.k[:, :n] = src.k[:, :n]
            dst.v[:, :n] = src.v[:, :n]
        if src.k_scales is not None:  # int8 rows' scales, one per head and token
            dst.k_scales, dst.v_scales = (x.new_empty(shape[:2]) for x in (src.k_scales,
                                                                          src.v_scales))
            dst.k_scales[:, :n] = src.k_scales[:, :n]
            dst.v_scales[:, :n] = src.v_scales[:, :n]
        dst.offset = n
    for index, src in cache.states.items():
        dst = out.states[index] = copy.copy(src)
        dst.value = None if src.value is None else src.value.clone()
    return out
