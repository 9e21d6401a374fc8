"""One C call per block for the rows of a decode step or a short prompt (models/kernels/w8a16.py:
w8a16_block).

A pre-norm block (norm, attention with its KV cache, residual; norm, MLP, residual) runs
~20 torch ops and Python calls a layer around its int8 kernels. At decode's sizes these
cost more than the kernels' work: on SmolLM2-135M, ~0.7 ms of a layer's ~0.9, and the
weight stream between them evicts their code and data from the caches, so each runs cold.
Where each sequence of the batch has 1 to layers.ROW_BY_ROW_ROWS new rows (a decode step,
or a short prompt, whose rows attend one by one as their decode steps would), and the
block's activations are float32 on the CPU with every int8 layer on w8a16, `block` makes
the block's calls from C in one: the same C functions, in the same order, as the modules
make them one by one (layers.py: RMSNorm, LayerNorm, rotate, _decode_row, _row_by_row,
SwiGLU, GeluMLP). So the result has the same bits either way (tests/test_decode.py), and a
sequence's tokens do not depend on which path ran, nor on whether its prompt came in one
step or token by token. Elsewhere (a longer prompt, a GPU tier, bf16, another kernel)
`block` returns None and the modules run. A 16-token prompt of SmolLM2-135M took 46 ms
through the modules, 36 ms here (a Xeon, 2 cores). `run_blocks` runs a stage's blocks
with one C call for each run of them that can go there: their Python (caches, pointers)
then runs back to back, warm, not between weight streams that leave it cold.

LLM_SHARD_FUSED_BLOCKS=0 turns it off (to compare: `llm-shard bench`).
"""

from __future__ import annotations

import ctypes
import os
import weakref
from contextlib import contextmanager

import torch
from torch import nn

from llm_shard.models.cache import Batch
from llm_shard.models.kernels import cuda_graphs, w8a16
from llm_shard.models.layers import ROW_BY_ROW_ROWS, RMSNorm, no_graph, rope_tables
from llm_shard.models.quant import plan_epoch, plan_serials, w8a16_calls

ENABLED = os.environ.get("LLM_SHARD_FUSED_BLOCKS", "1") != "0"
PARTS = 3  # layers one projection may have (the C code's PARTS)


@contextmanager
def modules_only():
    """Inside, every block runs through its modules: no one C call a block, no CUDA graphs
    (a benchmark's A/B, forward hooks)."""
    global ENABLED
    was = ENABLED, cuda_graphs.ENABLED
    ENABLED = cuda_graphs.ENABLED = False
    try:
        yield
    finally:
        ENABLED, cuda_graphs.ENABLED = was


class _Lin(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("s", ctypes.c_void_p), ("mins", ctypes.c_void_p),
                ("b", ctypes.c_void_p), ("O", ctypes.c_int), ("I", ctypes.c_int),
                ("group", ctypes.c_int), ("nib", ctypes.c_int), ("lo", ctypes.c_int)]


class _Proj(ctypes.Structure):
    _fields_ = [("part", _Lin * PARTS), ("n", ctypes.c_int)]


class _Block(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("d", "heads", "kv", "hd", "inter", "layer_norm",
                                            "gelu")] + [
        ("eps", ctypes.c_float), ("scale", ctypes.c_float)] + [
        (n, ctypes.c_void_p) for n in ("n1w", "n1b", "n2w", "n2b")] + [
        (n, _Proj) for n in ("qkv", "o", "up", "down")] + [
        ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("threads", ctypes.c_int),
        ("attend_threaded", ctypes.c_long)] + [
        (n, ctypes.c_void_p) for n in ("nfw", "nfb", "qin")] + [("qp", _Proj)]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _proj(layers) -> _Proj | None:
    calls = w8a16_calls(layers)
    if calls is None or len(calls) > PARTS:
        return None
    p = _Proj(n=len(calls))
    for i, (w, s, mins, b, group, lo) in enumerate(calls):
        p.part[i] = _Lin(w.data_ptr(), s.data_ptr(), _ptr(mins), _ptr(b), w.shape[0],
                         w.shape[1] * (1 if lo is None else 2), group, lo is not None,
                         lo or 0)
    return p


def _norm(m: nn.Module) -> tuple[int, float, int, int | None] | None:
    """(layer_norm, eps, weight, bias) of an RMSNorm or a LayerNorm the C code computes."""
    w = m.weight
    if not (w.dtype == torch.float32 and w.is_cpu and w.is_contiguous()):
        return None
    if isinstance(m, RMSNorm):
        return 0, m.eps, w.data_ptr(), None
    if (isinstance(m, nn.LayerNorm) and m.bias is not None and m.bias.is_contiguous()
            and m.bias.dtype == torch.float32 and m.bias.is_cpu):
        return 1, m.eps, w.data_ptr(), m.bias.data_ptr()
    return None


