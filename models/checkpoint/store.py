"""The checkpoint store: one safetensors file per part, described by a versioned manifest.

    STORE/manifest.json            arch, config, dtype, quantization, tokenizer, files
    STORE/embed.safetensors        the embedding
    STORE/blocks/NNN.safetensors   one file per block (global index), so a worker maps only its own
    STORE/head.safetensors         final norm and LM head (a tied one: in embed.safetensors)
    STORE/tokenizer/...

int8 stores hold each Linear weight as `<name>.weight` (int8, out x in) plus
`<name>.scales` (float32, per output channel), and the token tables (manifest
"embedding") alike: int8 rows, a scale per row; other stores keep the tables in their
dtype. A tied LM head is the table's tensors, read from embed.safetensors (manifest
"embedding" "tied": {head layer: table}). Loading memory-maps a part's file, checks
its size and its sha256 (verify.py: unless recorded as already checked), and places what
w8a16 streams into 2 MiB pages (placement.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from llm_shard.models import get_arch
from llm_shard.models.base import Arch, ArchConfig, Part, on_meta, parts_of
from llm_shard.models.cache import DEFAULT_KV_DTYPE, kv_dtype_of
from llm_shard.models.checkpoint.placement import (
    back_to_back,
    huge_page_arena,
    huge_page_place,
    huge_pages_problem,
    release_mapped,
    weights_to_huge_pages,
)
from llm_shard.models.checkpoint.verify import (
    VERIFIED,
    VERIFIED_LOCK,
    Checks,
    record_verified,
    sha256_file,
)
from llm_shard.models.errors import StoreError
from llm_shard.models.quant.embedding import RowEmbedding, swap_tables
from llm_shard.models.quant.fusion import prepare_int8
from llm_shard.models.quant.linear import Int8Linear, int8_formats, keeps_dtype, swap_int8
from llm_shard.models.quant.screened import screen_head

# importable from here as well, for callers outside models/checkpoint
__all__ = ["ALIGN", "DTYPES", "PAD", "SAFETENSORS_DTYPES", "VERIFIED", "VERIFIED_LOCK", "Store",
           "StoreError", "StoreWriter", "huge_page_arena", "huge_pages_problem",
           "record_verified", "release_mapped", "save_aligned", "without_padding"]

FORMAT = "llm-shard-store"
# 2: token tables at their stored size (int8 rows + scales in int8 stores), a tied head
# kept once, in embed.safetensors. Version 1 stores are refused (Store.open) or, in the
# catalog's home, converted again (catalog.resolve).
VERSION = 2
# the torch dtype each store dtype runs its float parts in; its names are DTYPE_NAMES, which
# the command line offers without loading torch (tests/test_store_verify.py checks)
DTYPES = {"int8": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}

# Kernels that run a layer from a copy of its weights (fbgemm's packed form; "auto"
# resolved, see Int8Linear.running), so that its mapped pages can go; so can those of a
# "fused" group's members, whose fused layer holds a copy of their rows. w8a16 reads the
# mapped weights as they are, unless they move into 2 MiB pages (weights_to_huge_pages:
# there a fused layer's rows are its members' own bytes, which stay), or into nibbles
# (their mapped pages go there).
PACKED_KERNELS = ("fbgemm",)


# Every tensor's data starts at a multiple of ALIGN bytes in its file, and so in a mapping
# or a page-aligned staging buffer: _weight_int8pack_mm crashes (SIGSEGV) on int8 weights
# that are not 16-byte aligned once a call has 4 or more rows, and vector loads prefer it.
ALIGN = 64
PAD = "__pad"  # filler tensors that keep the data aligned (a safetensors file has no holes)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def save_aligned(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file whose tensors' data are ALIGN-byte aligned.

    The header is padded with spaces (the format allows it) to end on ALIGN bytes; a
    tensor that would start misaligned is preceded by a uint8 filler named __padN, which
    `without_padding` drops. Any safetensors reader opens the file."""
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _DTYPE_NAMES:
            raise StoreError(f"tensor {name!r} has dtype {t.dtype}, which a store cannot hold")
        gap = -offset % ALIGN
        if gap:
            header[f"{PAD}{len(header)}"] = {"dtype": "U8", "shape": [gap],
                                             "data_offsets": [offset, offset + gap]}
            chunks.append(bytes(gap))
            offset += gap
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        chunks.append(t.reshape(-1).view(torch.uint8).numpy() if size else b"")
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for chunk in chunks:
            f.write(chunk)


