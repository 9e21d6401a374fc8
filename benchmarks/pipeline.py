"""The pipeline's cost, with real Ray actors and ZeroMQ on this machine: decode of one
sequence unsplit and over 2 and 3 local workers (each with all the machine's threads: with
one sequence only one stage computes at a time, so the split costs only its hops), the
per-hop overhead, and concurrent sequences over 2 workers (each with half the threads, as
two machines would bring their own) with and without micro-batching. Also the suite's
`split` and `throughput`.

    llm-shard bench pipeline [--model NAME|PATH] [--tokens N] [--json PATH|-]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import time
from typing import TYPE_CHECKING

from llm_shard.benchmarks import publish
from llm_shard.benchmarks.turns import paired_speedup, take_turns

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
CONCURRENT = 16

if TYPE_CHECKING:
    from llm_shard.benchmarks.suite import Context


def _start_ray():
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address="local", include_dashboard=False, num_cpus=os.cpu_count())


def decode_seconds(llms: dict, tokens: int, runs: int = 3) -> dict[object, list[float]]:
    """Seconds per decode token of one sequence on each LLM of `llms`, one figure per
    round: a generate of 1 + tokens less one of 1 in the same round, so the prefill and
    the first token are left out. Every round runs each LLM's two generates, the order
    rotating (benchmarks/turns.py), so that LLMs compared ran in the same moments of a
    host that drifts. Where noise leaves a round's difference not positive (tiny counts),
    that round's whole long run per token: an upper bound."""
    ids = {k: _prompt_ids(llm) for k, llm in llms.items()}  # tokenized outside the timing
    calls = {(k, n): functools.partial(_greedy, llm, ids[k], n)
             for k, llm in llms.items() for n in (tokens + 1, 1)}
    seconds, _ = take_turns(calls, runs, warmup=1)
    out = {}
    for k in llms:
        long, short = seconds[k, tokens + 1], seconds[k, 1]
        out[k] = [(a - b) / tokens if a > b else a / (tokens + 1) for a, b in zip(long, short)]
    return out


class Chain:
    """A plan's stages in this process, called one after another, the hidden rows passed
    through the wire's dtype as the workers pass them: the split with no Ray, ZeroMQ or
    other process. Generates greedily through `generate` as an LLM does (decode_seconds
    times it as it times one). The stages of every Chain of one `chains` call share one
    copy of the weights."""

    def __init__(self, stages: list, tokenizer=None) -> None:
        self.stages, self.tokenizer = stages, tokenizer

    def generate(self, prompt_token_ids, params) -> None:
        import torch

        from llm_shard.cluster import wire
        from llm_shard.models.cache import Batch, SequenceCache

        for ids in prompt_token_ids:
            caches = [SequenceCache() for _ in self.stages]
            x = torch.tensor(ids)
            for _ in range(params.max_tokens):
                h = x
                for stage, cache in zip(self.stages, caches):
                    h = stage(h, Batch.of([len(x)], [cache]))
                    if stage.head is None:
                        h = wire.from_wire(wire.to_wire(h, wire.DEFAULT_ACTIVATION_DTYPE),
                                           torch.float32)
                x = h.argmax(-1)


def chains(model: str, plans: dict) -> dict:
    """A Chain per plan ([[start, end], ...] of blocks) of `model`, its stages sharing one
    copy of the weights."""
    from torch import nn

    from llm_shard.models.checkpoint.catalog import resolve
    from llm_shard.models.checkpoint.store import StoreError
    from llm_shard.models.runner import StageModel

    store = resolve(model)
    n = store.n_blocks
    whole = StageModel(store, 0, n)
    try:
        tokenizer = store.tokenizer()
    except StoreError:  # 16 fixed ids, as for an LLM on such a store (_prompt_ids)
        tokenizer = None
    out = {}
    for key, plan in plans.items():
        stages = []
        for start, end in plan:
            stage = StageModel(store, start, end, embed=False, head=False, load_blocks=False)
            stage.has_embed, stage.has_head = start == 0, end == n
            stage.embed = whole.embed if start == 0 else None
            stage.head = whole.head if end == n else None
            stage.blocks = nn.ModuleDict({str(i): whole.blocks[str(i)]
                                          for i in range(start, end)})
            stages.append(stage)
        out[key] = Chain(stages, tokenizer)
    return out


def decode_metrics(llm, tokens: int) -> dict:
    """The scheduler's metrics after a run of `tokens` decode steps, so that its moving
    averages of step times are decode's (weight 0.8**31 left on the prefill after 32)."""
    _greedy(llm, _prompt_ids(llm), tokens)
    return llm.metrics()


def _greedy(llm, ids: list[int], n: int) -> None:
    """One sequence, exactly `n` greedy tokens."""
    from llm_shard import SamplingParams

    llm.generate(prompt_token_ids=[ids],
                 params=SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))


