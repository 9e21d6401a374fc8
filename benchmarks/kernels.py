"""Linear-layer kernels on this machine: GB/s of weight bytes, as a share of memory bandwidth.

For each layer shape of PanGu-alpha-2.6B and LLaMA-7B and each batch size, times fp32 and
bf16 `F.linear` and the int8 kernels of `llm_shard.models.quant` (plus fbgemm's one-level
dynamic W8A8, for reference only: it fails the quality bar). Weights are rotated through
a pool of copies larger than the last-level cache, so every call streams its weights from
memory as a real decode step does. Figures are medians of many calls after a warm-up.

    python -m benchmarks.kernels [--threads N] [--repeats R] [--quick] [--json PATH|-]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from llm_shard.models.quant import Int8Linear, quantize_weight

# (model, layer, in_features, out_features)
SHAPES: tuple[tuple[str, str, int, int], ...] = (
    ("pangu-2.6b", "qkv", 2560, 7680),
    ("pangu-2.6b", "attn", 2560, 2560),
    ("pangu-2.6b", "mlp-up", 2560, 10240),
    ("pangu-2.6b", "mlp-down", 10240, 2560),
    ("llama-7b", "attn", 4096, 4096),
    ("llama-7b", "mlp-up", 4096, 11008),
    ("llama-7b", "mlp-down", 11008, 4096),
)
QUICK_SHAPES = (("quick", "tiny", 512, 1024), ("quick", "odd-k", 520, 256))
BATCHES = (1, 8, 64)
QUICK_BATCHES = (1, 8)
KERNELS = ("fp32", "bf16", "fbgemm", "int8pack", "dequant", "fbgemm-w8a8")
INT8_KERNELS = ("fbgemm", "int8pack", "dequant")
POOL_BYTES = 256 << 20  # weights cycled per measurement: several times a 32 MiB L3
QUICK_POOL_BYTES = 8 << 20
BANDWIDTH_BYTES = 512 << 20
QUICK_BANDWIDTH_BYTES = 32 << 20


def _median_seconds(fn: Callable[[int], object], calls: int, warmup: int) -> float:
    """Median wall time of fn(i) over `calls` calls, after `warmup` untimed ones."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(calls):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def memory_bandwidth(nbytes: int = BANDWIDTH_BYTES, repeats: int = 9) -> float:
    """Read bandwidth in GB/s: fp32 sum over a buffer far larger than the caches.

    The buffer is written first: first touch of fresh memory is several times slower.
    """
    x = torch.ones(nbytes // 4)
    return nbytes / _median_seconds(lambda i: x.sum(), repeats, warmup=2) / 1e9


def _layers(kernel: str, w: torch.Tensor, copies: int) -> tuple[list, int, str]:
    """`copies` callables x -> y for `kernel` on weight w, their weight bytes each, and
    the name of the kernel actually running (an int8 kernel may fall back)."""
    out_f, in_f = w.shape
    if kernel == "fp32":
        ws = [w.clone() for _ in range(copies)]
        return [lambda x, w=w: F.linear(x, w) for w in ws], w.numel() * 4, kernel
    if kernel == "bf16":
        ws = [w.to(torch.bfloat16) for _ in range(copies)]
        return [lambda x, w=w: F.linear(x.to(torch.bfloat16), w) for w in ws], w.numel() * 2, kernel
    q, scales = quantize_weight(w)
    nbytes = q.numel() + scales.numel() * 4
    mods = []
    for _ in range(copies):
        m = Int8Linear(in_f, out_f, bias=False, kernel=kernel.removesuffix("-w8a8"))
        m.weight.copy_(q)
        m.scales.copy_(scales)
        m.prepare()
        mods.append(m)
    if kernel == "fbgemm-w8a8" and mods[0].kernel == "fbgemm":
        # One 7-bit level per call (per token at batch 1), as torch's dynamic quantized
        # Linear does; for reference only.
        zeros = torch.zeros(out_f, dtype=torch.long)
        packed = [torch.ops.quantized.linear_prepack(
            torch._make_per_channel_quantized_tensor(m.weight, m.scales.double(), zeros, 0), None)
            for m in mods]
        return [lambda x, p=p: torch.ops.quantized.linear_dynamic(x, p, True)
                for p in packed], nbytes, kernel
    return mods, nbytes, mods[0].kernel


def run(threads: int | None = None, repeats: int = 5, quick: bool = False) -> dict:
    """Measures bandwidth and every kernel on every shape and batch; returns a dict
    (see `main` for the table). `repeats` passes over each weight pool are timed."""
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(repeats, quick)
    finally:
        torch.set_num_threads(old_threads)


def _run(repeats: int, quick: bool) -> dict:
    torch.manual_seed(0)
    shapes, batches = (QUICK_SHAPES, QUICK_BATCHES) if quick else (SHAPES, BATCHES)
    pool_bytes = QUICK_POOL_BYTES if quick else POOL_BYTES
    bandwidth = memory_bandwidth(QUICK_BANDWIDTH_BYTES if quick else BANDWIDTH_BYTES)
    rows = []
    with torch.inference_mode():
        for model, layer, in_f, out_f in shapes:
            w = torch.randn(out_f, in_f) * 0.02
            for kernel in KERNELS:
                per_copy = w.numel() * {"fp32": 4, "bf16": 2}.get(kernel, 1)
                copies = max(1, math.ceil(pool_bytes / per_copy))
                fns, nbytes, running = _layers(kernel, w, copies)
                for m in batches:
                    row = {"model": model, "layer": layer, "in_features": in_f,
                           "out_features": out_f, "batch": m, "kernel": kernel,
                           "running": running, "weight_bytes": nbytes}
                    if running != kernel:  # fell back: its own row measures that kernel
                        rows.append({**row, "seconds": None, "gbs": None, "ratio": None})
                        continue
                    x = torch.randn(m, in_f)
                    s = _median_seconds(lambda i, x=x, fns=fns: fns[i % len(fns)](x),
                                        calls=repeats * len(fns), warmup=len(fns))
                    rows.append({**row, "seconds": s, "gbs": nbytes / s / 1e9,
                                 "ratio": nbytes / s / 1e9 / bandwidth})
                del fns
    chosen = {f"{in_f}x{out_f}": Int8Linear(in_f, out_f, bias=False).prepare()
              for _, _, in_f, out_f in shapes}
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "quantized_engine": torch.backends.quantized.engine,
            "bandwidth_gbs": bandwidth, "chosen": chosen, "kernels": list(KERNELS),
            "rows": rows}


