"""Models larger than their workers' RAM: random int8 stores of LLaMA-2-7B and PanGu-α-13B
shapes (built here once, no download), served by 3 local Ray workers whose RAM budgets
sum to less than the model (7B on 3 x 1.5 GiB, 13B on 3 x 3 GiB), the rest of the blocks
streamed from each worker's disk tier. Also the suite's `scale`.

Per model it prints: decode tok/s of one sequence, and of 8 (or more) sequences together
with one micro-batch per stage and with one micro-batch in all (the throughput mode, the
planner's throughput objective); the disk bytes every decode pass reads (the files of the
plan's disk blocks; the workers' own counters check it) and the share of the disk roofline
(the cold read rate of the same block files, measured before and after the run, over
those bytes); each worker's peak RSS (VmHWM) against its budget; the planner's predicted
seconds per token and per stage against the measured ones; and whether the greedy tokens
of every sequence are those of one worker with RAM to spare. The tight workers send
activations in fp32 here (`wire_dtype`), so that this compares the split itself bit for
bit: the default bf16 wire rounds the hidden rows at every cut, which can flip a random
model's near-tie.

The disk figures are honest on a machine whose page cache could hold the store: the
store's pages are dropped (posix_fadvise DONTNEED) before the cold-read measurement and
before the workers start, and the workers read disk blocks with read() and drop each
file's pages after reading it (worker/tiers.py read_file), so every decode pass reads its
disk blocks from the device. The cold read rate is the same code reading the same files.

    llm-shard bench scale [--models llama-7b,pangu-13b,tiny] [--tokens N] [--sequences 8,16]
                          [--layers N] [--no-reference] [--dir PATH] [--json PATH|-]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llm_shard.benchmarks import publish, swap
from llm_shard.benchmarks.pipeline import _start_ray

if TYPE_CHECKING:
    from llm_shard.benchmarks.suite import Context

WORKERS = 3
WIRE_DTYPE = "fp32"  # activations between the tight workers' stages (see above)
PROMPT_TOKENS = 16
# llama.cpp (llama-cpp-python) memory-mapping a random 7B Q8_0 GGUF in a 4.5 GiB cgroup on
# this kind of machine, one sequence: measured once by hand, not by this bench
LLAMA_CPP_7B_MMAP_TOK_S = 0.35


@dataclass(frozen=True)
class Shape:
    """A model shape to build randomly, and the budget each of its workers gets."""
    label: str
    arch: str
    worker: str  # SPEC of each of the WORKERS workers ("" : tight_spec, sized from the store)
    config: dict  # the arch config's fields

    def build_config(self, layers: int | None):
        from llm_shard.models import get_arch

        cls = get_arch(self.arch).config
        fields = dict(self.config)
        if layers is not None:
            key = "num_hidden_layers" if "num_hidden_layers" in cls().to_dict() else "num_layers"
            fields[key] = layers
        return cls.from_dict(fields)


SHAPES = {
    "llama-7b": Shape("random LLaMA-2-7B int8", "llama", "ram=1536MiB,disk=20GiB", {}),
    "pangu-13b": Shape("random PanGu-α-13B int8", "pangu-alpha", "ram=3GiB,disk=20GiB",
                       {"hidden_size": 5120, "num_layers": 40, "num_heads": 40}),
    # the harness check (--quick, tests): small enough to build in seconds, budgets sized
    # from the store so that about half its blocks stream from disk (tight_spec)
    "tiny": Shape("random LLaMA (tiny) int8", "llama", "",
                  {"vocab_size": 1024, "hidden_size": 512, "intermediate_size": 1408,
                   "num_hidden_layers": 24, "num_attention_heads": 4}),
}


def build(name: str, layers: int | None = None, folder: Path | None = None,
          progress: bool = True):
    """The random store of SHAPES[name] (at `folder`, default $LLM_SHARD_HOME/bench-scale-
    NAME[-Nl]; reused when it is there)."""
    from llm_shard.models.checkpoint.catalog import home

    shape = SHAPES[name]
    folder = folder or home() / f"bench-scale-{name}{'' if layers is None else f'-{layers}l'}"
    return swap.random_store(folder, shape.arch, shape.build_config(layers), shape.label,
                             progress)


RUNTIME_MARGIN = 4 * 2**20  # over the probe worker's runtime: workers here differ by ~1 MiB


def worker_runtime(store_path: str) -> int:
    """Bytes of a Ray worker's runtime as a worker measures it: a worker of the store on
    this node, calibrated, its `overhead` (worker/actor.py), then stopped. Needs Ray."""
    import ray

    from llm_shard.cluster import ray_glue
    from llm_shard.worker.actor import Worker

    actor = ray_glue.start_actor(Worker, ray_glue.this_node(), str(store_path), threads=1)
    try:
        ray.get(actor.calibrate.remote(), timeout=300)
        return ray.get(actor.info.remote(), timeout=60)["overhead"]
    finally:
        ray.get(actor.shutdown.remote(), timeout=30)
        ray.kill(actor)


def tight_spec(store, cache_tokens: int, runtime: int, workers: int = WORKERS) -> str:
    """A RAM budget for each of `workers` workers that leaves about half the blocks on
    disk: the worker's `runtime` (a budget is the whole process: docs/budgets.md), the
    larger of embedding and head, two staging buffers, one stage's KV cache and a share of
    a third of the blocks (a stage with no disk block holds blocks in its buffers' room)."""
    from llm_shard.models.base import Part

    n = store.n_blocks
    blocks = [store.part_bytes(Part("block", i)) for i in range(n)]
    resident = max(store.part_bytes(Part("embed")), store.part_bytes(Part("head")))
    cache = store.config.cache_bytes_per_token * cache_tokens * -(-n // workers)
    ram = runtime + resident + 2 * max(blocks) + cache + sum(blocks) // (3 * workers)
    return f"ram={ram},disk={4 * store.nbytes}"


def prompts(count: int, vocab: int) -> list[list[int]]:
    """`count` different prompts of PROMPT_TOKENS ids (random stores have no tokenizer)."""
    return [[(100 + 37 * k + 11 * j) % vocab for j in range(PROMPT_TOKENS)]
            for k in range(count)]


def generate(llm, ids: list[list[int]], tokens: int) -> tuple[float, list[list[int]]]:
    """Seconds of one greedy generate of exactly `tokens` for every prompt, and the tokens."""
    from llm_shard import SamplingParams

    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=ids,
                        params=SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    return time.perf_counter() - t0, [list(o.token_ids) for o in outs]


def _read(llm) -> int:
    """Disk-block bytes every worker has read so far (worker/actor.py stats)."""
    stats = llm.worker_stats(timeout=60)
    if len(stats) != len(llm.pipeline.workers):
        raise RuntimeError(f"only {len(stats)} of {len(llm.pipeline.workers)} workers "
                           "answered for their disk counters")
    return sum(s["swap_bytes_read"] for s in stats.values())


def _llm(store, workers: list[str], cache_tokens: int, micro_batches: int | None = None,
         objective: str = "latency"):
    from llm_shard import LLM

    # a worker lost mid-run would replay its sequences: none may restart. WIRE_DTYPE:
    # the cuts pass the hidden rows unrounded (the module's docstring)
    return LLM(str(store.path), workers=workers, use_all_workers=True, max_restarts=0,
               cache_tokens=cache_tokens, micro_batches=micro_batches, objective=objective,
               step_timeout=600.0, wire_dtype=WIRE_DTYPE)


def plan_rows(llm) -> list[dict]:
    """Per stage: its blocks and tiers, the bytes of its disk blocks' files (what every
    pass reads: a range's last blocks are its disk ones), and the planner's predicted
    seconds per token."""
    from llm_shard.models.base import Part

    store, rows = llm.store, []
    for a, r in zip(llm.plan.stages, llm.plan_report.stages):
        disk = r.blocks.get(_disk(), 0)
        rows.append({"blocks": [a.start, a.end],
                     "tiers": {t.value: n for t, n in r.blocks.items() if n},
                     "disk_bytes": int(r.weights.get(_disk(), 0)),
                     "disk_file_bytes": sum(
                         (store.path / Part("block", i).file).stat().st_size
                         for i in range(a.end - disk, a.end)),
                     "predicted_s": r.seconds})
    return rows


def _disk():
    from llm_shard.cluster.types import Tier

    return Tier.DISK


def decode_one(llm, ids: list[int], tokens: int) -> dict:
    """One sequence: a generate of 1 token and one of 1 + `tokens`; their difference is
    the decode (the prefill and first token left out), its disk bytes likewise."""
    r0 = _read(llm)
    short, _ = generate(llm, [ids], 1)
    r1 = _read(llm)
    long, [out] = generate(llm, [ids], 1 + tokens)
    r2 = _read(llm)
    m = llm.metrics()
    # where noise leaves the difference not positive (tiny models), the long run's whole
    # time per token: an upper bound
    per_token = (long - short) / tokens if long > short else long / (1 + tokens)
    return {"tok_s": 1 / per_token, "s_per_token": per_token, "tokens": out,
            "disk_bytes_per_token": ((r2 - r1) - (r1 - r0)) / tokens,
            "stage_ms": [s * 1e3 for s in m["stage_seconds"]],
            "step_ms": m["step_seconds"] * 1e3}


def decode_many(llm, ids: list[list[int]], tokens: int) -> dict:
    """Every prompt together, 1 + `tokens` each: generated tokens per second of the whole
    job (prefill included), and where a step's time went per stage."""
    seconds, outs = generate(llm, ids, 1 + tokens)
    m = llm.metrics()
    return {"sequences": len(ids), "tok_s": len(ids) * (1 + tokens) / seconds,
            "seconds": seconds, "tokens": outs,
            "stage_ms": [s * 1e3 for s in m["stage_seconds"]]}


def throughput_bound(run: dict, groups: int) -> dict:
    """The throughput mode's ceiling from the run's own per-stage step times: with every
    stage busy on a micro-batch of its own, the slowest stage sets the pace (S x one
    stage's rate when stages are balanced); with none overlapping, their sum does."""
    rows = run["sequences"] / max(1, groups)  # rows of a micro-batch's step
    ms = run["stage_ms"]
    every_busy = rows / (max(ms) / 1e3)
    return {"micro_batches": groups, "rows_per_step": rows,
            "every_stage_busy_tok_s": every_busy,
            "stages_one_at_a_time_tok_s": rows / (sum(ms) / 1e3),
            "of_every_stage_busy": run["tok_s"] / every_busy}


def _workers(llm) -> list[dict]:
    stats = llm.worker_stats(timeout=60)
    out = []
    for w in llm.pipeline.workers:
        s = stats.get(w.index, {})
        out.append({"worker": w.index, "pid": w.info.get("pid"),
                    "budget_ram": int(w.capacity.ram), "peak_rss": s.get("peak_rss"),
                    "baseline_rss": w.info.get("baseline_rss"),
                    "blocks": s.get("blocks"), "staging_bytes": s.get("staging_bytes")})
    for x in out:
        _within(x)
    return out


def _within(x: dict) -> None:
    """Whether a worker's peak RSS stayed within its RAM budget, and within the budget
    plus the RSS the worker had before it held any weights (Python, torch, Ray)."""
    peak = x["peak_rss"]
    x["peak_within_budget"] = peak is not None and peak <= x["budget_ram"]
    x["peak_less_baseline_within_budget"] = (
        peak is not None and peak - (x["baseline_rss"] or 0) <= x["budget_ram"])


def run_model(name: str, tokens: int = 8, sequences=(8,), layers: int | None = None,
              reference: bool = True, folder: Path | None = None,
              progress: bool = True, log=print) -> dict:
    """Every figure of one shape (module docstring)."""
    from llm_shard.cluster.types import reserved_tokens
    from llm_shard.models.base import Part

    _start_ray()
    store = build(name, layers, folder, progress)
    shape, n = SHAPES[name], store.n_blocks
    many = max(sequences, default=1)
    # caches grow in whole chunks per sequence: room for one sequence, or for `many`
    per_seq = reserved_tokens(PROMPT_TOKENS + tokens + 1)
    # a budget is the whole process: a worker's measured runtime first
    spec = shape.worker or tight_spec(store, many * per_seq,
                                      worker_runtime(store.path) + RUNTIME_MARGIN)
    # one sequence's cache; a budget sized from the store fits the batches' caches, and
    # its one-sequence run keeps them so that its blocks stay tight too
    one_cache = per_seq if shape.worker else many * per_seq
    ids = prompts(many, store.config.vocab_size)
    log(f"scale {name}: cold disk read of {n} block files")
    disk_rate = swap.cold_read_bandwidth(store, runs=1)
    swap.drop_cache(store.path)
    out: dict = {"model": shape.label + ("" if layers is None else f", {n} blocks"),
                 "store": str(store.path), "model_bytes": store.nbytes,
                 "block_bytes": sum(store.part_bytes(Part("block", i)) for i in range(n)),
                 "workers": [spec] * WORKERS, "cache_tokens": one_cache,
                 "cold_read_GBps": disk_rate / 1e9, "tokens": tokens,
                 "prompt_tokens": PROMPT_TOKENS}
    log(f"scale {name}: one sequence on {WORKERS} workers of {spec}")
    with _llm(store, [spec] * WORKERS, one_cache) as llm:
        out["ram_budgets_bytes"] = budgets = sum(int(w.capacity.ram)
                                                 for w in llm.pipeline.workers)
        out["wire_dtype"] = llm.config.wire_dtype  # what the stages pass on (WIRE_DTYPE)
        out["stages"] = plan_rows(llm)
        out["predicted_s_per_token"] = llm.plan_report.seconds_per_token
        out["one"] = one = decode_one(llm, ids[0], tokens)
        for stage, ms in zip(out["stages"], one["stage_ms"]):  # measured / predicted - 1
            stage["measured_s"] = ms / 1e3
            stage["prediction_error"] = ms / 1e3 / stage["predicted_s"] - 1
        out["worker_rss"] = _workers(llm)
    out["batches"], out["throughput"], peaks = [], [], []
    if sequences:  # the throughput mode
        log(f"scale {name}: {', '.join(map(str, sequences))} sequences, a micro-batch per stage")
        # the throughput mode: the planner balances the stages (its "throughput" objective)
        with _llm(store, [spec] * WORKERS, many * per_seq, objective="throughput") as llm:
            out["batch_stages"] = plan_rows(llm)
            out["batches"] = [decode_many(llm, ids[:k], tokens) for k in sequences]
            peaks = [_workers(llm)]
        groups = len(out["batch_stages"])
        out["throughput"] = [throughput_bound(b, groups) for b in out["batches"]]
        log(f"scale {name}: {many} sequences, one micro-batch in all")
        with _llm(store, [spec] * WORKERS, many * per_seq, micro_batches=1,
                  objective="throughput") as llm:
            b = decode_many(llm, ids, tokens)
            out["one_micro_batch"] = {**b, **throughput_bound(b, 1)}
            peaks.append(_workers(llm))
    for a, *others in zip(out["worker_rss"], *peaks):  # the peak over every run
        a["peak_rss"] = max([a["peak_rss"] or 0] + [b["peak_rss"] or 0 for b in others]) or None
        _within(a)
    # the cold read rate again: on a shared host it varies; the faster is the roofline's
    out["cold_read_GBps_after"] = swap.cold_read_bandwidth(store, runs=1) / 1e9
    disk_rate = max(disk_rate, out["cold_read_GBps_after"] * 1e9)
    # every pass reads each disk block's file once (the counters, whose difference of two
    # runs may be off by a prefetched block, check it)
    disk_per_token = sum(s["disk_file_bytes"] for s in out["stages"])
    out["disk_bytes_per_token"] = disk_per_token
    out["counted_disk_bytes_per_token"] = one["disk_bytes_per_token"]
    out["planned_disk_bytes_per_token"] = sum(s["disk_bytes"] for s in out["stages"])
    out["must_read_bytes_per_token"] = max(0, store.nbytes - budgets)
    roof = disk_rate / disk_per_token if disk_per_token > 0 else float("inf")
    out["disk_roofline_tok_s"] = roof
    out["of_disk_roofline"] = one["tok_s"] / roof
    out["predicted_over_measured"] = out["predicted_s_per_token"] / one["s_per_token"]
    if name == "llama-7b" and layers is None:
        out["vs_llama_cpp_mmap"] = one["tok_s"] / LLAMA_CPP_7B_MMAP_TOK_S
    if reference:
        out["reference"] = reference_tokens(store, ids, tokens, many * per_seq, out, log)
    return out


def reference_tokens(store, ids: list[list[int]], tokens: int, cache_tokens: int, out: dict,
                     log=print) -> dict:
    """The same greedy generates on one worker with RAM for the whole model: whether every
    sequence's tokens are those of the tight workers."""
    from llm_shard.cluster.resources import detect_ram

    ram = store.nbytes + store.config.cache_bytes_per_token * cache_tokens * store.n_blocks \
        + (1 << 30)
    free = int(detect_ram()[1])
    if ram + (1 << 30) > free:
        return {"ran": False, "why": f"one roomy worker needs {ram / 2**30:.1f} GiB; "
                                     f"{free / 2**30:.1f} GiB is available"}
    log(f"scale: one roomy worker of ram={ram}")
    runs = out["batches"] + ([out["one_micro_batch"]] if "one_micro_batch" in out else [])
    with _llm(store, [f"ram={ram}"], cache_tokens) as llm:
        _, [one] = generate(llm, [ids[0]], 1 + tokens)
        many = {len(b["tokens"]): generate(llm, ids[:len(b["tokens"])], 1 + tokens)[1]
                for b in runs}
    same = {"one": one == out["one"]["tokens"]}
    for b in out["batches"]:
        same[f"batch_{b['sequences']}"] = many[b["sequences"]] == b["tokens"]
    if "one_micro_batch" in out:
        b = out["one_micro_batch"]
        same[f"one_micro_batch_{b['sequences']}"] = many[b["sequences"]] == b["tokens"]
    return {"ran": True, "worker": f"ram={ram}", "same_tokens": same,
            "all_same": all(same.values())}


def run(models=("llama-7b", "pangu-13b"), tokens: int = 8, sequences=(8,),
        layers: int | None = None, reference: bool = True, folder: Path | None = None,
        progress: bool = True, log=print) -> dict:
    out = {"workers": WORKERS, "cpus": os.cpu_count(), "models": []}
    for name in models:
        sub = folder / name if folder is not None else None
        load = os.getloadavg()[0]  # a shared host's other work slows every figure
        out["models"].append(run_model(name, tokens, sequences, layers, reference, sub,
                                       progress, log))
        out["models"][-1]["load_average"] = [load, os.getloadavg()[0]]
    return out


def report(r: dict) -> str:
    return "\n".join(markdown(r))


def markdown(r: dict) -> list[str]:
    """bench.md's section (report.py) and the command's printout."""
    from llm_shard.benchmarks.report import _table

    lines = ["### Scale: models larger than their workers' RAM", "",
             f"{r['workers']} local Ray workers on {r['cpus']} CPUs and one disk; random int8 "
             "stores. Disk roofline: the cold read rate of the block files (measured "
             "before and after the run, page cache dropped; the faster) / the bytes of the "
             "disk blocks' files every decode pass reads. *1 seq* is decode alone (a "
             "generate of 1 token subtracted); batches count every generated token of "
             "the whole job, prefill included. *every stage busy*: the slowest stage's "
             "step time (the run's own) sets the pace with a micro-batch per stage: S x "
             "one stage's rate when balanced. *same tokens*: every sequence's greedy "
             f"tokens are one roomy worker's; the stages pass activations in {WIRE_DTYPE} "
             "here (the default bf16 rounds them at each cut, which can flip a random "
             "model's near-tie).", ""]
    rows = []
    for m in r["models"]:
        ref = m.get("reference", {})
        same = ref.get("all_same") if ref.get("ran") else ref.get("why", "not run")
        peak = max((w["peak_rss"] or 0) for w in m["worker_rss"])
        rows.append([m["model"], m["workers"][0], f"{m['model_bytes'] / 2**30:.2f}",
                     m["one"]["tok_s"], f"{m['disk_bytes_per_token'] / 2**30:.2f}",
                     max(m["cold_read_GBps"], m["cold_read_GBps_after"]),
                     f"{m['of_disk_roofline']:.0%}",
                     m["predicted_s_per_token"], m["one"]["s_per_token"],
                     f"{peak / 2**20:.0f} / {m['worker_rss'][0]['budget_ram'] / 2**20:.0f}",
                     same])
    lines += _table(["model", "each worker", "model GiB", "1 seq tok/s", "disk GiB/token",
                     "cold read GB/s", "of disk roofline", "predicted s/token",
                     "measured s/token", "peak RSS / budget MiB", "same tokens"], rows)
    rows = []
    for m in r["models"]:
        for b, t in zip(m["batches"], m["throughput"]):
            rows.append([m["model"], b["sequences"], t["micro_batches"], b["tok_s"],
                         " + ".join(f"{v:.0f}" for v in b["stage_ms"]),
                         t["every_stage_busy_tok_s"], t["stages_one_at_a_time_tok_s"],
                         f"{t['of_every_stage_busy']:.0%}"])
        b = m.get("one_micro_batch")
        if b is None:
            continue
        rows.append([m["model"], b["sequences"], 1, b["tok_s"],
                     " + ".join(f"{v:.0f}" for v in b["stage_ms"]),
                     b["every_stage_busy_tok_s"], b["stages_one_at_a_time_tok_s"],
                     f"{b['of_every_stage_busy']:.0%}"])
    if rows:
        lines += ["Throughput mode (the planner's throughput objective): sequences together, "
                  "a micro-batch per stage (the default) or one in all.", ""]
        lines += _table(["model", "sequences", "micro-batches", "tok/s", "stage ms per step",
                         "every stage busy tok/s", "one stage at a time tok/s",
                         "of every stage busy"], rows)
    for m in r["models"]:
        lines.append(f"{m['model']}: per worker peak RSS (budget "
                     f"{m['worker_rss'][0]['budget_ram'] / 2**20:.0f} MiB; baseline of an idle "
                     "worker in brackets): " + ", ".join(
                         f"{(w['peak_rss'] or 0) / 2**20:.0f} MiB "
                         f"({(w['baseline_rss'] or 0) / 2**20:.0f})" for w in m["worker_rss"])
                     + "; stages " + ", ".join(
                         f"{s['blocks']} {s['tiers']} predicted {s['predicted_s']:.2f} s, "
                         f"measured {s['measured_s']:.2f} s ({s['prediction_error']:+.0%})"
                         for s in m["stages"])
                     + f"; load average {m['load_average'][0]:.1f} before, "
                       f"{m['load_average'][1]:.1f} after"
                     + (f"; vs llama.cpp memory-mapping the same weights in the same "
                        f"memory ({LLAMA_CPP_7B_MMAP_TOK_S} tok/s, measured earlier): "
                        f"{m['vs_llama_cpp_mmap']:.2f}x" if "vs_llama_cpp_mmap" in m else "")
                     + ".")
        lines.append("")
    return lines


def plot(r: dict, bars) -> None:
    """The suite's scale.png through report.plots' `bars`."""
    ms = r["models"]
    bars("scale", "models over their workers' RAM: one sequence's decode",
         [m["model"] for m in ms],
         {"decode": [m["one"]["tok_s"] for m in ms],
          "disk roofline": [m["disk_roofline_tok_s"] for m in ms],
          "predicted": [1 / m["predicted_s_per_token"] for m in ms]}, "tok/s")


def suite_scale(ctx: Context) -> dict:
    """`run` of the configured shapes (quick: the tiny one)."""
    cfg = ctx.cfg
    return run(tuple(cfg.scale_models), cfg.scale_tokens, tuple(cfg.scale_sequences),
               cfg.scale_layers, progress=not cfg.quick)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="llm-shard bench scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama-7b,pangu-13b",
                    help=f"comma-separated, of {','.join(SHAPES)}")
    ap.add_argument("--tokens", type=int, default=8, help="decode tokens per sequence")
    ap.add_argument("--sequences", default="8",
                    help="comma-separated sequence counts of the throughput runs ('': "
                         "none, one sequence only; each "
                         "sequence's KV cache takes 256 rows per block: 16 sequences of "
                         "LLaMA-7B need 4 GiB of the budgets)")
    ap.add_argument("--layers", type=int, default=None, help="fewer blocks (a quick run)")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the roomy worker that checks the tokens")
    ap.add_argument("--dir", type=Path, default=None,
                    help="where the stores are built (default: under $LLM_SHARD_HOME)")
    ap.add_argument("--json", default=None, help="write the figures as JSON (- for stdout)")
    a = ap.parse_args(argv)
    models = [x.strip() for x in a.models.split(",") if x.strip()]
    bad = sorted(set(models) - set(SHAPES))
    if bad:
        ap.error(f"unknown models {bad}: choose from {', '.join(SHAPES)}")
    try:
        sequences = tuple(int(x) for x in a.sequences.split(",") if x.strip())
    except ValueError:
        ap.error(f"--sequences {a.sequences!r}: expected counts like 8,16 (or '')")
    if a.tokens < 1 or min(sequences, default=1) < 1:
        ap.error("--tokens and --sequences must be >= 1")
    r = run(tuple(models), a.tokens, sequences, a.layers, not a.no_reference, a.dir)
    publish(r, report(r), a.json)
    return r


if __name__ == "__main__":
    main()
