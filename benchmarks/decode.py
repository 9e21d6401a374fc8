"""The decode suite: prefill and decode tok/s at each batch size, each decode run against
the memory-bandwidth roofline of its own moments (weight bytes read per step / the
bandwidth read between its steps); the gain of the one-call blocks; and where a batch-1
step goes, per module class (selftimes.py). On SmolLM2-135M int8 and on a random int8
model with PanGu-α-2.6B shapes (built once, shared with the split and swap suites).
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from llm_shard.benchmarks.suite import Config, Context


def _llc_bytes() -> int:
    """The last-level cache's size (sysfs; 32 MiB where it says nothing)."""
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(size[:-1]) << {"K": 10, "M": 20}[size[-1]]
    except (OSError, ValueError, KeyError, IndexError):
        return 32 << 20


# the bandwidth read between decode steps comes from memory, not the last-level cache:
# a buffer at least twice that cache (capped by Config.bandwidth_bytes)
READ_BETWEEN_STEPS_BYTES = max(128 << 20, 2 * _llc_bytes())


def step_bytes(stage) -> int:
    """Bytes of weights one decode step reads: every block and the head (an embedding
    table reads one row per token: the stage's is left out, a block's counts a row).
    Tied tensors count once; a screened head counts its int8 copy and scales (its float
    rows recomputed per step are a few KB); a layer that w8a16 reads as packed nibbles
    counts those (half its int8 weight's bytes)."""
    from llm_shard.models.quant import Int8Linear, ScreenedLinear

    def key(t: torch.Tensor) -> tuple[int, int]:  # tied tensors share it
        return t.untyped_storage().data_ptr(), t.storage_offset()

    seen, total = set(), 0
    for module in [*stage.blocks.values(), stage.head]:
        if module is None:
            continue
        for sub in module.modules():
            if isinstance(sub, torch.nn.Embedding):  # a table in a block: a row per token
                seen.add(key(sub.weight))
                total += sub.weight.shape[1] * sub.weight.element_size()
            if isinstance(sub, ScreenedLinear):
                seen.add(key(sub.weight))
                total += sub.out_features * (sub.in_features + 4)
            if isinstance(sub, Int8Linear) and sub.nibbles_now() is not None:
                seen.add(key(sub.weight))
                total += sub.nibbles_now().packed.nbytes
        for t in [*module.parameters(), *module.buffers()]:
            k = key(t)
            if k not in seen:
                seen.add(k)
                total += t.numel() * t.element_size()
    return total


def _decode_run(stage, vocab: int, batch: int, prompt: int, tokens: int,
                reader=None, times=None) -> tuple[float, float, float | None]:
    """Seconds of the prefill of `batch` random prompts and of `tokens` greedy steps; with
    `reader` (kernels.Reader), the memory bandwidth read after every step, each read timed
    apart from the steps: GB/s over the run (else None). `times` (selftimes.SelfTimes, not
    entered) hooks the decode steps alone."""
    from llm_shard.models.cache import Batch, SequenceCache

    g = torch.Generator().manual_seed(batch)
    caches = [SequenceCache() for _ in range(batch)]
    ids = torch.randint(vocab, (batch * prompt,), generator=g)
    t0 = time.perf_counter()
    nxt = stage(ids, Batch.of([prompt] * batch, caches)).argmax(-1)
    prefill, decode, reads = time.perf_counter() - t0, 0.0, []
    with times or nullcontext():
        for _ in range(tokens):
            t = time.perf_counter()
            nxt = stage(nxt, Batch.of([1] * batch, caches)).argmax(-1)
            decode += time.perf_counter() - t
            if reader is not None:
                reads.append(reader.gbps(1))
    return prefill, decode, statistics.harmonic_mean(reads) if reads else None


