"""llm-shard: big language models split across a home lab of cheap machines.

    from llm_shard import LLM, Client, SamplingParams

Names are imported on first use, so `import llm_shard` stays light (no torch, no Ray).
"""

from __future__ import annotations

import importlib
import os as _os

__version__ = "0.1.0"

if "RAY_RAYLET_PID" in _os.environ:  # a Ray worker process (never set in a driver)
    from llm_shard.cluster.ray_glue import worker_process_env

    worker_process_env()  # before torch loads: GOMP_SPINCOUNT

_EXPORTS = {
    "LLM": "llm_shard.coordinator.llm",
    "EngineConfig": "llm_shard.coordinator.config",
    "RequestError": "llm_shard.coordinator.scheduler",
    "SamplingParams": "llm_shard.cluster.types",
    "Completion": "llm_shard.cluster.types",
    "Client": "llm_shard.coordinator.client",
    "AsyncClient": "llm_shard.coordinator.client",
    "wrap": "llm_shard.worker.wrap",
    "BlockList": "llm_shard.worker.wrap",
    "quantize": "llm_shard.worker.wrap",
    "WrapError": "llm_shard.worker.wrap",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llm_shard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
