"""A node's budget as Ray custom resources, both ways.

`llm-shard node-resources` measures what this node can give llm-shard and prints the JSON
that `ray start --resources` takes (`ray start --head --resources="$(llm-shard
node-resources)"`); `budgets_from_ray_nodes(ray.nodes())` reads it back as `Capacity`
values. Amounts are whole bytes, the unit of Ray's own `memory` resource.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import click

from .types import Capacity, GiB, Memory, MiB

__all__ = [
    "RESOURCE_NAMES", "MAX_QUANTITY", "RAM_HEADROOM_MIN", "RAM_HEADROOM_FRACTION",
    "DISK_HEADROOM", "GPU_HEADROOM", "ram_budget", "disk_budget", "gpu_budget",
    "detect_ram", "detect_disk", "detect_gpu_mem", "store_dir", "to_ray_resources",
    "budgets_from_ray_nodes", "node_resources", "rss_bytes",
]

# Capacity field → Ray custom resource name.
RESOURCE_NAMES = {"ram": "llm_shard_ram", "disk": "llm_shard_disk", "gpu_mem": "llm_shard_gpu_mem"}
# ray._private.ray_constants.MAX_RESOURCE_QUANTITY: Ray keeps quantities in fixed point
# (1e-4), exact for whole numbers up to this; a larger disk is advertised as this.
MAX_QUANTITY = Memory(10**14)

RAM_HEADROOM_MIN = GiB
RAM_HEADROOM_FRACTION = 0.10
DISK_HEADROOM = GiB
GPU_HEADROOM = 512 * MiB


def _minus(amount: int, headroom: int) -> Memory:
    return Memory(max(0, int(amount) - int(headroom)))


def ram_budget(total: int, available: int) -> Memory:
    """available − max(1 GiB, 10 % of total), at least 0: room for the OS and Ray's
    daemons. The worker's own runtime is inside the budget (docs/budgets.md)."""
    return _minus(available, max(RAM_HEADROOM_MIN, int(total * RAM_HEADROOM_FRACTION)))


def disk_budget(free: int) -> Memory:
    """free − 1 GiB, at least 0, so the node never fills its disk."""
    return _minus(free, DISK_HEADROOM)


def gpu_budget(free: int) -> Memory:
    """free − 512 MiB (the worker's CUDA context), at least 0 (0 stays 0: no GPU)."""
    return _minus(free, GPU_HEADROOM)


def rss_bytes() -> int:
    """This process's resident set now (VmRSS: private and file-backed pages), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def store_dir() -> Path:
    """The store folder: $LLM_SHARD_HOME, else ~/.cache/llm-shard (as models.catalog.home)."""
    return Path(os.environ.get("LLM_SHARD_HOME", "~/.cache/llm-shard")).expanduser()


def detect_ram() -> tuple[Memory, Memory]:
    """(total, available) bytes of this node's RAM."""
    # Ray ships psutil in ray/thirdparty_files and puts it on sys.path when imported.
    import ray  # noqa: F401, I001
    import psutil

    vm = psutil.virtual_memory()
    return Memory(vm.total), Memory(vm.available)


def detect_disk(path: Path) -> Memory:
    """Free bytes on the file system holding `path` (or its nearest existing parent)."""
    path = Path(path).expanduser().absolute()
    while not path.exists():
        path = path.parent
    return Memory(shutil.disk_usage(path).free)


def detect_gpu_mem() -> Memory:
    """Free bytes on the first CUDA device torch sees (CUDA_VISIBLE_DEVICES picks it), 0
    when it sees none."""
    import torch

    if not torch.cuda.is_available():
        return Memory(0)
    free, _total = torch.cuda.mem_get_info(0)
    return Memory(free)


def to_ray_resources(capacity: Capacity) -> dict[str, int]:
    """{"llm_shard_ram": bytes, "llm_shard_disk": bytes, "llm_shard_gpu_mem": bytes}.

    Whole numbers of bytes, each clamped to Ray's largest resource quantity. Ray drops
    zero quantities, so an absent key reads back as 0.
    """
    return {name: min(int(getattr(capacity, field)), int(MAX_QUANTITY))
            for field, name in RESOURCE_NAMES.items()}


