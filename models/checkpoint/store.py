"""The checkpoint store: one safetensors file per part, described by a versioned manifest.

    STORE/manifest.json            arch, config, dtype, quantization, tokenizer, files
    STORE/embed.safetensors        the embedding
    STORE/blocks/NNN.safetensors   one file per block (global index), so a worker maps only its own
    STORE/head.safetensors         final norm and LM head
    STORE/tokenizer/...

int8 stores hold each Linear weight as `<name>.weight` (int8, out x in) plus
`<name>.scales` (float32, per output channel). Loading memory-maps the files; the int8
weights that w8a16 streams every step are then copied into 2 MiB pages where Linux's
transparent huge pages run, and a GGUF's Q4 blocks packed there at 4 bits a value
(`weights_to_huge_pages`).

Loading a part checks its file's size, and its sha256 against the manifest unless the
sidecar STORE/.llm-shard-verified.json says that this very file (same device, inode,
size, mtime and ctime: a copy or an edit changes them) already passed that check. Convert
and cluster/transfer.py record the files they write and verify (`record_verified`), so
only a store copied by other means, or a file changed since, is hashed, once.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import json
import logging
import mmap
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from llm_shard.models import get_arch
from llm_shard.models.base import Arch, ArchConfig, Part, on_meta, parts_of
from llm_shard.models.errors import StoreError
from llm_shard.models.kernels import w8a16
from llm_shard.models.quant import (
    Int8Linear,
    Nibbles,
    int8_formats,
    keeps_dtype,
    prepare_int8,
    resolve_kernel,
    screen_head,
    swap_int8,
)

log = logging.getLogger(__name__)

FORMAT = "llm-shard-store"
VERSION = 1
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
_MADV_DONTNEED, _MADV_POPULATE_READ = 4, 22
_libc = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None


def _advise(t: torch.Tensor, advice: int) -> int:
    """madvise the whole pages inside a CPU tensor's bytes (none for other tensors):
    0, or the errno of a failed call."""
    if _libc is None or t.device.type != "cpu" or t.numel() == 0:
        return 0
    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first, last = -(-start // page) * page, end // page * page  # whole pages inside only
    if last > first and _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first),
                                      advice):
        return ctypes.get_errno()
    return 0


def release_mapped(t: torch.Tensor) -> None:
    """Drop the pages of a memory-mapped CPU tensor from this process's resident set;
    they are read back from the file if the tensor is touched again."""
    _advise(t, _MADV_DONTNEED)


# --- int8 weights in 2 MiB pages ----------------------------------------------------
# A decode step streams every weight once. On 4 KiB pages (a mapped file's, or malloc's)
# that is a TLB miss every 4 KiB, whose page walk w8a16's software prefetches wait on
# (perf, 2 cores of a Xeon with AVX512-VNNI: most of its samples sat on them). In 2 MiB
# pages, decode ran ~8% faster there (alternating processes): the random PanGu-α-2.6B
# 102.7-106.5 -> 96.0-97.9 ms a step; SmolLM2-135M 7.9-8.9 -> 7.3-8.0 ms with every
# byte in huge pages, 8.3-8.8 -> 8.1-8.3 ms with each 3.5 MB block's tail on 4 KiB pages.
# The copy costs SmolLM2's load ~0.1 s, PanGu-α-2.6B's 0.6 s where the memory was used
# before and ~3 s on memory this VM touches for the first time.
_MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@functools.cache
def huge_pages_problem() -> str | None:
    """Why weights cannot go into 2 MiB pages here, or None when they can: Linux's
    transparent huge pages in "always" or "madvise" mode."""
    if _libc is None:
        return "not a POSIX system"
    try:
        mode = THP_ENABLED.read_text()
    except OSError as e:
        return f"no transparent huge pages ({THP_ENABLED}: {e.strerror})"
    if "[never]" in mode:
        return f"transparent huge pages are off ([never] in {THP_ENABLED})"
    return None


def huge_page_arena(nbytes: int, advise: bool = True) -> torch.Tensor:
    """nbytes of CPU memory (uint8) starting on a 2 MiB boundary of an anonymous mapping
    of its own, whose whole 2 MiB pages are advised MADV_HUGEPAGE (unless not `advise`)
    before anything touches them: the kernel backs those with huge pages where it can,
    and the tail past the last whole one with 4 KiB pages, so that no more than nbytes is
    resident (a worker's RAM budget counts a part's bytes). No page is resident before it
    is written."""
    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(m, dtype=torch.uint8)  # its storage holds the mapping
    start = -whole.data_ptr() % HUGE_PAGE
    arena = whole[start: start + nbytes]
    if advise and (err := _advise(arena[: nbytes // HUGE_PAGE * HUGE_PAGE], _MADV_HUGEPAGE)):
        log.warning("madvise(MADV_HUGEPAGE) failed: %s; weights stay on 4 KiB pages",
                    os.strerror(err))
    return arena


def huge_page_place(nbytes: int) -> torch.Tensor | None:
    """A `huge_page_arena` of nbytes for a copy that w8a16 will read (a screened head's
    int8 copy: ScreenedLinear's `place`), or None: no transparent huge pages here, or
    less than one 2 MiB page."""
    if huge_pages_problem() is not None or nbytes < HUGE_PAGE:
        return None
    return huge_page_arena(nbytes)


def weights_to_huge_pages(module: nn.Module, mapped: set[int]) -> int:
    """Before prepare_int8: copies the int8 weights that w8a16 will read as stored (the
    Int8Linears of `module` that it will run) into one `huge_page_arena`, the layers of
    each group that fuse_int8 may fuse back to back and in its order (`back_to_back` then
    gives their fused layer a view of them: their rows are never copied again), and drops
    the pages of those that were memory-mapped (`mapped`: their data_ptrs) from the
    resident set. Nothing is copied twice and no copy goes back to malloc: freed, its
    chunks would stay resident (glibc's malloc_trim returns no thread arena's top).

    A blocks layer whose values fit 4 bits (a GGUF's Q4_0 or Q4_1: `w8a16.nibble_offset`,
    the same offset across a fusable group) is packed there instead, at half the bytes
    (`Nibbles`), and keeps its stored weight, released from the resident set. Without
    transparent huge pages the arena holds those alone, on 4 KiB pages. Returns the
    bytes moved (0: nothing to move, or less than one 2 MiB page of int8 copies)."""
    huge = huge_pages_problem() is None
    chosen = {id(m): m for m in module.modules()
              if isinstance(m, Int8Linear) and m.weight.device.type == "cpu"
              and m.weight.is_contiguous() and resolve_kernel(m).name == "w8a16"}
    runs, placed = [], set()  # runs of layers back to back: a group's, or one layer
    for parent in module.modules():
        for names in getattr(parent, "shared_input", ()):
            group = [m for m in (getattr(parent, n, None) for n in names)
                     if id(m) in chosen and id(m) not in placed]
            if group:
                runs.append(group)
                placed.update(map(id, group))
    runs += [[m] for key, m in chosen.items() if key not in placed]
    offsets = [_nibble_run(run) for run in runs]  # a run's nibble offset, or None
    keep = [(run, lo) for run, lo in zip(runs, offsets) if huge or lo is not None]
    sizes = [-(-sum(m.weight.nbytes // (1 if lo is None else 2) for m in run) // 64) * 64
             for run, lo in keep]
    if not any(lo is not None for _, lo in keep) and sum(sizes) < HUGE_PAGE:
        return 0
    arena, offset = huge_page_arena(sum(sizes), advise=huge), 0
    for (run, lo), size in zip(keep, sizes):
        at = offset
        for m in run:
            old = m.weight
            nbytes = old.nbytes // (1 if lo is None else 2)
            if lo is None:
                new = arena[at: at + nbytes].view(old.dtype).view(old.shape)
                new.copy_(old)
                m._buffers["weight"] = new
            else:  # the stored weight stays (mapped: read again only if used again)
                m.nibbles = Nibbles(w8a16.pack_nibbles(old, lo, arena[at: at + nbytes]),
                                    lo, old)
            if old.data_ptr() in mapped:
                release_mapped(old)
            at += nbytes
        offset += size
    return offset


def _nibble_run(run: list[Int8Linear]) -> int | None:
    """The nibble offset of every layer of a run (one for all), else None."""
    if not all(m.group for m in run):
        return None
    found = {w8a16.nibble_offset(m.weight) for m in run}
    return found.pop() if len(found) == 1 else None


def back_to_back(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """The rows of `weights` as one tensor, a view, where they lie back to back in one
    storage (`weights_to_huge_pages` puts a fused group's members so); else None. A
    fused layer's weight (fuse_int8's `rows`)."""
    first = weights[0]
    storage = first.untyped_storage().data_ptr()
    if not all(w.is_contiguous() and w.dtype == first.dtype and w.device == first.device
               and w.shape[1:] == first.shape[1:]
               and w.untyped_storage().data_ptr() == storage for w in weights):
        return None
    if any(a.data_ptr() + a.nbytes != b.data_ptr() for a, b in zip(weights, weights[1:])):
        return None
    shape = (sum(w.shape[0] for w in weights), *first.shape[1:])
    return first.as_strided(shape, torch.empty(shape, device="meta").stride(),
                            first.storage_offset())


def read_ahead(module: nn.Module) -> threading.Thread:
    """Read a module's memory-mapped tensors in from their files, in a daemon thread
    (returned): madvise(MADV_POPULATE_READ), Linux 5.14+, maps every page. (MADV_WILLNEED
    reads no more than the disk's readahead window, 8 MiB here.)

    For the embedding, the one mapped part that a forward pass reads a few rows of: from a
    cold page cache each new token's row is otherwise a read from disk in the middle of
    a step (measured here: PanGu-2.6B's 420 MB fp32 embedding, random tokens, 1.2-6.4 ms
    a step, 23 ms for one row). The planner counts the embedding in its stage's RAM."""
    tensors = [*module.parameters(), *module.buffers()]

    def advise() -> None:
        for t in tensors:
            if err := _advise(t, _MADV_POPULATE_READ):
                log.warning("cannot read the %s mapped bytes of a %s in ahead (madvise: "
                            "%s): its rows are read from disk as they are first used",
                            t.numel() * t.element_size(), type(module).__name__,
                            os.strerror(err))
                return

    thread = threading.Thread(target=advise, name="llm-shard-read-ahead", daemon=True)
    thread.start()
    return thread


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


def without_padding(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if not k.startswith(PAD)}


def sha256_file(path: Path, log_every: float | None = None) -> str:
    """sha256 of a file, read in 4 MiB chunks; with `log_every` (seconds), a progress line
    at info level that often."""
    h = hashlib.sha256()
    total = os.path.getsize(path) if log_every else 0
    done, last = 0, time.monotonic()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            if log_every:
                done += len(chunk)
                if time.monotonic() - last >= log_every:
                    last = time.monotonic()
                    log.info("%s: %.0f of %.0f MB verified", path, done / 1e6, total / 1e6)
    return h.hexdigest()


# ------------------------------------------------------------ sha256 checks, recorded
# Like git's index: a file whose stat identity matches the one recorded when it last
# passed its sha256 check (or was written by convert, or fetched and checked by
# cluster/transfer.py) is not hashed again. A copy (cp, rsync, scp, another disk) has
# another inode and ctime, an edit another mtime and ctime, so either is hashed once.
VERIFIED = ".llm-shard-verified.json"  # {"version", "files": {name: {sha256, stat}}}
VERIFIED_LOCK = ".llm-shard-verified.lock"  # writers merge into VERIFIED under flock
LOG_EVERY = 10.0  # seconds between progress lines of one file's check
_seen: dict[tuple[int, ...], str] = {}  # stat identity -> sha256, checked in this process
_seen_lock = threading.Lock()
_warned: set[str] = set()  # store folders whose records cannot be written


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _records(root: Path) -> dict:
    try:
        data = json.loads((root / VERIFIED).read_text())
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) and data.get("version") == 1 else None
    return files if isinstance(files, dict) else {}


def _remember(identity: tuple[int, ...], sha256: str) -> None:
    with _seen_lock:
        _seen[identity] = sha256


def _is_recorded(root: Path, name: str, sha256: str, st: os.stat_result) -> bool:
    identity = _identity(st)
    with _seen_lock:
        if _seen.get(identity) == sha256:
            return True
    rec = _records(root).get(name)
    if (isinstance(rec, dict) and rec.get("sha256") == sha256
            and rec.get("stat") == list(identity)):
        _remember(identity, sha256)
        return True
    return False


def record_verified(root: str | Path, files: dict[str, str]) -> bool:
    """Record that the files `{name: sha256}` of the store at `root` hold that sha256 as
    they are now (the caller hashed them, or checked them against the manifest), so
    loading them does not hash them again. Concurrent writers (workers loading parts of
    one store) merge their records under a lock. Where the folder is not writable, warns
    once that the checks will repeat on every load, and returns False."""
    root, now = Path(root), {}
    for name, sha256 in files.items():
        with contextlib.suppress(OSError):  # a file that is gone has nothing to record
            now[name] = (sha256, _identity((root / name).stat()))
    return _record(root, now)


def _record(root: Path, files: dict[str, tuple[str, tuple[int, ...]]]) -> bool:
    """record_verified with the stat identities the files had when they were hashed."""
    new = {}
    for name, (sha256, identity) in files.items():
        _remember(identity, sha256)
        new[name] = {"sha256": sha256, "stat": list(identity)}
    if not new:
        return True
    tmp = root / f"{VERIFIED}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(root / VERIFIED_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed
            records = _records(root)
            records.update(new)
            tmp.write_text(json.dumps(
                {"version": 1, "about": "sha256 checks llm-shard made of this store's files "
                 "(deleting this file only makes the next load check them again)",
                 "files": dict(sorted(records.items()))}, indent=1))
            os.replace(tmp, root / VERIFIED)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        key = os.path.abspath(root)
        if key not in _warned:
            _warned.add(key)
            log.warning("cannot record sha256 checks in %s (%s): every process that "
                        "loads its files checks them again", root, e.strerror or e)
        return False
    return True


def check_file(root: Path, name: str, entry: dict, st: os.stat_result | None = None) -> None:
    """Check the store file `name` against its manifest `entry` {name, bytes, sha256}:
    hash it unless its record says it passed as it is, and record it when it passes.
    StoreError naming the file if it fails."""
    path = root / name
    st = st or path.stat()
    if _is_recorded(root, name, entry["sha256"], st):
        return
    log.info("verifying %d bytes of %s (sha256 against the store's manifest)",
             st.st_size, path)
    if sha256_file(path, log_every=LOG_EVERY) != entry["sha256"]:
        raise StoreError(
            f"{path} fails its sha256 check against {root / 'manifest.json'}: the file is "
            "corrupt or was changed since the store was written. Convert the checkpoint "
            "again (llm-shard convert SRC -o STORE --overwrite), or delete the file and "
            "copy it again from an intact store (a worker that fetches its store from the "
            "coordinator fetches a deleted file by itself)")
    if _identity(path.stat()) == _identity(st):  # not changed while it was hashed
        _record(root, {name: (entry["sha256"], _identity(st))})


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

    @property
    def nbytes(self) -> int:
        """Bytes of all the store's weight files, as its manifest lists them."""
        return sum(f["bytes"] for f in self.manifest["files"])

    def part_bytes(self, part: Part) -> int:
        return self.file_entry(part.file)["bytes"]

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
        check_file(self.path, name, entry, st)
        return path

    def verify(self, names: list[str] | None = None) -> None:
        """Check sha256 of the named files (default: all), whatever their records say;
        raise naming the first bad one, record the good ones."""
        for entry in self.manifest["files"]:
            if names is not None and entry["name"] not in names:
                continue
            _, path, st = self._sized(entry["name"])
            if sha256_file(path, LOG_EVERY) != entry["sha256"]:
                raise StoreError(f"{path} fails its sha256 check: the file is corrupt or was "
                                 "changed since the store was written")
            if _identity(path.stat()) == _identity(st):
                _record(self.path, {entry["name"]: (entry["sha256"], _identity(st))})

    def tensors(self, part: Part) -> dict[str, torch.Tensor]:
        """The part's tensors, memory-mapped (nothing is read until used)."""
        return without_padding(load_file(self._checked(part.file)))

    def load(self, part: Part, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> nn.Module:
        """Build one part and fill it from its file: int8 Linears stay int8."""
        arch, cfg = self.arch, self.config
        with on_meta():
            module = arch.build(cfg, part)
        state = self.tensors(part)
        int8 = int8_formats(state)
        if int8:
            with on_meta():  # empty Int8Linears: the state dict fills them
                swap_int8(module, formats=int8)
        raw = state  # kept to the end: no new tensor can take a mapped tensor's address
        mapped = {v.data_ptr() for v in raw.values()}
        state = {k: (v if keeps_dtype(k, v) else v.to(dtype)) for k, v in raw.items()}
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
        if part.kind == "head" and self.manifest["dtype"] == "int8":
            # a float head (tied to the embedding) is read through an int8 screen; of a
            # mapped weight, only the rows recomputed exactly are read from then on
            screen_head(module, lambda lin: release_mapped
                        if lin.weight.data_ptr() in mapped else None,
                        place=huge_page_place if huge else None)
        del raw
        return module.eval().requires_grad_(False)

    def tokenizer(self):
        from llm_shard.models.text.tokenizer import load_tokenizer

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
