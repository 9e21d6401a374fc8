"""Checkpoint import and the store: sources (HF, GGUF, Megatron, BMInf), convert, the
store format and the catalog of model names."""
