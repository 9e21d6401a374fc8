"""Fusion: Int8Linears that read one input, run as one layer; and `prepare_int8`.

A module lists, in `shared_input`, groups of its Linears that read the same input (LLaMA's
q/k/v and gate/up, PanGu-α's q/k/v). `fuse_int8` concatenates each group's int8 rows into
one layer, prepared for the kernel each member would have run, and `layers.project(x, *ls)`
then makes one kernel call for the group instead of one per member: at one row each call
has a fixed cost that small models' many layers pay once a layer per token. Every kernel
of FUSED_KERNELS computes each output feature from its own weight row and the input
alone, so a fused layer gives each member's outputs the same bits (tests/test_quant.py).
Members keep their buffers (the checkpoint is unchanged) and run, when called alone, their
slice of the fused layer; reloading or moving a member makes it a layer of its own again,
and `project` then calls each member.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from llm_shard.models.kernels.backends import Kernel, Nibbles, resolve_kernel
from llm_shard.models.quant.linear import Int8Linear

FUSED_KERNELS = ("fbgemm", "w8a16", "int8pack")  # each output feature on its own: exact

# rows(members' int8 weights) -> their fused layer's weight (out, in) without a copy (a
# view), or None: the fused layer concatenates them (see `fuse_int8`)
Rows = Callable[[list[torch.Tensor]], torch.Tensor | None]


@dataclass(frozen=True)
class _Slice:
    fused: Int8Linear
    start: int
    end: int


def _slice_run(layer: Int8Linear, part: _Slice, x: torch.Tensor) -> torch.Tensor:
    return part.fused(x)[:, part.start:part.end].contiguous()


# a member's plan: its slice of the fused layer (Int8Linear.running looks through it by name)
_MEMBER = Kernel("fused", lambda layer: "fuse_int8 sets it", lambda layer: None, _slice_run)


def prepare_int8(module: nn.Module, kernel: str | None = None,
                 fuse: bool = False, rows: Rows | None = None) -> dict[str, str]:
    """Prepares every Int8Linear in `module` (call after load_state_dict); returns
    {layer name: kernel name}. With `fuse`, the groups of layers that read one input are
    first fused (`fuse_int8`, given `rows`); their members report "fused"."""
    members = fuse_int8(module, kernel, rows) if fuse else set()
    return {name: mod.kernel if mod in members else mod.prepare(kernel)
            for name, mod in module.named_modules() if isinstance(mod, Int8Linear)}


def _fusable(layers: list) -> bool:
    """Two or more Int8Linears alike in inputs, blocks, mins, bias and device."""
    if len(layers) < 2 or not all(isinstance(m, Int8Linear) for m in layers):
        return False
    return len({(m.in_features, m.group, m.mins is None, m.bias is None, m.device)
                for m in layers}) == 1


def fuse_int8(module: nn.Module, kernel: str | None = None,
              rows: Rows | None = None) -> set[Int8Linear]:
    """Fuses each `shared_input` group of `module`'s modules whose members would run one
    kernel of FUSED_KERNELS; returns the members, prepared as slices of their fused layer
    (their own int8 bytes are no longer read: a caller may release them, unless `rows`
    gave the fused layer a view of them rather than a copy: Store.load's members in 2 MiB
    pages, `placement.back_to_back`)."""
    members: set[Int8Linear] = set()
    for parent in module.modules():
        for names in getattr(parent, "shared_input", ()):
            layers = [getattr(parent, n, None) for n in names]
            if not _fusable(layers):
                continue
            with torch.no_grad():
                kernels = {resolve_kernel(m, kernel).name for m in layers}
                if len(kernels) != 1 or next(iter(kernels)) not in FUSED_KERNELS:
                    continue
                fused = _fused_layer(layers, next(iter(kernels)), rows)
            if fused is None:
                continue
            start = 0
            for m in layers:
                m.preferred_kernel = kernel or m.preferred_kernel
                m._plan = (_MEMBER, _Slice(fused, start, start + m.out_features))
                start += m.out_features
            members.update(layers)
    return members


def _fused_layer(layers: list[Int8Linear], kernel: str,
                 rows: Rows | None = None) -> Int8Linear | None:
    """One layer of the members' rows, prepared for `kernel` (None if it would not run it);
    its weight is `rows(members' weights)` where that gives one."""
    first = layers[0]
    with torch.device("meta"):  # no memory: the buffers are set below
        fused = Int8Linear(first.in_features, sum(m.out_features for m in layers),
                           bias=first.bias is not None, kernel=kernel, group=first.group,
                           mins=first.mins is not None)
    nibs = [m.nibbles_now() for m in layers]
    packed = (rows([n.packed for n in nibs]) if rows is not None and kernel == "w8a16"
              and None not in nibs and len({n.lo for n in nibs}) == 1 else None)
    for name, dim in (("weight", 0), ("scales", 0), ("mins", 1), ("bias", 0)):
        if getattr(first, name) is not None:
            parts = [getattr(m, name) for m in layers]
            if name == "weight" and packed is not None:  # it reads its nibbles only
                fused._buffers[name] = torch.empty(fused.out_features, fused.in_features,
                                                   dtype=torch.int8, device="meta")
                fused.nibbles = Nibbles(packed, nibs[0].lo, fused._buffers[name])
                continue
            view = rows(parts) if name == "weight" and rows is not None else None
            fused._buffers[name] = torch.cat(parts, dim) if view is None else view
    if fused.prepare() != kernel:  # a fallback would change the members' bits
        return None
    if kernel == "fbgemm":  # it reads its packed copy only
        fused._buffers["weight"] = torch.empty_like(fused.weight, device="meta")
    return fused


def fused_of(layers) -> Int8Linear | None:
    """The layer `fuse_int8` made of exactly these layers, in this order, if it did."""
    plans = [getattr(m, "_plan", None) for m in layers]
    if not plans or not all(p is not None and p[0] is _MEMBER for p in plans):
        return None
    parts = [p[1] for p in plans]
    fused = parts[0].fused
    whole = (all(p.fused is fused for p in parts) and parts[0].start == 0
             and parts[-1].end == fused.out_features
             and all(a.end == b.start for a, b in zip(parts, parts[1:])))
    return fused if whole else None


def plan_serials(layers) -> tuple[int, ...]:
    """Serials that change whenever `w8a16_calls(layers)` may: each layer's plan serial,
    and for a member of a fused layer, the fused layer's too (0: not an Int8Linear)."""
    out = []
    for m in layers:
        serial = getattr(m, "plan_serial", 0) if isinstance(m, Int8Linear) else 0
        out.append(serial)
        plan = m._plan if serial else None
        if plan is not None and plan[0] is _MEMBER:
            out.append(plan[1].fused.plan_serial)
    return tuple(out)