def format_table(result: dict) -> str:
    kernels = result["kernels"]
    lines = [f"memory read bandwidth {result['bandwidth_gbs']:.1f} GB/s, "
             f"{result['threads']} threads, torch {result['torch']}",
             "GB/s of weight bytes (share of bandwidth); chosen int8 kernel per shape: "
             + ", ".join(f"{k}: {v}" for k, v in result["chosen"].items()),
             f"{'shape':28s} {'M':>3s} " + " ".join(f"{k:>14s}" for k in kernels)]
    cells: dict[tuple, dict] = {}
    for r in result["rows"]:
        key = (r["model"], r["layer"], r["in_features"], r["out_features"], r["batch"])
        cells.setdefault(key, {})[r["kernel"]] = r
    for (model, layer, in_f, out_f, m), by_kernel in cells.items():
        parts = []
        for k in kernels:
            r = by_kernel.get(k)
            if r is None or r["gbs"] is None:
                parts.append(f"{'-> ' + r['running'] if r else '-':>14s}")
            else:
                parts.append(f"{r['gbs']:7.1f} ({r['ratio']:4.2f})")
        lines.append(f"{model + ' ' + layer + f' {in_f}->{out_f}':28s} {m:3d} " + " ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="llm-shard bench kernels", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes over each weight pool")
    p.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-': stdout)")
    args = p.parse_args(argv)
    result = run(threads=args.threads, repeats=args.repeats, quick=args.quick)
    print(format_table(result))
    if args.json == "-":
        print(json.dumps(result, indent=1))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
