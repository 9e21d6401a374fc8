"""Benchmarks that print figures and ratios to physical limits (`llm-shard bench ...`)."""

from __future__ import annotations

import json


def publish(result: dict, text: str, dest: str | None) -> None:
    """Print a benchmark's report `text`; with `dest`, its figures as JSON there too
    ("-": standard output)."""
    print(text)
    if dest == "-":
        print(json.dumps(result, indent=1))
    elif dest:
        with open(dest, "w") as f:
            json.dump(result, f, indent=1)
