"""Parts shared by several architectures: norms, rotary embeddings, cached attention, MLPs.

Activations inside a stage are flattened rows (rows, hidden); `Batch` says which rows
belong to which sequence. Linear layers run on all rows at once; only attention loops
over sequences, each against its own cache.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from llm_shard.models.cache import Batch
from llm_shard.models.kernels import w8a16
from llm_shard.models.quant import fused_of


def no_graph(*tensors: torch.Tensor) -> bool:
    """Whether autograd records nothing of an op on `tensors`: then a C call may take its
    place (its result carries no gradient)."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


class RMSNorm(nn.Module):
    """LLaMA's norm: computed in fp32, weight only."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if no_graph(x, self.weight) and w8a16.can_rms_norm(x, self.weight):  # C, no autograd
            return w8a16.rms_norm(x, self.weight, self.eps)  # one call, not seven ops
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm, computed by one C call (w8a16.layer_norm) on float32 CPU rows: the
    bits of a block in one C call (models/kernels/decode.py), which computes it the same
    way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (no_graph(x, self.weight, self.bias)
                and w8a16.can_layer_norm(x, self.weight, self.bias)):
            return w8a16.layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)


class Rotary:
    """Half-split rotary embedding (Hugging Face's rotate_half convention).

    `scaling` follows Hugging Face's rope_scaling: {"type": "linear"|"dynamic", "factor"}.
    Dynamic NTK scaling depends on each sequence's current length.
    """

    def __init__(self, dim: int, base: float, max_positions: int,
                 scaling: dict | None = None, table_dtype: torch.dtype = torch.float32) -> None:
        # table_dtype=float16 computes inv_freq, positions, angles and cos/sin in fp16, as
        # ChatGLM-6B's code does (its checkpoints were made that way)
        self.dim, self.base, self.max_positions = dim, base, max_positions
        self.table_dtype = table_dtype
        self.kind = (scaling or {}).get("type") or (scaling or {}).get("rope_type") or "default"
        if self.kind not in ("default", "linear", "dynamic"):
            raise ValueError(f"rope scaling type {self.kind!r} is not supported "
                             "(supported: linear, dynamic)")
        self.factor = float((scaling or {}).get("factor", 1.0))
        self.inv_freq = self._inv_freq(base)

    def _inv_freq(self, base: float) -> torch.Tensor:
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, dtype=torch.float32,
                                             device="cpu") / self.dim))

    def cos_sin(self, positions: torch.Tensor, seq_len: int | None = None):
        """cos, sin of shape (rows, dim) for the given absolute positions."""
        inv_freq = self.inv_freq
        pos = positions.float()
        if self.kind == "linear":
            pos = pos / self.factor
        elif self.kind == "dynamic" and seq_len is not None and seq_len > self.max_positions:
            base = self.base * ((self.factor * seq_len / self.max_positions)
                                - (self.factor - 1)) ** (self.dim / (self.dim - 2))
            inv_freq = self._inv_freq(base)
        if self.table_dtype != torch.float32:
            t = self.table_dtype
            freqs = (pos.cpu().to(t)[:, None] * inv_freq.to(t)[None, :]).to(positions.device)
            emb = torch.cat((freqs, freqs), dim=-1).float()
            return emb.cos().to(t), emb.sin().to(t)
        freqs = torch.outer(pos.cpu(), inv_freq).to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (rows, heads, dim); cos/sin (rows, dim)."""
        # tables live where the batch's positions do (CPU); a GPU-tier block gets copies
        cos = cos[:, None, :].to(x.device, x.dtype)
        sin = sin[:, None, :].to(x.device, x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    @staticmethod
    def apply_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """GPT-J/CodeGen rotation of adjacent pairs (2i, 2i+1) by angle i, with the cos/sin of
        `cos_sin` (rows, dim): x (rows, heads, dim)."""
        half = x.shape[-1] // 2
        cos = cos[:, None, :half].repeat_interleave(2, -1).to(x.device, x.dtype)
        sin = sin[:, None, :half].repeat_interleave(2, -1).to(x.device, x.dtype)
        rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        return x * cos + rotated * sin


def rope_rows(rope: Rotary, batch: Batch):
    """cos/sin for every row of a batch; dynamic scaling uses each sequence's length.

    Computed once per batch and rotary setting, not once per layer (`batch.memo`).
    """
    key = ("rope", rope.dim, rope.base, rope.kind, rope.factor, rope.max_positions,
           rope.table_dtype)
    found = batch.memo.get(key)
    if found is None:
        found = batch.memo[key] = _rope_rows(rope, batch)
    return found


def rope_tables(rope: Rotary, batch: Batch, like: torch.Tensor):
    """(cos, signed sin), each (rows, 1, dim) on `like`'s device and dtype, for
    `rotate(x, cos, sin)`; once per batch, rotary setting, device and dtype. Float32 CPU
    rows of a rotary whose angles depend on the position alone are rows of `_position_tables`
    (the same bits, without a decode step's ten ops)."""
    key = ("rope3", rope.dim, rope.base, rope.kind, rope.factor, rope.max_positions,
           rope.table_dtype, like.device, like.dtype)
    found = batch.memo.get(key)
    if found is None:
        if (rope.kind != "dynamic" and rope.table_dtype == torch.float32
                and like.dtype == torch.float32 and like.device.type == "cpu"):
            pos = batch.positions
            last = int(pos[0]) if pos.numel() == 1 else int(pos.max()) if pos.numel() else 0
            cos, sin = _position_tables(rope, last + 1)
            found = (cos.index_select(0, pos)[:, None, :], sin.index_select(0, pos)[:, None, :])
        else:
            cos, sin = rope_rows(rope, batch)
            sin = _signed(sin)
            found = (cos[:, None, :].to(like.device, like.dtype),
                     sin[:, None, :].to(like.device, like.dtype))
        batch.memo[key] = found
    return found


def _signed(sin: torch.Tensor) -> torch.Tensor:
    """sin with rotate_half's sign on its first half (what `rotate` multiplies by)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[:, :half], sin[:, half:]), -1)


# (dim, base, kind, factor) -> float32 (cos, signed sin) of positions [0, n) on the CPU,
# shared by every block and stage of this process; n doubles as sequences grow
_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _position_tables(rope: Rotary, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope`'s (cos, signed sin) tables, float32 (n, dim) for n >= `positions`: rows of
    Rotary.cos_sin over torch.arange(n), so each row holds the bits that cos_sin computes
    for that position alone (elementwise ops)."""
    key = (rope.dim, rope.base, rope.kind, rope.factor)
    found = _TABLES.get(key)
    if found is None or found[0].shape[0] < positions:
        n = max(256, 1 << (positions - 1).bit_length())
        cos, sin = rope.cos_sin(torch.arange(n))
        found = _TABLES[key] = (cos, _signed(sin))
    return found


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`Rotary.apply` with the tables of `rope_tables`: the same bits, four ops (on the
    CPU in float32, one C call: w8a16.rotate)."""
    if w8a16.can_rotate(x, cos, signed_sin):
        return w8a16.rotate(x, cos, signed_sin)
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def _rope_rows(rope: Rotary, batch: Batch):
    if rope.kind != "dynamic":
        return rope.cos_sin(batch.positions)
    parts, row = [], 0
    for n in batch.seq_lens:
        pos = batch.positions[row: row + n]
        parts.append(rope.cos_sin(pos, seq_len=int(pos[-1]) + 1 if n else 0))
        row += n
    return torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch,
                     layer: int, scale: float | None = None,
                     prefix_lens: list[int] | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new rows against its cache.

    q (rows, heads, d), k/v (rows, kv_heads, d); returns (rows, heads, d). The new k/v
    are appended to the cache of `layer` (a global index) first. `prefix_lens` (one per
    sequence) makes the first columns visible to every row: GLM's bidirectional prompt.
    """
    out = torch.empty_like(q)
    row = 0
    for i, (n, cache) in enumerate(zip(batch.seq_lens, batch.caches)):
        if n == 0:
            continue
        if n == 1:  # a decode step: no mask, and no copy of the cache per GQA group
            _decode_row(q[row], k[row], v[row], cache.layer(layer), scale, out[row])
            row += 1
            continue
        if (n <= ROW_BY_ROW_ROWS and not (prefix_lens and prefix_lens[i])
                and _row_by_row(q[row: row + n], k[row: row + n], v[row: row + n],
                                cache.layer(layer), scale, out[row: row + n])):
            row += n
            continue
        keys, values = cache.layer(layer).update_and_fetch(
            k[row: row + n].transpose(0, 1), v[row: row + n].transpose(0, 1))
        total = keys.shape[1]
        # row i sees every cached token and new tokens up to itself
        mask = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(total - n)
        if prefix_lens is not None and prefix_lens[i]:
            mask[:, : prefix_lens[i]] = True
        # (heads, n, d) against (kv_heads, total, d)
        o = F.scaled_dot_product_attention(
            q[row: row + n].transpose(0, 1), keys, values, attn_mask=mask, scale=scale,
            enable_gqa=keys.shape[0] != q.shape[1])
        out[row: row + n] = o.transpose(0, 1)
        row += n
    return out


# A sequence's new rows up to this many attend one by one, each as its decode step would
# (w8a16.append_attend: its k, v written, then its query against every row up to it), on
# the CPU in float32: the rows of a short prompt then get the bits of decoding it token by
# token, in the modules and in a block's one C call alike (models/kernels/decode.py, which
# takes such rows too). Longer prompts run SDPA, which catches up with the one C call a
# block at a few hundred rows; the modules take these rows one call a row from Python, so
# the bound stays low.
ROW_BY_ROW_ROWS = 64


def _row_by_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv, scale: float | None,
                out: torch.Tensor) -> bool:
    """One sequence's n new rows (q (n, heads, d), k and v (n, kv_heads, d)) appended to
    its KVCache `kv` and attended row by row, each to the rows up to it, into `out`; False
    (nothing done) where the C attention cannot run them."""
    n = q.shape[0]
    kv.reserve(n, k[0], v[0])
    if not (w8a16.can_append_attend(q[0], k[0], v[0], kv.k, kv.v) and q.is_contiguous()
            and k.is_contiguous() and v.is_contiguous() and out.is_contiguous()):
        return False
    scale = default_scale(q.shape[-1]) if scale is None else scale
    for j in range(n):
        w8a16.append_attend(q[j], k[j], v[j], kv.k, kv.v, kv.offset + j + 1, scale, out[j])
    kv.offset += n
    return True


def _decode_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv, scale: float | None,
                out: torch.Tensor) -> None:
    """One sequence's decode step: k, v (kv_heads, d) appended to its KVCache `kv`, and
    q's (heads, d) attention over the cache written into `out`. On the CPU in float32 one
    C call does both (w8a16.append_attend)."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    kv.reserve(1, k, v)
    if w8a16.can_append_attend(q, k, v, kv.k, kv.v) and out.is_contiguous():
        w8a16.append_attend(q, k, v, kv.k, kv.v, kv.offset + 1, scale, out)
        kv.offset += 1
        return
    keys, values = kv.update_and_fetch(k.unsqueeze(1), v.unsqueeze(1))
    out.copy_(_one_query(q, keys, values, scale))


def _one_query(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               scale: float) -> torch.Tensor:
    """Attention of one row q (heads, d) against keys/values (kv_heads, total, d).

    SDPA's CPU path for one row repeats every cached key and value once per query head of
    its group (enable_gqa); here each kv head's group of query heads is one (groups, d) x
    (d, total) product. Softmax runs in float32. On the CPU in
    float32 one C call does all of it (w8a16.attend): these seven torch ops cost more than
    their work at decode's sizes.
    """
    kv_heads, _, d = keys.shape
    if w8a16.can_attend(q, keys, values):
        return w8a16.attend(q, keys, values, scale)
    qg = q.view(kv_heads, -1, d) * scale
    probs = torch.softmax(torch.bmm(qg, keys.transpose(1, 2)), -1, dtype=torch.float32)
    return torch.bmm(probs.to(values.dtype), values).view(q.shape)


def project(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """Each of `linears` applied to x, which they all read: one int8 kernel call where
    Store.load fused them (`shared_input`, models/quant.py fuse_int8), else one each."""
    fused = fused_of(linears)
    if fused is None:
        return tuple(m(x) for m in linears)
    return tuple(t.contiguous() for t in fused(x).split([m.out_features for m in linears], -1))


class SwiGLU(nn.Module):
    """LLaMA's MLP: down(silu(gate(x)) * up(x)); names follow Hugging Face."""

    shared_input = (("gate_proj", "up_proj"),)  # one int8 call (quant.fuse_int8)

    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mlp(x, (self.gate_proj, self.up_proj), self.down_proj, gelu=False)


