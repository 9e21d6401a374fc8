"""Timing that compares: the things compared take turns, and ratios pair the same rounds.

A shared host's speed drifts within minutes, so runs of one engine back to back and then
the next compare different moments. Instead every round calls each engine once, the
order rotating, and a ratio is the median of the rounds' ratios.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable


def take_turns(engines: dict[Hashable, Callable[[], object]], runs: int, warmup: int = 1
               ) -> tuple[dict[Hashable, list[float]], dict[Hashable, object]]:
    """Each engine's wall seconds per round, and what its last call returned: `warmup`
    untimed rounds, then `runs` rounds of one call each, the order rotating every round."""
    names, seconds, results = list(engines), {k: [] for k in engines}, {}
    for r in range(warmup + max(1, runs)):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            results[name] = engines[name]()
            if r >= warmup:
                seconds[name].append(time.perf_counter() - t0)
    return seconds, results


def paired_speedup(ours: list[float], theirs: list[float]) -> float:
    """How many times faster ours ran: the median of the rounds' ratios of seconds, so
    that each ratio compares two runs of the same moments."""
    return statistics.median(b / a for a, b in zip(ours, theirs, strict=True))
