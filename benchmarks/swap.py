"""Disk-tier streaming: a random int8 model with PanGu-α shapes, far larger than its
stage's RAM budget (two staging buffers and the KV cache), decoded block by block from
disk with prefetch on and off. Prints the cold disk-read bandwidth of the block files
(page cache dropped per file, read as the worker reads), decode tok/s, and the disk
throughput achieved during decode as a share of that bandwidth (goal >= 80% with
prefetch, which hides compute behind the next block's read). Also the suite's `swap`.

    llm-shard bench swap [--preset 2.6b] [--layers N] [--tokens N] [--dir PATH] [--json PATH|-]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llm_shard.benchmarks import publish
from llm_shard.models.base import Part

if TYPE_CHECKING:
    from llm_shard.benchmarks.suite import Context

CACHE_DROP = ("each weight file's page cache dropped with posix_fadvise(POSIX_FADV_DONTNEED) "
              "before every run (no root needed; Python and library files stay cached)")


def build_store(path: Path, preset: str, layers: int | None, progress: bool = True):
    """A random int8 PanGu-α store at `path` (reused when it is there)."""
    from llm_shard.models.archs.pangu import PRESETS

    cfg = PRESETS[preset]
    if layers is not None:
        cfg = type(cfg).from_dict({**cfg.to_dict(), "num_layers": layers})
    return random_store(path, "pangu-alpha", cfg, f"random PanGu-α {preset}", progress)


def random_store(path: Path, arch_name: str, cfg, label: str, progress: bool = True):
    """A random int8 store of `arch_name` with config `cfg` at `path` (reused when it is
    there): weights N(0, 0.02), norm gains 1, kept as `convert` keeps a checkpoint with an
    untied head: every block's and the head's Linear int8 per channel, the token tables
    int8 rows with a scale per row."""
    from tqdm import tqdm

    from llm_shard.models import get_arch
    from llm_shard.models.base import parts_of
    from llm_shard.models.checkpoint.convert import round_nearest, table_dtype, tables
    from llm_shard.models.checkpoint.store import VERSION, Store, StoreWriter

    manifest = path / "manifest.json"
    if manifest.is_file():
        version = json.loads(manifest.read_text()).get("version")
        if version == VERSION:
            return Store.open(path)
        print(f"{path}: a random store of version {version}, this llm-shard writes "
              f"{VERSION}: building it again")
        shutil.rmtree(path)
    arch = get_arch(arch_name)
    writer = StoreWriter(path, arch, cfg, "int8", {"path": label, "layout": "random"})
    token_tables = tables(arch, cfg)
    writer.manifest["embedding"] = {
        "tables": {t: table_dtype("int8", tied=False) for t in token_tables}, "tied": {}}
    g = torch.Generator().manual_seed(0)
    for part in tqdm(parts_of(cfg.n_blocks), desc=f"{label} int8", unit="part",
                     disable=not progress):
        with torch.device("meta"):
            module = arch.build(cfg, part)
        int8 = ({f"{n}.weight" for n, m in module.named_modules()
                 if isinstance(m, torch.nn.Linear)} if part.kind != "embed"
                else {f"{t}.weight" for t in token_tables})
        tensors = {}
        for name, p in module.state_dict().items():
            t = torch.randn(p.shape, generator=g) * 0.02
            if name.endswith(".weight") and p.dim() == 1:  # norm gains
                t = torch.ones(p.shape)
            tensors[name] = t
        writer.write(part, round_nearest(tensors, int8))
    store = writer.finish()
    for f in store.manifest["files"]:  # written pages to disk, so that reads are cold
        with open(store.path / f["name"], "rb") as fh:
            os.fsync(fh.fileno())
    return store


def cold_read_bandwidth(store, runs: int = 3) -> float:
    """Bytes/s reading the block files cold into one staging buffer (median of runs)."""
    from llm_shard.worker.tiers import read_file

    paths = [store.path / Part("block", i).file for i in range(store.n_blocks)]
    buf = torch.empty(max(p.stat().st_size for p in paths), dtype=torch.uint8)
    rates = []
    for _ in range(runs):
        for p in paths:
            drop_cache(p)
        t0 = time.perf_counter()
        n = 0
        for p in paths:
            n += read_file(p, buf)
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def drop_cache(path: Path) -> None:
    """Drop a file's (or every file of a folder's) pages from the page cache."""
    for p in [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]:
        with open(p, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def decode(store, tokens: int, prefetch: bool, context: int = 16) -> dict:
    """One stage holding every block on disk: `tokens` decode steps after a prefill of
    `context` rows. Returns tok/s and the disk bytes/s achieved during decode."""
    from llm_shard.cluster.types import Tier
    from llm_shard.models.cache import Batch, SequenceCache
    from llm_shard.worker.tiers import TieredBlocks

    n = store.n_blocks
    for i in range(n):
        drop_cache(store.path / f"blocks/{i:03d}.safetensors")
    blocks = TieredBlocks(store, 0, n, [Tier.DISK] * n)
    streamer = blocks.streamer
    streamer.prefetch_enabled = prefetch
    if not prefetch and streamer.pending is not None:  # the constructor's first read
        streamer.pending[2].result()
    cache, hidden = SequenceCache(), store.config.hidden_size
    g = torch.Generator().manual_seed(1)
    try:
        with torch.inference_mode():
            blocks.run(torch.randn(context, hidden, generator=g), Batch.of([context], [cache]))
            read0, t0 = streamer.bytes_read, time.perf_counter()
            for _ in range(tokens):
                blocks.run(torch.randn(1, hidden, generator=g), Batch.of([1], [cache]))
            seconds = time.perf_counter() - t0
            read = streamer.bytes_read - read0
    finally:
        blocks.close()
    return {"tok_s": tokens / seconds, "disk_bytes_s": read / seconds}


def run(preset: str = "2.6b", layers: int | None = None, tokens: int = 3,
        folder: Path | None = None, progress: bool = True) -> dict:
    from llm_shard.models.checkpoint.catalog import home

    folder = folder or home() / f"bench-swap-pangu-{preset}" \
        f"{'' if layers is None else f'-{layers}l'}"
    store = build_store(folder, preset, layers, progress)
    n = store.n_blocks
    block_bytes = [store.part_bytes(Part("block", i)) for i in range(n)]
    model_bytes = sum(block_bytes)
    cache = (tokens + 16) * store.config.cache_bytes_per_token * n
    ram_budget = 2 * max(block_bytes) + cache  # staging buffers + KV cache
    bandwidth = cold_read_bandwidth(store)
    on = decode(store, tokens, prefetch=True)
    off = decode(store, tokens, prefetch=False)
    return {
        "model": f"random PanGu-α-{preset} int8" + (f", {n} blocks" if layers else ""),
        "store": str(store.path), "blocks": n,
        "block_bytes": model_bytes, "stage_ram_budget_bytes": ram_budget,
        "model_over_budget": model_bytes / ram_budget,
        "cold_read_GBps": bandwidth / 1e9,
        "prefetch_on": {"tok_s": on["tok_s"], "disk_GBps": on["disk_bytes_s"] / 1e9,
                        "of_bandwidth": on["disk_bytes_s"] / bandwidth},
        "prefetch_off": {"tok_s": off["tok_s"], "disk_GBps": off["disk_bytes_s"] / 1e9,
                         "of_bandwidth": off["disk_bytes_s"] / bandwidth},
        "prefetch_speedup": on["tok_s"] / off["tok_s"],
        "tokens": tokens, "threads": torch.get_num_threads(),
    }


def report(r: dict) -> str:
    on, off = r["prefetch_on"], r["prefetch_off"]
    return "\n".join([
        f"{r['model']}: {r['blocks']} blocks, {r['block_bytes'] / 2**30:.2f} GiB of blocks, "
        f"all on the disk tier",
        f"stage RAM budget (2 staging buffers + KV cache): "
        f"{r['stage_ram_budget_bytes'] / 2**20:.0f} MiB; model is "
        f"{r['model_over_budget']:.1f}x that",
        f"cold disk read: {r['cold_read_GBps']:.2f} GB/s",
        f"prefetch on : {on['tok_s']:.3f} tok/s, disk {on['disk_GBps']:.2f} GB/s = "
        f"{on['of_bandwidth']:.0%} of bandwidth (goal >= 80%)",
        f"prefetch off: {off['tok_s']:.3f} tok/s, disk {off['disk_GBps']:.2f} GB/s = "
        f"{off['of_bandwidth']:.0%} of bandwidth",
        f"prefetch speedup: {r['prefetch_speedup']:.2f}x",
    ])


def suite_swap(ctx: Context) -> dict:
    """`run` on the decode suite's random PanGu-α store where it has the same blocks;
    the medians of whole runs."""
    cfg = ctx.cfg
    folder = ctx.pangu_dir if cfg.swap_layers == cfg.pangu_layers else None
    results = [run("2.6b", cfg.swap_layers, cfg.swap_tokens, folder, progress=not cfg.quick)
               for _ in range(max(1, cfg.swap_runs))]
    return {**median_dict(results), "runs": len(results)}


def median_dict(results: list[dict]) -> dict:
    """The first dict with each number replaced by its median over all (nested too)."""
    out = {}
    for k, v in results[0].items():
        if isinstance(v, dict):
            out[k] = median_dict([r[k] for r in results])
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = statistics.median(r[k] for r in results)
        else:
            out[k] = v
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="llm-shard bench swap", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="2.6b", choices=["2.6b", "13b"])
    ap.add_argument("--layers", type=int, default=None,
                    help="fewer blocks than the preset (a quick run)")
    ap.add_argument("--tokens", type=int, default=3, help="decode steps per setting")
    ap.add_argument("--dir", type=Path, default=None,
                    help="where the random store is built (default: under $LLM_SHARD_HOME)")
    ap.add_argument("--json", default=None, help="write the figures as JSON (- for stdout)")
    a = ap.parse_args(argv)
    r = run(a.preset, a.layers, a.tokens, a.dir)
    publish(r, report(r), a.json)
    return r


if __name__ == "__main__":
    main()
