"""Time to first token of a chat's turns, with the prefix cache and without (issue #37).

A chat client resends the whole history every turn. Without the prefix cache each turn
prefills all of it, so the time to its first token grows with the chat; with it, a turn
starts from the caches of the turn before and prefills only the new tokens. Each round
runs one 10-turn chat (the chat template, greedy replies of --tokens tokens) on two
engines alive side by side over 2 local Ray workers, one with the cache and one
without, the order alternating (benchmarks/turns.py); each round's chat opens with its own
question, so a round starts from no turn of another (the chat template's system prompt
is shared). TTFT: from submit to the first text of the reply. Target: the 10th turn's
TTFT <= 1.2x the first's, with the cache. Both engines must give the same replies.

    llm-shard bench prefix [--model NAME|PATH] [--turns N] [--tokens N] [--rounds N]
                           [--quick] [--json PATH|-]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from llm_shard.benchmarks import publish
from llm_shard.benchmarks.pipeline import _llm, _start_ray

OPENERS = ["Tell me about the Moon.", "What do bees do all day?",
           "How does a bicycle stay upright?", "Why is the sea salty?",
           "What is a good name for a cat?", "How are clouds made?"]
FOLLOW_UPS = ["Tell me more.", "Why is that?", "Can you give an example?",
              "What else should I know?", "Say it more simply.", "Is that always true?",
              "What happened next?", "Who found that out?", "How do we know?"]
RESULTS = Path(__file__).parent / "results" / "prefix.json"
TARGET = 1.2


def chat_ttft(llm, opener: str, turns: int, tokens: int) -> tuple[list[float], list, list]:
    """One chat of `turns` turns on `llm`, each resending the history: the seconds from
    submit to each reply's first text (to its end where it has none), each reply's token
    ids, and each prompt's length in tokens."""
    from llm_shard.cluster.types import SamplingParams

    tok, params = llm.tokenizer, SamplingParams(max_tokens=tokens, temperature=0)
    history, ttft, replies, lengths = [], [], [], []
    for k in range(turns):
        history.append({"role": "user",
                        "content": opener if k == 0 else FOLLOW_UPS[(k - 1) % len(FOLLOW_UPS)]})
        ids = tok.encode(tok.render_chat(history))
        lengths.append(len(ids))
        stamps: list[float] = []
        t0 = time.perf_counter()
        # on_text runs on the scheduler's thread, before the future is done
        done = llm.submit(ids, params, on_text=lambda _piece, s=stamps: s.append(
            time.perf_counter())).result(timeout=3600)
        ttft.append((stamps[0] if stamps else time.perf_counter()) - t0)
        replies.append(list(done.token_ids))
        history.append({"role": "assistant", "content": done.text})
    return ttft, replies, lengths


