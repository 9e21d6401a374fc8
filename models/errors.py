"""The models package's expected errors and store dtype names, without torch: the command
line imports these to parse its options and print one-line errors, and stays fast
(`llm-shard --help`, `chat URL`) by not loading torch until a command needs it."""

from __future__ import annotations

# a store's dtypes (models/checkpoint/store.py maps each to the torch dtype its float parts run in)
DTYPE_NAMES = ("int8", "fp32", "bf16", "fp16")
# what a KV cache stores K/V in (models/cache.py KV_DTYPES maps each to its torch dtype)
KV_DTYPE_NAMES = ("fp16", "fp32", "int8")


class UnknownArch(ValueError):
    pass


class ConvertError(Exception):
    """The checkpoint does not match the architecture; the message names the key."""


class SourceError(Exception):
    """A checkpoint source that cannot be read; the message says what to do."""


class StoreError(Exception):
    """A store that is missing, incomplete, corrupt or of another version."""


class TokenizerError(ValueError):
    """A tokenizer that cannot be found, read or built."""