def w8a16_calls(layers) -> list[tuple] | None:
    """The w8a16 kernel calls that `project(x, *layers)` makes: one (weight, scales, mins,
    bias, group, lo) per call (one for a fused group, else one per layer), or None where a
    layer would run another kernel, or is not prepared yet. With lo (not None) the weight
    is the layer's packed nibbles (`Nibbles`). models/kernels/decode.py makes them from C."""
    fused = fused_of(layers)
    calls = []
    for m in (fused,) if fused is not None else layers:
        plan = getattr(m, "_plan", None) if isinstance(m, Int8Linear) else None
        if plan is None:
            return None
        kernel, state = plan
        if kernel.name == "auto":
            kernel, state = state
        if kernel.name != "w8a16":
            return None
        scales, mins, bias, nib = state
        calls.append((m.weight, scales, mins, bias, m.group, None) if nib is None else
                     (nib.packed, scales, mins, bias, m.group, nib.lo))
    return calls


def fused_layers(module: nn.Module) -> list[Int8Linear]:
    """The layers `fuse_int8` made of `module`'s Int8Linears: called in their members'
    place, and not submodules of anything."""
    found: dict[int, Int8Linear] = {}
    for m in module.modules():
        plan = getattr(m, "_plan", None) if isinstance(m, Int8Linear) else None
        if plan is not None and plan[0] is _MEMBER:
            found.setdefault(id(plan[1].fused), plan[1].fused)
    return list(found.values())