def budgets_from_ray_nodes(nodes: list[dict[str, Any]]) -> list[tuple[str, str, Capacity]]:
    """(node_id, node_ip, Capacity) for each alive node of `ray.nodes()` that advertises
    an llm-shard budget, in the given order.

    The Capacity is pinned to its node (`node=node_id`). A node with none of the
    llm_shard_* resources (or only zeros, which Ray drops) hosts no worker and is left out.
    """
    out = []
    for n in nodes:
        if not n.get("Alive", n.get("alive", False)):
            continue
        res = n.get("Resources") or {}
        if not any(res.get(name) for name in RESOURCE_NAMES.values()):
            continue
        amounts = {}
        for field, name in RESOURCE_NAMES.items():
            v = float(res.get(name, 0))
            if not v.is_integer():
                raise ValueError(f"node {n['NodeID']}: resource {name}={v} is not a whole "
                                 f"number of bytes; advertise it with `llm-shard node-resources`")
            amounts[field] = Memory(int(v))
        out.append((n["NodeID"], n["NodeManagerAddress"], Capacity(node=n["NodeID"], **amounts)))
    return out


class MemoryType(click.ParamType):
    """A click parameter parsed by `Memory.parse` ("2GiB", "1.5GB", "800M", "1024")."""

    name = "SIZE"

    def convert(self, value: Any, param: Any, ctx: Any) -> Memory:
        if isinstance(value, Memory):
            return value
        try:
            return Memory.parse(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


@click.command("node-resources")
@click.option("--ram", type=MemoryType(), default=None, envvar="LLM_SHARD_RAM",
              help="RAM budget (default: available RAM minus max(1GiB, 10% of total)).")
@click.option("--disk", type=MemoryType(), default=None, envvar="LLM_SHARD_DISK",
              help="Disk budget (default: free space under --store minus 1GiB).")
@click.option("--gpu-mem", type=MemoryType(), default=None, envvar="LLM_SHARD_GPU_MEM",
              help="GPU memory budget (default: free memory of the first CUDA device "
                   "minus 512MiB; 0 without CUDA).")
@click.option("--store", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Store folder whose file system gives the disk budget "
                   "(default: $LLM_SHARD_HOME or ~/.cache/llm-shard).")
def node_resources(ram: Memory | None, disk: Memory | None, gpu_mem: Memory | None,
                   store: Path | None) -> None:
    """Print this node's budget as JSON for `ray start --resources`.

    The RAM budget is the worker's whole process: its runtime (Python, torch, Ray: about
    300-400 MiB, measured when it starts) comes out of it first, the model gets the rest.
    The default leaves max(1GiB, 10%) of the node for the OS and Ray's daemons.

    \b
    ray start --head --resources="$(llm-shard node-resources)"
    ray start --address=HEAD:6379 --resources="$(llm-shard node-resources --ram 4GiB)"

    Each flag may also come from the environment (LLM_SHARD_RAM, LLM_SHARD_DISK,
    LLM_SHARD_GPU_MEM), so a machine can pin its own budget in ~/.bashrc while the
    cluster config runs the same command everywhere.

    Amounts are whole bytes under the resource names llm_shard_ram, llm_shard_disk and
    llm_shard_gpu_mem. Sizes take units: 2GiB, 1536MiB, 1.5GB, 800M.
    """
    if ram is None:
        ram = ram_budget(*detect_ram())
    if disk is None:
        disk = disk_budget(detect_disk(store if store is not None else store_dir()))
    if gpu_mem is None:
        gpu_mem = gpu_budget(detect_gpu_mem())
    capacity = Capacity(ram=ram, disk=disk, gpu_mem=gpu_mem)
    # Compact, no spaces: survives a shell that splits an unquoted $(...).
    click.echo(json.dumps(to_ray_resources(capacity), separators=(",", ":")))
