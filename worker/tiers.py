"""A stage's blocks in memory tiers: on the GPU, in RAM, or on disk, streamed.

`TieredBlocks` holds a stage's blocks [start, end) by the plan's tiers and runs them;
`Streamer` brings streamed blocks, one at a time, to where they compute: disk blocks
through two RAM staging buffers with a prefetch thread, and on a GPU worker every
non-resident block through two device slots.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from llm_shard.cluster.types import Tier
from llm_shard.models.base import Part, on_meta
from llm_shard.models.checkpoint.store import PAD, SAFETENSORS_DTYPES, Store
from llm_shard.models.kernels import decode, w8a16
from llm_shard.models.quant import int8_formats, keeps_dtype, prepare_int8, swap_int8

log = logging.getLogger("llm_shard.worker")


def stream_kernel() -> str:
    """The int8 kernel of blocks streamed on the CPU: one that reads the stored int8 weights
    as they are (w8a16; int8pack where w8a16 cannot run). Not "auto": its fbgemm layers
    would pack their weights again on every pass."""
    return "w8a16" if w8a16.problem() is None else "int8pack"


# (name, dtype, shape, start, end) of each tensor in a safetensors file's bytes
Layout = list[tuple[str, torch.dtype, list[int], int, int]]


def read_file(path: os.PathLike, buf: torch.Tensor) -> int:
    """Read a file into `buf` (uint8), then drop its pages from the page cache; its size."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size > buf.numel():
            raise ValueError(f"{path} is {size} bytes, over the {buf.numel()}-byte staging buffer")
        view = memoryview(buf.numpy())[:size]
        done = 0
        while done < size:
            n = f.readinto(view[done:])
            if not n:
                raise OSError(f"{path} ended after {done} of {size} bytes")
            done += n
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return size


COLD_READS = 3


