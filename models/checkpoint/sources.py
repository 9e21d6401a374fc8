"""Readers for checkpoint sources: a Hugging Face folder, a Meta LLaMA folder, a Megatron
PanGu-α file, a ChatRWKV RWKV-4 .pth, a GGUF file, and an architecture's own format
through its `Arch.reader`. Each gives keys, shapes, a config and lazily loaded tensors.

Nothing here unpickles arbitrary objects: .bin/.pth files load with weights_only=True.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llm_shard.models.errors import SourceError

log = logging.getLogger(__name__)


@dataclass
class Blocks:
    """A 2-D weight w (out, in) held as int8 in blocks of 32 inputs:
    w[o, i] = q[o, i] * scales[o, i // 32] + mins[o, i // 32] (mins: None when zero)."""

    q: torch.Tensor  # int8 (out, in)
    scales: torch.Tensor  # float16 (out, in / 32)
    mins: torch.Tensor | None  # float16 (out, in / 32)
    kind: str  # the source's name for the format, e.g. "Q4_1"


class Source:
    layout: str  # which of the arch's layouts the keys follow
    arch: str | None  # what the source says it is, if it says
    path: Path

    def keys(self) -> list[str]:
        return list(self._where)

    def where(self, key: str) -> str:
        """The file that holds key, for error messages."""
        return self._where[key]

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def config(self, arch: str) -> dict:
        raise NotImplementedError

    def blocks(self, key: str) -> Blocks | None:
        """The tensor as int8 blocks exactly as the source stores it, or None when it is not
        stored so (only GGUF files are)."""
        return None

    def tokenizer(self, arch: str):
        """The source's tokenizer, or None when it carries none."""
        from llm_shard.models.text.tokenizer import TokenizerError, tokenizer_from_folder

        try:
            return tokenizer_from_folder(self.path if self.path.is_dir() else self.path.parent,
                                         arch)
        except TokenizerError:
            return None


def _load_pickle_free(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError and RuntimeError variants here
        raise SourceError(f"{path}: cannot load as a plain tensor file ({e.__class__.__name__}: "
                          f"{str(e).splitlines()[0]}); llm-shard never unpickles objects") from None


def _flatten(d: dict, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        elif isinstance(v, torch.Tensor):
            yield prefix + k, v


class TensorFiles(Source):
    """Keys spread over safetensors or torch files, each opened lazily and memory-mapped."""

    def __init__(self, path: Path, files: list[Path], layout: str, arch: str | None,
                 strip: tuple[str, ...] = ()) -> None:
        self.path, self.layout, self.arch = path, layout, arch
        self._where: dict[str, str] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        self._st: dict[str, object] = {}
        for f in files:
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                handle = safe_open(f, framework="pt")
                self._st[f.name] = handle
                for k in handle.keys():
                    self._where[k] = f.name
            else:
                for k, t in _flatten(_load_pickle_free(f)):
                    for s in strip:
                        k = k[len(s):] if k.startswith(s) else k
                    self._where[k], self._tensors[k] = f.name, t

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._tensors:
            return tuple(self._tensors[key].shape)
        return tuple(self._st[self._where[key]].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        if key in self._tensors:
            return self._tensors[key]
        return self._st[self._where[key]].get_tensor(key)


class HFFolder(TensorFiles):
    def __init__(self, path: Path) -> None:
        try:
            self._config = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SourceError(f"{path}/config.json is unreadable: {e}") from None
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
        if not files:
            raise SourceError(f"{path} has config.json but no *.safetensors or "
                              "pytorch_model*.bin weights")
        super().__init__(path, files, "hf", self._config.get("model_type"))

    def config(self, arch: str) -> dict:
        return self._config


class MetaFolder(TensorFiles):
    """Meta's LLaMA release: params.json + consolidated.NN.pth."""

    def __init__(self, path: Path) -> None:
        shards = sorted(path.glob("consolidated.*.pth"))
        if len(shards) != 1:
            raise SourceError(f"{path}: found {len(shards)} consolidated.*.pth files; only "
                              "single-shard Meta checkpoints (7B) are supported")
        self._params = json.loads((path / "params.json").read_text())
        super().__init__(path, shards, "meta", "llama")

    def config(self, arch: str) -> dict:
        from llm_shard.models.archs.llama import config_from_meta

        return config_from_meta(self._params, {k: self.shape(k) for k in self.keys()})


class MegatronFile(TensorFiles):
    """PanGu-α's Megatron port: one torch file of nested dicts under model.language_model."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, [path], "megatron", "pangu-alpha",
                         strip=("model.language_model.", "language_model."))
        if "embedding.word_embeddings.weight" not in self._where:
            raise SourceError(f"{path}: no embedding.word_embeddings.weight; not a Megatron "
                              "PanGu-α checkpoint")

    def config(self, arch: str) -> dict:
        cfg_file = self.path.parent / "config.json"
        if cfg_file.is_file():
            return json.loads(cfg_file.read_text())
        from llm_shard.models.archs.pangu import config_from_megatron

        return config_from_megatron({k: self.shape(k) for k in self.keys()})


class RWKVFile(TensorFiles):
    """ChatRWKV's RWKV-4 checkpoint: one .pth of flat keys (emb.weight, blocks.N.att.*,
    blocks.N.ffn.*, ln_out, head), with no config: sizes come from the tensors."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, [path], "pth", "rwkv")

    def config(self, arch: str) -> dict:
        from llm_shard.models.archs.rwkv import config_from_pth

        return config_from_pth({k: self.shape(k) for k in self.keys()})


def _torch_file(path: Path) -> Source:
    """A single .pt/.pth/.bin file: in an architecture's own format where its `Arch.reader`
    recognises it (such files need not be torch files), else ChatRWKV's RWKV-4 .pth, else
    a Megatron PanGu-α file."""
    from llm_shard.models import all_archs

    for arch in all_archs():
        if arch.reader is not None and (source := arch.reader(path)) is not None:
            return source
    keys = _load_pickle_free(path)
    if isinstance(keys, dict) and "emb.weight" in keys and "blocks.0.ln0.weight" in keys:
        return RWKVFile(path)
    return MegatronFile(path)


def gguf_reader(path: Path):
    """The gguf package's reader of `path`, shared while anything holds it and the file is
    unchanged (path, size, modification time): it parses every metadata item on its own,
    seconds and ~160 MB for a 49k-token vocabulary. Freed with its last holder,
    so a server that converted a GGUF at start keeps none of it."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    with _READERS_LOCK:
        reader = _READERS.get(key)
        if reader is None:
            import gguf

            reader = _READERS[key] = gguf.GGUFReader(path)
    return reader


_READERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_READERS_LOCK = threading.Lock()


class GGUFFile(Source):
    """A GGUF file: tensors dequantized to float32 on demand (numpy, via the gguf package)."""

    def __init__(self, path: Path) -> None:
        self.path, self.layout = path, "gguf"
        try:
            self.reader = gguf_reader(path)
        except Exception as e:  # gguf raises ValueError/struct.error/OSError on bad files
            raise SourceError(f"{path} is not a readable GGUF file: {e}") from None
        self._by_name = {t.name: t for t in self.reader.tensors}
        self._where = {name: path.name for name in self._by_name}
        self.meta = {}
        for name, field in self.reader.fields.items():
            if name.startswith("GGUF.") or name in ("tokenizer.ggml.tokens",
                                                    "tokenizer.ggml.merges",
                                                    "tokenizer.ggml.token_type",
                                                    "tokenizer.ggml.scores"):
                continue
            self.meta[name] = field.contents()
        self.arch = self.meta.get("general.architecture")

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._by_name[key].shape))

    def get(self, key: str) -> torch.Tensor:
        from gguf.quants import dequantize

        t = self._by_name[key]
        arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        return torch.from_numpy(arr.reshape(self.shape(key)).copy())

    # GGML block types that int8 holds exactly: bytes of the scale, and of the min (0: none)
    # at the start of each 32-weight block; the rest is the quants, which `dequantize`
    # unpacks (q = (w - min) / scale, an integer of at most 8 bits, checked below).
    EXACT_TYPES = {"Q8_0": 0, "Q4_0": 0, "Q5_0": 0, "Q4_1": 2, "Q5_1": 2}

    def blocks(self, key: str) -> Blocks | None:
        import gguf
        from gguf.quants import dequantize

        t = self._by_name[key]
        kind = t.tensor_type.name
        if kind not in self.EXACT_TYPES or len(t.shape) != 2:
            return None
        size, nbytes = gguf.GGML_QUANT_SIZES[t.tensor_type]
        out, inp = self.shape(key)
        raw = np.asarray(t.data).reshape(out * inp // size, nbytes)
        scales = np.ascontiguousarray(raw[:, :2]).view(np.float16).reshape(out, inp // size)
        has_min = self.EXACT_TYPES[kind]
        mins = (np.ascontiguousarray(raw[:, 2:4]).view(np.float16).reshape(out, inp // size)
                if has_min else None)
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(out, -1, size)
        d = scales.astype(np.float32)[..., None]
        m = 0 if mins is None else mins.astype(np.float32)[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(d != 0, np.rint((w - m) / d), 0)
        if (np.abs(q) > 127).any() or not np.array_equal(d * q.astype(np.float32) + m, w):
            log.warning("%s (%s) in %s does not read back exactly as int8 blocks: it is "
                        "rounded per output channel instead", key, kind, self.path.name)
            return None
        return Blocks(torch.from_numpy(q.astype(np.int8).reshape(out, inp)),
                      torch.from_numpy(scales.copy()),
                      None if mins is None else torch.from_numpy(mins.copy()), kind)

    def config(self, arch: str) -> dict:
        from llm_shard.models.archs.llama import config_from_gguf

        meta = dict(self.meta)
        meta["tensor_names"] = set(self._by_name)
        meta["tokenizer.ggml.tokens"] = self.reader.fields["tokenizer.ggml.tokens"].data
        return config_from_gguf(meta)

    def tokenizer(self, arch: str):
        from llm_shard.models.text.tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(self.reader)


def open_source(src: str | Path) -> Source:
    """Recognise what SRC is by what it contains."""
    path = Path(src).expanduser()
    if not path.exists():
        raise SourceError(f"{path} does not exist")
    if path.is_file():
        if path.suffix == ".gguf":
            return GGUFFile(path)
        if path.suffix in (".pt", ".pth", ".bin"):
            return _torch_file(path)
        raise SourceError(f"{path}: unknown file type {path.suffix!r} (expected .gguf, or a "
                          "folder with config.json or params.json)")
    if (path / "config.json").is_file() and (any(path.glob("*.safetensors"))
                                            or any(path.glob("pytorch_model*.bin"))):
        return HFFolder(path)
    if (path / "params.json").is_file():
        return MetaFolder(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return GGUFFile(ggufs[0])
    megatron = sorted(path.glob("*.pt")) + sorted(path.glob("*.pth"))
    if len(megatron) == 1:
        return _torch_file(megatron[0])
    raise SourceError(f"{path}: not a checkpoint folder (expected config.json with "
                      "*.safetensors or pytorch_model*.bin, params.json with consolidated.00.pth, "
                      "one *.gguf, one Megatron *.pt, or one ChatRWKV *.pth)")
