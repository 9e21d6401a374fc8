"""The load suite: cold start to the first token of SmolLM2-135M (a fresh Python process,
the weights' page cache dropped) from our int8 and fp32 stores, against transformers
`from_pretrained` of the same weights as fp32 safetensors and as the GGUF, each held to
the weights' bytes over the measured cold disk-read bandwidth.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llm_shard.benchmarks.pipeline import PROMPT
from llm_shard.benchmarks.swap import CACHE_DROP, drop_cache
from llm_shard.benchmarks.versus import peer

if TYPE_CHECKING:
    from llm_shard.benchmarks.suite import Config, Context

# each script: argv = weights' path, prompt ids (JSON), torch threads; prints one JSON line
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


def suite_load(ctx: Context) -> dict:
    cfg, disk, stores = ctx.cfg, ctx.machine["disk_read_GBps"], ctx.stores
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
    theirs = peer(ctx, out)
    if theirs is not None:
        folder, gguf = theirs
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