def cold_read_seconds(path: os.PathLike, runs: int = COLD_READS,
                      clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds to read a file whose pages are not in the page cache, as a disk block is
    read every token (read_file drops them after): the median of `runs` reads. Not the
    first alone: a disk stage reads the same files token after token, and a file's first
    read may be far off the rate of the next (docs/budgets.md)."""
    if hasattr(os, "posix_fadvise"):
        with open(path, "rb", buffering=0) as f:  # drop it from the page cache: cold
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    buf = torch.empty(os.path.getsize(path), dtype=torch.uint8)
    seconds = []
    for _ in range(runs):
        t0 = clock()
        read_file(path, buf)  # and its pages dropped again
        seconds.append(clock() - t0)
    return statistics.median(seconds)


def layout(buf: torch.Tensor) -> Layout:
    """Where each tensor of the safetensors bytes in `buf` (uint8, on the CPU) lies."""
    hlen = int.from_bytes(buf[:8].numpy().tobytes(), "little")
    header = json.loads(buf[8:8 + hlen].numpy().tobytes())
    base = 8 + hlen
    return [(name, SAFETENSORS_DTYPES[d["dtype"]], d["shape"],
             base + d["data_offsets"][0], base + d["data_offsets"][1])
            for name, d in header.items() if name != "__metadata__" and not name.startswith(PAD)]


def views(buf: torch.Tensor, where: Layout) -> dict[str, torch.Tensor]:
    """The tensors of `where` as views of `buf` (any device); normal tensors even under
    inference mode, so that their version counters work (worker/wrap.py checks them)."""
    out = {}
    with torch.inference_mode(False):
        for name, dtype, shape, start, end in where:
            raw = buf[start:end]
            try:
                t = raw.view(dtype)
            except RuntimeError:  # an offset not aligned to the element size: copy this one
                t = raw.clone().view(dtype)  # (stores written before save_aligned)
            out[name] = t.reshape(shape)
    return out


class Streamer:
    """Blocks brought, one at a time, to where they compute: meta skeletons, two host
    staging buffers for disk blocks (one prefetch thread), and with `device` two device
    slots that every block passes through.

    While one block computes from one buffer, the thread reads the next disk block into
    the other (`readinto`, no mmap, then POSIX_FADV_DONTNEED: the file's pages leave the
    page cache). Each use assigns the skeleton views into its buffer: streaming allocates
    nothing. On CUDA the copies run on a copy stream, the next block's while the current
    one computes; events keep a slot from being overwritten before its block is done, and
    a staging buffer from being refilled before its copy is done.

    `paths` maps each streamed block's global index to its safetensors file (written by
    `save_aligned`); `skeleton(i)` builds block i with its file's tensors on the meta
    device (int8 Linears already swapped in). `dtype` converts floating tensors other
    than int8 scales on every load (None: as stored). `held` blocks are read once into
    RAM of their own (a GPU worker's RAM tier); the others are read from disk on every
    pass. Without `device`, a block computes from its host buffer (on the CPU); with it,
    each pass copies the block's bytes into a device slot (pinned and asynchronous on
    CUDA) and the block computes there. `from_store` builds one for a store.
    """

    def __init__(self, paths: dict[int, os.PathLike], skeleton: Callable[[int], nn.Module],
                 dtype: torch.dtype | None = None, *, held: Iterable[int] = (),
                 device: str | torch.device | None = None) -> None:
        if not paths:
            raise ValueError("a Streamer needs at least one block")
        self.paths = {i: Path(p) for i, p in sorted(paths.items())}
        self.blocks, self.dtype = list(self.paths), dtype
        self.held = set(held)
        if not self.held <= set(self.blocks):
            raise ValueError(f"held blocks {sorted(self.held - set(self.blocks))} have no file")
        self.disk = [i for i in self.blocks if i not in self.held]
        self.device = None if device is None else torch.device(device)
        self.cuda = self.device is not None and self.device.type == "cuda"
        sizes = {i: os.path.getsize(p) for i, p in self.paths.items()}

        def host(n: int) -> torch.Tensor:  # pinned for a CUDA device: asynchronous copies
            return torch.empty(n, dtype=torch.uint8, pin_memory=self.cuda)

        self.buffers = [host(max(sizes[i] for i in self.disk)) for _ in range(2)] \
            if self.disk else []
        self.bytes_read = 0
        self.read_seconds = 0.0
        self.wait_seconds = 0.0
        self.bytes_copied = 0  # into device slots
        self.lock = threading.Lock()
        self.held_buffers = {}
        for i in sorted(self.held):
            self.held_buffers[i] = host(sizes[i])
            read_file(self.paths[i], self.held_buffers[i])
        self.layouts = {i: layout(b) for i, b in self.held_buffers.items()}  # disk: on read
        self.slots = ([torch.empty(max(sizes.values()), dtype=torch.uint8, device=self.device)
                       for _ in range(2)] if self.device is not None else [])
        self.slot = 1  # the device slot in use; the next copy goes to the other
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.slot_free: list = [None, None]  # CUDA events: compute done with each slot
        self.buffer_free: list = [None, None]  # CUDA events: copy out of each buffer done
        self.skeletons = {i: skeleton(i).eval().requires_grad_(False) for i in self.blocks}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self.pending: tuple[int, int, Future] | None = None  # (block, buffer, read)
        self.current = 1  # the buffer in use; the next read goes to the other
        self.prefetch_enabled = True

    @classmethod
    def from_store(cls, store: Store, blocks: list[int], dtype: torch.dtype, *,
                   held: Iterable[int] = (),
                   device: str | torch.device | None = None) -> Streamer:
        # a CPU pass reads the stored int8 as it is; elsewhere the device's own kernel
        on_cpu = device is None or torch.device(device).type == "cpu"

        def skeleton(i: int) -> nn.Module:
            with on_meta():
                module = store.arch.build(store.config, Part("block", i))
            int8 = int8_formats(store.tensors(Part("block", i)))
            if int8:
                with on_meta():  # filled by assignment on every pass
                    swap_int8(module, formats=int8,
                              kernel=stream_kernel() if on_cpu else None)
            return module

        return cls({i: store._checked(Part("block", i).file) for i in blocks}, skeleton, dtype,
                   held=held, device=device)

    @property
    def staging_bytes(self) -> int:
        """The host staging buffers of disk blocks (device slots not included)."""
        return sum(b.numel() for b in self.buffers)

    def _read(self, i: int, slot: int) -> Layout:
        done = self.buffer_free[slot]
        if done is not None:  # the copy out of this buffer must land before it is refilled
            done.synchronize()
        t0 = time.perf_counter()
        size = read_file(self.paths[i], self.buffers[slot])
        where = self.layouts.get(i)
        if where is None:  # a block's header is parsed on its first read only
            where = self.layouts[i] = layout(self.buffers[slot])
        with self.lock:
            self.read_seconds += time.perf_counter() - t0
            self.bytes_read += size
        return where

    def prefetch(self, i: int | None) -> None:
        """Start reading disk block i into the buffer not in use (if nothing is pending)."""
        if i is None or i in self.held or not self.prefetch_enabled or self.pending is not None:
            return
        slot = 1 - self.current
        self.pending = (i, slot, self.pool.submit(self._read, i, slot))

    def _host(self, i: int) -> tuple[torch.Tensor, Layout, int | None]:
        """Block i's bytes in RAM, where its tensors lie, and its staging buffer (if any)."""
        if i in self.held:
            return self.held_buffers[i], self.layouts[i], None
        if self.pending is not None and self.pending[0] == i:
            _, slot, future = self.pending
            where = future.result()
        else:
            if self.pending is not None:  # a read of another block: let it land first
                self.pending[2].result()
            slot = 1 - self.current
            where = self._read(i, slot)
        self.pending = None
        self.current = slot
        return self.buffers[slot], where, slot

    def get(self, i: int) -> nn.Module:
        """Block i, filled from its buffer or device slot (waiting for its read, or reading
        it now). With a device, call `release()` once the block's forward is queued."""
        t0 = time.perf_counter()
        buf, where, staging = self._host(i)
        if self.device is not None:
            self.slot = 1 - self.slot
            size = max((end for *_, end in where), default=0)
            buf = self._copy(buf, size, staging)
            self.bytes_copied += size
        self.wait_seconds += time.perf_counter() - t0
        state = views(buf, where)
        if self.dtype is not None:
            state = {k: v.to(self.dtype) if v.is_floating_point() and not keeps_dtype(k, v)
                     else v for k, v in state.items()}
        module = self.skeletons[i]
        module.load_state_dict(state, strict=True, assign=True)
        prepare_int8(module)
        return module

    def _copy(self, host: torch.Tensor, size: int, staging: int | None) -> torch.Tensor:
        """Copy host[:size] into the current device slot; the compute stream waits for it."""
        slot = self.slots[self.slot]
        if not self.cuda:
            slot[:size].copy_(host[:size])
            return slot
        free = self.slot_free[self.slot]
        if free is not None:  # the block that last used this slot is done with it
            self.copy_stream.wait_event(free)
        with torch.cuda.stream(self.copy_stream):
            slot[:size].copy_(host[:size], non_blocking=True)
            copied = self.copy_stream.record_event()
        torch.cuda.current_stream(self.device).wait_event(copied)
        if staging is not None:
            self.buffer_free[staging] = copied
        return slot

    def run(self, i: int, x: torch.Tensor, batch) -> torch.Tensor:
        """Block i's forward: fetched, the next disk block's read started, slot released."""
        block = self.get(i)
        self.prefetch(self.next_after(i))
        x = decode.run_block(block, x, batch)
        self.release()
        return x

    def release(self) -> None:
        """After the forward of the block `get` last returned is queued: its slot may be
        refilled once that forward is done."""
        if self.cuda:
            self.slot_free[self.slot] = torch.cuda.current_stream(self.device).record_event()

    def next_after(self, i: int) -> int | None:
        """The disk block to prefetch once block i is under way (None: no disk blocks)."""
        later = [b for b in self.disk if b > i]
        return later[0] if later else (self.disk[0] if self.disk else None)

    def close(self) -> None:
        if self.pending is not None:
            self.pending[2].result()
        self.pool.shutdown(wait=True)