def _prompt_ids(llm) -> list[int]:
    """PROMPT's tokens; a store without a tokenizer (random weights) gets 16 fixed ids."""
    if llm.tokenizer is None:
        return list(range(100, 116))
    return llm.tokenizer.encode(PROMPT)


def concurrent_rate(llm, tokens: int, requests: int = CONCURRENT, vary: bool = False,
                    runs: int = 1) -> float:
    """Generated tokens per second of `requests` sequences submitted together (median of
    `runs` after a warm-up). With `vary`, request i asks for between tokens/4 and tokens
    new tokens, so sequences finish at different steps and continuous batching matters."""
    from llm_shard import SamplingParams

    ids = _prompt_ids(llm)
    if vary:
        params = [SamplingParams(max_tokens=max(1, tokens * (1 + i % 4) // 4), temperature=0,
                                 ignore_eos=True) for i in range(requests)]
    else:
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    llm.generate(prompt_token_ids=[ids] * 2, params=SamplingParams(max_tokens=4))  # warm
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        outs = llm.generate(prompt_token_ids=[ids] * requests, params=params)
        rates.append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0))
    return statistics.median(rates)


def split(model: str, tokens: int, workers=(1, 2, 3), runs: int = 3) -> dict:
    """Decode of one sequence over each count of local workers (every worker gets all the
    machine's threads, and RAM for the whole model); ratio to unsplit and per-hop
    overhead. Where a step's time goes, from the scheduler's moving averages of the last
    steps: per stage its compute (`stage_ms`) and how long the worker held the step
    (`busy_ms`: compute, decoding, caches, sampling), and the wire's share of the round
    trip (`wire_ms`, all hops together). Then, with the Ray workers gone, each plan's
    stages chained in this process (`Chain`): what the cut costs without the transport
    (`in_process_ratio_{n}_workers`), from a third of the rounds."""
    _start_ray()
    cpus = os.cpu_count() or 1
    ram = _store_bytes(model) + (1 << 30)
    out: dict = {}
    with contextlib.ExitStack() as stack:  # every count's LLM up at once: interleaved runs
        llms = {n: stack.enter_context(_llm(model, workers=[f"ram={ram},threads={cpus}"] * n,
                                            use_all_workers=True, cache_tokens=1024))
                for n in workers}  # cache_tokens: room for one sequence, on any model
        per_token = decode_seconds(llms, tokens, runs)
        for n, llm in llms.items():
            m = decode_metrics(llm, tokens)
            out[f"decode_tok_s_{n}_workers"] = 1 / statistics.median(per_token[n])
            out[f"stage_ms_{n}_workers"] = [s * 1e3 for s in m["stage_seconds"]]
            out[f"busy_ms_{n}_workers"] = [s * 1e3 for s in m["busy_seconds"]]
            out[f"wire_ms_{n}_workers"] = m["wire_seconds"] * 1e3
            out[f"step_ms_{n}_workers"] = m["step_seconds"] * 1e3
            out[f"plan_{n}_workers"] = [[s.start, s.end] for s in llm.plan.stages]
    inproc = decode_seconds(chains(model, {n: out[f"plan_{n}_workers"] for n in workers}),
                            tokens, max(1, runs // 3))
    for n in workers:
        out[f"in_process_tok_s_{n}_workers"] = 1 / statistics.median(inproc[n])
        if n > 1 and 1 in inproc:
            out[f"in_process_ratio_{n}_workers"] = paired_speedup(inproc[n], inproc[1])
    if 1 in per_token:  # each ratio and hop cost from rounds' pairs (the same moments)
        for n in workers:
            if n > 1:
                out[f"ratio_{n}_workers"] = paired_speedup(per_token[n], per_token[1])
                out[f"hop_ms_{n}_workers"] = statistics.median(
                    (a - b) * 1e3 / (n - 1) for a, b in zip(per_token[n], per_token[1]))
    return out


def throughput(model: str, tokens: int, requests: int = CONCURRENT, micro_batches=(1, 2),
               runs: int = 1, vary: bool = False, objective: str = "latency",
               stages: int = 2) -> dict:
    """`requests` sequences at once over `stages` workers (each with an equal share of the
    machine's threads, as separate machines would bring their own), for each count of
    micro-batches in flight; the gain of the largest count over 1."""
    _start_ray()
    cpus = os.cpu_count() or 1
    share = max(1, cpus // stages)
    prompt = len(PROMPT) // 2  # more than its tokens
    cache = max(4096, requests * (prompt + tokens + 8))
    out: dict = {}
    for groups in micro_batches:
        with _llm(model, workers=[f"ram=2GiB,threads={share}"] * stages,
                  use_all_workers=True, micro_batches=groups, objective=objective,
                  cache_tokens=cache) as llm:
            out[f"concurrent_tok_s_{groups}_micro_batches"] = concurrent_rate(
                llm, tokens, requests, vary, runs)
    if 1 in micro_batches and len(micro_batches) > 1:
        out["micro_batching_gain"] = (
            out[f"concurrent_tok_s_{max(micro_batches)}_micro_batches"]
            / out["concurrent_tok_s_1_micro_batches"])
    return out


def _store_bytes(model: str) -> int:
    """Bytes of a store's weight files."""
    from llm_shard.models.checkpoint.catalog import resolve

    return resolve(model).nbytes


def _llm(*args, **kwargs):  # imported late: Ray and ZeroMQ only when run
    from llm_shard import LLM

    return LLM(*args, **kwargs)


def run(model: str, tokens: int, runs: int = 3) -> dict:
    _start_ray()
    cpus = os.cpu_count() or 1
    out: dict = {"model": model, "cpus": cpus, "tokens": tokens}
    out.update(split(model, tokens, (1, 2, 3), runs))
    out.update(throughput(model, tokens, CONCURRENT, (1, 2)))
    return out


def report(r: dict) -> str:
    lines = [f"pipeline benchmark: {r['model']}, {r['cpus']} CPUs, {r['tokens']} tokens/run"]
    for n in (1, 2, 3):
        extra = "" if n == 1 else (f"  {r[f'ratio_{n}_workers']:.3f}x unsplit (goal >= 0.95), "
                                   f"{r[f'hop_ms_{n}_workers']:.2f} ms per extra hop; the "
                                   f"same cut in one process "
                                   f"{r[f'in_process_ratio_{n}_workers']:.3f}x")
        lines.append(f"  decode, {n} worker(s) {r[f'plan_{n}_workers']}: "
                     f"{r[f'decode_tok_s_{n}_workers']:.1f} tok/s{extra}")
        stages = ", ".join(f"{ms:.1f}" for ms in r[f"stage_ms_{n}_workers"])
        busy = ", ".join(f"{ms:.1f}" for ms in r[f"busy_ms_{n}_workers"])
        lines.append(f"    stage compute ms [{stages}], held ms [{busy}], wire "
                     f"{r[f'wire_ms_{n}_workers']:.2f} ms, round trip "
                     f"{r[f'step_ms_{n}_workers']:.1f} ms")
    lines.append(f"  {CONCURRENT} concurrent sequences over 2 stages: "
                 f"{r['concurrent_tok_s_1_micro_batches']:.1f} tok/s with 1 micro-batch, "
                 f"{r['concurrent_tok_s_2_micro_batches']:.1f} tok/s with 2 "
                 f"({r['micro_batching_gain']:.2f}x)")
    return "\n".join(lines)


def suite_split(ctx: Context) -> dict:
    """`split` on SmolLM2 (a short step, where a hop's fixed cost shows most) and on the
    decode suite's random PanGu-α (a model of the size the product is for), each held to
    its bandwidth roofline."""
    from llm_shard.benchmarks.decode import pangu_label, pangu_store, step_bytes
    from llm_shard.models.runner import StageModel

    cfg, bw = ctx.cfg, ctx.machine["memory_GBps"]
    pangu = pangu_store(cfg, ctx.pangu_dir)
    models = []
    for label, store in (("SmolLM2-135M int8", ctx.stores["int8"]),
                         (pangu_label(cfg, pangu), pangu)):
        nbytes = step_bytes(StageModel(store, 0, store.n_blocks))
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


def suite_throughput(ctx: Context) -> dict:
    """`throughput` of requests of mixed lengths (continuous batching) on SmolLM2 over 2
    workers, micro-batches off (1 in flight) and on (2)."""
    cfg = ctx.cfg
    r = throughput(str(ctx.stores["int8"].path), cfg.throughput_tokens, cfg.requests, (1, 2),
                   runs=max(1, cfg.runs), vary=True, objective="throughput")
    off, on = r["concurrent_tok_s_1_micro_batches"], r["concurrent_tok_s_2_micro_batches"]
    return {"model": "SmolLM2-135M int8", "requests": cfg.requests, "workers": 2,
            "max_tokens": f"{max(1, cfg.throughput_tokens // 4)} to {cfg.throughput_tokens}, "
                          "mixed, so sequences leave and the batch shrinks (continuous "
                          "batching)",
            "micro_batches_off_tok_s": off, "micro_batches_on_tok_s": on,
            "micro_batching_gain": on / off}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="llm-shard bench pipeline",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--json", help="also write the figures as JSON to PATH (- for stdout)")
    args = ap.parse_args(argv)
    r = run(args.model, args.tokens)
    publish(r, report(r), args.json)


if __name__ == "__main__":
    main()
