"""A store's `ModelCost`: what the planner counts for each part, asked of the store.

Sizes come from the Store's own API (`part_bytes`, `tensors`' headers), so they follow
its format: a part takes its file's bytes in RAM. A tied LM head (the head is the
embedding's matrix) is counted once where one stage holds both. The head's compute cost
is the bytes it reads per token: an int8 store reads every head matrix as int8 (a float
head through its int8 screen, models/quant/screened.py), so a float head costs a quarter
of its file. KV-cache bytes per token come from the model config (`cache_bytes_per_token`,
in whatever dtype the cache is kept), plus a recurrent model's state per CACHE_CHUNK.
"""

from __future__ import annotations

from llm_shard.cluster.types import CACHE_CHUNK, block_cache_budget
from llm_shard.models.base import Part
from llm_shard.models.checkpoint.store import Store

from .planner import ModelCost

__all__ = ["cache_bytes_per_token", "head_read_bytes", "model_cost", "tied_head"]


def tied_head(store: Store) -> bool:
    """Whether the store's LM head is the embedding's matrix: the config says so
    (`tie_word_embeddings`), or, for an architecture without that switch, its checkpoint
    layout reads the head from an embedding key (PanGu-α)."""
    cfg = store.config
    if hasattr(cfg, "tie_word_embeddings"):
        return bool(cfg.tie_word_embeddings)
    from llm_shard.models.checkpoint.convert import part_rules, tied_keys

    layouts = store.arch.layouts
    name = store.manifest.get("source", {}).get("layout")
    layout = layouts[name if name in layouts else next(iter(layouts))](cfg)
    return bool(tied_keys(layout) & {r.source for r in part_rules(layout, Part("head")).values()})


def head_read_bytes(store: Store) -> int:
    """Bytes the head reads per token: its file's, but in an int8 store each 2-D weight
    as int8 plus a float32 scale per row (the screen of a float head; an int8 head as
    stored)."""
    size = store.part_bytes(Part("head"))
    if store.dtype != "int8":
        return size
    read = 0
    for t in store.tensors(Part("head")).values():  # memory-mapped: headers only
        if t.dim() == 2 and t.is_floating_point():
            read += t.numel() + 4 * t.shape[0]
        else:
            read += t.numel() * t.element_size()
    return min(size, read)


def cache_bytes_per_token(store: Store) -> int:
    """KV-cache bytes per token per block (a recurrent model's state spread over the
    CACHE_CHUNK tokens each sequence's state stands for), rounded up."""
    return -(-block_cache_budget(store.config, CACHE_CHUNK) // CACHE_CHUNK)


def model_cost(store: Store, cache_tokens: int | None) -> ModelCost:
    """The planner's view of `store`, reserving `cache_tokens` of KV cache per block
    (None: as many as the memory left holds, planner.MIN_CACHE_TOKENS while placing)."""
    return ModelCost.from_manifest(store.manifest, cache_tokens, cache_bytes_per_token(store),
                                   tied=tied_head(store), head_read_bytes=head_read_bytes(store))
