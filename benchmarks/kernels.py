"""Linear-layer kernels on this machine: GB/s of weight bytes, as a share of memory bandwidth.

Per layer shape (PanGu-α-2.6B, LLaMA-7B, two of SmolLM2-135M) and batch size: fp32 and
bf16 `F.linear`, the int8 kernels of `llm_shard.models.quant`, and fbgemm's dynamic W8A8
for reference (it fails the quality bar). Weights cycle through copies several times the
last-level cache, so each call streams them from memory as a decode step does; kernels
and a memory read take turns, so each ratio is against the bandwidth of its own moment.
Also the memory-bandwidth `Reader` and the CPU facts other benchmarks report.

    llm-shard bench kernels [--threads N] [--repeats R] [--quick] [--json PATH|-]
"""

from __future__ import annotations

import argparse
import math
import platform
import random
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from llm_shard.benchmarks import publish
from llm_shard.models.kernels import w8a16
from llm_shard.models.quant import Int8Linear, quantize_weight

# (model, layer, in_features, out_features)
SHAPES: tuple[tuple[str, str, int, int], ...] = (
    ("smollm2-135m", "attn", 576, 576),  # small layers: where "auto" picks w8a16
    ("smollm2-135m", "mlp-up", 576, 1536),
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
# "blocks": w8a16 on a GGUF's Q4_1-like blocks kept as they are (float16 scale and min
# per 32 inputs: 1/8 more bytes than int8 alone)
KERNELS = ("fp32", "bf16", "auto", "fbgemm", "w8a16", "blocks", "int8pack", "dequant",
           "fbgemm-w8a8")
POOL_BYTES = 128 << 20  # weights cycled per kernel: several times a last-level cache
QUICK_POOL_BYTES = 4 << 20
BANDWIDTH_BYTES = 512 << 20
QUICK_BANDWIDTH_BYTES = 32 << 20
ROUND_BUDGET_S = 2.0  # per shape and batch, for all kernels; at least MIN_ROUNDS rounds
QUICK_ROUND_BUDGET_S = 0.05
MIN_ROUNDS = 3


def memory_bandwidth(nbytes: int = BANDWIDTH_BYTES, repeats: int = 9) -> float:
    """Read bandwidth in GB/s: median fp32 sum over a buffer far larger than the caches."""
    return Reader(nbytes).gbps(repeats)


class Reader:
    """A buffer far larger than the caches, written first (first touch of fresh memory is
    several times slower), to read the memory bandwidth of a moment again and again. It
    lies in 2 MiB pages where Store.load puts the weights there (`huge_page_arena`): on
    4 KiB pages the read is TLB-bound, and a roofline from it would let the weights'
    stream pass 100%."""

    def __init__(self, nbytes: int = BANDWIDTH_BYTES) -> None:
        from llm_shard.models.checkpoint.store import huge_page_arena, huge_pages_problem

        n = nbytes // 4
        if huge_pages_problem() is None:
            self.buf = huge_page_arena(4 * n).view(torch.float32).fill_(1.0)
        else:
            self.buf = torch.ones(n)
        for _ in range(2):
            self.buf.sum()

    def gbps(self, repeats: int = 3) -> float:
        """GB/s of the median of `repeats` fp32 sums over the buffer."""
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            self.buf.sum()
            times.append(time.perf_counter() - t)
        return self.buf.numel() * 4 / statistics.median(times) / 1e9


Call = Callable[[torch.Tensor], torch.Tensor]


def _pool(kernel: str, w: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
          pool_bytes: int) -> tuple[list[Call], int, str]:
    """Copies of one layer as callables x -> y for `kernel`, the weight bytes of one copy,
    and the kernel actually running (an int8 kernel may fall back for this shape)."""
    out_f, in_f = w.shape
    nbytes = {"fp32": 4 * w.numel(), "bf16": 2 * w.numel(),
              "blocks": q.numel() + 4 * (q.numel() // 32)}.get(
        kernel, q.numel() + 4 * scales.numel())
    copies = range(max(1, math.ceil(pool_bytes / nbytes)))
    if kernel == "blocks":
        if in_f % 32:
            return [], nbytes, "n/a (in % 32)"
        mods = []
        for _ in copies:
            m = Int8Linear(in_f, out_f, bias=False, kernel="w8a16", group=32, mins=True)
            m.weight.copy_(q)
            m.scales.copy_((scales[:, None] / 8).expand(out_f, in_f // 32))
            m.mins.fill_(-0.01)
            m.prepare()
            mods.append(m)
        return mods, nbytes, "blocks" if mods[0].kernel == "w8a16" else mods[0].kernel
    if kernel in ("fp32", "bf16"):
        dtype = torch.float32 if kernel == "fp32" else torch.bfloat16
        ws = [w.to(dtype, copy=True) for _ in copies]
        return [lambda x, w=w: F.linear(x.to(w.dtype), w) for w in ws], nbytes, kernel
    mods = []
    for _ in copies:
        m = Int8Linear(in_f, out_f, bias=False, kernel=kernel.removesuffix("-w8a8"))
        m.weight.copy_(q)
        m.scales.copy_(scales)
        m.prepare()
        mods.append(m)
    if kernel == "fbgemm-w8a8" and mods[0].kernel == "fbgemm":
        # One 7-bit activation level per call (per token at batch 1), as torch's dynamic
        # quantized Linear does.
        zeros = torch.zeros(out_f, dtype=torch.long)
        packed = [torch.ops.quantized.linear_prepack(
            torch._make_per_channel_quantized_tensor(m.weight, m.scales.double(), zeros, 0), None)
            for m in mods]
        return [lambda x, p=p: torch.ops.quantized.linear_dynamic(x, p, True)
                for p in packed], nbytes, kernel
    return mods, nbytes, mods[0].kernel


def _time_in_turns(pools: dict[str, list[Call]], x: torch.Tensor, max_rounds: int,
                   budget_s: float) -> dict[str, float]:
    """Median seconds per call of each pool's layers on x, kernels taking turns.

    Each round calls every kernel on the next 1/rows of its pool (the whole pool at batch
    1, where streaming the weights is the cost; fewer calls where compute is)."""
    times: dict[str, list[float]] = {k: [] for k in pools}
    for fns in pools.values():  # warm-up
        fns[0](x)
        fns[-1](x)
    start, i, order, shuffle = time.perf_counter(), 0, list(pools), random.Random(0).shuffle
    for rnd in range(max_rounds):
        calls = max(1, max(map(len, pools.values())) // x.shape[0])
        shuffle(order)  # no kernel always runs in another's wake
        for k in order:
            fns = pools[k]
            for j in range(i, i + min(calls, len(fns))):
                t = time.perf_counter()
                fns[j % len(fns)](x)
                times[k].append(time.perf_counter() - t)
        i += calls
        if rnd + 1 >= MIN_ROUNDS and time.perf_counter() - start > budget_s:
            break
    return {k: statistics.median(v) for k, v in times.items()}


def cpu_and_kernel() -> dict:
    """What the int8 figures depend on, so that runs on other CPUs compare: the CPU's name
    (and x86 family/model), its vector extensions, and the int8 kernel that ran."""
    info = w8a16.cpu_info()
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info:
        name += f" (family {info['cpu family']}, model {info.get('model', '?')})"
    flags = set(w8a16._cpu_flags().split())  # what keeps_up reads
    problem = w8a16.problem()
    return {"cpu": name,
            "cpu_vector": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni")
                           if f in flags],
            "int8_kernel": (f"w8a16 {w8a16.variant()}, on large layers too" if w8a16.keeps_up()
                            else f"w8a16 {w8a16.variant()} on small layers, fbgemm on large "
                                 "ones") if problem is None
                           else f"fbgemm (w8a16 cannot run here: {problem})"}


def cpu_line(d: dict) -> str:
    """`cpu_and_kernel`'s facts (in `d`) as one line of a report."""
    vector = ", ".join(d["cpu_vector"]) or "neither AVX2 nor AVX512"
    return f"CPU {d['cpu']}, with {vector}; int8 kernel {d['int8_kernel']}"


def run(threads: int | None = None, repeats: int = 10, quick: bool = False) -> dict:
    """Measures bandwidth and every kernel on every shape and batch; returns a dict
    (`format_table` prints it). At most `repeats` rounds per shape and batch."""
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
    budget = QUICK_ROUND_BUDGET_S if quick else ROUND_BUDGET_S
    bw_bytes = QUICK_BANDWIDTH_BYTES if quick else BANDWIDTH_BYTES
    bandwidth_start = memory_bandwidth(bw_bytes)
    # The same read, timed in turns with the kernels: each ratio is against the bandwidth
    # of its own moment (other work on the machine comes and goes).
    reader = Reader(bw_bytes)
    read = [lambda x: reader.buf.sum()]
    rows, chosen = [], {}
    with torch.inference_mode():
        for model, layer, in_f, out_f in shapes:
            w = torch.randn(out_f, in_f) * 0.02
            q, scales = quantize_weight(w)
            pools, nbytes, running = {}, {}, {}
            for k in KERNELS:
                fns, nbytes[k], running[k] = _pool(k, w, q, scales, pool_bytes)
                if running[k] == k:  # a fallback is not timed under the wrong name
                    pools[k] = fns
            chosen[f"{in_f}x{out_f}"] = Int8Linear(in_f, out_f, bias=False).prepare()
            for m in batches:
                seconds = _time_in_turns({**pools, "read": read}, torch.randn(m, in_f),
                                         repeats, budget)
                bandwidth = bw_bytes / seconds["read"] / 1e9
                for k in KERNELS:
                    s = seconds.get(k)
                    gbs = None if s is None else nbytes[k] / s / 1e9
                    rows.append({"model": model, "layer": layer, "in_features": in_f,
                                 "out_features": out_f, "batch": m, "kernel": k,
                                 "running": running[k], "weight_bytes": nbytes[k],
                                 "seconds": s, "gbs": gbs, "bandwidth_gbs": bandwidth,
                                 "ratio": None if gbs is None else gbs / bandwidth})
            del pools
    bandwidth_end = memory_bandwidth(bw_bytes)
    return {**cpu_and_kernel(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "quantized_engine": torch.backends.quantized.engine,
            "bandwidth_gbs": statistics.median(r["bandwidth_gbs"] for r in rows),
            "bandwidth_start_end_gbs": [bandwidth_start, bandwidth_end],
            "chosen": chosen, "kernels": list(KERNELS), "rows": rows}


def format_table(result: dict) -> str:
    kernels = result["kernels"]
    start, end = result["bandwidth_start_end_gbs"]
    lines = [cpu_line(result),
             f"memory read bandwidth {result['bandwidth_gbs']:.1f} GB/s (median over the "
             f"table; {start:.1f} at start, {end:.1f} at end), {result['threads']} threads, "
             f"torch {result['torch']}",
             "int8 kernel chosen per shape: "
             + ", ".join(f"{k} {v}" for k, v in result["chosen"].items()),
             "GB/s of weight bytes (share of the bandwidth read in the same rounds, column "
             "'read'); '-> k': falls back to kernel k",
             f"{'shape':30s} {'M':>3s} {'read':>5s} " + " ".join(f"{k:>13s}" for k in kernels)]
    cells: dict[tuple, dict] = {}
    for r in result["rows"]:
        key = (r["model"], r["layer"], r["in_features"], r["out_features"], r["batch"])
        cells.setdefault(key, {})[r["kernel"]] = r
    for (model, layer, in_f, out_f, m), by_kernel in cells.items():
        parts = []
        for k in kernels:
            r = by_kernel[k]
            parts.append(f"{'-> ' + r['running']:>13s}" if r["gbs"] is None
                         else f"{r['gbs']:6.1f} ({r['ratio']:4.2f})")
        read = by_kernel[kernels[0]]["bandwidth_gbs"]
        lines.append(f"{f'{model} {layer} {in_f}->{out_f}':30s} {m:3d} {read:5.1f} "
                     + " ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="llm-shard bench kernels",
                                description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=10,
                   help="at most this many timed rounds per shape and batch")
    p.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-': stdout)")
    args = p.parse_args(argv)
    result = run(threads=args.threads, repeats=args.repeats, quick=args.quick)
    publish(result, format_table(result), args.json)
    return result


if __name__ == "__main__":
    main()
