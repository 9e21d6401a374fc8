"""Memory tiers: blocks that do not fit a worker's RAM budget stay on disk and stream
through two staging buffers with prefetch; the worker stays inside its budget; caches that
would overflow make new sequences wait. Real SmolLM2 int8 weights, real Ray workers."""

from __future__ import annotations

import pytest
import ray
import torch

from llm_shard import LLM, SamplingParams
from llm_shard.cluster.types import Tier
from llm_shard.models.base import Part
from llm_shard.models.runner import LocalModel
from llm_shard.worker.actor import WORKER_OVERHEAD
from llm_shard.worker.stage import StageRunner

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):",
           "The three primary colors are"]
GREEDY = SamplingParams(max_tokens=12, temperature=0)
CACHE_TOKENS = 512


@pytest.fixture(scope="module")
def store(smollm2_stores):
    return smollm2_stores["int8"]


@pytest.fixture(scope="module")
def reference(store):
    tok, model = store.tokenizer(), LocalModel(store)
    return [model.greedy(tok.encode(p), GREEDY.max_tokens, tok.eos_ids) for p in PROMPTS]


def ram_for(store, blocks_in_ram: int, embed: bool = True, head: bool = True,
            staging: bool = True, blocks: int | None = None) -> int:
    """A RAM budget: embedding, head, the KV cache of `blocks` blocks (default: all), two
    staging buffers and `blocks_in_ram` blocks."""
    block = max(store.part_bytes(Part("block", i)) for i in range(store.n_blocks))
    blocks = store.n_blocks if blocks is None else blocks
    cache = CACHE_TOKENS * store.config.cache_bytes_per_token * blocks
    return (embed * store.part_bytes(Part("embed")) + head * store.part_bytes(Part("head"))
            + cache + staging * 2 * block + blocks_in_ram * block)


def test_streamed_blocks_give_the_resident_tokens_in_process(store, reference):
    """Tiers without Ray: all blocks on disk, then a mix, against all in RAM."""
    tok = store.tokenizer()
    n = store.n_blocks
    for tiers in ([Tier.DISK] * n, [Tier.RAM, Tier.DISK] * (n // 2)):
        runner = StageRunner(store, 0, n, cache_budget=1 << 34, tiers=tiers)
        p = GREEDY.to_dict()
        for k, prompt in enumerate(PROMPTS[:2]):
            ids, out = tok.encode(prompt), []
            f = {"epoch": 0, "mb": 0, "seqs": [k], "lens": [len(ids)], "reset": [k],
                 "params": {str(k): p}, "steps": [0]}
            rows = ids
            while len(out) < GREEDY.max_tokens:
                _, f, _ = runner.step(f, {"tokens": torch.tensor(rows)})
                out.append(f["sampled"][0])
                if out[-1] in tok.eos_ids:
                    break
                rows = out[-1:]
                f = {"epoch": 0, "mb": 0, "seqs": [k], "lens": [1], "reset": [],
                     "steps": [len(out)]}
            assert out == reference[k]
        streamer = runner.blocks.streamer
        assert streamer.bytes_read > 0 and streamer.staging_bytes < 3 * 2**20 * 4
        runner.close()


def test_a_quarter_in_ram_stays_within_budget(ray_cluster, store, reference):
    ram = ram_for(store, blocks_in_ram=6)  # 6 of 30 blocks: under a quarter
    with LLM(str(store.path), workers=[f"ram={ram},disk=1GiB"],
             cache_tokens=CACHE_TOKENS) as model:
        (stage,) = model.plan.stages
        assert 0 < stage.tiers.count(Tier.RAM) < store.n_blocks / 4
        assert model.generate(PROMPTS, GREEDY) == model.generate(PROMPTS, GREEDY)
        assert [o.token_ids for o in model.generate(PROMPTS, GREEDY)] == reference
        worker = model.pipeline.workers[0]
        stats = ray.get(worker.actor.stats.remote())
        baseline = worker.info["baseline_rss"]
        assert baseline <= WORKER_OVERHEAD
        assert stats["peak_rss"] <= ram + baseline, (stats["peak_rss"], ram, baseline)
        assert stats["swap_bytes_read"] > 0
        assert stats["bytes_by_tier"]["disk"] > 3 * stats["bytes_by_tier"]["ram"]


def test_all_on_disk_and_two_budgets_together(ray_cluster, store, reference):
    """One worker with no RAM for blocks (only its staging buffers) beside one with RAM
    for two thirds of them and no disk, in one pipeline: the first must stream the rest."""
    second = 2 * store.n_blocks // 3
    first = store.n_blocks - second
    tiny = ram_for(store, 0, head=False, blocks=first)  # the first stage: embedding, no head
    big = ram_for(store, second, embed=False, staging=False, blocks=second)
    with LLM(str(store.path), workers=[f"ram={tiny},disk=1GiB", f"ram={big},disk=0"],
             use_all_workers=True, cache_tokens=CACHE_TOKENS) as model:
        tiers = {s.worker: s.tiers for s in model.plan.stages}
        assert list(tiers[0]) == [Tier.DISK] * first
        assert set(tiers[1]) == {Tier.RAM}
        assert [o.token_ids for o in model.generate(PROMPTS, GREEDY)] == reference


def test_a_batch_over_the_cache_budget_completes_by_queueing(ray_cluster, store, reference):
    """Room for two sequences' caches; eight prompts wait their turn, none is lost."""
    with LLM(str(store.path), workers=["ram=1GiB"], cache_tokens=512) as model:
        outs = model.generate(PROMPTS * 2, GREEDY)
        assert [o.token_ids for o in outs] == reference * 2
        metrics = model.metrics()
        assert sum(metrics["finished_total"].values()) == len(outs) == 8
        assert metrics["cache_waits_total"] >= 1  # room for 2 at once: the rest queued
        assert metrics["waiting"] == metrics["running"] == 0
