"""Memory tiers: blocks that do not fit a worker's RAM budget stay on disk and stream
through two staging buffers with prefetch; the worker stays inside its budget; caches that
would overflow make new sequences wait. Real SmolLM2 int8 weights, real Ray workers."""

from __future__ import annotations

import pytest
import ray
import torch
from conftest import step

from llm_shard import LLM, SamplingParams
from llm_shard.cluster.types import Tier
from llm_shard.coordinator.costs import head_screen_bytes, shared_bytes
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
    """A RAM budget for the model's parts: embedding, head and its int8 screen (a tied
    matrix once with the embedding), the KV cache of `blocks` blocks (default: all), two
    staging buffers and `blocks_in_ram` blocks. A worker's budget adds its runtime
    (`worker_runtime`)."""
    block = max(store.part_bytes(Part("block", i)) for i in range(store.n_blocks))
    blocks = store.n_blocks if blocks is None else blocks
    cache = CACHE_TOKENS * store.config.cache_bytes_per_token * blocks
    e, h = store.part_bytes(Part("embed")), store.part_bytes(Part("head"))
    shared = shared_bytes(store) if embed and head else 0  # a tied table held once
    return (embed * e + head * (h + head_screen_bytes(store)) - shared
            + cache + staging * 2 * block + blocks_in_ram * block)


def greedy(runner: StageRunner, tok, k: int, prompt: str) -> list[int]:
    """Sequence k's greedy tokens from a StageRunner that holds the whole model."""
    ids, out = tok.encode(prompt), []
    msg = step([k], [len(ids)], ids, reset=[k], params={k: GREEDY})
    while len(out) < GREEDY.max_tokens:
        out.append(runner.step(msg).sampled[0])
        if out[-1] in tok.eos_ids:
            break
        msg = step([k], [1], out[-1:], steps=[len(out)])
    return out