def _decode_rows(batch: Batch) -> int:
    """The batch's row count where each sequence has 1 to ROW_BY_ROW_ROWS new rows (a
    decode step, or a short prompt that layers.cached_attention attends row by row), else
    -1 (once per batch)."""
    rows = batch.memo.get("decode_rows")
    if rows is None:
        lens = batch.seq_lens
        rows = batch.memo["decode_rows"] = (
            sum(lens) if lens and all(1 <= n <= ROW_BY_ROW_ROWS for n in lens) else -1)
    return rows


# A block's _Block, built once per block module: building it (the norms' and projections'
# pointers, ctypes structs) cost ~0.25 ms a layer with the caches cold from the weights
# streamed before it, more than a SmolLM2 layer's int8 kernels. Kept while its key holds:
# the projections' plan serials (a new plan, after a load, a move or a re-fuse, changes
# them), the norms and the shapes; checked in full only after some plan changed
# (plan_epoch). None: the modules run that block.
_SPECS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _spec(d: int, norm1: nn.Module, qkv: tuple, o: nn.Module, norm2: nn.Module, up: tuple,
          down: nn.Module, query: tuple, **shape) -> _Block | None:
    epoch, found = plan_epoch(), _SPECS.get(norm1)
    norms = (norm1, norm2, *query[:1])
    fast = (d, *shape.values(), *(_ptr(_tensor(m, n)) for m in norms
                                  for n in ("weight", "bias")))
    if found is not None and found[0] == epoch and found[1] == fast:
        return found[3]
    ns = [_norm(m) for m in norms]
    key = (*ns, plan_serials((*qkv, o, *up, down, *query[1:2])), tuple(shape))
    if found is None or found[1] != fast or found[2] != key:
        found = (epoch, fast, key, _build(d, ns, qkv, o, up, down, query[1:2], **shape))
    _SPECS[norm1] = (epoch, *found[1:])
    return found[3]


def _tensor(m: nn.Module, name: str) -> torch.Tensor | None:
    """`getattr(m, name, None)` for a tensor, without nn.Module.__getattr__ (the lookup
    that fails before it costs more than the rest of a block's key)."""
    d = m.__dict__
    for where in (d["_parameters"], d["_buffers"], d):
        if name in where:
            return where[name]
    return None


def _build(d: int, norms: list, qkv: tuple, o: nn.Module, up: tuple, down: nn.Module,
           q: tuple, *, heads: int, kv_heads: int, head_dim: int, scale: float, gelu: bool
           ) -> _Block | None:
    """norms: norm1's, norm2's and the query layer's first norm's `_norm`; q: () or the
    query layer's (q_proj,)."""
    if (w8a16.problem() is not None or None in norms
            or any(n[:2] != norms[0][:2] for n in norms)):
        return None
    projs = [_proj(qkv), _proj((o,)), _proj(up), _proj((down,)), _proj(q) if q else _Proj()]
    if any(p is None for p in projs):
        return None
    (_, eps, n1w, n1b), (_, _, n2w, n2b) = norms[:2]
    nf = norms[2][2:] if q else (None, None)
    return _Block(d=d, heads=heads, kv=kv_heads, hd=head_dim, inter=down.in_features,
                  layer_norm=norms[0][0], gelu=int(gelu), eps=eps, scale=scale, n1w=n1w,
                  n1b=n1b, n2w=n2w, n2b=n2b, qkv=projs[0], o=projs[1], up=projs[2],
                  down=projs[3], nfw=nf[0], nfb=nf[1], qp=projs[4])


def block(module: nn.Module, x: torch.Tensor, batch: Batch) -> torch.Tensor | None:
    """A block's x + attn(norm1(x)), then that + mlp(norm2(that)), in one C call; or None
    where its modules must run it (see the module docstring). `module.decode_args()`
    names its parts: (layer, norm1, qkv, o, norm2, up, down, shape, rope), where qkv are
    the q, k and v projections (reading norm1's output), up is (gate, up) of a SwiGLU or
    (fc,) of a GELU MLP, down its output projection, shape the keywords heads, kv_heads,
    head_dim, scale and gelu, rope a layers.Rotary for q and k (or None), and layer the
    global index of the block's cache. PanGu-α's query layer adds a tenth, (normf,
    q_proj, wqe): x = normf(x) first, and the queries are q_proj(wqe(positions)), qkv
    then (k_proj, v_proj)."""
    y, ran = blocks((module,), x, batch)
    return y if ran else None


