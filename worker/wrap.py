"""Library use: int8 and streamed blocks for a PyTorch model you already have.

    model = wrap(model, ram="1GiB")          # a transformers causal LM, or any model with a
    model.generate(...)                      #   ModuleList of blocks; forward is unchanged

`wrap` finds the block list, swaps Linear layers for `Int8Linear` (`quantize`) and puts a
`BlockList` in the list's place: the caller's own blocks, each kept in GPU memory, RAM or
on disk within the budgets (`plan_tiers`), disk blocks streamed by worker/tiers.py.
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import math
import mmap
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable
from itertools import accumulate
from pathlib import Path

import torch
from torch import nn

from llm_shard.cluster.placement import disk_fill, gpu_end
from llm_shard.cluster.types import Memory, Tier
from llm_shard.models.checkpoint.store import ALIGN, release_mapped, save_aligned
from llm_shard.models.quant import Int8Linear, Predicate
from llm_shard.models.quant import quantize as _quantize_all

from .tiers import Streamer, stream_kernel

log = logging.getLogger("llm_shard.worker")

__all__ = ["wrap", "BlockList", "quantize", "plan_tiers", "runtime_bytes", "WrapError"]

_HEADER_BYTES_PER_TENSOR = 256  # safetensors header entry + alignment filler, generously
_STATE_NAMES = ("cache",)  # buffers named like this hold state between calls


class WrapError(ValueError):
    """A model, block list or budget that cannot be wrapped; says which module and why."""


# --- quantization --------------------------------------------------------------------

def _shared_storages(model: nn.Module) -> set[int]:
    """Data pointers of tensors that more than one parameter slot holds (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        if p.device.type != "meta":
            seen[p.data_ptr()] = seen.get(p.data_ptr(), 0) + 1
    return {ptr for ptr, n in seen.items() if n > 1}


def _untied(model: nn.Module) -> Predicate:
    shared = _shared_storages(model)
    return lambda _name, linear: linear.weight.data_ptr() not in shared


def quantize(model: nn.Module, predicate: Predicate | None = None,
             kernel: str | None = None) -> nn.Module:
    """Swaps, in place, each nn.Linear of `model` with predicate(name, linear) true for an
    Int8Linear (per-output-channel int8, models/quant); returns `model`.

    The default predicate takes every Linear whose weight is not tied to another
    parameter (a tied LM head stays float). `kernel` names the preferred int8 kernel
    (`KERNELS`; None: the device's preference list)."""
    return _quantize_all(model, predicate or _untied(model), kernel=kernel)


def _int8_linears(module: nn.Module, prefix: str, predicate: Predicate) -> set[str]:
    return {name for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and predicate(_join(prefix, name), m)}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


# --- sizes and tiers -----------------------------------------------------------------

def _tensors(module: nn.Module, skip: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Parameters and buffers of `module` (each storage once), minus those under `skip`."""
    skipped = set() if skip is None else {id(t) for t in (*skip.parameters(), *skip.buffers())}
    out, seen = {}, set()
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        key = (t.data_ptr(), t.device) if t.device.type != "meta" else id(t)
        if id(t) not in skipped and key not in seen:
            seen.add(key)
            out[name] = t
    return out


def _bytes_after_int8(module: nn.Module, int8: set[str], skip: nn.Module | None = None) -> int:
    """Bytes of `module`'s tensors once the Linears named in `int8` are Int8Linears."""
    total = 0
    for name, t in _tensors(module, skip).items():
        owner, _, attr = name.rpartition(".")
        if owner in int8 and attr == "weight":  # int8 weight + float32 scales
            total += t.numel() + 4 * t.shape[0]
        elif owner in int8 and attr == "bias":
            total += 4 * t.numel()
        else:
            total += t.numel() * t.element_size()
    return total


def _file_bytes(size: int, n_tensors: int) -> int:
    """An upper bound on the size of a block's aligned safetensors file."""
    return size + n_tensors * (ALIGN + _HEADER_BYTES_PER_TENSOR) + ALIGN


def plan_tiers(sizes: list[int], *, gpu: int = 0, ram: int | None = None,
               disk: int | None = None, files: list[int] | None = None,
               outside_gpu: int = 0, outside_ram: int = 0, what: str = "blocks") -> list[Tier]:
    """Tiers for blocks of `sizes` bytes, in order: GPU while they fit, then RAM, the
    rest on disk (cluster.placement's rule). `ram=None` or `disk=None` is no limit.
    `files` are the blocks' sizes on disk (default: `sizes`); two staging buffers of the
    largest disk file come out of the RAM budget once a block is on disk. `outside_*` are
    bytes already taken there."""
    files = list(sizes) if files is None else files
    n, P = len(sizes), list(accumulate(sizes, initial=0))
    gpu = int(gpu)
    g = 0
    if gpu:
        if gpu < outside_gpu:
            raise WrapError(f"gpu={Memory(gpu).to_spec()} is short: the model's parts outside "
                            f"{what} need {Memory(outside_gpu)} of GPU memory")
        g = gpu_end(P, 0, n, gpu - outside_gpu)
    if ram is not None and int(ram) < outside_ram:
        raise WrapError(f"ram={Memory(ram).to_spec()} is short: the model's parts outside "
                        f"{what} need {Memory(outside_ram)} of RAM")
    room = math.inf if ram is None else int(ram) - outside_ram
    add, r = disk_fill(P, files, 0), 0
    for e in range(1, n + 1):
        placed = add(min(g, e), room)
        if placed is None:
            staging = max(files[g:])
            raise WrapError(
                f"ram={Memory(ram).to_spec()} is short: streaming {what} from disk needs "
                f"two staging buffers of {Memory(staging)}"
                + (f" on top of {Memory(outside_ram)} for the parts outside {what}"
                   if outside_ram else ""))
        r = placed[0]
    on_disk = sum(files[r:])
    if disk is not None and on_disk > int(disk):
        raise WrapError(f"disk={Memory(disk).to_spec()} is short: {n - r} "
                        f"{what} that do not fit the GPU and RAM budgets need {Memory(on_disk)}")
    return [Tier.GPU] * g + [Tier.RAM] * (r - g) + [Tier.DISK] * (n - r)


def _memory(name: str, value: int | str | None) -> Memory | None:
    if value is None:
        return None
    try:
        return Memory.parse(value)
    except ValueError as e:
        raise WrapError(f"{name}: {e}") from None


# --- giving memory back ------------------------------------------------------------------
# Replaced float weights may be pages of a memory-mapped checkpoint that stay in RSS while
# the mapping lives; clean file pages are dropped (MADV_DONTNEED), written ones kept.

_PAGEMAP_PRESENT, _PAGEMAP_FILE = 1 << 63, 1 << 61


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's file-backed mappings, sorted."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[4] != "0" and fields[5].startswith("/"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                out.append((start, end))
    return sorted(out)


def _release_file_pages(tensors: list[torch.Tensor]) -> int:
    """Drops the pages of CPU tensors that are clean pages of a mapped file; returns the
    bytes released (their data is read back from the file if they are used again)."""
    tensors = [t for t in tensors if t.device.type == "cpu" and t.numel()]
    if not tensors or not os.path.exists("/proc/self/pagemap"):
        return 0
    maps, page, released = _file_mappings(), mmap.PAGESIZE, 0
    starts = [a for a, _ in maps]
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        for t in tensors:
            start = t.data_ptr()
            end = start + t.numel() * t.element_size()
            k = bisect.bisect_right(starts, start) - 1
            if k < 0 or end > maps[k][1]:
                continue  # not inside one file mapping: anonymous memory, never dropped
            first, last = -(-start // page), end // page
            if last <= first:
                continue
            pagemap.seek(first * 8)
            raw = pagemap.read((last - first) * 8)
            entries = memoryview(raw).cast("Q")
            if any(e & _PAGEMAP_PRESENT and not e & _PAGEMAP_FILE for e in entries):
                continue  # a page written to: the process's own copy
            release_mapped(t)
            released += (last - first) * page
    return released


def _resident_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of these CPU tensors in this process's resident set (each storage once): a
    tensor in a mapped file by its pages present, any other whole."""
    seen, total = set(), 0
    maps = _file_mappings()
    starts = [a for a, _ in maps]
    page = mmap.PAGESIZE
    pagemap = open("/proc/self/pagemap", "rb", buffering=0) \
        if os.path.exists("/proc/self/pagemap") else None
    try:
        for t in tensors:
            if t.device.type != "cpu" or not t.numel():
                continue
            start = t.untyped_storage().data_ptr()
            if start in seen:
                continue
            seen.add(start)
            size = t.untyped_storage().nbytes()
            k = bisect.bisect_right(starts, start) - 1
            if pagemap is None or k < 0 or start + size > maps[k][1]:
                total += size  # anonymous memory: resident once written
                continue
            first, last = start // page, -(-(start + size) // page)
            pagemap.seek(first * 8)
            entries = memoryview(pagemap.read((last - first) * 8)).cast("Q")
            total += page * sum(1 for e in entries if e & _PAGEMAP_PRESENT)
    finally:
        if pagemap is not None:
            pagemap.close()
    return total


def runtime_bytes(model: nn.Module) -> int:
    """This process's resident set less the bytes of `model`'s tensors in it: what a
    whole-process RAM budget pays before the model (wrap's `overhead="measure"`)."""
    from llm_shard.cluster.resources import rss_bytes

    return max(0, rss_bytes() - _resident_bytes(list(_tensors(model).values())))


# --- moving arguments and checking state ---------------------------------------------

def _first_device(obj) -> torch.device | None:
    if isinstance(obj, torch.Tensor):
        return obj.device
    if isinstance(obj, (tuple, list)):
        obj = iter(obj)
    elif isinstance(obj, dict):
        obj = iter(obj.values())
    else:
        return None
    for item in obj:
        device = _first_device(item)
        if device is not None:
            return device
    return None


def _to(obj, device: torch.device):
    """`obj` with every tensor inside tuples, lists and dicts moved to `device`; other
    objects (a transformers Cache) as they are."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(_to(v, device) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _holds_tensor(v) -> bool:
    return isinstance(v, torch.Tensor) or (
        isinstance(v, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in v))


def _tensor_attributes(block: nn.Module) -> dict[tuple[str, str], int]:
    """Tensors a block's modules hold as plain attributes (not parameters or buffers)."""
    return {(name, k): id(v) for name, m in block.named_modules()
            for k, v in vars(m).items() if not k.startswith("_") and _holds_tensor(v)}


class _Slot:
    """A streamed block's tensors: where each lives and its meta placeholder."""

    def __init__(self, block: nn.Module) -> None:
        self.entries: list[tuple[nn.Module, str, str, torch.Tensor]] = []  # owner, kind, name
        for owner in block.modules():
            for name, p in owner._parameters.items():
                if p is not None:
                    meta = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
                    self.entries.append((owner, "_parameters", name, meta))
            for name, b in owner._buffers.items():
                if b is not None and name not in owner._non_persistent_buffers_set:
                    meta = torch.empty_like(b, device="meta")
                    self.entries.append((owner, "_buffers", name, meta))
        self.int8 = [m for m in block.modules() if isinstance(m, Int8Linear)]
        self.names = {id(owner): n for n, owner in block.named_modules()}
        self.versions: list[int] = []
        self.attributes: dict[tuple[str, str], int] = {}
        self.block = block

    def empty(self) -> None:
        """Meta placeholders in place of the block's tensors (dropping their views)."""
        for owner, kind, name, meta in self.entries:
            getattr(owner, kind)[name] = meta
        for m in self.int8:
            m._plan = None

    def snapshot(self) -> None:
        self.versions = [getattr(o, k)[n]._version for o, k, n, _ in self.entries]
        self.attributes = _tensor_attributes(self.block)

    def changed(self) -> str | None:
        """What the forward since `snapshot` changed of the block's own state, if anything."""
        for (owner, kind, name, _), before in zip(self.entries, self.versions):
            if getattr(owner, kind)[name]._version != before:
                return f"it changed its tensor {_join(self.names[id(owner)], name)} in place"
        after = _tensor_attributes(self.block)
        for key in after.keys() - self.attributes.keys() | {
                k for k in after.keys() & self.attributes.keys() if after[k] != self.attributes[k]}:
            return f"it set the attribute {_join(*key)} to a tensor"
        return None


class _Runtime:
    """What the hooks share: tiers, devices, the streamer and the spill folder. Holds no
    reference to the BlockList, so its finalizer can run when the list is collected."""

    def __init__(self, name: str, tiers: list[Tier], gpu: torch.device | None) -> None:
        self.name, self.tiers, self.gpu = name, tiers, gpu
        self.streamer: Streamer | None = None
        self.slots: dict[int, _Slot] = {}
        self.folder: Path | None = None
        self.homes: dict[int, torch.device] = {}

    def device(self, i: int) -> torch.device:
        return self.gpu if self.tiers[i] is Tier.GPU else torch.device("cpu")

    def before(self, i: int, module: nn.Module, args: tuple, kwargs: dict):
        home = _first_device((args, kwargs))
        if home is not None:
            self.homes[i] = home
        device = self.device(i)
        args, kwargs = _to(args, device), _to(kwargs, device)
        if self.tiers[i] is Tier.DISK:
            self.streamer.get(i)  # fills `module` (the streamer's skeleton) from its buffer
            self.streamer.prefetch(self.streamer.next_after(i))
            self.slots[i].snapshot()
        return args, kwargs

    def after(self, i: int, output):
        if self.tiers[i] is Tier.DISK:
            slot = self.slots[i]
            why = slot.changed()
            slot.empty()
            if why is not None:
                raise WrapError(
                    f"block {self.name}.{i} keeps state between calls ({why}): a block "
                    "streamed from disk is reloaded on every call, so it cannot; keep its "
                    "state outside the block (as transformers' Cache objects do), or give "
                    "budgets that keep every block in RAM or on the GPU")
        home = self.homes.get(i)
        return output if home is None else _to(output, home)

    def close(self) -> None:
        if self.streamer is not None:
            self.streamer.close()
            self.streamer = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def _check_streamable(path: str, block: nn.Module) -> None:
    for name, _ in block.named_buffers():
        if any(s in name.rpartition(".")[2].lower() for s in _STATE_NAMES):
            raise WrapError(
                f"block {path} keeps state between calls (its buffer {name} looks like a "
                "cache): a block streamed from disk is reloaded on every call, so it cannot; "
                "keep the state outside the block, or give budgets that keep every block "
                "in RAM or on the GPU")


def _check_blocks(path: str, blocks: list[nn.Module],
                  outside: dict[str, torch.Tensor] | None = None) -> None:
    """Placing a block apart needs its tensors loaded and its own: not tied to another
    block's or to `outside` ({name: tensor} of the rest of the model)."""
    owner = {t.data_ptr(): name or "the model" for name, t in (outside or {}).items()
             if t.device.type != "meta" and t.numel()}
    for i, block in enumerate(blocks):
        for name, t in _tensors(block).items():
            here = f"{path}.{i}.{name}"
            if t.device.type == "meta":
                raise WrapError(f"{here} is on the meta device: load the weights first")
            if t.numel() and owner.setdefault(t.data_ptr(), here) != here:
                raise WrapError(f"{here} shares its storage with {owner[t.data_ptr()]}: "
                                "blocks whose weights are tied to other modules cannot be "
                                "placed apart")


class BlockList(nn.ModuleList):
    """A drop-in for a ModuleList of blocks that keeps each block in GPU memory, RAM or on
    disk within budgets, prefetching the next disk block while the current one runs.

    The caller's own block modules stay in it, so names, hooks and `isinstance` checks
    keep working. A disk-tier block is written (64-byte aligned) to a temporary folder the
    list removes on `close()` or garbage collection; its tensors become meta placeholders
    that a forward pre-hook fills from the `Streamer` and a forward hook empties again.
    GPU-tier blocks compute on the GPU, the others on the CPU; each block moves its tensor
    arguments to its device and its outputs back. A streamed block that changes its own
    tensors in place or keeps tensors as attributes between calls (a KV cache inside the
    block) raises a WrapError naming it.

    `blocks`: the block modules (a ModuleList, taken over: its blocks are moved, and
    disk-tier ones emptied). `gpu`, `ram`, `disk`: budgets for the blocks' weights only, as
    bytes or "2GiB" (gpu: 0 by default; ram, disk: no limit by default); or `tiers`, one
    `Tier` per block. `int8` quantizes each block's Linears first (`predicate(name,
    linear)` picks them, names as `{name}.{i}.{sub}`; `kernel` the int8 kernel).
    `device`: the GPU for GPU-tier blocks. `spill_dir`: where the disk tier's temporary
    folder goes (default: the system's temp dir). `name`: the list's path in its model,
    for messages.
    """

    def __init__(self, blocks: Iterable[nn.Module] | None = None, *, gpu: int | str | None = None,
                 ram: int | str | None = None, disk: int | str | None = None,
                 tiers: list[Tier | str] | None = None, int8: bool = False,
                 predicate: Predicate | None = None, kernel: str | None = None,
                 device: str | torch.device = "cuda", spill_dir: str | Path | None = None,
                 name: str = "blocks") -> None:
        super().__init__()
        blocks = list(blocks or [])
        _check_blocks(name, blocks)
        if not int8 and (predicate is not None or kernel is not None):
            raise WrapError("predicate and kernel choose int8 layers: pass int8=True")
        pred = predicate or (lambda _n, _m: True)
        int8_names = [_int8_linears(b, "", lambda n, m, i=i: pred(f"{name}.{i}.{n}", m))
                      if int8 else set() for i, b in enumerate(blocks)]
        if tiers is None:
            sizes = [_bytes_after_int8(b, s) for b, s in zip(blocks, int8_names)]
            files = [_file_bytes(n, len(_tensors(b)) + 2 * len(s))
                     for n, b, s in zip(sizes, blocks, int8_names)]
            tiers = plan_tiers(sizes, gpu=_memory("gpu", gpu) or 0, ram=_memory("ram", ram),
                               disk=_memory("disk", disk), files=files, what=name)
        elif len(tiers) != len(blocks) or any(v is not None for v in (gpu, ram, disk)):
            raise WrapError(f"{len(tiers)} tiers for {len(blocks)} blocks"
                            if len(tiers) != len(blocks) else "give budgets or tiers, not both")
        self._place(blocks, [Tier(t) for t in tiers], int8_names, kernel, device, spill_dir,
                    name)

    @classmethod
    def _placed(cls, blocks: list[nn.Module], tiers: list[Tier], int8_names: list[set[str]],
                kernel: str | None, device: str | torch.device, spill_dir: str | Path | None,
                name: str) -> BlockList:
        """A BlockList of blocks already planned (by wrap, which checked them)."""
        self = cls.__new__(cls)
        nn.ModuleList.__init__(self)
        self._place(blocks, tiers, int8_names, kernel, device, spill_dir, name)
        return self

    def _place(self, blocks: list[nn.Module], tiers: list[Tier], int8_names: list[set[str]],
               kernel: str | None, device: str | torch.device, spill_dir: str | Path | None,
               name: str) -> None:
        gpu_device = None
        if Tier.GPU in tiers:
            if not torch.cuda.is_available():
                raise WrapError("a GPU budget was given, but torch sees no CUDA device")
            gpu_device = torch.device(device)
        for i, block in enumerate(blocks):
            if tiers[i] is Tier.DISK:
                _check_streamable(f"{name}.{i}", block)
        self._runtime = rt = _Runtime(name, tiers, gpu_device)
        self._finalizer = weakref.finalize(self, rt.close)
        paths: dict[int, Path] = {}
        for i, block in enumerate(blocks):  # one block at a time: its floats go as it goes
            before = list(_tensors(block).values())
            if int8_names[i]:
                _quantize_all(block, lambda n, _m, s=int8_names[i]: n in s, kernel=kernel)
            if tiers[i] is Tier.DISK:
                if rt.folder is None:
                    rt.folder = Path(tempfile.mkdtemp(prefix="llm-shard-wrap-", dir=spill_dir))
                paths[i] = rt.folder / f"{i:03d}.safetensors"
                save_aligned({k: v.to("cpu") for k, v in block.state_dict().items()}, paths[i])
                for m in block.modules():
                    if isinstance(m, Int8Linear) and m.preferred_kernel is None:
                        m.preferred_kernel = stream_kernel()  # reads the staged int8
                rt.slots[i] = _Slot(block)
                rt.slots[i].empty()
            else:
                block.to(rt.device(i))
            kept = {id(t) for t in _tensors(block).values()}
            _release_file_pages([t for t in before if id(t) not in kept])
            block.register_forward_pre_hook(
                lambda m, args, kwargs, i=i: rt.before(i, m, args, kwargs), with_kwargs=True)
            block.register_forward_hook(lambda m, args, output, i=i: rt.after(i, output))
            self.append(block)
        if paths:
            rt.streamer = Streamer(paths, lambda i: blocks[i], dtype=None)
            rt.streamer.prefetch(rt.streamer.blocks[0])
        log.info("%s: %s", name, self.extra_repr())

    @property
    def tiers(self) -> list[Tier]:
        return list(self._runtime.tiers)

    @property
    def streamer(self) -> Streamer | None:
        return self._runtime.streamer

    @property
    def staging_bytes(self) -> int:
        return 0 if self.streamer is None else self.streamer.staging_bytes

    def bytes_by_tier(self) -> dict[str, int]:
        """Bytes of block weights kept in each tier (disk: the files' sizes)."""
        out = {t.value: 0 for t in Tier}
        rt = self._runtime
        for i, block in enumerate(self):
            out[rt.tiers[i].value] += (rt.streamer.paths[i].stat().st_size
                                       if rt.tiers[i] is Tier.DISK
                                       else sum(t.numel() * t.element_size()
                                                for t in _tensors(block).values()))
        return out

    def close(self) -> None:
        """Stops the prefetch thread and removes the disk tier's folder (also done when
        the list is garbage collected). Disk-tier blocks cannot run afterwards."""
        self._finalizer()

    def __getitem__(self, idx):
        if isinstance(idx, slice):  # a plain list of the same (placed) blocks
            return nn.ModuleList(list(self._modules.values())[idx])
        return super().__getitem__(idx)

    def _apply(self, fn, recurse: bool = True):
        raise WrapError("a BlockList keeps its blocks where its budgets put them: move or "
                        "convert the model before wrapping it, not after")

    def extra_repr(self) -> str:
        counts = {t.value: self._runtime.tiers.count(t) for t in Tier}
        return ", ".join(f"{k}={v}" for k, v in counts.items() if v)


# --- wrap ------------------------------------------------------------------------------

def find_blocks(model: nn.Module, blocks: str | None = None) -> str:
    """The path of the model's block list: `blocks` checked, or the ModuleList of two or
    more children of one class that holds the most parameters."""
    if blocks is not None:
        try:
            found = model.get_submodule(blocks)
        except AttributeError:
            raise WrapError(f"{type(model).__name__} has no module {blocks!r}") from None
        if not isinstance(found, nn.ModuleList) or isinstance(found, BlockList):
            raise WrapError(f"{blocks} is a {type(found).__name__}, not a ModuleList of blocks"
                            if not isinstance(found, BlockList) else f"{blocks} is wrapped already")
        kinds = {type(b).__name__ for b in found}
        if len(kinds) > 1:
            raise WrapError(f"{blocks} holds blocks of different classes "
                            f"({', '.join(sorted(kinds))}): streamed blocks must share one "
                            "interface")
        if not len(found):
            raise WrapError(f"{blocks} is empty")
        return blocks
    if isinstance(model, nn.ModuleList):
        raise WrapError("wrap() takes the model that holds a block list; for a bare list of "
                        "blocks use BlockList(blocks, ...)")
    if any(isinstance(m, BlockList) for m in model.modules()):
        raise WrapError(f"{type(model).__name__} is wrapped already")
    best, best_numel = None, 0
    for name, m in model.named_modules():
        if (isinstance(m, nn.ModuleList) and len(m) >= 2
                and len({type(b) for b in m}) == 1):
            numel = sum(p.numel() for p in m.parameters())
            if numel > best_numel:
                best, best_numel = name, numel
    if best is None:
        raise WrapError(f"no block list found in {type(model).__name__}: no ModuleList holds "
                        "two or more blocks of one class with weights; name it with "
                        "blocks='path.to.list'")
    return best


def _malloc_trim() -> None:
    """Give freed heap memory (the replaced float weights) back to the OS (glibc only)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the allocator keeps what it keeps
        log.debug("malloc_trim is not available; freed weights may stay in RSS")


def wrap(model: nn.Module, *, ram: int | str | None = None, gpu: int | str | None = None,
         disk: int | str | None = None, int8: bool = True, blocks: str | None = None,
         predicate: Predicate | None = None, kernel: str | None = None,
         device: str | torch.device = "cuda", spill_dir: str | Path | None = None,
         overhead: int | str | None = None) -> nn.Module:
    """Fits `model` into budgets, in place; returns it with its forward unchanged.

    `ram`, `gpu`, `disk`: budgets for the whole model's weights, as bytes or "2GiB" (ram,
    disk: no limit by default; gpu: none used by default); activations, the KV cache and
    the int8 kernels' packed copies come on top. `overhead`: RAM the budget pays before
    the model, as bytes or "1GiB", or "measure": this process's resident set now less the
    model's tensors in it (`runtime_bytes`), so that `ram` bounds the whole process as a
    worker's budget does (docs/budgets.md); None: 0, `ram` is the model's alone. With
    `gpu`, the parts outside the block list (embedding, final norm, LM head) go to
    `device` first, then as many blocks as
    fit; the next blocks stay in RAM and the last ones on disk, streamed. `int8`: swap
    Linear layers for Int8Linear (`predicate(name, linear)` picks them; default: all but a
    tied LM head, which would lose its tie and save nothing; `kernel`: the int8 kernel).
    `blocks`: the block list's path (default: the largest ModuleList of same-class
    children). Raises WrapError, before changing anything, when the model cannot be
    wrapped within the budgets.
    """
    path = find_blocks(model, blocks)
    original = model.get_submodule(path)
    block_list = list(original)
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name)
    pred = (predicate or _untied(model)) if int8 else (lambda _n, _m: False)
    if not int8 and (predicate is not None or kernel is not None):
        raise WrapError("predicate and kernel choose int8 layers: pass int8=True")

    # Plan everything before changing anything.
    _check_blocks(path, block_list, _tensors(model, skip=original))
    outside_int8 = {n for n, m in model.named_modules()
                    if isinstance(m, nn.Linear) and not n.startswith(path + ".") and pred(n, m)}
    outside = _bytes_after_int8(model, outside_int8, skip=original)
    int8_names = [_int8_linears(b, f"{path}.{i}", pred) for i, b in enumerate(block_list)]
    sizes = [_bytes_after_int8(b, s) for b, s in zip(block_list, int8_names)]
    files = [_file_bytes(n, len(_tensors(b)) + 2 * len(s))
             for n, b, s in zip(sizes, block_list, int8_names)]
    gpu_b, ram_b, disk_b = _memory("gpu", gpu) or 0, _memory("ram", ram), _memory("disk", disk)
    runtime = (runtime_bytes(model) if overhead == "measure"
               else _memory("overhead", overhead) or 0)
    if ram_b is not None and runtime:
        if runtime > ram_b:
            raise WrapError(f"ram={ram_b.to_spec()} is short: this process's runtime takes "
                            f"{Memory(runtime)} of it before the model")
        ram_b = Memory(ram_b - runtime)
    if gpu_b and not torch.cuda.is_available():
        raise WrapError(f"gpu={gpu} was given, but torch sees no CUDA device")
    tiers = plan_tiers(sizes, gpu=gpu_b, ram=ram_b, disk=disk_b, files=files,
                       outside_gpu=outside if gpu_b else 0,
                       outside_ram=0 if gpu_b else outside, what=path)
    for i, block in enumerate(block_list):
        if tiers[i] is Tier.DISK:
            _check_streamable(f"{path}.{i}", block)

    # The parts outside the block list: int8, and to the GPU when it has a budget.
    setattr(parent, attr, nn.ModuleList())
    before = list(_tensors(model).values())
    try:
        if outside_int8:
            _quantize_all(model, lambda n, _m: n in outside_int8, kernel=kernel)
        if gpu_b:
            model.to(device)
        kept = {id(t) for t in _tensors(model).values()}
        _release_file_pages([t for t in before if id(t) not in kept])
        wrapped = BlockList._placed(block_list, tiers, int8_names, kernel, device, spill_dir,
                                    path)
    except BaseException:
        setattr(parent, attr, original)
        raise
    setattr(parent, attr, wrapped)
    _malloc_trim()
    return model
