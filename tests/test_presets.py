"""The released sizes build with the right parameter counts (on the meta device: no memory)."""

from __future__ import annotations

import pytest
import torch

from llm_shard.models import get_arch
from llm_shard.models.archs.llama import LlamaConfig
from llm_shard.models.archs.pangu import PRESETS
from llm_shard.models.base import parts_of


def n_params(arch_name, cfg, tied: bool) -> int:
    arch = get_arch(arch_name)
    total = 0
    with torch.device("meta"):
        for part in parts_of(cfg.n_blocks):
            if tied and part.kind == "head":
                continue  # the head reuses the embedding matrix
            total += sum(p.numel() for p in arch.build(cfg, part).parameters())
    return total


# "13B" is the release name: 40 layers of 12·5120² plus the embedding tables is 12.8B
@pytest.mark.parametrize("name, billions", [("2.6b", 2.6), ("13b", 12.8)])
def test_pangu_presets(name, billions):
    cfg = PRESETS[name]
    assert round(n_params("pangu-alpha", cfg, tied=True) / 1e9, 1) == pytest.approx(billions,
                                                                                     abs=0.25)


def test_llama2_7b():
    cfg = LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5)
    assert round(n_params("llama", cfg, tied=False) / 1e9, 2) == 6.74