def blocks(modules, x: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, int]:
    """The longest run of `modules` from the first that can go in C, in one call (each a
    block with `decode_args()`, as `block` takes them); returns (output, how many ran): 0
    where the first must run through its modules. One call for a stage's blocks leaves
    the Python of all its layers together, warm, before the weights stream."""
    if not _decode_step(x, batch):
        return x, 0
    specs, layers, kc, vc, ks, vs, total = [], [], [], [], [], [], []
    keep = []  # the query layer's query rows, alive until the call returns
    for m in modules:  # decode_args of each until one cannot go: O(blocks) a stage
        args = getattr(m, "decode_args", None)
        found = args() if args is not None else None
        if found is None:
            break
        layer, norm1, qkv, o, norm2, up, down, shape, rope, *query = found
        query = query[0] if query else ()
        spec = _spec(x.shape[1], norm1, qkv, o, norm2, up, down, query, **shape)
        rows = query[2](batch.positions) if spec is not None and query else None
        if spec is None or (rows is not None and not _cpu_float32_rows(rows, x)) or \
                not _caches(batch, layer, x, shape, kc, vc, ks, vs, total):
            break
        spec = _Block.from_buffer_copy(spec)  # this call's: another thread may run the block
        if rows is not None:
            spec.qin = rows.data_ptr()
            keep.append(rows)
        tables = rope_tables(rope, batch, x) if rope is not None else None
        spec.cos, spec.sin = _ptr(tables and tables[0]), _ptr(tables and tables[1])
        spec.threads, spec.attend_threaded = torch.get_num_threads(), w8a16.ATTEND_THREADED
        specs.append(spec)
        layers.append(layer)
    return _run(x, batch, specs, layers, kc, vc, ks, vs, total)


def _cpu_float32_rows(rows: torch.Tensor, x: torch.Tensor) -> bool:
    return (rows.dtype == torch.float32 and rows.is_cpu and rows.is_contiguous()
            and rows.shape == x.shape)


def run_blocks(modules, x: torch.Tensor, batch: Batch) -> torch.Tensor:
    """`modules` in order: each run of blocks that can go in C in one call, the others
    through their forward (all of them, where the step is not one C can run)."""
    modules = list(modules)
    if not _decode_step(x, batch):
        if cuda_graphs.usable(x, batch):  # GPU-resident blocks: their CUDA graphs
            return cuda_graphs.run_blocks(modules, x, batch)
        for m in modules:
            x = m(x, batch)
        return x
    k = 0
    while k < len(modules):
        x, ran = blocks(modules[k:], x, batch)
        if not ran:
            x, ran = modules[k](x, batch), 1
        k += ran
    return x


def _decode_step(x: torch.Tensor, batch: Batch) -> bool:
    """Whether C may run blocks on x: float32 rows on the CPU, 1 to ROW_BY_ROW_ROWS of
    each sequence (`_decode_rows`), no graph being built."""
    return (ENABLED and x.dtype == torch.float32 and x.is_cpu and x.dim() == 2
            and x.is_contiguous() and _decode_rows(batch) == x.shape[0] and no_graph(x))


def _run(x: torch.Tensor, batch: Batch, specs: list, layers: list[int], kc, vc, ks, vs,
         total) -> tuple[torch.Tensor, int]:
    """specs' blocks over x in one C call; their caches' pointers, strides and lengths in
    kc, vc, ks, vs and total (rows per block). Returns (output, len(specs))."""
    n, rows = len(specs), x.shape[0]
    if not n:
        return x, 0
    out, done = x.clone(), ctypes.c_int(0)
    per = rows * n  # block l's rows at [l * rows, (l + 1) * rows)
    err = w8a16.load().w8a16_blocks_run(
        (ctypes.POINTER(_Block) * n)(*(ctypes.pointer(s) for s in specs)), n,
        out.data_ptr(), rows, (ctypes.c_void_p * per)(*kc),
        (ctypes.c_void_p * per)(*vc), (ctypes.c_long * per)(*ks), (ctypes.c_long * per)(*vs),
        (ctypes.c_int * per)(*total),
        ctypes.byref(done))
    for layer in layers[:done.value]:
        for cache, new in zip(batch.caches, batch.seq_lens):
            cache.layer(layer).offset += new
    if err == -1:
        raise MemoryError(f"w8a16 block: no memory for {rows} rows")
    if err:
        s, layer = specs[done.value], layers[done.value]
        raise ValueError(f"w8a16 block of layer {layer}: its projections' shapes do not "
                         f"match a hidden size of {s.d}, {s.heads} + 2 x {s.kv} heads of "
                         f"{s.hd} and an MLP of {s.inter}, or a layer's inputs are not "
                         "whole blocks")
    return out, n


def _caches(batch: Batch, layer: int, x: torch.Tensor, shape: dict, kc, vc, ks, vs,
            total) -> bool:
    """Room for one more row in each sequence's cache of `layer`; appends their pointers,
    head strides and lengths with it (False, appending nothing: a cache the C code does
    not read)."""
    found = []
    for cache, n in zip(batch.caches, batch.seq_lens):
        kv = cache.layer(layer)
        if kv.k is None or kv.offset + n > kv.k.shape[1]:
            like = x.new_empty(shape["kv_heads"], 1, shape["head_dim"])
            kv.reserve(n, like, like)
        if kv.k.dtype != torch.float32 or not kv.k.is_cpu:
            return False
        found.append((kv, n))
    for kv, n in found:  # row j of a sequence: its cache's row offset + j, seeing those up to it
        kc += [kv.k.data_ptr()] * n
        vc += [kv.v.data_ptr()] * n
        ks += [kv.k.stride(0)] * n
        vs += [kv.v.stride(0)] * n
        total += range(kv.offset + 1, kv.offset + n + 1)
    return True
