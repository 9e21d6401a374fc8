"""The benchmark suite: figures that compare, each beside the physical limit it is held to.

One run measures this machine's memory-read and cold disk-read bandwidths, runs the
suites, and writes DIR/bench.json, DIR/bench.md and DIR/*.png (report.py). Every timed
figure is the median of several runs after a warm-up.

- decode (decode.py): prefill and decode tok/s at batch 1 and 16 of SmolLM2-135M int8 and
  a random int8 PanGu-α-2.6B, against the bandwidth roofline; where a step goes;
- versus (versus.py): transformers `generate` in fp32 and bf16 against llm-shard, same
  weights and prompt, greedy, the engines taking turns;
- load (load.py): cold start to the first token, against transformers `from_pretrained`;
- split, throughput (pipeline.py): decode over 1, 2 and 3 local Ray workers and the cost
  of a hop; 64 requests of mixed lengths over 2 workers, micro-batches off and on;
- swap (swap.py): every block of the random PanGu-α streamed from the disk tier;
- scale (scale.py): random LLaMA-7B and PanGu-α-13B on 3 local workers whose RAM budgets
  sum to less than the model: decode against the disk roofline, peak RSS against the
  budgets, predicted against measured, throughput mode (quick: a tiny random LLaMA).

    llm-shard bench suite [--suites decode,versus,load,split,throughput,swap,scale] [--quick]
                          [--out DIR] [--runs N] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llm_shard.benchmarks import decode, load, pipeline, report, scale, swap, versus

RUNNERS = {"decode": decode.suite_decode, "versus": versus.suite_versus,
           "load": load.suite_load, "split": pipeline.suite_split,
           "throughput": pipeline.suite_throughput, "swap": swap.suite_swap,
           "scale": scale.suite_scale}
SUITES = tuple(RUNNERS)


@dataclass
class Config:
    runs: int = 5  # timed runs per figure; the median is reported
    warmup: int = 1  # untimed runs first
    tokens: int = 32  # new tokens per decode run
    prompt_tokens: int = 64  # prompt rows per sequence in decode / prefill
    batches: tuple[int, ...] = (1, 16)
    pangu_layers: int | None = None  # None: all 32 blocks of PanGu-α-2.6B
    load_runs: int = 3
    split_workers: tuple[int, ...] = (1, 2, 3)
    split_tokens: int = 32
    # interleaved rounds of each worker count: a hop costs a few % of a step, less than
    # the run-to-run noise of a shared host
    split_runs: int = 15
    requests: int = 64
    throughput_tokens: int = 32
    swap_layers: int | None = None
    swap_tokens: int = 3
    swap_runs: int = 3  # whole swap runs (cold bandwidth, prefetch on, off); medians
    # scale: shapes of scale.SHAPES, decode tokens, sequence counts of the throughput mode
    # (none: one sequence only)
    scale_models: tuple[str, ...] = ("llama-7b", "pangu-13b")
    scale_tokens: int = 8
    scale_sequences: tuple[int, ...] = (8,)
    scale_layers: int | None = None
    bandwidth_bytes: int = 512 << 20
    threads: int | None = None  # torch threads of the in-process suites (None: torch's)
    quick: bool = False


def quick_config() -> Config:
    """Tiny counts: checks that the harness works; its figures mean little."""
    return Config(runs=1, warmup=1, tokens=4, prompt_tokens=8, pangu_layers=3, load_runs=1,
                  split_tokens=4, split_runs=1, requests=16, throughput_tokens=4, swap_layers=3,
                  swap_tokens=2, swap_runs=1, scale_models=("tiny",), scale_tokens=2,
                  scale_sequences=(), bandwidth_bytes=128 << 20, quick=True)


@dataclass
class Context:
    """What every suite is handed."""
    cfg: Config
    stores: dict  # {"int8": Store, "fp32": Store} of SmolLM2-135M
    machine: dict  # machine(): the run's bandwidths, threads and versions
    pangu_dir: Path | None = None  # the random PanGu-α store (None: under $LLM_SHARD_HOME)


def machine(cfg: Config, store) -> dict:
    """This run's physical limits: memory-read bandwidth, cold disk-read bandwidth (the
    blocks of `store`), threads, versions."""
    from llm_shard.benchmarks.kernels import cpu_and_kernel, memory_bandwidth

    mem = memory_bandwidth(cfg.bandwidth_bytes)
    disk = swap.cold_read_bandwidth(store, runs=max(1, cfg.runs))
    return {
        "memory_GBps": mem,
        "disk_read_GBps": disk / 1e9,
        "disk_read_of": str(store.path),
        "page_cache": swap.CACHE_DROP,
        # a cold read as fast as memory means the pages were not dropped
        "page_cache_dropped": disk / 1e9 < 0.5 * mem,
        "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "machine": platform.machine(),
        **cpu_and_kernel(),
    }


def run(suites=SUITES, cfg: Config | None = None, stores: dict | None = None,
        pangu_dir: Path | None = None, log=print) -> dict:
    """Runs `suites`; `stores` ({"int8": Store, "fp32": Store} of SmolLM2-135M) default
    to the catalog's. Returns the report's dict."""
    cfg = cfg or Config()
    unknown = set(suites) - set(SUITES)
    if unknown:
        raise ValueError(f"unknown suites {sorted(unknown)}: choose from {', '.join(SUITES)}")
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(suites, cfg, stores, pangu_dir, log)
    finally:
        torch.set_num_threads(threads)


def _run(suites, cfg: Config, stores: dict | None, pangu_dir: Path | None, log) -> dict:
    from llm_shard.benchmarks.kernels import memory_bandwidth
    from llm_shard.models.checkpoint.catalog import resolve

    stores = stores or {d: resolve("smollm2-135m", dtype=d, progress=not cfg.quick)
                        for d in ("int8", "fp32")}
    log("measuring memory and disk-read bandwidth")
    ctx = Context(cfg, stores, machine(cfg, stores["int8"]), pangu_dir)
    result = {"version": 1, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "quick": cfg.quick, "config": asdict(cfg),
              "machine": ctx.machine, "suites": {}}
    for name in SUITES:
        if name in suites:
            log(f"suite {name}")
            t0 = time.perf_counter()
            result["suites"][name] = RUNNERS[name](ctx)
            result["suites"][name]["suite_seconds"] = time.perf_counter() - t0
    result["machine"]["memory_GBps_after"] = memory_bandwidth(cfg.bandwidth_bytes)
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="llm-shard bench suite", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", default=",".join(SUITES),
                    help=f"comma-separated, of {','.join(SUITES)} (default: all)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny counts and 3-block random PanGu: checks the harness works")
    ap.add_argument("--out", type=Path, default=Path("bench"), help="output folder")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per figure")
    ap.add_argument("--pangu-dir", type=Path, default=None,
                    help="where the random PanGu-α store is built (default: $LLM_SHARD_HOME)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the in-process suites and the load processes "
                         "(default: torch's; the split and throughput workers use the CPUs)")
    a = ap.parse_args(argv)
    cfg = quick_config() if a.quick else Config()
    cfg.threads = a.threads
    if a.runs is not None:
        cfg.runs = cfg.load_runs = a.runs
    suites = [x.strip() for x in a.suites.split(",") if x.strip()]
    bad = sorted(set(suites) - set(SUITES))
    if bad:
        ap.error(f"unknown suites {bad}: choose from {', '.join(SUITES)}")
    r = run(suites, cfg, pangu_dir=a.pangu_dir)
    names = report.write(r, a.out)
    print(report.markdown(r))
    print(f"\nwrote {', '.join(str(a.out / n) for n in names)}")
    if r["plots"] == report.NO_PNG:
        print(report.NO_PNG)
    return r


if __name__ == "__main__":
    main()
