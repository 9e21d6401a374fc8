"""`EngineConfig`: every setting of an `LLM` engine other than its model, in one value.

    LLM("smollm2-135m", workers=["ram=1GiB"], cache_tokens=1024)          # keywords, or
    LLM("smollm2-135m", config=EngineConfig(workers=["ram=1GiB"], cache_tokens=1024))

The CLI's `serve` and `chat` flags are these fields (cli.py `engine_options`). Light: no
torch, Ray or ZeroMQ, so `llm-shard --help` can read the defaults (the HTTP server's own
too: MAX_PROMPTS_PER_REQUEST).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .planner import DEFAULT_HOP_SECONDS

# The HTTP server's cap on prompts in one completions request (serve
# --max-prompts-per-request): beyond it, a 400.
MAX_PROMPTS_PER_REQUEST = 256


@dataclass(frozen=True)
class EngineConfig:
    """`workers`: N (N workers sharing this machine's memory evenly), a list of SPEC
    strings or Capacity objects, or None (every Ray node's advertised budget; see
    llm.worker_capacities). `address`: the Ray cluster (None: RAY_ADDRESS, `ray start`'s,
    else a private one). `dtype`: the store's weights; `compute_dtype`/`wire_dtype`: what stages
    compute in and send between them. `objective`: the planner's ("latency" or
    "throughput"). `cache_tokens`: KV-cache tokens every stage keeps for all sequences
    together (None: as many as the RAM its budget leaves after the weights holds).
    `micro_batches`: groups in flight (None: one per stage). `use_all_workers`:
    give every worker a stage even where fewer would be faster. `hop_seconds`: the
    planner's cost of one stage-to-stage hop. `step_timeout`: seconds a step may take
    before the workers are probed; `control_timeout`: seconds a probed worker has to
    answer before it counts as dead. `host`: the address workers send results to (None:
    this Ray node's). `kv_dtype`: what every stage's KV cache stores K and V in ("fp16",
    "fp32" or "int8" with a scale per head and token; attention computes in compute_dtype).
    `encrypt`: CURVE-encrypt and authenticate every ZeroMQ link with
    keys made here and handed to the workers (cluster/links.py); False only on a trusted
    single machine. `max_restarts`: how many times a lost worker is replaced by a fresh
    one (same node, same budget) within 10 minutes; -1 without limit, 0 never (the
    re-plan then runs over the workers left). `prefix_cache`: keep finished sequences'
    caches for later prompts that start with the same tokens (a chat's next turn), within
    the cache budget, least recently used freed first (coordinator/prefix.py)."""

    workers: Any = None
    address: str | None = None
    dtype: str = "int8"
    compute_dtype: str = "fp32"
    wire_dtype: str = "bf16"
    objective: str = "latency"
    cache_tokens: int | None = None
    kv_dtype: str = "fp16"
    micro_batches: int | None = None
    use_all_workers: bool = False
    hop_seconds: float = DEFAULT_HOP_SECONDS
    step_timeout: float = 120.0
    host: str | None = None
    encrypt: bool = True
    max_restarts: int = 3
    control_timeout: float = 30.0
    prefix_cache: bool = True

    def replace(self, **settings) -> EngineConfig:
        """A copy with `settings` changed; an unknown name is a TypeError naming it."""
        unknown = sorted(set(settings) - set(self.names()))
        if unknown:
            raise TypeError(f"unknown engine setting(s) {unknown}; EngineConfig has "
                            f"{list(self.names())}")
        return dataclasses.replace(self, **settings)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field `name` (the CLI shows it in --help)."""
        return next(f.default for f in dataclasses.fields(cls) if f.name == name)


__all__ = ["EngineConfig", "MAX_PROMPTS_PER_REQUEST"]
