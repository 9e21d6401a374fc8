"""CPM-2: the model (model.py), BMInf's checkpoint reader (bminf.py), its tokenizer."""

from llm_shard.models.archs.cpm2.model import ARCH

__all__ = ["ARCH"]