def _tensor_bytes(path: Path) -> dict[str, int]:
    """{tensor name: bytes} from a safetensors file's header (no data read)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
            if k != "__metadata__"}


def without_padding(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if not k.startswith(PAD)}


@dataclass
class Store:
    path: Path
    manifest: dict
    # what this process's caches of the store store K/V in (models/cache.py KV_DTYPES);
    # `config` carries it, so that its cache_bytes_per_token follows
    kv_dtype: str = field(default=DEFAULT_KV_DTYPE, compare=False)
    checks: Checks = field(init=False, repr=False, compare=False)  # sha256 checks (verify.py)

    def __post_init__(self) -> None:
        kv_dtype_of(self.kv_dtype)
        self.checks = Checks(self.path)

    def with_kv_dtype(self, kv_dtype: str) -> Store:
        """This store, its caches (and so its config's cache bytes) in `kv_dtype`."""
        return dataclasses.replace(self, kv_dtype=kv_dtype)

    @classmethod
    def open(cls, path: str | Path, kv_dtype: str = DEFAULT_KV_DTYPE) -> Store:
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
        return cls(path, manifest, kv_dtype)

    @property
    def arch(self) -> Arch:
        return get_arch(self.manifest["arch"])

    @property
    def config(self) -> ArchConfig:
        return self.arch.config.from_dict(self.manifest["config"]).with_kv_dtype(self.kv_dtype)

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

    @property
    def nbytes(self) -> int:
        """Bytes of all the store's weight files, as its manifest lists them."""
        return sum(f["bytes"] for f in self.manifest["files"])

    @property
    def tables(self) -> list[str]:
        """The embed part's token tables (RowEmbeddings once loaded)."""
        return list(self.manifest["embedding"]["tables"])

    @property
    def tied(self) -> dict[str, str]:
        """{head layer: embed table} of a tied LM head, whose tensors are the table's."""
        return dict(self.manifest["embedding"]["tied"])

    def tied_bytes(self) -> int:
        """Bytes of embed.safetensors that a tied head reads (0 for an untied head)."""
        names = {f"{t}.{n}" for t in self.tied.values() for n in ("weight", "scales")}
        return sum(b for name, b in _tensor_bytes(self.path / Part("embed").file).items()
                   if name in names)

    def part_bytes(self, part: Part) -> int:
        """Bytes the part holds at its stored size, as mapped or read to run it: its
        file's, and for a tied head the table it shares with the embedding (counted in
        both parts: `parts_bytes` counts it once where one worker holds both)."""
        extra = self.tied_bytes() if part.kind == "head" else 0
        return self.file_entry(part.file)["bytes"] + extra

    def parts_bytes(self, parts: list[Part]) -> int:
        """Bytes of the parts one worker holds together: a tied head's table counted once."""
        total = sum(self.part_bytes(p) for p in parts)
        kinds = {p.kind for p in parts}
        return total - (self.tied_bytes() if {"embed", "head"} <= kinds else 0)

    def _sized(self, name: str) -> tuple[dict, Path, os.stat_result]:
        """The file's manifest entry, path and stat; StoreError if missing or mis-sized."""
        entry, path = self.file_entry(name), self.path / name
        if not path.is_file():
            raise StoreError(f"{path} is missing from the store")
        st = path.stat()
        if st.st_size != entry["bytes"]:
            raise StoreError(f"{path} has {st.st_size} bytes, the manifest says "
                             f"{entry['bytes']}: the file is truncated or was changed")
        return entry, path, st

    def _checked(self, name: str) -> Path:
        """The path of a file to load: its size checked, and its sha256 unless recorded."""
        entry, path, st = self._sized(name)
        self.checks.check(name, entry, st)
        return path

    def verify(self, names: list[str] | None = None) -> None:
        """Check sha256 of the named files (default: all), whatever their records say;
        raise naming the first bad one, record the good ones."""
        for entry in self.manifest["files"]:
            if names is not None and entry["name"] not in names:
                continue
            _, _, st = self._sized(entry["name"])
            self.checks.verify(entry["name"], entry, st)

    def tensors(self, part: Part) -> dict[str, torch.Tensor]:
        """The part's tensors, memory-mapped (nothing is read until used)."""
        return without_padding(load_file(self._checked(part.file)))

    def load(self, part: Part, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> nn.Module:
        """Build one part and fill it from its file: int8 Linears stay int8, token tables
        stay as stored and mapped (RowEmbedding), a tied head reads the embedding's."""
        arch, cfg = self.arch, self.config
        with on_meta():
            module = arch.build(cfg, part)
        state = self.tensors(part)
        if part.kind == "head" and self.tied:
            table = self.tensors(Part("embed"))
            for layer, name in self.tied.items():
                state.update({f"{layer}.{k}": table[f"{name}.{k}"]
                              for k in ("weight", "scales") if f"{name}.{k}" in table})
        tables = {f"{t}.weight" for t in self.tables} if part.kind == "embed" else set()
        int8 = {k: v for k, v in int8_formats(state).items() if f"{k}.weight" not in tables}
        with on_meta():  # empty Int8Linears and RowEmbeddings: the state dict fills them
            if int8:
                swap_int8(module, formats=int8)
            swap_tables(module, {k[: -len(".weight")]: state[k].dtype for k in tables},
                        dtype)
        raw = state  # kept to the end: no new tensor can take a mapped tensor's address
        mapped = {v.data_ptr() for v in raw.values()}
        # a tied head over an int8 store's fp16 table reads it mapped, through a screen
        half = {f"{t}.weight" for t in self.tied} if (
            part.kind == "head" and self.manifest["dtype"] == "int8") else set()
        state = {k: (v if k in tables or k in half or keeps_dtype(k, v) else v.to(dtype))
                 for k, v in raw.items()}
        module.load_state_dict(state, strict=True, assign=True)
        module.to(device)
        # the int8 weights that w8a16 streams every step go into 2 MiB pages (where
        # transparent huge pages run) before anything copies them: fused layers are views
        # of their members there, a screened head's int8 copy is made there
        huge = self.manifest["dtype"] == "int8" and torch.device(device).type == "cpu"
        if int8:
            moved = weights_to_huge_pages(module, mapped) if huge else 0
            kernels = prepare_int8(module, fuse=True, rows=back_to_back if moved else None)
            for name, kernel in kernels.items():
                layer = module.get_submodule(name)
                if ((kernel == "fused" or layer.running in PACKED_KERNELS)
                        and layer.weight.data_ptr() in mapped):
                    release_mapped(layer.weight)  # a copy replaced the mapped bytes
        if half:
            # the float head (tied to the embedding) is read through an int8 screen; of a
            # mapped weight, only the rows recomputed exactly are read from then on
            screened = screen_head(module, lambda lin: release_mapped
                                   if lin.weight.data_ptr() in mapped else None,
                                   place=huge_page_place if huge else None)
            for name in set(self.tied) - set(screened):  # no screen here: run it in dtype
                lin = module.get_submodule(name)
                lin.weight = nn.Parameter(lin.weight.to(dtype), requires_grad=False)
        del raw
        return module.eval().requires_grad_(False)

    def share_tied(self, embed: nn.Module, head: nn.Module) -> int:
        """One copy of a tied table where one worker holds both parts: the embedding reads
        its rows from the head's layer (int8 rows and scales, or float rows where the head
        runs in the stored dtype), whose bytes the head reads at every step anyway.
        Returns the bytes no longer held twice (0: untied, or the layer's form differs,
        such as an fp32 head over a bf16 table, or a packed kernel's copy)."""
        saved = 0
        for layer, name in self.tied.items():
            table, lin = embed.get_submodule(name), head.get_submodule(layer)
            if not isinstance(table, RowEmbedding):
                raise StoreError(f"{self.path}: {name} is not a loaded token table")
            if isinstance(lin, Int8Linear):
                if lin.group or lin.nibbles_now() is not None:
                    continue
                weight, scales = lin.weight, lin.scales
            else:
                weight, scales = lin.weight, None
            if table.share(weight, scales):
                saved += weight.numel() * weight.element_size() + (
                    0 if scales is None else scales.numel() * scales.element_size())
        return saved

    def tokenizer(self):
        from llm_shard.models.text.tokenizer import load_tokenizer

        spec = self.manifest.get("tokenizer")
        if spec is None:
            raise StoreError(f"{self.path} has no tokenizer: pass token ids, or convert from a "
                             "source that includes one")
        folder = self.path / "tokenizer"
        name = spec.get("file") if isinstance(spec, dict) else None
        if isinstance(name, str):  # a manifest cannot point outside its store
            path = folder / name
            if os.path.isabs(name) or ".." in Path(name).parts or \
                    not path.resolve().is_relative_to(self.path.resolve()):
                raise StoreError(f"{self.path}: the manifest's tokenizer file {name!r} is not "
                                 f"inside the store ({path} leads out of it)")
        return load_tokenizer(folder, spec)


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
        save_aligned(tensors, path)
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
        # hashed as written: a fresh store loads without hashing (renaming the folder
        # keeps its files' stat identity)
        record_verified(self.path, {f["name"]: f["sha256"] for f in self.manifest["files"]})
        (self.path / "manifest.json").write_text(json.dumps(self.manifest, indent=1))
        if self.final.exists():
            import shutil

            shutil.rmtree(self.final)
        self.path.rename(self.final)
        return Store.open(self.final)
