"""llm-shard: big language models split across a home lab of cheap machines."""

__version__ = "0.1.0"
