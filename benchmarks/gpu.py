"""The GPU tier on this machine's GPU, timed with CUDA events (medians after a warm-up):
- its memory-read and pinned host-to-device copy bandwidths: the two ceilings;
- per layer shape and row count, GB/s of weight bytes of our Triton int8 kernels,
  "dequant", torch's `_weight_int8pack_mm` and float `F.linear`, as shares of the read
  bandwidth (weights cycle through copies 4x the L2, as a decode step reads them);
- batch-1 decode of a random int8 PanGu-α-2.6B whose blocks are resident (with and
  without CUDA graphs) or streamed from pinned RAM: tok/s of the blocks against their
  roofline, and of the whole stage (embedding and head on the CPU, as in a worker).

    llm-shard bench gpu [--layers N] [--tokens T] [--json PATH|-]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llm_shard.benchmarks import kernels, publish
from llm_shard.models.kernels import cuda_int8
from llm_shard.models.quant import quantize_weight

SHAPES = kernels.SHAPES  # (model, layer, in_features, out_features): the CPU bench's
ROWS = (1, 4, 16, 256)


def _events_ms(fn, reps: int) -> float:
    """Milliseconds a call, over `reps` calls timed with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(reps):
        fn(i)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def timed(fn, reps: int = 50, repeats: int = 5) -> float:
    """Median seconds a call of fn(i) after one warm-up pass."""
    _events_ms(fn, max(2, reps // 5))
    return statistics.median(_events_ms(fn, reps) for _ in range(repeats)) / 1e3


def read_bandwidth(nbytes: int = 2 << 30) -> float:
    """GB/s of a float32 sum over nbytes in GPU memory."""
    x = torch.ones(nbytes // 4, device="cuda")
    s = timed(lambda i: x.sum(), reps=20)
    return nbytes / s / 1e9


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """GB/s of a pinned host-to-device copy."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    s = timed(lambda i: dev.copy_(host, non_blocking=True), reps=5)
    return nbytes / s / 1e9


def _copies(weight_bytes: int, l2: int) -> int:
    return max(2, -(-4 * l2 // weight_bytes))


def layer_kernels(k: int, n: int, rows: int, l2: int) -> dict:
    """GB/s of weight bytes a call for each kernel on an (n, k) layer and `rows` rows."""
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda") * 0.02
    q, scales = quantize_weight(w)
    bias = torch.zeros(n, device="cuda")
    pool = [q.clone() for _ in range(_copies(q.numel(), l2))]
    x32 = torch.randn(rows, k, device="cuda")
    x16 = x32.to(torch.bfloat16)
    out: dict = {}

    def rate(name: str, nbytes: int, fn) -> None:
        try:
            out[name] = nbytes / timed(fn) / 1e9
        except Exception as e:  # an op this torch lacks on CUDA, a kernel that fails here
            out[name] = None
            out[f"{name}_error"] = str(e).splitlines()[0][:200]

    m = len(pool)
    for kernel, precision in (("row", "-"), ("tile", "tf32x3"), ("tile", "ieee")):
        name = f"triton_{kernel}_fp32" + ("" if precision == "-" else f"_{precision}")
        rate(name, q.numel(), lambda i, kernel=kernel, p=precision: cuda_int8.linear(
            pool[i % m], scales, x32, bias, kernel=kernel,
            precision="tf32x3" if p == "-" else p))
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        x = x32.to(dtype)
        rate(f"triton_{name}", q.numel(),
             lambda i, x=x: cuda_int8.linear(pool[i % m], scales, x, bias))
    rate("dequant_fp32", q.numel(),
         lambda i: F.linear(x32, pool[i % m].to(torch.float32)) * scales + bias)
    rate("dequant_bf16", q.numel(),
         lambda i: F.linear(x16, pool[i % m].to(torch.bfloat16)) * scales.to(torch.bfloat16))
    s16 = scales.to(torch.bfloat16)
    rate("int8pack_bf16", q.numel(),
         lambda i: torch.ops.aten._weight_int8pack_mm(x16, pool[i % m], s16))
    pool.clear()  # free the copies before the float pools
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        wf = w.to(dtype)
        fpool = [wf.clone() for _ in range(_copies(wf.numel() * wf.element_size(), l2))]
        x = x32.to(dtype)
        rate(f"linear_{name}", wf.numel() * wf.element_size(),
             lambda i, p=fpool, x=x: F.linear(x, p[i % len(p)]))
        del fpool
    return out


def gpu_busy(step, steps: int = 3) -> tuple[float, float]:
    """(ms the GPU spends in kernels and copies, their count) per call of `step`, from the
    torch profiler: against a step's wall time, what the GPU waits for."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    return sum(e.device_time for e in events) / 1e3 / steps, len(events) / steps


def decode(store, tokens: int, streamed: bool, graphs: bool = True) -> dict:
    """Batch-1 decode of `store` with every block on the GPU (resident, or streamed from
    pinned RAM): tok/s of the blocks alone and of the whole stage. Resident blocks replay
    CUDA graphs (models/kernels/cuda_graphs.py) unless not `graphs`."""
    from contextlib import nullcontext

    from llm_shard.cluster.types import Tier
    from llm_shard.models.cache import Batch, SequenceCache
    from llm_shard.models.kernels.decode import modules_only
    from llm_shard.worker.stage import StageRunner

    n = store.n_blocks
    t0 = time.perf_counter()
    runner = (StageRunner(store, 0, n, cache_budget=1 << 34, tiers=[Tier.RAM] * n,
                          stream_to="cuda") if streamed else
              StageRunner(store, 0, n, cache_budget=1 << 34, tiers=[Tier.GPU] * n))
    load_s = time.perf_counter() - t0
    hidden, vocab = store.config.hidden_size, store.config.vocab_size
    g = torch.Generator().manual_seed(0)
    cache = SequenceCache()

    def step():  # the blocks alone: hidden in, hidden out (on the CPU)
        return runner.blocks.run(torch.randn(1, hidden, generator=g), Batch.of([1], [cache]))

    try:
        with torch.inference_mode(), nullcontext() if graphs else modules_only():
            runner.blocks.run(torch.randn(16, hidden, generator=g), Batch.of([16], [cache]))
            step(), step()  # a row count's CUDA graphs are captured on its second step
            t0 = time.perf_counter()
            for _ in range(tokens):
                step()
            blocks_s = (time.perf_counter() - t0) / tokens
            busy_ms, launches = gpu_busy(step)
            stage_cache = SequenceCache()
            ids = torch.randint(vocab, (16,), generator=g)
            nxt = runner.model(ids, Batch.of([16], [stage_cache]), run_blocks=runner.blocks.run)
            t0 = time.perf_counter()
            for _ in range(tokens):
                nxt = runner.model(nxt.argmax(-1), Batch.of([1], [stage_cache]),
                                   run_blocks=runner.blocks.run)
            stage_s = (time.perf_counter() - t0) / tokens
        blocks = (runner.blocks.streamer.skeletons if streamed else runner.blocks.resident)
        kernels = sorted({m.kernel for b in blocks.values() for m in b.modules()
                          if hasattr(m, "kernel") and m.kernel})
    finally:
        runner.close()
    return {"load_s": load_s, "blocks_ms": blocks_s * 1e3, "blocks_tok_s": 1 / blocks_s,
            "gpu_busy_ms": busy_ms, "kernel_launches": launches,
            "stage_ms": stage_s * 1e3, "stage_tok_s": 1 / stage_s, "kernels": kernels}


def run(layers: int | None = None, tokens: int = 32, folder: Path | None = None,
        progress: bool = True) -> dict:
    from llm_shard.benchmarks.swap import build_store
    from llm_shard.models.base import Part

    if not torch.cuda.is_available():
        raise SystemExit("llm-shard bench gpu: torch sees no CUDA GPU here")
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 64 << 20)
    r: dict = {"gpu": props.name, "capability": ".".join(map(str, (props.major, props.minor))),
               "gpu_memory_GiB": props.total_memory / 2**30, "torch": torch.__version__,
               "triton_problem": cuda_int8.problem("cuda"),
               "read_GBps": read_bandwidth(), "h2d_GBps": copy_bandwidth()}
    r["layers"] = []
    for model, layer, k, n in SHAPES:
        for rows in ROWS:
            d = layer_kernels(k, n, rows, l2)
            r["layers"].append({"model": model, "layer": layer, "in": k, "out": n,
                                "rows": rows, "GBps": d})
            if progress:
                print(f"{model} {layer} {k}x{n} rows={rows}: " + ", ".join(
                    f"{key} {v:.0f}" for key, v in d.items() if isinstance(v, float)),
                    flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = build_store(folder or Path(tmp) / "pangu", "2.6b", layers, progress)
        r["store_build_s"] = time.perf_counter() - t0
        block_bytes = sum(store.part_bytes(Part("block", i)) for i in range(store.n_blocks))
        r["decode"] = {"model": "random PanGu-α-2.6B int8" +
                       (f", {store.n_blocks} blocks" if layers else ""),
                       "block_bytes": block_bytes, "tokens": tokens,
                       "roofline_tok_s_resident": r["read_GBps"] * 1e9 / block_bytes,
                       "roofline_tok_s_streamed": r["h2d_GBps"] * 1e9 / block_bytes}
        for mode in MODES:  # eager: resident, every module launched from Python
            d = r["decode"][mode] = decode(store, tokens, mode == "streamed", mode != "eager")
            roof = _roofline(r["decode"], mode)
            d["blocks_of_roofline"] = d["blocks_tok_s"] / roof
            if progress:
                print(f"decode {mode}: blocks {d['blocks_tok_s']:.1f} tok/s "
                      f"({d['blocks_of_roofline']:.0%} of {roof:.1f}), stage "
                      f"{d['stage_tok_s']:.1f} tok/s, kernels {d['kernels']}", flush=True)
    return r


def report(r: dict) -> str:
    lines = [f"GPU {r['gpu']} (compute capability {r['capability']}, "
             f"{r['gpu_memory_GiB']:.0f} GiB), torch {r['torch']}; Triton kernel: "
             f"{r['triton_problem'] or 'runs'}",
             f"memory read {r['read_GBps']:.0f} GB/s, pinned host-to-device copy "
             f"{r['h2d_GBps']:.1f} GB/s", "",
             "| layer | rows | " + " | ".join(k for k in _kernel_names(r)) + " |",
             "| --- | --- | " + " | ".join("---" for _ in _kernel_names(r)) + " |"]
    for d in r["layers"]:
        cells = []
        for k in _kernel_names(r):
            v = d["GBps"].get(k)
            cells.append("-" if v is None else f"{v:.0f} ({v / r['read_GBps']:.0%})")
        lines.append(f"| {d['model']} {d['layer']} {d['in']}x{d['out']} | {d['rows']} | "
                     + " | ".join(cells) + " |")
    dec = r["decode"]
    lines += ["", f"{dec['model']}, {dec['block_bytes'] / 1e9:.2f} GB of blocks, batch 1:"]
    for mode in (m for m in MODES if m in dec):
        d, roof = dec[mode], _roofline(dec, mode)
        lines.append(f"- {MODES[mode]}: blocks {d['blocks_tok_s']:.1f} tok/s "
                     f"({d['blocks_ms']:.2f} ms a step, {d['blocks_of_roofline']:.0%} of "
                     f"the {roof:.1f} tok/s roofline); whole stage "
                     f"(embedding and head on the CPU) {d['stage_tok_s']:.1f} tok/s; "
                     f"the GPU busy {d['gpu_busy_ms'] or 0:.2f} ms a step in "
                     f"{d['kernel_launches'] or 0:.0f} kernels and copies; "
                     f"kernels {', '.join(d['kernels'])}; load {d['load_s']:.1f} s")
    return "\n".join(lines)


MODES = {"resident": "resident (CUDA graphs)", "eager": "resident, no CUDA graphs",
         "streamed": "streamed"}


def _roofline(dec: dict, mode: str) -> float:
    return dec["roofline_tok_s_streamed" if mode == "streamed" else "roofline_tok_s_resident"]


def _kernel_names(r: dict) -> list[str]:
    names = []
    for d in r["layers"]:
        for k, v in d["GBps"].items():
            if (v is None or isinstance(v, float)) and k not in names:
                names.append(k)
    return names


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="llm-shard bench gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None,
                    help="fewer blocks than PanGu-α-2.6B's 32 (a quick run)")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps per setting")
    ap.add_argument("--dir", type=Path, default=None,
                    help="where the random store is built (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="write the figures as JSON (- for stdout)")
    a = ap.parse_args(argv)
    r = run(a.layers, a.tokens, a.dir)
    publish(r, report(r), a.json)
    return r