@pytest.mark.slow
def test_streamed_blocks_give_the_resident_tokens_in_process(store, reference):
    """Tiers without Ray: all blocks on disk, then a mix, against all in RAM."""
    tok = store.tokenizer()
    n = store.n_blocks
    for tiers in ([Tier.DISK] * n, [Tier.RAM, Tier.DISK] * (n // 2)):
        runner = StageRunner(store, 0, n, cache_budget=1 << 34, tiers=tiers)
        for k, prompt in enumerate(PROMPTS[:2]):
            assert greedy(runner, tok, k, prompt) == reference[k]
        streamer = runner.blocks.streamer
        assert streamer.bytes_read > 0 and streamer.staging_bytes < 3 * 2**20 * 4
        runner.close()


def test_streamed_blocks_read_their_int8_as_stored(store, monkeypatch):
    """Streamed blocks take a kernel that needs no packing: w8a16, else int8pack (never
    auto, whose fbgemm layers would pack again on every pass)."""
    from llm_shard.models.quant import Int8Linear
    from llm_shard.worker import tiers

    for problem, expect in ((None, "w8a16"), ("no compiler (test)", "int8pack")):
        monkeypatch.setattr(tiers.w8a16, "problem", lambda p=problem: p)
        streamer = tiers.Streamer.from_store(store, [0], torch.float32)
        linears = [m for m in streamer.skeletons[0].modules() if isinstance(m, Int8Linear)]
        assert linears and {m.preferred_kernel for m in linears} == {expect}
        streamer.close()


@pytest.mark.slow
@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                          reason="needs a CUDA GPU"))])
def test_a_gpu_worker_streams_its_ram_and_disk_blocks_to_the_gpu(store, reference, device):
    """A GPU worker computes every block on its GPU: GPU-tier blocks resident there, RAM-tier
    blocks held in pinned RAM and disk blocks read from the store, both copied through two
    device slots while the block before computes. "cpu" stands in for the GPU where there
    is none: the same slots, copies and prefetch, without CUDA streams and events."""
    tok, n = store.tokenizer(), store.n_blocks
    gpu_blocks = 8
    tiers = [Tier.GPU] * gpu_blocks + [Tier.RAM, Tier.DISK] * ((n - gpu_blocks) // 2)
    runner = StageRunner(store, 0, n, cache_budget=1 << 34, tiers=tiers, stream_to=device)
    blocks, streamer = runner.blocks, runner.blocks.streamer
    assert sorted(blocks.resident) == list(range(gpu_blocks))
    assert streamer.held == {i for i in range(n) if tiers[i] is Tier.RAM}
    assert streamer.slots[0].device.type == device and len(streamer.slots) == 2
    assert all(b.is_pinned() for b in streamer.held_buffers.values()) == (device == "cuda")
    if device == "cuda":  # the CUDA int8 path: our Triton kernel on the device
        linears = [m for m in blocks.resident[0].modules() if hasattr(m, "kernel")]
        assert linears and {m.kernel for m in linears} == {"triton"}
    outs = [greedy(runner, tok, k, prompt) for k, prompt in enumerate(PROMPTS[:2])]
    cache = runner.sequences[1].cache
    assert {cache.layer(i).k.device.type for i in range(n)} == {device}  # where it computes
    streamed = sum(store.part_bytes(Part("block", i)) for i in range(gpu_blocks, n))
    steps = sum(len(o) for o in outs)
    assert streamer.bytes_copied >= steps * streamed * 0.99  # every block, every step
    assert streamer.bytes_read > 0  # disk blocks came from the store
    if device == "cpu":  # the same kernels as resident CPU blocks: the same bits
        assert outs == reference[:2]
    else:  # the GPU's float32 kernel against the CPU's: greedy agrees
        assert tok.decode(outs[0]).strip().startswith(tok.decode(reference[0][:2]).strip())
        assert sum(a == b for a, b in zip(outs[1], reference[1])) >= len(reference[1]) // 2
    runner.close()


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_budget_smaller_than_the_range_runs_gpu_and_streamed_ram(ray_cluster, store,
                                                                     reference):
    """Through Ray: a worker whose GPU holds the caches, the two stream slots and 8 of 30
    blocks runs GPU + RAM tiers, every block on the GPU, with CPU's greedy tokens."""
    block = max(store.part_bytes(Part("block", i)) for i in range(store.n_blocks))
    cache = CACHE_TOKENS * store.config.cache_bytes_per_token * store.n_blocks
    gpu = cache + 2 * block + 8 * block + block // 2
    with LLM(str(store.path), workers=[f"gpu={gpu},ram=1GiB"],
             cache_tokens=CACHE_TOKENS) as model:
        (stage,) = model.plan.stages
        assert stage.tiers.count(Tier.GPU) == 8 and stage.tiers.count(Tier.RAM) == 22
        outs = [o.token_ids for o in model.generate(PROMPTS, GREEDY)]
        stats = ray.get(model.pipeline.workers[0].actor.stats.remote())
        assert stats["bytes_by_tier"]["gpu"] > 0 and stats["bytes_by_tier"]["ram"] > 0
    agree = sum(a == b for o, r in zip(outs, reference) for a, b in zip(o, r))
    assert agree >= 0.75 * sum(map(len, reference)), (outs, reference)


@pytest.mark.slow
def test_a_quarter_in_ram_stays_within_budget(ray_cluster, store, reference, worker_runtime):
    ram = ram_for(store, blocks_in_ram=1) + worker_runtime  # 1 of 30 blocks, and a margin
    with LLM(str(store.path), workers=[f"ram={ram},disk=1GiB"],
             cache_tokens=CACHE_TOKENS) as model:
        (stage,) = model.plan.stages
        worker = model.pipeline.workers[0]
        # the RAM blocks are what the budget leaves once this worker's runtime is paid
        block = store.part_bytes(Part("block", 0))
        left = ram - worker.overhead - ram_for(store, blocks_in_ram=0)
        assert stage.tiers.count(Tier.RAM) == left // block
        assert 0 < stage.tiers.count(Tier.RAM) < store.n_blocks / 4
        assert model.generate(PROMPTS, GREEDY) == model.generate(PROMPTS, GREEDY)
        assert [o.token_ids for o in model.generate(PROMPTS, GREEDY)] == reference
        stats = ray.get(worker.actor.stats.remote())
        assert worker.info["baseline_rss"] <= worker.overhead <= WORKER_OVERHEAD
        # the budget is the whole process, its runtime included
        assert stats["peak_rss"] <= ram, (stats["peak_rss"], ram, worker.overhead)
        assert stats["swap_bytes_read"] > 0
        assert stats["bytes_by_tier"]["disk"] > 3 * stats["bytes_by_tier"]["ram"]


@pytest.mark.slow
def test_all_on_disk_and_two_budgets_together(ray_cluster, store, reference, worker_runtime):
    """One worker with no RAM for blocks (only its staging buffers) beside one with RAM
    for two thirds of them and no disk, in one pipeline: the first streams what its
    budget has no room for, the second holds its blocks in RAM."""
    second = 2 * store.n_blocks // 3
    first = store.n_blocks - second
    # the first stage: embedding, no head; each beside its runtime
    tiny = ram_for(store, 0, head=False, blocks=first) + worker_runtime
    big = ram_for(store, second, embed=False, staging=False, blocks=second) + worker_runtime
    block = max(store.part_bytes(Part("block", i)) for i in range(store.n_blocks))
    with LLM(str(store.path), workers=[f"ram={tiny},disk=1GiB", f"ram={big},disk=0"],
             use_all_workers=True, cache_tokens=CACHE_TOKENS) as model:
        tiers = {s.worker: s.tiers for s in model.plan.stages}
        assert set(tiers[1]) == {Tier.RAM}  # the second has no disk
        # the first holds in RAM only what its budget has room for once its runtime, as
        # the worker measured it, is paid (a probe's runtime and a worker's differ by tens
        # of MiB of torch's library pages, so the split between the two moves): every
        # other block of its range streams from disk (two staging buffers where one does)
        runtime = model.pipeline.workers[0].overhead
        parts = ram_for(store, 0, head=False, blocks=len(tiers[0]),
                        staging=Tier.DISK in tiers[0])
        room = max(0, tiny - runtime - parts) // block
        assert tiers[0].count(Tier.RAM) <= room
        assert tiers[0].count(Tier.DISK) >= len(tiers[0]) - room
        assert [o.token_ids for o in model.generate(PROMPTS, GREEDY)] == reference


@pytest.mark.slow
def test_a_batch_over_the_cache_budget_completes_by_queueing(ray_cluster, store, reference):
    """Room for two sequences' caches; eight prompts wait their turn, none is lost."""
    with LLM(str(store.path), workers=["ram=1GiB"], cache_tokens=512) as model:
        outs = model.generate(PROMPTS * 2, GREEDY)
        assert [o.token_ids for o in outs] == reference * 2
        metrics = model.metrics()
        assert sum(metrics["finished_total"].values()) == len(outs) == 8
        assert metrics["cache_waits_total"] >= 1  # room for 2 at once: the rest queued
        assert metrics["waiting"] == metrics["running"] == 0


def test_a_cold_read_is_timed_as_the_median_of_several(tmp_path, monkeypatch):
    """Calibration times a disk block's file as the median of COLD_READS whole reads with
    its pages dropped, not by the first alone: a first read far slower than the next
    does not set the rate the planner plans disk blocks with."""
    from llm_shard.worker import tiers

    path = tmp_path / "block.safetensors"
    path.write_bytes(bytes(range(256)) * 4096)
    reads, clock = [], iter([0.0, 0.6, 1.0, 1.1, 2.0, 2.12])  # reads of 0.6, 0.1, 0.12 s
    real = tiers.read_file

    def read_file(p, buf):
        reads.append(real(p, buf))
        assert torch.equal(buf[:256], torch.arange(256, dtype=torch.uint8))
        return reads[-1]

    monkeypatch.setattr(tiers, "read_file", read_file)
    assert tiers.cold_read_seconds(path, clock=lambda: next(clock)) == pytest.approx(0.12)
    assert reads == [path.stat().st_size] * tiers.COLD_READS == [1 << 20] * 3


LOAD_PEAK = """
import json, sys
from llm_shard.models.base import Part
from llm_shard.models.checkpoint.store import Store

def status():
    d = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(d[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}

store = Store.open(sys.argv[1])
with open("/proc/self/clear_refs", "w") as f:  # peak RSS from here on
    f.write("5")
before = status()["VmRSS"]
block = store.load(Part("block", 0))
after = status()
print(json.dumps({"held": after["VmRSS"] - before, "transient": after["VmHWM"] - after["VmRSS"]}))
"""


def test_loading_a_block_holds_no_weight_twice(tmp_path):
    """A RAM block's int8 weights are copied out of the file's mapping (into 2 MiB pages)
    a piece at a time, each piece's mapped pages dropped behind it: loading peaks at its
    block's bytes plus a piece, not plus its largest weight, which no budget counts.
    Measured in a fresh process (VmHWM)."""
    import json
    import subprocess
    import sys

    from llm_shard.benchmarks.swap import random_store
    from llm_shard.models.archs.llama import LlamaConfig
    from llm_shard.models.checkpoint.placement import COPY_BYTES, huge_pages_problem

    if huge_pages_problem() is not None:
        pytest.skip(f"weights are not copied out of the mapping here: {huge_pages_problem()}")
    cfg = LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=49152,
                      num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8)
    store = random_store(tmp_path / "wide", "llama", cfg, "wide", progress=False)
    weight = cfg.hidden_size * cfg.intermediate_size  # an MLP matrix: 48 MiB of int8
    out = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(store.path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["held"] >= 3 * weight  # the block is resident
    assert got["transient"] < 2 * COPY_BYTES < weight, got
