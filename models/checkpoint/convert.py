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

from llm_shard.models import get_arch
from llm_shard.models.base import Arch, ArchConfig, Part, Rule, on_meta, parts_of
from llm_shard.models.checkpoint.sources import Blocks, Source, open_source
from llm_shard.models.checkpoint.store import DTYPES, Store, StoreWriter
from llm_shard.models.errors import ConvertError
from llm_shard.models.quant import quantize_weight
from llm_shard.models.quant.calibrate import Calibrator, calibration_ids

log = logging.getLogger(__name__)


def part_rules(layout: dict, part: Part) -> dict[str, Rule]:
    if part.kind == "block":
        rules = layout.get(f"block {part.index}", layout["block"])
        return {k: Rule(r.source.format(i=part.index), r.transform) for k, r in rules.items()}
    return layout[part.kind]


def _expected_shapes(arch: Arch, cfg: ArchConfig, part: Part) -> tuple[dict, set[str]]:
    """Parameter shapes of the part, and the names of its Linear weights (int8 candidates)."""
    with on_meta():
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


def tied_keys(layout: dict) -> set[str]:
    """Source keys of the embedding: a head rule reading one of them is a tied LM head."""
    return {r.source for r in layout["embed"].values()}


def tied_head(layout: dict) -> dict[str, str]:
    """{head key: embed key} of the head's tensors that are the embedding's: a tied LM
    head, which the store keeps once, in the embedding's file."""
    embed = {r.source: k for k, r in layout["embed"].items()}
    return {k: embed[r.source] for k, r in layout["head"].items() if r.source in embed}


def table_dtype(dtype: str, tied: bool) -> str:
    """How a store of `dtype` keeps a token table: int8 rows with a scale per row in an
    int8 store, but fp16 where the LM head is tied to it (the head's exact rows, which
    its int8 screen recomputes the top logits from); other stores: their dtype."""
    return ("fp16" if tied else "int8") if dtype == "int8" else dtype


def tables(arch: Arch, cfg: ArchConfig) -> list[str]:
    """The embed part's token tables: its nn.Embeddings with a row per vocabulary entry
    (not PanGu's position table)."""
    with on_meta():
        module = arch.build(cfg, Part("embed"))
    return [name for name, m in module.named_modules()
            if isinstance(m, nn.Embedding) and m.num_embeddings == cfg.vocab_size]


def int8_keys(layout: dict, part: Part, linears: set[str]) -> set[str]:
    """The part's Linear weights that an int8 store rounds to int8: every one but a tied
    LM head, which is the embedding's table (one copy, in embed.safetensors), kept in
    fp16 there (`table_dtype`) and read through an int8 screen (quant/screened.py).

    An int8 tied head costs SmolLM2-135M 2 points of top-1 agreement (0.971 -> 0.952 with
    round-to-nearest blocks). An untied head is int8: on LLaMA-7B it is 500 MB of fp32
    that the last stage reads at every decode step, so int8 there cuts the largest
    single read 4x.
    """
    rules = part_rules(layout, part)
    tied = tied_keys(layout) if part.kind != "embed" else set()
    return {k for k in linears if rules[k].source not in tied}


