"""What every architecture module provides, and the names of a model's parts.

A model is three kinds of part: the embedding, blocks with global indices, and the
head. Each part is one file in the store and one module at run time, so a worker
builds and loads only the parts of its range.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from llm_shard.models.cache import DEFAULT_KV_DTYPE, kv_bytes_per_token, kv_dtype_of


class _NoInit(torch.overrides.TorchFunctionMode):
    """Leaves meta tensors' in-place random initialisation out: on the meta device it
    computes nothing, yet the first `normal_` there (nn.Embedding's init) imports
    torch._dynamo, about a second of every process's start-up."""

    SKIP = frozenset((torch.Tensor.normal_, torch.Tensor.uniform_, torch.nn.init.normal_,
                      torch.nn.init.trunc_normal_, torch.Tensor.zero_, torch.Tensor.fill_))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SKIP:
            t = args[0] if args else kwargs.get("tensor")
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta():
    """Modules built inside have parameters on the meta device (no memory, no init): for
    filling from a state dict with assign=True."""
    with _NoInit(), torch.device("meta"):
        yield


@dataclass(frozen=True)
class Part:
    kind: str  # "embed" | "block" | "head"
    index: int = -1  # global block index, for blocks

    @property
    def file(self) -> str:
        if self.kind == "block":
            return f"blocks/{self.index:03d}.safetensors"
        return f"{self.kind}.safetensors"

    def __str__(self) -> str:
        return f"block {self.index}" if self.kind == "block" else self.kind


def parts_of(n_blocks: int) -> list[Part]:
    return [Part("embed"), *(Part("block", i) for i in range(n_blocks)), Part("head")]


@dataclass(frozen=True)
class Rule:
    """Where one store tensor comes from: a source key ({i} = block index) and a transform."""

    source: str
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class ArchConfig:
    """Base of every architecture's config dataclass.

    `kv_dtype` (not a field: a run setting, never in a manifest) is what the caches of
    this run store K/V in (models/cache.py KV_DTYPES); `cache_bytes_per_token` follows it.
    A Store's `config` carries the store's `kv_dtype`."""

    kv_dtype: ClassVar[str] = DEFAULT_KV_DTYPE

    @classmethod
    def normalize(cls, raw: dict) -> dict:
        return dict(raw)

    @classmethod
    def from_dict(cls, raw: dict):
        """Build from a checkpoint's config, dropping keys this architecture doesn't use."""
        d = cls.normalize(raw)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def n_blocks(self) -> int:
        raise NotImplementedError

    @property
    def max_context(self) -> int | None:
        """The longest sequence the model takes; None where nothing bounds it (RWKV)."""
        for name in ("max_position_embeddings", "max_sequence_length", "n_positions"):
            value = getattr(self, name, None)
            if value:
                return int(value)
        return None

    @property
    def kv_layout(self) -> tuple[int, int]:
        """(heads, head_dim) of the K (and alike V) that one token adds to one block's
        cache; (0, 0) where nothing grows with the sequence."""
        raise NotImplementedError

    @property
    def cache_bytes_per_token(self) -> int:
        """KV-cache bytes one token costs in one block, in a `kv_dtype` cache."""
        return kv_bytes_per_token(*self.kv_layout, self.kv_dtype)

    def with_kv_dtype(self, kv_dtype: str):
        """This config, its caches in `kv_dtype` (KV_DTYPES)."""
        kv_dtype_of(kv_dtype)
        cfg = dataclasses.replace(self)
        cfg.kv_dtype = kv_dtype
        return cfg


Layout = Callable[[ArchConfig], dict]


@dataclass(frozen=True)
class Arch:
    name: str
    config: type[ArchConfig]
    embed: Callable[[ArchConfig], nn.Module]
    block: Callable[[ArchConfig, int], nn.Module]
    head: Callable[[ArchConfig], nn.Module]
    # source layout name -> {"embed"|"block"|"block N"|"head": {key: Rule}, "ignore": (regex,)}
    layouts: dict[str, Layout]
    chat_template: str = "plain"
    aliases: tuple[str, ...] = field(default=())
    # An architecture's own checkpoint format and tokenizer, where checkpoint/sources.py's
    # readers and text/tokenizer.py's kinds don't cover them:
    # reader(path) -> a Source of that file, or None when the file is not in its format;
    reader: Callable[[Path], object | None] | None = None
    # tokenizer: a Tokenizer class, whose `kind` names it in a store and `file` in a folder.
    tokenizer: type | None = None

    def build(self, cfg: ArchConfig, part: Part) -> nn.Module:
        if part.kind == "block":
            return self.block(cfg, part.index)
        return {"embed": self.embed, "head": self.head}[part.kind](cfg)
