"""A stage's blocks in memory tiers: on the GPU, in RAM, or on disk, streamed.

Disk-tier blocks stay in the worker's local store. Two staging buffers, each the size of
the largest of them, take turns: while one block computes from one buffer, a background
thread reads the next disk block into the other (`readinto`, no mmap), then tells the
kernel to drop those file pages from its cache (POSIX_FADV_DONTNEED). A block's module is
built once on the meta device; each use assigns it tensors that are views into its
buffer, so streaming allocates nothing. int8 layers of a streamed block run a kernel that
reads the stored int8 weights as they are (int8pack, else dequant): fbgemm would copy them
into a packed form on every pass.

RAM-tier blocks are loaded once (memory-mapped, then kernel-packed; Store.load releases
the mapped int8 bytes that a packed copy replaced, so a block costs its bytes once).
GPU-tier blocks are copied to the device once; activations move between devices at tier
boundaries.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from llm_shard.cluster.types import Tier
from llm_shard.models.base import Part, on_meta
from llm_shard.models.quant import prepare_int8, swap_int8
from llm_shard.models.store import PAD, SAFETENSORS_DTYPES, Store

log = logging.getLogger("llm_shard.worker")

STREAM_KERNEL = "int8pack"  # falls back to "dequant" where int8pack cannot run a layer


def read_into(path: os.PathLike, buf: torch.Tensor) -> dict[str, torch.Tensor]:
    """Read a safetensors file into `buf` (uint8) and return its tensors as views of it."""
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
    hlen = int.from_bytes(bytes(view[:8]), "little")
    header = json.loads(bytes(view[8:8 + hlen]))
    base, out = 8 + hlen, {}
    for name, d in header.items():
        if name == "__metadata__" or name.startswith(PAD):
            continue
        start, end = d["data_offsets"]
        raw = buf[base + start: base + end]
        dtype = SAFETENSORS_DTYPES[d["dtype"]]
        try:
            t = raw.view(dtype)
        except RuntimeError:  # an offset not aligned to the element size: copy this one
            t = raw.clone().view(dtype)  # (stores written before save_aligned)
        out[name] = t.reshape(d["shape"])
    return out


class Streamer:
    """Disk-tier blocks: meta skeletons, two staging buffers, one prefetch thread.

    `paths` maps each streamed block's global index to its safetensors file (written by
    `save_aligned`); `skeleton(i)` builds block i with its file's tensors on the meta
    device (int8 Linears already swapped in). `dtype` converts floating tensors other
    than int8 scales on every load (None: as stored). `from_store` builds one for a store.
    """

    def __init__(self, paths: dict[int, os.PathLike], skeleton: Callable[[int], nn.Module],
                 dtype: torch.dtype | None = None) -> None:
        if not paths:
            raise ValueError("a Streamer needs at least one block")
        self.paths = {i: Path(p) for i, p in sorted(paths.items())}
        self.blocks, self.dtype = list(self.paths), dtype
        size = max(os.path.getsize(p) for p in self.paths.values())
        self.buffers = [torch.empty(size, dtype=torch.uint8) for _ in range(2)]
        self.skeletons = {i: skeleton(i).eval().requires_grad_(False) for i in self.blocks}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self.pending: tuple[int, int, Future] | None = None  # (block, buffer, read)
        self.current = 1  # the buffer in use; the next read goes to the other
        self.prefetch_enabled = True
        self.bytes_read = 0
        self.read_seconds = 0.0
        self.wait_seconds = 0.0
        self.lock = threading.Lock()

    @classmethod
    def from_store(cls, store: Store, blocks: list[int], dtype: torch.dtype) -> Streamer:
        def skeleton(i: int) -> nn.Module:
            with on_meta():
                module = store.arch.build(store.config, Part("block", i))
            names = store.tensors(Part("block", i)).keys()
            int8 = {k[: -len(".scales")] for k in names if k.endswith(".scales")}
            if int8:
                with on_meta():  # filled by assignment on every pass
                    swap_int8(module, lambda name, _m: name in int8, kernel=STREAM_KERNEL)
            return module

        return cls({i: store._checked(Part("block", i).file) for i in blocks}, skeleton, dtype)

    @property
    def staging_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers)

    def _read(self, i: int, slot: int) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        state = read_into(self.paths[i], self.buffers[slot])
        with self.lock:
            self.read_seconds += time.perf_counter() - t0
            self.bytes_read += os.path.getsize(self.paths[i])
        return state

    def prefetch(self, i: int) -> None:
        """Start reading block i into the buffer not in use (if nothing is pending)."""
        if not self.prefetch_enabled or self.pending is not None:
            return
        slot = 1 - self.current
        self.pending = (i, slot, self.pool.submit(self._read, i, slot))

    def get(self, i: int) -> nn.Module:
        """Block i, filled from its buffer (waiting for its read, or reading it now)."""
        t0 = time.perf_counter()
        if self.pending is not None and self.pending[0] == i:
            _, slot, future = self.pending
            state = future.result()
        else:
            if self.pending is not None:  # a read of another block: let it land first
                self.pending[2].result()
            slot = 1 - self.current
            state = self._read(i, slot)
        self.pending = None
        self.current = slot
        self.wait_seconds += time.perf_counter() - t0
        if self.dtype is not None:
            state = {k: v.to(self.dtype) if v.is_floating_point() and not k.endswith(".scales")
                     else v for k, v in state.items()}
        module = self.skeletons[i]
        module.load_state_dict(state, strict=True, assign=True)
        prepare_int8(module)
        return module

    def next_after(self, i: int) -> int:
        k = self.blocks.index(i)
        return self.blocks[(k + 1) % len(self.blocks)]

    def close(self) -> None:
        if self.pending is not None:
            self.pending[2].result()
        self.pool.shutdown(wait=True)


class TieredBlocks:
    """Blocks [start, end) by tier; `run(x, batch)` runs them in order."""

    def __init__(self, store: Store, start: int, end: int, tiers: list[Tier], *,
                 dtype: torch.dtype = torch.float32, gpu: str | torch.device = "cuda") -> None:
        if len(tiers) != end - start:
            raise ValueError(f"{len(tiers)} tiers for blocks [{start}, {end})")
        self.tiers = {start + k: Tier(t) for k, t in enumerate(tiers)}
        self.gpu = torch.device(gpu) if Tier.GPU in self.tiers.values() else None
        self.resident: dict[int, nn.Module] = {}
        for i, tier in self.tiers.items():
            if tier is Tier.DISK:
                continue
            device = self.gpu if tier is Tier.GPU else "cpu"
            self.resident[i] = store.load(Part("block", i), dtype, device)
        disk = [i for i, t in self.tiers.items() if t is Tier.DISK]
        self.streamer = Streamer.from_store(store, disk, dtype) if disk else None
        if self.streamer is not None:
            self.streamer.prefetch(disk[0])

    def device_of(self, i: int) -> torch.device:
        return self.gpu if self.tiers[i] is Tier.GPU else torch.device("cpu")

    def run(self, x: torch.Tensor, batch) -> torch.Tensor:
        for i in sorted(self.tiers):
            device = self.device_of(i)
            if x.device != device:
                x = x.to(device)
            if self.tiers[i] is Tier.DISK:
                block = self.streamer.get(i)
                self.streamer.prefetch(self.streamer.next_after(i))
            else:
                block = self.resident[i]
            x = block(x, batch)
        return x.to("cpu")  # embedding and head stay in RAM

    def bytes_by_tier(self, store: Store) -> dict[str, int]:
        out = {t.value: 0 for t in Tier}
        for i, t in self.tiers.items():
            out[t.value] += store.part_bytes(Part("block", i))
        return out

    def close(self) -> None:
        if self.streamer is not None:
            self.streamer.close()
