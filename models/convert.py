"""Checkpoint import: a source checkpoint -> a store, part by part, strictly.

Every store tensor comes from one declarative rule (source key template + transform).
Before anything is written, every rule's key must exist with the right shape and every
source key must be used or explicitly ignored; the error names the key and its file.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import get_arch
from .base import Arch, ArchConfig, Part, Rule, parts_of
from .quant import quantize_weight
from .sources import Source, open_source
from .store import DTYPES, Store, StoreWriter

log = logging.getLogger(__name__)


class ConvertError(Exception):
    """The checkpoint does not match the architecture; the message names the key."""


def part_rules(layout: dict, part: Part) -> dict[str, Rule]:
    if part.kind == "block":
        rules = layout.get(f"block {part.index}", layout["block"])
        return {k: Rule(r.source.format(i=part.index), r.transform) for k, r in rules.items()}
    return layout[part.kind]


def _expected_shapes(arch: Arch, cfg: ArchConfig, part: Part) -> tuple[dict, set[str]]:
    """Parameter shapes of the part, and the names of its Linear weights (int8 candidates)."""
    with torch.device("meta"):
        module = arch.build(cfg, part)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    linears = {f"{n}.weight" for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    return shapes, linears


def check(source: Source, arch: Arch, cfg: ArchConfig, layout: dict) -> None:
    """Strict mapping: missing keys, unknown keys and wrong shapes, all named."""
    used: set[str] = set()
    for part in parts_of(cfg.n_blocks):
        shapes, _ = _expected_shapes(arch, cfg, part)
        rules = part_rules(layout, part)
        if set(rules) != set(shapes):
            raise ConvertError(f"layout {source.layout!r} of {arch.name} does not cover {part}: "
                               f"{sorted(set(shapes) ^ set(rules))}")
        for key, rule in rules.items():
            if rule.source not in source._where:
                raise ConvertError(f"missing key {rule.source!r} ({part}) in {source.path}")
            used.add(rule.source)
            if rule.transform is None and source.shape(rule.source) != shapes[key]:
                raise ConvertError(
                    f"key {rule.source!r} in {source.where(rule.source)} has shape "
                    f"{list(source.shape(rule.source))}, the config expects {list(shapes[key])}")
    ignore = [re.compile(p) for p in layout.get("ignore", ())]
    unknown = [k for k in source.keys()
               if k not in used and not any(p.fullmatch(k) for p in ignore)]
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise ConvertError(f"unknown key {unknown[0]!r} in {source.where(unknown[0])}{more}: "
                           f"not part of a {arch.name} checkpoint with {cfg.n_blocks} blocks "
                           f"({', '.join(repr(k) for k in unknown[1:5])})")


def encode_part(source: Source, arch: Arch, cfg: ArchConfig, layout: dict, part: Part,
                dtype: str) -> dict[str, torch.Tensor]:
    shapes, linears = _expected_shapes(arch, cfg, part)
    out = {}
    for key, rule in part_rules(layout, part).items():
        t = source.get(rule.source).float()
        if rule.transform is not None:
            t = rule.transform(t)
        if tuple(t.shape) != shapes[key]:
            raise ConvertError(f"key {rule.source!r} in {source.where(rule.source)} has shape "
                               f"{list(t.shape)} after conversion, expected {list(shapes[key])}")
        if dtype == "int8" and key in linears:
            q, scales = quantize_weight(t)
            out[key], out[key[: -len("weight")] + "scales"] = q, scales
        else:
            out[key] = t.to(DTYPES[dtype])
    return out


def convert(src: str | Path, out: str | Path, arch: str | None = None, dtype: str = "int8",
            progress: bool = True) -> Store:
    if dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    source = open_source(src)
    arch_name = arch or source.arch
    if arch_name is None:
        raise ConvertError(f"{src} does not say its architecture: pass --arch")
    a = get_arch(arch_name)
    if source.layout not in a.layouts:
        raise ConvertError(f"{src} is in {source.layout!r} layout, which {a.name} has no "
                           f"mapping for (it has: {', '.join(a.layouts)})")
    cfg = a.config.from_dict(source.config(a.name))
    layout = a.layouts[source.layout](cfg)
    check(source, a, cfg, layout)
    tokenizer = source.tokenizer(a.name)
    if tokenizer is None:
        log.warning("no tokenizer found in %s: the store will take token ids only", src)
    writer = StoreWriter(Path(out), a, cfg, dtype,
                         {"path": str(Path(src).resolve()), "layout": source.layout})
    parts = parts_of(cfg.n_blocks)
    for part in tqdm(parts, desc=f"convert {Path(src).name} -> {dtype}", unit="part",
                     disable=not progress):
        writer.write(part, encode_part(source, a, cfg, layout, part, dtype))
    return writer.finish(tokenizer)
