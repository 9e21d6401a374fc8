"""The checkpoint store: one safetensors file per part, described by a versioned manifest.

    STORE/manifest.json            arch, config, dtype, quantization, tokenizer, files
    STORE/embed.safetensors        the embedding
    STORE/blocks/NNN.safetensors   one file per block (global index), so a worker maps only its own
    STORE/head.safetensors         final norm and LM head
    STORE/tokenizer/...

int8 stores hold each Linear weight as `<name>.weight` (int8, out x in) plus
`<name>.scales` (float32, per output channel). Loading memory-maps the files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import get_arch
from .base import Arch, ArchConfig, Part, parts_of
from .quant import prepare_int8, swap_int8

FORMAT = "llm-shard-store"
VERSION = 1
DTYPES = {"int8": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}


class StoreError(Exception):
    """A store that is missing, incomplete, corrupt or of another version."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Store:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path) -> Store:
        path = Path(path)
        mf = path / "manifest.json"
        if not mf.is_file():
            raise StoreError(f"{path} is not an llm-shard store (no manifest.json); "
                             f"create one with: llm-shard convert SRC -o {path}")
        try:
            manifest = json.loads(mf.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"{mf} is not valid JSON: {e}") from None
        if manifest.get("format") != FORMAT:
            raise StoreError(f"{mf} is not an llm-shard manifest")
        if manifest.get("version") != VERSION:
            raise StoreError(f"{mf} has store version {manifest.get('version')}, this llm-shard "
                             f"reads version {VERSION}: convert the checkpoint again")
        return cls(path, manifest)

    @property
    def arch(self) -> Arch:
        return get_arch(self.manifest["arch"])

    @property
    def config(self) -> ArchConfig:
        return self.arch.config.from_dict(self.manifest["config"])

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def n_blocks(self) -> int:
        return self.manifest["n_blocks"]

    def file_entry(self, name: str) -> dict:
        for entry in self.manifest["files"]:
            if entry["name"] == name:
                return entry
        raise StoreError(f"{self.path}: manifest lists no file {name}")

    def part_bytes(self, part: Part) -> int:
        return self.file_entry(part.file)["bytes"]

    def _checked(self, name: str) -> Path:
        entry, path = self.file_entry(name), self.path / name
        if not path.is_file():
            raise StoreError(f"{path} is missing from the store")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise StoreError(f"{path} has {size} bytes, the manifest says {entry['bytes']}: "
                             "the file is truncated or was changed")
        return path

    def verify(self, names: list[str] | None = None) -> None:
        """Check sha256 of the named files (default: all); raise naming the first bad one."""
        for entry in self.manifest["files"]:
            if names is not None and entry["name"] not in names:
                continue
            path = self._checked(entry["name"])
            if sha256_file(path) != entry["sha256"]:
                raise StoreError(f"{path} fails its sha256 check: the file is corrupt")

    def tensors(self, part: Part) -> dict[str, torch.Tensor]:
        """The part's tensors, memory-mapped (nothing is read until used)."""
        return load_file(self._checked(part.file))

    def load(self, part: Part, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> nn.Module:
        """Build one part and fill it from its file: int8 Linears stay int8."""
        arch, cfg = self.arch, self.config
        with torch.device("meta"):
            module = arch.build(cfg, part)
        state = self.tensors(part)
        int8 = {k[: -len(".scales")] for k in state if k.endswith(".scales")}
        if int8:
            swap_int8(module, lambda name, _m: name in int8)
        state = {k: (v if v.dtype == torch.int8 or k.endswith(".scales") else v.to(dtype))
                 for k, v in state.items()}
        module.load_state_dict(state, strict=True, assign=True)
        module.to(device)
        if int8:
            prepare_int8(module)
        return module.eval().requires_grad_(False)

    def tokenizer(self):
        from .tokenizer import load_tokenizer

        spec = self.manifest.get("tokenizer")
        if spec is None:
            raise StoreError(f"{self.path} has no tokenizer: pass token ids, or convert from a "
                             "source that includes one")
        return load_tokenizer(self.path / "tokenizer", spec)


class StoreWriter:
    """Writes a store part by part into PATH.partial, renamed to PATH when finished."""

    def __init__(self, path: Path, arch: Arch, cfg: ArchConfig, dtype: str,
                 source: dict) -> None:
        self.final = Path(path)
        self.path = self.final.with_name(self.final.name + ".partial")
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "blocks").mkdir(exist_ok=True)
        self.manifest = {
            "format": FORMAT, "version": VERSION, "arch": arch.name, "config": cfg.to_dict(),
            "n_blocks": cfg.n_blocks, "dtype": dtype,
            "quantization": ({"method": "int8-symmetric-per-output-channel",
                              "weights": "<name>.weight int8 [out, in]",
                              "scales": "<name>.scales float32 [out]"}
                             if dtype == "int8" else None),
            "source": source, "tokenizer": None, "chat_template": arch.chat_template,
            "files": []}

    def write(self, part: Part, tensors: dict[str, torch.Tensor]) -> None:
        path = self.path / part.file
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
        self.manifest["files"].append({"name": part.file, "bytes": path.stat().st_size,
                                       "sha256": sha256_file(path)})

    def finish(self, tokenizer=None) -> Store:
        if tokenizer is not None:
            self.manifest["tokenizer"] = tokenizer.save(self.path / "tokenizer")
            self.manifest["chat_template"] = tokenizer.chat_template
        expected = {p.file for p in parts_of(self.manifest["n_blocks"])}
        written = {f["name"] for f in self.manifest["files"]}
        if expected != written:
            raise StoreError(f"store is incomplete, missing {sorted(expected - written)}")
        (self.path / "manifest.json").write_text(json.dumps(self.manifest, indent=1))
        if self.final.exists():
            import shutil

            shutil.rmtree(self.final)
        self.path.rename(self.final)
        return Store.open(self.final)
