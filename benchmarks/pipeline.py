"""The pipeline's cost: decode speed unsplit vs split over 2 and 3 local workers, the
per-hop overhead, and 16 concurrent sequences over 2 stages with and without
micro-batching. Real Ray actors and ZeroMQ on this machine, SmolLM2-135M int8 by default.

Latency runs give every worker all the machine's threads (with one sequence only one stage
computes at a time, so the split costs only its hops); the throughput runs give each of
the 2 workers half, as two machines would each bring their own cores.

    python -m llm_shard.benchmarks.pipeline [--model NAME|PATH] [--tokens N] [--json PATH|-]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
CONCURRENT = 16


def _start_ray():
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address="local", include_dashboard=False, num_cpus=os.cpu_count())


def decode_rate(llm, tokens: int, runs: int = 3) -> float:
    """Tokens per second of one sequence's decode: (time of 1 + tokens) - (time of 1),
    so the prefill and the first token are left out. Median of `runs`."""
    from llm_shard import SamplingParams

    ids = llm.tokenizer.encode(PROMPT)

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        llm.generate(prompt_token_ids=[ids],
                     params=SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        return time.perf_counter() - t0

    timed(4)  # warm up
    return statistics.median(tokens / (timed(tokens + 1) - timed(1)) for _ in range(runs))


def concurrent_rate(llm, tokens: int) -> float:
    """Generated tokens per second of CONCURRENT sequences submitted together."""
    from llm_shard import SamplingParams

    ids = llm.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    llm.generate(prompt_token_ids=[ids] * 2, params=SamplingParams(max_tokens=4))  # warm
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=[ids] * CONCURRENT, params=params)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0)


def run(model: str, tokens: int) -> dict:
    from llm_shard import LLM

    _start_ray()
    cpus = os.cpu_count() or 1
    out: dict = {"model": model, "cpus": cpus, "tokens": tokens}
    per_token = {}
    for n in (1, 2, 3):
        workers = [f"ram=2GiB,threads={cpus}"] * n
        with LLM(model, workers=workers, use_all_workers=True) as llm:
            rate = decode_rate(llm, tokens)
            per_token[n] = 1 / rate
            m = llm.metrics()
            out[f"decode_tok_s_{n}_workers"] = rate
            out[f"stage_ms_{n}_workers"] = [s * 1e3 for s in m["stage_seconds"]]
            out[f"step_ms_{n}_workers"] = m["step_seconds"] * 1e3
            out[f"plan_{n}_workers"] = [[s.start, s.end] for s in llm.plan.stages]
    for n in (2, 3):
        out[f"ratio_{n}_workers"] = out[f"decode_tok_s_{n}_workers"] / out["decode_tok_s_1_workers"]
        out[f"hop_ms_{n}_workers"] = (per_token[n] - per_token[1]) * 1e3 / (n - 1)
    half = max(1, cpus // 2)
    for groups in (1, 2):
        with LLM(model, workers=[f"ram=2GiB,threads={half}"] * 2, use_all_workers=True,
                 micro_batches=groups) as llm:
            out[f"concurrent_tok_s_{groups}_micro_batches"] = concurrent_rate(llm, tokens)
    out["micro_batching_gain"] = (out["concurrent_tok_s_2_micro_batches"]
                                  / out["concurrent_tok_s_1_micro_batches"])
    return out


def report(r: dict) -> str:
    lines = [f"pipeline benchmark: {r['model']}, {r['cpus']} CPUs, {r['tokens']} tokens/run"]
    for n in (1, 2, 3):
        extra = "" if n == 1 else (f"  {r[f'ratio_{n}_workers']:.3f}x unsplit (goal >= 0.95), "
                                   f"{r[f'hop_ms_{n}_workers']:.2f} ms per extra hop")
        lines.append(f"  decode, {n} worker(s) {r[f'plan_{n}_workers']}: "
                     f"{r[f'decode_tok_s_{n}_workers']:.1f} tok/s{extra}")
        stages = ", ".join(f"{ms:.1f}" for ms in r[f"stage_ms_{n}_workers"])
        lines.append(f"    stage compute ms [{stages}], micro-batch round trip "
                     f"{r[f'step_ms_{n}_workers']:.1f} ms")
    lines.append(f"  {CONCURRENT} concurrent sequences over 2 stages: "
                 f"{r['concurrent_tok_s_1_micro_batches']:.1f} tok/s with 1 micro-batch, "
                 f"{r['concurrent_tok_s_2_micro_batches']:.1f} tok/s with 2 "
                 f"({r['micro_batching_gain']:.2f}x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--json", help="also write the figures as JSON to PATH (- for stdout)")
    args = ap.parse_args(argv)
    r = run(args.model, args.tokens)
    print(report(r))
    if args.json:
        text = json.dumps(r, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)


if __name__ == "__main__":
    main()
