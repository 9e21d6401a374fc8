"""Where a loaded part's bytes live: madvise on mapped tensors (drop their pages, read them
ahead), int8 weights copied into 2 MiB pages, and a fused group's rows kept back to back.

A decode step streams every weight once. On 4 KiB pages (a mapped file's, or malloc's)
that is a TLB miss every 4 KiB, whose page walks w8a16's software prefetches wait on; in
2 MiB pages (Linux's transparent huge pages) decode runs faster, for a one-time copy at
load (`weights_to_huge_pages`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
from pathlib import Path

import torch
from torch import nn

from llm_shard.models.kernels import w8a16
from llm_shard.models.kernels.backends import Nibbles, resolve_kernel
from llm_shard.models.quant.linear import Int8Linear

log = logging.getLogger(__name__)

_MADV_DONTNEED, _MADV_HUGEPAGE = 4, 14
_libc = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None
HUGE_PAGE = 2 << 20
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


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
                _copy_releasing(new, old, old.data_ptr() in mapped)
                m._buffers["weight"] = new
            else:  # the stored weight stays (mapped: read again only if used again)
                m.nibbles = Nibbles(w8a16.pack_nibbles(old, lo, arena[at: at + nbytes]),
                                    lo, old)
            if old.data_ptr() in mapped:
                release_mapped(old)
            at += nbytes
        offset += size
    return offset


# A mapped weight is copied this many bytes at a time, each piece's source pages dropped
# behind it: loading holds one piece twice, not a whole weight, which no budget counts.
COPY_BYTES = 8 << 20


def _copy_releasing(new: torch.Tensor, old: torch.Tensor, release: bool) -> None:
    """new.copy_(old) for contiguous tensors of one shape, in COPY_BYTES pieces, the pages
    of each piece of `old` dropped once copied where `release` (memory-mapped)."""
    src, dst = old.view(-1), new.view(-1)
    step = max(1, COPY_BYTES // old.element_size())
    for a in range(0, src.numel(), step):
        dst[a: a + step].copy_(src[a: a + step])
        if release:
            release_mapped(src[a: a + step])


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