def run(model: str = "smollm2-135m", turns: int = 10, tokens: int = 24, rounds: int = 3,
        cache_tokens: int = 4096) -> dict:
    """`rounds` chats of `turns` turns on each engine, taking turns; per turn, the median
    TTFT over rounds, and the ratios the target reads."""
    import os

    _start_ray()
    share = max(1, (os.cpu_count() or 1) // 2)
    engines, seconds, hits, reused, lengths = {}, {}, {}, {}, []
    same = True
    try:
        for cached in (True, False):
            engines[cached] = _llm(model, workers=[f"ram=2GiB,threads={share}"] * 2,
                                   use_all_workers=True, cache_tokens=cache_tokens,
                                   prefix_cache=cached)
        for cached in engines:  # warm-up: one short chat each, untimed
            chat_ttft(engines[cached], "Hello!", 2, 4)
        for cached, llm in engines.items():
            m = llm.metrics()
            hits[cached], reused[cached] = m["prefix_hits_total"], m["prefix_tokens_reused_total"]
        for r in range(rounds):
            opener = OPENERS[r % len(OPENERS)]
            got = {}
            for cached in ((True, False) if r % 2 == 0 else (False, True)):
                got[cached] = chat_ttft(engines[cached], opener, turns, tokens)
                seconds.setdefault(cached, []).append(got[cached][0])
            same = same and got[True][1] == got[False][1]
            lengths = got[True][2]
        for cached, llm in engines.items():
            m = llm.metrics()
            hits[cached] = m["prefix_hits_total"] - hits[cached]
            reused[cached] = m["prefix_tokens_reused_total"] - reused[cached]
    finally:
        for llm in engines.values():
            llm.shutdown()
    per_turn = {c: [statistics.median(s[k] for s in seconds[c]) for k in range(turns)]
                for c in seconds}
    ratio = {c: per_turn[c][-1] / per_turn[c][0] for c in per_turn}
    return {"model": model, "turns": turns, "reply_tokens": tokens, "rounds": rounds,
            "workers": 2, "cpus": os.cpu_count(), "cpu": _cpu(),
            "prompt_tokens_last_round": lengths, "ttft_s_with_cache": per_turn[True],
            "ttft_s_without_cache": per_turn[False],
            "last_over_first_with_cache": ratio[True],
            "last_over_first_without_cache": ratio[False],
            "last_turn_speedup": per_turn[False][-1] / per_turn[True][-1],
            # a first turn with the cache may reuse the system prompt of an earlier chat
            "last_with_over_first_without": per_turn[True][-1] / per_turn[False][0],
            "target_last_over_first": TARGET, "target_met": ratio[True] <= TARGET,
            "prefix_hits": hits[True], "prefix_tokens_reused": reused[True],
            "prefix_hits_without_cache": hits[False], "same_replies": same,
            "ttft_s_rounds_with_cache": seconds[True],
            "ttft_s_rounds_without_cache": seconds[False]}


def _cpu() -> str:
    from llm_shard.benchmarks.kernels import cpu_and_kernel, cpu_line

    return cpu_line(cpu_and_kernel())


def report(r: dict) -> str:
    lines = [f"prefix cache: {r['turns']}-turn chats on {r['model']} over {r['workers']} "
             f"local workers, replies of {r['reply_tokens']} tokens, median of "
             f"{r['rounds']} round(s); {r['cpu']}",
             "  turn  prompt tokens  TTFT with cache  TTFT without"]
    for k, (n, a, b) in enumerate(zip(r["prompt_tokens_last_round"], r["ttft_s_with_cache"],
                                      r["ttft_s_without_cache"]), 1):
        lines.append(f"  {k:>4}  {n:>13}  {a * 1e3:>12.0f} ms  {b * 1e3:>10.0f} ms")
    met = "met" if r["target_met"] else "NOT met"
    lines += [f"  turn {r['turns']} / turn 1: {r['last_over_first_with_cache']:.2f}x with the "
              f"cache (target <= {r['target_last_over_first']}: {met}), "
              f"{r['last_over_first_without_cache']:.2f}x without; turn {r['turns']} "
              f"{r['last_turn_speedup']:.1f}x faster with it; "
              f"{r['last_with_over_first_without']:.2f}x the first turn without the cache "
              "(no system prompt cached)",
              f"  prefix hits {r['prefix_hits']}, prompt tokens reused "
              f"{r['prefix_tokens_reused']}; same replies with and without: "
              f"{r['same_replies']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="llm-shard bench prefix",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=24, help="tokens of each reply")
    ap.add_argument("--rounds", type=int, default=3, help="chats on each engine")
    ap.add_argument("--quick", action="store_true", help="3 turns of 4 tokens, 1 round: "
                    "checks the harness works; its figures mean little")
    ap.add_argument("--json", default=str(RESULTS),
                    help=f"write the figures as JSON to PATH (- for stdout; default {RESULTS})")
    a = ap.parse_args(argv)
    if a.quick:
        a.turns, a.tokens, a.rounds = 3, 4, 1
    r = run(a.model, a.turns, a.tokens, a.rounds)
    if not r["same_replies"]:
        print("WARNING: the replies differ with and without the prefix cache")
    publish(r, report(r), a.json)
    return r


if __name__ == "__main__":
    main()