class GeluMLP(nn.Module):
    """GPT-2-style MLP with erf GELU: c_proj(gelu(c_fc(x)))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden)
        self.c_proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mlp(x, (self.c_fc,), self.c_proj, gelu=True)


def mlp(x: torch.Tensor, up: tuple[nn.Module, ...], down: nn.Module,
        gelu: bool) -> torch.Tensor:
    """GeluMLP's down(gelu(fc(x))) (up: (fc,)) or SwiGLU's down(silu(gate(x)) * up(x))
    (up: (gate, up), one int8 call where fused). On float32 CPU rows the elementwise step
    is one C call: the bits of a block in one C call (models/kernels/decode.py). A CUDA
    graph's MLP too (models/kernels/cuda_graphs.py)."""
    if gelu:
        h = up[0](x)
        c = no_graph(h) and w8a16.can_elementwise(h)
        return down(w8a16.gelu(h) if c else F.gelu(h))
    gate, u = project(x, *up)
    if no_graph(gate, u) and w8a16.can_elementwise(gate, u):
        return down(w8a16.silu_mul(gate, u))
    return down(F.silu(gate) * u)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


class BlockParts(NamedTuple):
    """A pre-norm block's parts, named for the paths that run a whole block at once (a
    block's `decode_args()`: models/kernels/decode.py's one C call, cuda_graphs' graphs):
    x + o(attention(qkv(norm1(x)))), then that + down(act(up(norm2(that))))."""

    layer: int  # the global index of the block's cache
    norm1: nn.Module
    qkv: tuple  # the q, k and v projections, reading norm1's output
    o: nn.Module
    norm2: nn.Module
    up: tuple  # (gate, up) of a SwiGLU, or (fc,) of a GeluMLP
    down: nn.Module
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    gelu: bool
    rope: Rotary | None  # rotary for q and k, or none
    # PanGu-α's query layer: (normf, q_proj, wqe): x = normf(x) first, the queries are
    # q_proj(wqe(positions)), and qkv is (k_proj, v_proj)
    query: tuple = ()