def encode_part(source: Source, arch: Arch, cfg: ArchConfig, layout: dict, part: Part,
                dtype: str, kept: dict[str, int] | None = None
                ) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The part's tensors in `dtype` (int8 stores: float32, not yet rounded), and for
    int8 the keys of the Linear weights to round to int8. With `kept` (a count per source
    format), int8 Linear weights that the source holds in exact int8 blocks are kept as
    they are (weight, scales, mins; counted there) instead."""
    shapes, linears = _expected_shapes(arch, cfg, part)
    int8 = int8_keys(layout, part, linears) if dtype == "int8" else set()
    tied = tied_head(layout) if part.kind == "head" else {}
    out = {}
    for key, rule in part_rules(layout, part).items():
        if key in tied:  # the embedding's file holds it
            continue
        blocks = source.blocks(rule.source) if kept is not None and key in int8 else None
        if blocks is not None:
            out.update(_kept_blocks(source, key, rule, blocks, shapes[key]))
            kept[blocks.kind] = kept.get(blocks.kind, 0) + 1
            int8.discard(key)
            continue
        t = source.get(rule.source).float()
        if rule.transform is not None:
            t = rule.transform(t)
        if tuple(t.shape) != shapes[key]:
            raise ConvertError(f"key {rule.source!r} in {source.where(rule.source)} has shape "
                               f"{list(t.shape)} after conversion, expected {list(shapes[key])}")
        out[key] = t.to(DTYPES[dtype])
    return out, int8


def _kept_blocks(source: Source, key: str, rule: Rule, blocks: Blocks,
                 shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """A weight's int8 blocks under the store's names (quant.py: mins transposed)."""
    parts = {"weight": blocks.q, "scales": blocks.scales, "mins": blocks.mins}
    if rule.transform is not None:  # row permutations (GGUF's Q/K): every part alike
        parts = {k: None if v is None else rule.transform(v) for k, v in parts.items()}
    if tuple(parts["weight"].shape) != shape:
        raise ConvertError(f"key {rule.source!r} in {source.where(rule.source)} has shape "
                           f"{list(parts['weight'].shape)} after conversion, expected "
                           f"{list(shape)}")
    prefix = key[: -len("weight")]
    out = {key: parts["weight"].contiguous(), prefix + "scales": parts["scales"].contiguous()}
    if parts["mins"] is not None:
        out[prefix + "mins"] = parts["mins"].t().contiguous()
    return out


def round_nearest(tensors: dict[str, torch.Tensor], int8: set[str]) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    for key in int8:
        out[key], out[key[: -len("weight")] + "scales"] = quantize_weight(tensors[key])
    return out


ROUNDINGS = ("gguf", "gptq", "nearest")


def convert(src: str | Path, out: str | Path, arch: str | None = None, dtype: str = "int8",
            progress: bool = True, rounding: str | None = None) -> Store:
    """SRC -> a store at OUT. int8 `rounding`: "gguf" (the default for GGUF files),
    "nearest" (the default for the others) or "gptq" (calibrated on the built-in text;
    needs the source's tokenizer). The manifest records which was used.

    "gguf" keeps a GGUF's Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 weights exactly as the file holds them,
    in int8 blocks of 32 with float16 scales (and mins): the store computes what the file
    says (SmolLM2's Q4_1: top-1 agreement with its float weights 1.000, against 0.968 for
    the same weights rounded again per output channel). Weights in other GGUF types are
    rounded to nearest per output channel; "nearest" and "gptq" round every weight so,
    from its float values, which fbgemm can run at larger batches.

    Nearest is the default because GPTQ buys little here: on SmolLM2-135M (float tied
    head) top-1 agreement with fp32 goes 0.970 -> 0.975 while perplexity moves 1.0008 ->
    1.0027 of fp32, and the conversion takes several times as long."""
    if dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if rounding is not None and rounding not in ROUNDINGS:
        raise ConvertError(f"unknown int8 rounding {rounding!r}; choose one of "
                           f"{', '.join(ROUNDINGS)}")
    if rounding is not None and dtype != "int8":
        raise ConvertError(f"rounding={rounding!r} applies to int8 stores only, not {dtype}")
    source = open_source(src)
    if rounding == "gguf" and source.layout != "gguf":
        raise ConvertError(f"int8 rounding 'gguf' keeps a GGUF file's blocks, and {src} is "
                           f"in {source.layout!r} layout: choose 'nearest' or 'gptq'")
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
    calibrator = None
    if dtype == "int8":
        if rounding == "gptq" and tokenizer is None:
            raise ConvertError(f"int8 rounding 'gptq' calibrates on text, and {src} has no "
                               "tokenizer: add one, or choose rounding 'nearest'")
        rounding = rounding or ("gguf" if source.layout == "gguf" else "nearest")
        if rounding == "gptq":
            calibrator = Calibrator(a, cfg, calibration_ids(tokenizer))
    writer = StoreWriter(Path(out), a, cfg, dtype,
                         {"path": str(Path(src).resolve()), "layout": source.layout})
    tied = {k[: -len(".weight")]: v[: -len(".weight")] for k, v in tied_head(layout).items()}
    writer.manifest["embedding"] = {
        "tables": {t: table_dtype(dtype, t in tied.values()) for t in tables(a, cfg)},
        "tied": tied}
    int8_record: dict[str, list[str]] = {}
    kept: dict[str, int] | None = {} if rounding == "gguf" else None
    parts = parts_of(cfg.n_blocks)
    how = f"{dtype}, {rounding} rounding" if dtype == "int8" else dtype
    for part in tqdm(parts, desc=f"convert {Path(src).name} -> {how}", unit="part",
                     disable=not progress):
        tensors, int8 = encode_part(source, a, cfg, layout, part, dtype, kept)
        if calibrator is not None:
            tensors = calibrator.quantize_part(part, tensors, int8)
        elif int8:
            tensors = round_nearest(tensors, int8)
        if part.kind == "embed":  # int8 rows with a scale per row, or fp16 rows
            kinds = writer.manifest["embedding"]["tables"]
            tensors = round_nearest(tensors, {f"{t}.weight" for t in kinds
                                              if kinds[t] == "int8"})
            tensors.update({f"{t}.weight": tensors[f"{t}.weight"].half() for t in kinds
                            if kinds[t] == "fp16"})
        writer.write(part, tensors)
        if dtype == "int8":
            kind = "blocks" if part.kind == "block" else part.kind
            int8_record.setdefault(kind, sorted(k[: -len(".scales")] for k in tensors
                                                if k.endswith(".scales")))
    if dtype == "int8":
        if kept:
            writer.manifest["quantization"].update({
                "method": "int8 blocks of 32 as in the GGUF; other Linears "
                          "int8-symmetric-per-output-channel",
                "scales": "<name>.scales float16 [out, in/32] (blocks) or float32 [out]",
                "mins": "<name>.mins float16 [in/32, out] (Q4_1/Q5_1 blocks)",
                "kept": kept})
        writer.manifest["quantization"].update({
            "rounding": rounding,
            "calibration": ({"text": "built-in (models/quant/calibrate.py), English and Chinese",
                             "tokens": calibrator.tokens} if calibrator is not None else None),
            # Which Linears are int8, per part kind (blocks: every block alike); the
            # token tables are int8 rows with a float32 scale each, or fp16 where a tied
            # LM head reads them (manifest "embedding"); norms and biases are float32.
            "int8": int8_record,
            "lm_head": "the embedding's fp16 table (tied), through an int8 screen"
                       if tied else "int8"})
    return writer.finish(tokenizer)