def decode_model(name: str, store, cfg: Config, bandwidth: float) -> dict:
    """Prefill and decode rates at each batch size, and their share of the bandwidth
    roofline. The bandwidth is read between the decode steps of every timed run, so each
    run is held to the bandwidth of its own moments (the host's drifts with other work).
    `bandwidth` (the run's start) gives `roofline_tok_s_batch_1`."""
    from llm_shard.benchmarks.kernels import Reader
    from llm_shard.models.runner import StageModel

    stage = StageModel(store, 0, store.n_blocks)
    nbytes = step_bytes(stage)
    vocab = store.config.vocab_size
    reader = Reader(min(cfg.bandwidth_bytes, READ_BETWEEN_STEPS_BYTES))
    out: dict = {"model": name, "store": str(store.path), "dtype": store.manifest["dtype"],
                 "step_weight_bytes": nbytes,
                 "roofline_tok_s_batch_1": bandwidth * 1e9 / nbytes}
    for b in cfg.batches:
        for _ in range(cfg.warmup):
            _decode_run(stage, vocab, b, cfg.prompt_tokens, cfg.tokens)
        runs = [_decode_run(stage, vocab, b, cfg.prompt_tokens, cfg.tokens, reader)
                for _ in range(max(1, cfg.runs))]  # (prefill s, decode s, GB/s)
        pre = statistics.median(r[0] for r in runs)
        dec = statistics.median(r[1] for r in runs)
        gbps = statistics.median(r[2] for r in runs)
        # the step reads the weights once for b tokens: roofline b * bandwidth / bytes
        out[f"batch_{b}"] = {"prefill_tok_s": b * cfg.prompt_tokens / pre,
                             "decode_tok_s": b * cfg.tokens / dec,
                             "bandwidth_GBps": gbps,
                             "roofline_tok_s": b * gbps * 1e9 / nbytes,
                             "of_roofline": statistics.median(
                                 (b * cfg.tokens / r[1]) / (b * r[2] * 1e9 / nbytes)
                                 for r in runs)}
    if "batch_1" in out:
        out["modules_batch_1"] = modules_decode(stage, vocab, cfg, reader,
                                                out["batch_1"]["decode_tok_s"])
    out["profile_batch_1"] = decode_profile(stage, vocab, cfg, reader, nbytes)
    return out


def modules_decode(stage, vocab: int, cfg: Config, reader, fused_tok_s: float) -> dict:
    """Batch-1 decode with models/kernels/decode.py's one-call blocks off (every module
    called from Python): what they gain. Timed as the runs with them on are, the bandwidth
    read between steps included (it leaves each step's caches cold)."""
    from llm_shard.models.kernels import decode as one_call

    with one_call.modules_only():
        runs = [_decode_run(stage, vocab, 1, cfg.prompt_tokens, cfg.tokens, reader)[1]
                for _ in range(max(1, cfg.runs))]
    tok_s = cfg.tokens / statistics.median(runs)
    return {"decode_tok_s": tok_s, "fused_blocks_speedup": fused_tok_s / tok_s}


def decode_profile(stage, vocab: int, cfg: Config, reader, nbytes: int) -> dict:
    """Where a batch-1 decode step goes: one more run, with forward hooks
    (selftimes.SelfTimes) taking each module class's self time, per token. The int8 linear
    layers' self time (kernel and its Python) gives the GB/s they read weights at, against
    the bandwidth read between the same steps."""
    from llm_shard.benchmarks.selftimes import SelfTimes
    from llm_shard.models.kernels import decode as one_call

    times = SelfTimes(stage)
    with one_call.modules_only():  # hooks see modules: not inside a block's one C call
        _, decode, gbps = _decode_run(stage, vocab, 1, cfg.prompt_tokens, cfg.tokens,
                                      reader, times)
    n = cfg.tokens
    modules = {k: v / n * 1e3 for k, v in sorted(times.seconds.items(), key=lambda kv: -kv[1])}
    int8_s = times.int8_seconds() / n
    return {"step_ms": decode / n * 1e3,
            "modules_ms": modules,
            "calls_per_step": {k: times.calls[k] / n for k in modules},
            "outside_modules_ms": decode / n * 1e3 - sum(modules.values()),
            "int8_linear_ms": int8_s * 1e3,
            "int8_linear_GBps": nbytes / int8_s / 1e9 if int8_s else None,
            "bandwidth_GBps": gbps,
            "timing": "forward hooks on every module: self time per class, per decode step "
                      "(the hooks cost a few us a call: compare shares), with the one-call "
                      "blocks of models/kernels/decode.py off so that the hooks see each module"}


def pangu_store(cfg: Config, folder: Path | None):
    """The random int8 PanGu-α-2.6B store (built once; split and swap use the same one)."""
    from llm_shard.benchmarks.swap import build_store
    from llm_shard.models.checkpoint.catalog import home

    layers = cfg.pangu_layers
    folder = folder or home() / f"bench-swap-pangu-2.6b{'' if layers is None else f'-{layers}l'}"
    return build_store(folder, "2.6b", layers, progress=not cfg.quick)


def pangu_label(cfg: Config, store) -> str:
    return "random PanGu-α-2.6B int8" + ("" if cfg.pangu_layers is None
                                         else f" ({store.n_blocks} blocks)")


def suite_decode(ctx: Context) -> dict:
    cfg, bw = ctx.cfg, ctx.machine["memory_GBps"]
    models = [decode_model("SmolLM2-135M int8", ctx.stores["int8"], cfg, bw)]
    pangu = pangu_store(cfg, ctx.pangu_dir)
    models.append(decode_model(pangu_label(cfg, pangu), pangu, cfg, bw))
    return {"tokens": cfg.tokens, "prompt_tokens": cfg.prompt_tokens,
            "batches": list(cfg.batches), "models": models}
