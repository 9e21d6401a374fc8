"""How a stage runs its blocks: each run of them that C can take in one call (csrc/block.c,
w8a16_blocks_run), the others through their modules.

C takes a block where each sequence of the step has 1 to layers.ROW_BY_ROW_ROWS new rows
(a decode step, or a short prompt, whose rows attend one by one as their decode steps
would), the activations are float32 on the CPU, and every int8 layer of the block runs on
w8a16. It then makes the block's calls itself: the same C functions, in the same order, as
the modules make them one by one (layers.py: RMSNorm, LayerNorm, rotate, _decode_row,
_row_by_row, SwiGLU, GeluMLP). So the result has the same bits either way
(tests/test_decode.py), and a sequence's tokens depend neither on which path ran nor on
whether its prompt came in one step or token by token. At these sizes the torch ops and
Python calls around a block's int8 kernels cost more than their work, and one call for a
run of blocks leaves their Python (caches, pointers) back to back, warm, not between weight
streams. CUDA rows of a decode step replay cuda_graphs instead.

The C attention reads and writes float32 and float16 KV caches (w8a16.CACHE_DTYPES; a
float16 row written as torch's `.half()` rounds it, read back exactly); a block whose
caches are another dtype (int8 with scales) runs through its modules, said once in the log.

LLM_SHARD_FUSED_BLOCKS=0, or `modules_only()`, turns it off (to compare: `llm-shard bench`).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from llm_shard.models.cache import Batch
from llm_shard.models.kernels import build, cuda_graphs, w8a16
from llm_shard.models.layers import ROW_BY_ROW_ROWS, BlockParts, RMSNorm, no_graph, rope_tables
from llm_shard.models.quant import plan_epoch, plan_serials, w8a16_calls

ENABLED = os.environ.get("LLM_SHARD_FUSED_BLOCKS", "1") != "0"

log = logging.getLogger(__name__)
_TOLD: set = set()  # the cache dtypes whose blocks were said to run through their modules


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


def run_blocks(modules, x: torch.Tensor, batch: Batch) -> torch.Tensor:
    """`modules` in order: each run of blocks that can go in C in one call, the others
    through their forward (all of them, where the step is not one C can run; CUDA rows of
    a decode step replay their graphs)."""
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


def run_block(module: nn.Module, x: torch.Tensor, batch: Batch) -> torch.Tensor:
    """One block, in one C call where it can go there, else through its forward (a block
    streamed into a staging buffer, a block timed alone: no CUDA graphs)."""
    y, ran = blocks((module,), x, batch, keep=False)
    return y if ran else module(x, batch)


def blocks(modules, x: torch.Tensor, batch: Batch, keep: bool = True
           ) -> tuple[torch.Tensor, int]:
    """The longest run of `modules` from the first that can go in C, in one call (each a
    block whose `decode_args()` gives its layers.BlockParts); returns (output, how many
    ran): 0 where the first must run through its modules. With `keep`, the run's _Plan
    is kept across steps (a stage's resident blocks); without (a block streamed into a
    staging buffer), or where no plan holds the first block, `_blocks_once`."""
    if not _decode_step(x, batch):
        return x, 0
    modules = modules if isinstance(modules, (list, tuple)) else list(modules)
    if not modules:
        return x, 0
    plan = _plan(modules, x.shape[1]) if keep else None
    if plan is None:
        return _blocks_once(modules, x, batch)
    return plan.run(x, batch)


def _blocks_once(modules, x: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, int]:
    """`blocks` with every struct and array made for this one call."""
    f = build.ffi()
    specs, layers, kc, vc, ks, vs, total, half = [], [], [], [], [], [], [], []
    keep = []  # the query layer's query rows, alive until the call returns
    for m in modules:  # decode_args of each until one cannot go: O(blocks) a stage
        args = getattr(m, "decode_args", None)
        parts = args() if args is not None else None
        if parts is None:
            break
        spec = _spec(x.shape[1], parts)
        rows = parts.query[2](batch.positions) if spec is not None and parts.query else None
        if spec is None or (rows is not None and not _cpu_float32_rows(rows, x)) or \
                not _caches(batch, parts, x, kc, vc, ks, vs, total, half):
            break
        spec = f.new("block_t *", spec[0])  # this call's: another thread may run the block
        if rows is not None:
            spec.qin = _address(rows.data_ptr())
            keep.append(rows)
        if parts.rope is not None:
            cos, sin = rope_tables(parts.rope, batch, x)
            spec.cos, spec.sin = _address(cos.data_ptr()), _address(sin.data_ptr())
        spec.threads, spec.attend_threaded = torch.get_num_threads(), w8a16.ATTEND_THREADED
        specs.append(spec)
        layers.append(parts.layer)
    return _run(x, batch, specs, layers, kc, vc, ks, vs, total, half[:1] == [1])


def run_head(head: nn.Module, x: torch.Tensor):
    """A last stage's head over x (sequences, hidden) in one C call (w8a16_head): a norm,
    then a screened LM head on w8a16, with each row's greedy pick; the modules' bits.
    Returns (logits float32 (sequences, vocab), picks: [int]), or None where the head
    is not one the C code runs (its modules run it)."""
    if not (ENABLED and x.dtype == torch.float32 and x.is_cpu and x.dim() == 2
            and x.is_contiguous() and no_graph(x)):
        return None
    args = getattr(head, "decode_args", None)
    spec = _head_spec(head, args(), x.shape[1]) if args is not None else None
    if spec is None:
        return None
    f, rows = build.ffi(), x.shape[0]
    lin, s = spec[0], spec[1]
    s.threads = torch.get_num_threads()
    logits, xn = torch.empty(rows, s.O), torch.empty(rows, s.d)
    counts, picks = f.new("int[]", rows), f.new("int[]", rows)
    at = build.address
    if w8a16.load().w8a16_head(at(s), x.data_ptr(), xn.data_ptr(), logits.data_ptr(), rows,
                               at(counts), at(picks)):
        raise MemoryError(f"w8a16 head: no memory for {rows} rows")
    out = list(picks)
    for r in range(rows):  # too many candidates: every logit in float (ScreenedLinear's)
        if counts[r] > s.max_exact:
            logits[r] = F.linear(xn[r], lin.weight.float(), lin.bias)  # fp16: a tied table
            out[r] = int(logits[r].argmax())
    return logits, out


# Each head's head_t, kept while its key holds: the screen's int8 copy (a new one after
# prepare), the float weight, bias and norm tensors at their addresses, the hidden size.
_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _head_spec(head: nn.Module, parts, d: int):
    """(lm_head, head_t) of a head whose decode_args() are (norm, lm_head) with lm_head a
    ScreenedLinear on w8a16 (None: its modules run it)."""
    from llm_shard.models.quant.screened import ScreenedLinear, w8a16_bound_terms

    norm, lin = parts
    if not isinstance(lin, ScreenedLinear) or lin._screen is None:
        return None
    kernel, q, scales = lin._screen
    w, b = lin.weight, lin.bias
    key = (d, id(lin._screen), w.data_ptr(), None if b is None else b.data_ptr(),
           _tensor(norm, "weight"), _tensor(norm, "bias"), lin.max_exact)
    found = _HEADS.get(head)
    if found is not None and found[0] == key:
        return found[1]
    n = _norm(norm)
    tensors = (scales, *(() if b is None else (b,)))
    if (kernel != "w8a16" or n is None or w8a16.problem() is not None
            or not all(t.dtype == torch.float32 and t.is_cpu and t.is_contiguous()
                       for t in tensors)
            or w.dtype not in w8a16.SCREEN_WEIGHTS or not (w.is_cpu and w.is_contiguous())
            or q.dtype != torch.int8 or not q.is_contiguous()
            or q.shape != (lin.out_features, d) or w.shape != q.shape):
        _HEADS.pop(head, None)
        return None
    l1, mx = w8a16_bound_terms(d)
    spec = build.ffi().new("head_t *", {
        "d": d, "O": lin.out_features, "layer_norm": n[0], "max_exact": lin.max_exact,
        "eps": n[1], "bound_l1": l1, "bound_max": mx, "nw": _address(n[2]),
        "nb": _address(n[3]), "w": _address(q.data_ptr()), "s": _address(scales.data_ptr()),
        "W": _address(w.data_ptr()), "b": _address(None if b is None else b.data_ptr()),
        "w_half": int(w.dtype == torch.float16)})
    _HEADS[head] = (key, (lin, spec, lin._screen))  # the screen kept: its id stays its own
    return _HEADS[head][1]


def _address(ptr: int | None):
    """A `void *` for a struct field (NULL for None)."""
    f = build.ffi()
    return f.NULL if ptr is None else f.cast("void *", ptr)


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


# A block's block_t, built once per block module: building it (the norms' and projections'
# pointers, the structs) costs more than a small layer's int8 kernels, with the caches cold
# from the weights streamed before it. Kept while its key holds: the projections' plan
# serials (a new plan, after a load, a move or a re-fuse, changes them), the norms and the
# shapes; checked in full only after some plan changed (plan_epoch). None: the modules run
# that block.
_SPECS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _spec(d: int, p: BlockParts):
    shape = (p.heads, p.kv_heads, p.head_dim, p.scale, p.gelu)
    epoch, found = plan_epoch(), _SPECS.get(p.norm1)
    norms = (p.norm1, p.norm2, *p.query[:1])
    fast = (d, *shape, *(_tensor(m, n) for m in norms for n in ("weight", "bias")))
    if found is not None and found[0] == epoch and found[1] == fast:
        return found[3]
    ns = [_norm(m) for m in norms]
    key = (*ns, plan_serials((*p.qkv, p.o, *p.up, p.down, *p.query[1:2])))
    if found is None or found[1] != fast or found[2] != key:
        found = (epoch, fast, key, _build(d, ns, p))
    _SPECS[p.norm1] = (epoch, *found[1:])
    return found[3]


def _tensor(m: nn.Module, name: str) -> int | None:
    """The address of tensor `name` of m (None: none), without nn.Module.__getattr__ (the
    lookup that fails before it costs more than the rest of a block's key)."""
    d = m.__dict__
    for where in (d["_parameters"], d["_buffers"], d):
        if name in where:
            t = where[name]
            return None if t is None else t.data_ptr()
    return None


def _proj(layers) -> dict | None:
    """A proj_t's fields for `project(x, *layers)`'s w8a16 calls (None: another kernel)."""
    calls = w8a16_calls(layers)
    if calls is None or len(calls) > w8a16.load().PARTS:
        return None
    return {"n": len(calls), "part": [
        {"w": _address(w.data_ptr()), "s": _address(s.data_ptr()),
         "mins": _address(None if mins is None else mins.data_ptr()),
         "b": _address(None if b is None else b.data_ptr()), "O": w.shape[0],
         "I": w.shape[1] * (1 if lo is None else 2), "group": group,
         "nib": int(lo is not None), "lo": lo or 0}
        for w, s, mins, b, group, lo in calls]}


def _build(d: int, norms: list, p: BlockParts):
    """A block_t (None: the modules run the block). norms: norm1's, norm2's and the query
    layer's first norm's `_norm`."""
    if (w8a16.problem() is not None or None in norms
            or any(n[:2] != norms[0][:2] for n in norms)):
        return None
    projs = [_proj(p.qkv), _proj((p.o,)), _proj(p.up), _proj((p.down,)),
             _proj(p.query[1:2]) if p.query else {}]
    if any(q is None for q in projs):
        return None
    (_, eps, n1w, n1b), (_, _, n2w, n2b) = norms[:2]
    nf = norms[2][2:] if p.query else (None, None)
    return build.ffi().new("block_t *", {
        "d": d, "heads": p.heads, "kv": p.kv_heads, "hd": p.head_dim,
        "inter": p.down.in_features, "layer_norm": norms[0][0], "gelu": int(p.gelu),
        "eps": eps, "scale": p.scale, "n1w": _address(n1w), "n1b": _address(n1b),
        "n2w": _address(n2w), "n2b": _address(n2b), "qkv": projs[0], "o": projs[1],
        "up": projs[2], "down": projs[3], "nfw": _address(nf[0]), "nfb": _address(nf[1]),
        "qp": projs[4]})


def _cpu_float32_rows(rows: torch.Tensor, x: torch.Tensor) -> bool:
    return (rows.dtype == torch.float32 and rows.is_cpu and rows.is_contiguous()
            and rows.shape == x.shape)


def _decode_step(x: torch.Tensor, batch: Batch) -> bool:
    """Whether C may run blocks on x: float32 rows on the CPU, 1 to ROW_BY_ROW_ROWS of
    each sequence (`_decode_rows`), no graph being built."""
    return (ENABLED and x.dtype == torch.float32 and x.is_cpu and x.dim() == 2
            and x.is_contiguous() and _decode_rows(batch) == x.shape[0] and no_graph(x))


def _run(x: torch.Tensor, batch: Batch, specs: list, layers: list[int], kc, vc, ks, vs,
         total, half: bool) -> tuple[torch.Tensor, int]:
    """specs' blocks over x in one C call; their caches' pointers, strides and lengths in
    kc, vc, ks, vs and total (rows per block), float16 where `half`, else float32.
    Returns (output, len(specs))."""
    n, rows = len(specs), x.shape[0]
    if not n:
        return x, 0
    f, at = build.ffi(), build.address
    out, done = x.clone(), f.new("int *")
    # block l's rows at [l * rows, (l + 1) * rows) of each array
    arrays = [f.new("block_t *[]", specs), f.new("intptr_t[]", kc), f.new("intptr_t[]", vc),
              f.new("long[]", ks), f.new("long[]", vs), f.new("int[]", total)]
    b, k, v, k_stride, v_stride, lengths = (at(a) for a in arrays)
    err = w8a16.load().w8a16_blocks_run(b, n, out.data_ptr(), rows, k, v, k_stride, v_stride,
                                        lengths, int(half), at(done))
    for layer in layers[:done[0]]:
        for cache, new in zip(batch.caches, batch.seq_lens):
            cache.layer(layer).offset += new
    if err:
        _raise(err, rows, specs[done[0]], layers[done[0]])
    return out, n


def _raise(err: int, rows: int, s, layer: int):
    """w8a16_blocks_run's error `err` for block_t s of `layer`, as an exception."""
    if err == -1:
        raise MemoryError(f"w8a16 block: no memory for {rows} rows")
    raise ValueError(f"w8a16 block of layer {layer}: its projections' shapes do not "
                     f"match a hidden size of {s.d}, {s.heads} + 2 x {s.kv} heads of "
                     f"{s.hd} and an MLP of {s.inter}, or a layer's inputs are not "
                     "whole blocks")


def _grow(kv, n: int, like: tuple[int, int], x: torch.Tensor) -> None:
    """Room for n more rows in KVCache kv, of its dtype (x's for a new one, where the
    cache does not choose its own); like: (kv heads, head dim)."""
    if kv.k is None or kv.offset + n > kv.k.shape[1]:
        t = (x if kv.k is None else kv.k).new_empty(like[0], 1, like[1])
        kv.reserve(n, t, t)


def _half(kv) -> int | None:
    """w8a16_blocks_run's `half` for KVCache kv's buffers: 0 float32, 1 float16, None:
    the C code does not read them (another dtype, int8 with scales, is said once in the
    log; not on the CPU)."""
    k, v = kv.k, kv.v
    flag = w8a16.CACHE_DTYPES.get(k.dtype)
    if flag is None and k.dtype not in _TOLD:
        _TOLD.add(k.dtype)
        log.info("KV caches of %s: their blocks run through their modules (the one C call "
                 "a block reads float32 and float16 caches)", k.dtype)
    return flag if v.dtype == k.dtype and k.is_cpu and v.is_cpu else None


def _caches(batch: Batch, p: BlockParts, x: torch.Tensor, kc, vc, ks, vs, total,
            half: list[int]) -> bool:
    """Room for one more row in each sequence's cache of block p; appends their pointers,
    head strides and lengths with it (False, appending nothing: a cache the C code does
    not read, or of another dtype than the run's so far). half: [the run's `half`], set
    by its first block."""
    found = []
    for cache, n in zip(batch.caches, batch.seq_lens):
        kv = cache.layer(p.layer)
        _grow(kv, n, (p.kv_heads, p.head_dim), x)
        flag = _half(kv)
        if flag is None or flag != (half[0] if half else flag):
            return False
        if not half:
            half.append(flag)
        found.append((kv, n))
    for kv, n in found:  # row j of a sequence: its cache's row offset + j, seeing those up to it
        kc += [kv.k.data_ptr()] * n
        vc += [kv.v.data_ptr()] * n
        ks += [kv.k.stride(0)] * n
        vs += [kv.v.stride(0)] * n
        total += range(kv.offset + 1, kv.offset + n + 1)
    return True


# Each thread's plans: {first block: {run length: _Plan}} (a plan's structs are written
# each step, so threads running the same blocks keep their own).
_LOCAL = threading.local()


def _plan(modules, d: int):
    """The kept _Plan of `modules` (made where none holds), or None where its first
    block cannot go in C or has no plan (`_blocks_once` runs it)."""
    plans = getattr(_LOCAL, "plans", None)
    if plans is None:
        plans = _LOCAL.plans = weakref.WeakKeyDictionary()
    by_len = plans.get(modules[0])
    plan = by_len.get(len(modules)) if by_len is not None else None
    if plan is not None and plan.holds(modules, d):
        return plan
    plan = _Plan.make(modules, d)
    if plan is None:
        if by_len is not None:
            by_len.pop(len(modules), None)
        return None
    plans.setdefault(modules[0], {})[len(modules)] = plan
    return plan


class _Plan:
    """A run of blocks as one C call, its structs and pointer arrays kept across steps:
    a step writes only the rotary tables (where they moved) and the caches' addresses
    and rows (holding no cache: a finished sequence's is freed). Kept while no
    Int8Linear's plan changed (plan_epoch: a load, a move, a re-fuse), the blocks are the
    same modules and their norms the same tensors at the same addresses; the blocks'
    shapes (heads, head_dim) are read when it is made. At these sizes remaking the
    structs each step (decode_args, _spec, _caches: ~20 us a block) cost more than a
    small model's kernels of a block."""

    def __init__(self) -> None:
        self.refs: list = []  # weakrefs of the blocks
        self.norms: list = []  # (the norm's _parameters, weight, its address, bias, its)
        self.structs: list = []  # each block's own block_t (this thread's)
        self.layers: list[int] = []
        self.like: list[tuple[int, int]] = []  # (kv heads, head dim) of each block
        self.ropes: dict = {}  # id(rope) -> (rope, [block indices])
        self.queries: list = []  # (block index, its query rows' function)
        self.rows, self.rope_at, self.threads = -1, {}, None

    @classmethod
    def make(cls, modules, d: int):
        plan, f = cls(), build.ffi()
        plan.epoch, plan.d = plan_epoch(), d
        for m in modules:
            args = getattr(m, "decode_args", None)
            parts = args() if args is not None else None
            spec = _spec(d, parts) if parts is not None else None
            norms = (parts.norm1, parts.norm2, *parts.query[:1]) if spec is not None else ()
            if spec is None or not all("weight" in n._parameters for n in norms):
                break
            l = len(plan.structs)
            plan.refs.append(weakref.ref(m))
            for n in norms:
                w, b = n._parameters["weight"], n._parameters.get("bias")
                plan.norms.append((n._parameters, w, w.data_ptr(), b,
                                   None if b is None else b.data_ptr()))
            plan.structs.append(f.new("block_t *", spec[0]))
            plan.layers.append(parts.layer)
            plan.like.append((parts.kv_heads, parts.head_dim))
            if parts.rope is not None:
                plan.ropes.setdefault(id(parts.rope), (parts.rope, []))[1].append(l)
            if parts.query:
                plan.queries.append((l, parts.query[2]))
        if not plan.structs:
            return None
        plan.table = f.new("block_t *[]", plan.structs)
        return plan

    def holds(self, modules, d: int) -> bool:
        """Whether this plan still runs `modules` as made (see the class)."""
        if self.epoch != plan_epoch() or self.d != d:
            return False
        for r, m in zip(self.refs, modules):
            if r() is not m:
                return False
        for params, w, wp, b, bp in self.norms:
            if (params.get("weight") is not w or w.data_ptr() != wp
                    or params.get("bias") is not b or (b is not None and b.data_ptr() != bp)):
                return False
        return True

    def _arrays(self, rows: int) -> None:
        """Pointer arrays for `rows` rows a block (block l's at [l * rows, (l + 1) * rows))."""
        f, n = build.ffi(), len(self.structs) * rows
        self.kc, self.vc = f.new("intptr_t[]", n), f.new("intptr_t[]", n)
        self.ks, self.vs, self.total = f.new("long[]", n), f.new("long[]", n), f.new("int[]", n)
        self.done = f.new("int *")
        at = build.address
        self.addresses = (at(self.table), at(self.kc), at(self.vc), at(self.ks), at(self.vs),
                          at(self.total), at(self.done))
        self.rows = rows

    def run(self, x: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, int]:
        """The blocks over x in one C call, up to the first whose caches or query rows the
        C code does not read; returns (output, how many ran)."""
        rows = x.shape[0]
        if rows != self.rows:
            self._arrays(rows)
        threads = (torch.get_num_threads(), w8a16.ATTEND_THREADED)
        if threads != self.threads:
            for s in self.structs:
                s.threads, s.attend_threaded = threads
            self.threads = threads
        for key, (rope, ls) in self.ropes.items():
            cos, sin = rope_tables(rope, batch, x)
            ptrs = (cos.data_ptr(), sin.data_ptr())
            if self.rope_at.get(key) != ptrs:
                for l in ls:
                    self.structs[l].cos, self.structs[l].sin = (_address(p) for p in ptrs)
                self.rope_at[key] = ptrs
        n, keep = len(self.structs), []
        for l, query in self.queries:
            q = query(batch.positions)
            if not _cpu_float32_rows(q, x):
                n = min(n, l)
                break
            self.structs[l].qin = _address(q.data_ptr())
            keep.append(q)  # alive until the call returns
        n, moved, half = self._caches(batch, x, n)
        if not n:
            return x, 0
        out = x.clone()
        b, k, v, ks, vs, total, done = self.addresses
        err = w8a16.load().w8a16_blocks_run(b, n, out.data_ptr(), rows, k, v, ks, vs, total,
                                            half, done)
        for kv, new in moved[:self.done[0] * len(batch.caches)]:
            kv.offset += new
        if err:
            _raise(err, rows, self.structs[self.done[0]], self.layers[self.done[0]])
        return out, n

    def _caches(self, batch: Batch, x: torch.Tensor, n: int) -> tuple[int, list, int]:
        """Each block's cache rows written to the arrays (a cache without room for the
        step's rows grows first), up to the first of the n blocks with a cache the C code
        does not read, or of another dtype than the first block's; returns (blocks with
        their rows written, [(KVCache, new rows)] of each block and sequence, in order,
        their caches' `half`)."""
        kc, vc, ks, vs, total = self.kc, self.vc, self.ks, self.vs, self.total
        lens, caches = batch.seq_lens, batch.caches
        moved, i, half = [], 0, None
        for l in range(n):
            layer, found = self.layers[l], []
            for cache, new in zip(caches, lens):
                kv = cache.layer(layer)
                if kv.k is None or kv.offset + new > kv.k.shape[1]:
                    _grow(kv, new, self.like[l], x)
                flag = _half(kv)
                if flag is None or flag != (flag if half is None else half):
                    return l, moved, half or 0
                half = flag
                found.append((kv, new))
            for kv, new in found:
                k, v = kv.k, kv.v
                kp, ksp, vp, vsp = k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0)
                for j in range(new):
                    kc[i], ks[i], vc[i], vs[i] = kp, ksp, vp, vsp
                    total[i] = kv.offset + j + 1
                    i += 1
            moved += found
        return n, moved, half or 0
