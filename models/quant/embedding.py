"""A token embedding read by rows at its stored size: `RowEmbedding`, and `swap_tables`,
which puts it in a part in place of an nn.Embedding.

A store keeps the token table as int8 rows with a float32 scale per row (int8 stores:
the same form as an Int8Linear's weight, so a tied LM head reads the very same bytes),
or in the checkpoint's float dtype (fp16, bf16 or fp32 stores). Looking up a token reads
its row alone and converts it to the compute dtype: from a memory map, a table that is
never read in whole costs the rows its tokens touch, not its size.
"""

from __future__ import annotations

import torch
from torch import nn


class RowEmbedding(nn.Module):
    """out[i] = weight[ids[i]] * scales[ids[i]] (int8 rows) or weight[ids[i]] (float rows),
    in `dtype`. `weight` and `scales` keep their stored dtypes through module.to()."""

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 stored: torch.dtype = torch.int8, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if stored not in (torch.int8, torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"an embedding table is stored as int8, fp16, bf16 or fp32, "
                             f"not {stored}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.dtype = dtype
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim,
                                                   dtype=stored, device=device))
        self.register_buffer("scales", torch.ones(num_embeddings, device=device)
                             if stored == torch.int8 else None)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight.index_select(0, ids.reshape(-1)).to(self.dtype)
        if self.scales is not None:
            rows = rows * self.scales.index_select(0, ids.reshape(-1)).to(self.dtype)[:, None]
        return rows.reshape(*ids.shape, self.embedding_dim)

    def share(self, weight: torch.Tensor, scales: torch.Tensor | None) -> bool:
        """Read rows from `weight` (and `scales`) from now on, where they hold what this
        table holds in the same dtypes and shapes (a tied head's layer); False if not."""
        same = (weight.dtype == self.weight.dtype and weight.shape == self.weight.shape
                and weight.device == self.weight.device
                and (scales is None) == (self.scales is None)
                and (scales is None or (scales.dtype == self.scales.dtype
                                        and scales.shape == self.scales.shape)))
        if same:
            self._buffers["weight"], self._buffers["scales"] = weight, scales
        return same

    def _apply(self, fn, recurse: bool = True):
        before = {n: t for n, t in self._buffers.items() if t is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():  # module.to(dtype) moves, never casts, the table
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, stored={self.weight.dtype}, "
                f"dtype={self.dtype}")


def swap_tables(module: nn.Module, stored: dict[str, torch.dtype],
                dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace each nn.Embedding named in `stored` ({name: stored dtype}) by an empty
    RowEmbedding of that stored dtype, computing in `dtype`; returns the names replaced.
    Every name must be an nn.Embedding of `module`."""
    for name, kind in stored.items():
        old = module.get_submodule(name)
        if not isinstance(old, nn.Embedding):
            raise TypeError(f"{name} is a {type(old).__name__}, not an nn.Embedding")
        device = None if old.weight.device.type == "meta" else old.weight.device
        new = RowEmbedding(old.num_embeddings, old.embedding_dim, kind, dtype, device)
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, new)
    return list(stored)
