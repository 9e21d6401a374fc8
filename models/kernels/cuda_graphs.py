"""CUDA graphs for the decode steps of GPU-resident blocks.

On a GPU a decode step launches ~18 kernels a block (norms, int8 kernels, rotary, adds,
the MLP's activation), each costing more CPU time to launch from Python than the GPU
takes to run it. Here each block of such a step replays two captured graphs instead:
`pre` (norm1, the q/k/v projections, rotary) and `post` (the output projection, residual,
norm2, MLP, residual), around the attention, which runs as the modules run it (each
sequence's cache grows by a row a step, and cached_attention's decode rows read all of
it). The graphs replay the kernels the modules launch, in their order, on the same
inputs: the same bits (tests/test_cuda.py).

A block's graphs are captured for a row count on its second decode step with that many
rows (the first runs the modules, which compiles their Triton kernels), kept for at most
`KEEP` row counts, and captured again once its weights or int8 plans change (a reload, a
move, a re-fuse). Where a block has no `decode_args` (or is PanGu-α's query layer), the
step is not one sequence's row per sequence, or autograd records, the modules run.

LLM_SHARD_CUDA_GRAPHS=0 turns them off; so does decode.modules_only() (to compare:
`llm-shard bench gpu`).
"""

from __future__ import annotations

import os
import weakref

import torch
from torch import nn

from llm_shard.models.cache import Batch
from llm_shard.models.layers import (
    BlockParts,
    _decode_row,
    mlp,
    no_graph,
    project,
    rope_tables,
    rotate,
)
from llm_shard.models.quant import Int8Linear, plan_epoch, plan_serials

ENABLED = os.environ.get("LLM_SHARD_CUDA_GRAPHS", "1") != "0"
KEEP = 16  # row counts a block keeps graphs for (continuous batching changes it)


def usable(x: torch.Tensor, batch: Batch) -> bool:
    """Whether a step of x may replay graphs: CUDA rows, each one sequence's decode step,
    no autograd."""
    return (ENABLED and x.is_cuda and x.dim() == 2 and x.is_contiguous()
            and len(batch.seq_lens) == x.shape[0] and all(n == 1 for n in batch.seq_lens)
            and no_graph(x) and not torch.cuda.is_current_stream_capturing())


class _Graphs:
    """One block's two graphs for `rows` rows, their static inputs and outputs."""

    def __init__(self, p: BlockParts, x: torch.Tensor, tables) -> None:
        rows, d = x.shape
        self.x = x.clone()
        self.tables = tables  # static rotary tables that every block's graphs read
        self.att = x.new_zeros(rows, p.heads, p.head_dim)
        pool = _pool(x.device)

        def pre():
            q, k, v = project(p.norm1(self.x), *p.qkv)
            q = q.view(rows, p.heads, p.head_dim)
            kv = (rows, p.kv_heads, p.head_dim)
            k, v = k.view(kv), v.view(kv)
            if self.tables is not None:
                q, k = rotate(q, *self.tables), rotate(k, *self.tables)
            return q, k, v

        def post():
            h = self.x + p.o(self.att.reshape(rows, -1))
            return h + mlp(p.norm2(h), p.up, p.down, p.gelu)

        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # a warm-up off the capture (lazy inits)
            pre(), post()
        torch.cuda.current_stream(x.device).wait_stream(side)
        self.pre, self.post = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        # thread_local: a worker's prefetch thread may copy the next block meanwhile
        with torch.cuda.graph(self.pre, pool=pool, capture_error_mode="thread_local"):
            self.q, self.k, self.v = pre()
        with torch.cuda.graph(self.post, pool=pool, capture_error_mode="thread_local"):
            self.out = post()


_POOLS: dict = {}


def _pool(device: torch.device):
    """One memory pool per GPU that every block's graphs share: they replay one at a
    time, and each holds only its static outputs between replays."""
    if device not in _POOLS:
        _POOLS[device] = torch.cuda.graph_pool_handle()
    return _POOLS[device]


# per block module: (key, {rows: _Graphs or None (seen once: the modules ran)}, check),
# check: (plan_epoch, norm1's weight address) when the key was last found to hold
_BLOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _key(module: nn.Module, x: torch.Tensor) -> tuple:
    """What a block's graphs were captured from: its tensors' addresses and its int8
    layers' plans (a re-fused layer has new tensors outside the module)."""
    layers = [m for m in module.modules() if isinstance(m, Int8Linear)]
    return (x.device, x.dtype, plan_serials(layers),
            tuple(t.data_ptr() for t in [*module.parameters(), *module.buffers()]))


def _graphs(module: nn.Module, p: BlockParts, x: torch.Tensor, tables) -> _Graphs | None:
    # the whole key (~50 us of Python a block) only after some int8 plan changed (a move
    # or a reload drops them) or the block's first norm moved (a dense block's move)
    check = (plan_epoch(), p.norm1.weight.data_ptr(), x.device, x.dtype)
    found = _BLOCKS.get(module)
    if found is None or found[2] != check:
        key = _key(module, x)
        if found is None or found[0] != key:
            found = (key, {}, check)
        _BLOCKS[module] = found = (found[0], found[1], check)
    by_rows, rows = found[1], x.shape[0]
    if rows not in by_rows:
        if len(by_rows) >= KEEP:
            del by_rows[next(iter(by_rows))]
        by_rows[rows] = None  # the first step with these rows runs the modules
        return None
    if by_rows[rows] is None:
        by_rows[rows] = _Graphs(p, x, tables)
    return by_rows[rows]


# static rotary tables by (device, dtype, rows, width): [cos, sin, the step's cos they
# hold]; every block's graphs read them, and a step copies its tables there once
_TABLES: dict = {}


def _tables(rope, batch: Batch, x: torch.Tensor):
    """This step's rotary tables (`rope_tables`, one pair a step) in the static buffers
    the graphs read; None without rotary."""
    if rope is None:
        return None
    cos, sin = rope_tables(rope, batch, x)
    key = (x.device, x.dtype, *cos.shape)
    static = _TABLES.get(key)
    if static is None:
        static = _TABLES[key] = [cos.clone(), sin.clone(), cos]
    if static[2] is not cos:
        static[0].copy_(cos)
        static[1].copy_(sin)
        static[2] = cos
    return static[0], static[1]


def block(module: nn.Module, x: torch.Tensor, batch: Batch) -> torch.Tensor:
    """One block of a decode step on the GPU: its graphs around the attention, or its
    modules (see the module docstring). `usable(x, batch)` must hold."""
    get = getattr(module, "decode_args", None)
    p = get() if get is not None else None
    if p is None or p.query:  # none, or PanGu-α's query layer
        return module(x, batch)
    g = _graphs(module, p, x, _tables(p.rope, batch, x))
    if g is None:
        return module(x, batch)
    g.x.copy_(x)
    g.pre.replay()
    for r, cache in enumerate(batch.caches):  # as cached_attention's decode rows
        _decode_row(g.q[r], g.k[r], g.v[r], cache.layer(p.layer), p.scale, g.att[r])
    g.post.replay()
    return g.out


def run_blocks(modules, x: torch.Tensor, batch: Batch) -> torch.Tensor:
    """`modules` in order over a decode step's CUDA rows (`usable`); the result is the
    caller's own tensor (a graph's static output is overwritten by its next replay)."""
    out = x
    for m in modules:
        out = block(m, out, batch)
    return out.clone() if out is not x else out
