"""A store's `ModelCost`: what the planner counts for each part, asked of the store.

Sizes come from the Store's own API (`part_bytes`, `tensors`' headers), so they follow
its format: a part takes its file's bytes in RAM, and a float head in an int8 store its
int8 screen too. A tied LM head (the head is the embedding's matrix) is counted once
where one stage holds both, when the worker holds it once (`shared_bytes`). The head's
compute cost
is the bytes it reads per token: an int8 store reads every head matrix as int8 (a float
head through its int8 screen, models/quant/screened.py), so a float head costs a quarter
of its file. KV-cache bytes per token come from the model config (`cache_bytes_per_token`,
in whatever dtype the cache is kept), plus a recurrent model's state per CACHE_CHUNK.
"""

from __future__ import annotations

from llm_shard.cluster.resources import rss_bytes
from llm_shard.cluster.types import CACHE_CHUNK, block_cache_budget
from llm_shard.models.base import Part
from llm_shard.models.checkpoint.store import Store

from .planner import ModelCost

__all__ = ["cache_bytes_per_token", "head_read_bytes", "head_screen_bytes", "measure_runtime",
           "model_cost", "shared_bytes"]


def shared_bytes(store: Store) -> int:
    """Bytes a tied head shares with the embedding where one worker holds both. A version 2
    store keeps the table once and one worker holds one copy (`Store.tied_bytes`); a
    version 1 store writes a tied matrix into both files and a worker maps both, each
    part's pages resident as it reads them: nothing is shared."""
    if store.manifest.get("version", 1) >= 2:
        return store.tied_bytes()
    return 0


def head_screen_bytes(store: Store) -> int:
    """Bytes of the int8 screen an int8 store's float head is read through (an int8 copy
    and a float32 scale per row of each float matrix, models/quant/screened.py): RAM the
    head holds beside its file's pages. 0 for a head stored int8, or any other store."""
    if store.dtype != "int8":
        return 0
    return sum(t.numel() + 4 * t.shape[0] for t in store.tensors(Part("head")).values()
               if t.dim() == 2 and t.is_floating_point())  # memory-mapped: headers only


def head_read_bytes(store: Store) -> int:
    """Bytes the head reads per token: its file's, but a float head in an int8 store
    through its int8 screen (`head_screen_bytes`) instead of its float matrix."""
    size, screen = store.part_bytes(Part("head")), head_screen_bytes(store)
    if not screen:
        return size
    matrices = sum(t.numel() * t.element_size() for t in store.tensors(Part("head")).values()
                   if t.dim() == 2 and t.is_floating_point())
    return size - matrices + screen


def cache_bytes_per_token(store: Store) -> int:
    """KV-cache bytes per token per block (a recurrent model's state spread over the
    CACHE_CHUNK tokens each sequence's state stands for), rounded up."""
    return -(-block_cache_budget(store.config, CACHE_CHUNK) // CACHE_CHUNK)


def measure_runtime(store: Store | None = None) -> int:
    """This process's resident set once it imported what a worker computes with (torch,
    ZeroMQ, Ray, the decode kernels and, given a store, its model code built on the meta
    device): the runtime a worker's RAM budget pays before any weight, less Ray's core
    worker, which only a Ray worker process has (each measures its own: worker/actor.py)."""
    import ray  # noqa: F401
    import zmq  # noqa: F401

    import llm_shard.models.kernels.decode  # noqa: F401
    from llm_shard.models.base import on_meta

    if store is not None:
        with on_meta():
            store.arch.build(store.config, Part("embed"))
    return rss_bytes()


def model_cost(store: Store, cache_tokens: int | None) -> ModelCost:
    """The planner's view of `store`, reserving `cache_tokens` of KV cache per block
    (None: as many as the memory left holds, planner.MIN_CACHE_TOKENS while placing)."""
    n = store.n_blocks
    return ModelCost(tuple(store.part_bytes(Part("block", i)) for i in range(n)),
                     store.part_bytes(Part("embed")),
                     # a screened head holds its screen beside the matrix it reads rows of
                     store.part_bytes(Part("head")) + head_screen_bytes(store),
                     cache_bytes_per_token(store), cache_tokens, shared_bytes(store),
                     head_read_bytes(store))
