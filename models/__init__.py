"""llm_shard.models: architectures block by block, the checkpoint store, tokenizers, int8.

Knows no Ray and no ZeroMQ: everything here runs on plain tensors in one process. This
file is the architecture registry: generic code (checkpoint sources, tokenizers) finds an
architecture's own reader or tokenizer through it (`Arch.reader`, `Arch.tokenizer`) and
never imports an architecture module by name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from llm_shard.models.errors import UnknownArch

if TYPE_CHECKING:
    from llm_shard.models.base import Arch

_ARCH_MODULES = {"llama": "archs.llama", "pangu-alpha": "archs.pangu", "moss": "archs.moss",
                 "chatglm": "archs.chatglm", "rwkv": "archs.rwkv", "cpm2": "archs.cpm2"}
PLANNED: tuple[str, ...] = ()  # architectures of the seed not yet written


def arch_names() -> list[str]:
    return sorted(_ARCH_MODULES)


def all_archs() -> list[Arch]:
    """Every architecture, in `_ARCH_MODULES` order (imports each module)."""
    return [importlib.import_module(f".{m}", __name__).ARCH for m in _ARCH_MODULES.values()]


def get_arch(name: str) -> Arch:
    """The architecture for a --arch name or an alias (e.g. a config's model_type)."""
    key = name.lower().replace("_", "-")
    for arch_name, module in _ARCH_MODULES.items():
        arch = importlib.import_module(f".{module}", __name__).ARCH
        if key == arch_name or key in arch.aliases:
            return arch
    if key in PLANNED:
        raise UnknownArch(f"architecture {name!r} is planned but not implemented yet")
    raise UnknownArch(f"unknown architecture {name!r}; known: {', '.join(arch_names())}")