class TieredBlocks:
    """Blocks [start, end) by tier; `run(x, batch)` runs them in order.

    `stream_to`: the device every block computes on, a GPU worker's (coordinator.planner's
    `streams_to_gpu`): GPU-tier blocks are copied there once, a RAM-tier block keeps its
    file's bytes in pinned RAM, and RAM and disk blocks stream there. None: GPU-tier blocks
    on `gpu`; RAM-tier ones loaded once (memory-mapped, then kernel-packed) and computed
    on the CPU, disk ones streamed to it. The KV caches live where their block computes.
    """

    def __init__(self, store: Store, start: int, end: int, tiers: list[Tier], *,
                 dtype: torch.dtype = torch.float32, gpu: str | torch.device = "cuda",
                 stream_to: str | torch.device | None = None) -> None:
        if len(tiers) != end - start:
            raise ValueError(f"{len(tiers)} tiers for blocks [{start}, {end})")
        self.tiers = {start + k: Tier(t) for k, t in enumerate(tiers)}
        self.stream_to = None if stream_to is None else torch.device(stream_to)
        self.gpu = self.stream_to or (torch.device(gpu) if Tier.GPU in self.tiers.values()
                                      else None)
        streamed = [i for i, t in self.tiers.items()
                    if t is Tier.DISK or (t is Tier.RAM and self.stream_to is not None)]
        self.resident: dict[int, nn.Module] = {}
        for i, tier in self.tiers.items():
            if i not in streamed:
                device = self.gpu if tier is Tier.GPU else "cpu"
                self.resident[i] = store.load(Part("block", i), dtype, device)
        held = [i for i in streamed if self.tiers[i] is Tier.RAM]
        self.streamer = (Streamer.from_store(store, streamed, dtype, held=held,
                                             device=self.stream_to) if streamed else None)
        if self.streamer is not None:
            self.streamer.prefetch(self.streamer.next_after(-1))

    def device_of(self, i: int) -> torch.device:
        if self.stream_to is not None:
            return self.stream_to
        return self.gpu if self.tiers[i] is Tier.GPU else torch.device("cpu")

    def run(self, x: torch.Tensor, batch) -> torch.Tensor:
        order, k = sorted(self.tiers), 0
        while k < len(order):
            device = self.device_of(order[k])
            if x.device != device:
                x = x.to(device)
            if order[k] not in self.resident:
                x, k = self.streamer.run(order[k], x, batch), k + 1
                continue
            end = k + 1  # the resident blocks from k on the same device: one run
            while (end < len(order) and order[end] in self.resident
                   and self.device_of(order[end]) == device):
                end += 1
            x = decode.run_blocks([self.resident[i] for i in order[k:end]], x, batch)
            k = end
        return x if x.device.type == "cpu" else x.to("cpu")  # embedding and head stay in RAM

    def bytes_by_tier(self, store: Store) -> dict[str, int]:
        out = {t.value: 0 for t in Tier}
        for i, t in self.tiers.items():
            out[t.value] += store.part_bytes(Part("block", i))
        return out

    def close(self) -> None:
        if self.streamer is not None:
            self.streamer.close()
