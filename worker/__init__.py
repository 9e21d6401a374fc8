"""The worker: the Ray actor that hosts one stage's block range (`actor`), the compute of
that stage on decoded messages (`stage`), its blocks in GPU, RAM and disk tiers with
prefetch (`tiers`), and `wrap`, the same tiers for a PyTorch model in one process."""
