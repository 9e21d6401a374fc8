"""Budget accounting: a worker's RAM budget is its whole process (the runtime measured at
start comes out of it first), a tied LM head is counted once, the KV cache takes what is
left, disk reads hide in a stage's wait, and errors name the part that does not fit."""

import os

import pytest
from click.testing import CliRunner

from llm_shard.cluster.types import CACHE_CHUNK, Capacity, MiB, Tier
from llm_shard.coordinator import planner
from llm_shard.coordinator.cli import cli
from llm_shard.coordinator.costs import (
    cache_bytes_per_token,
    head_read_bytes,
    head_screen_bytes,
    model_cost,
    shared_bytes,
)
from llm_shard.coordinator.planner import (
    MIN_CACHE_TOKENS,
    ModelCost,
    PlanError,
    WorkerSpec,
    format_plan,
    plan,
    prediction_errors,
)
from llm_shard.models.base import Part

RAM, DISK = Tier.RAM, Tier.DISK
CPU = {RAM: 10e9, DISK: 1e9}


def worker(spec: str, overhead: int = 0, speed=None) -> WorkerSpec:
    return WorkerSpec(Capacity.parse(spec), dict(CPU if speed is None else speed), overhead)


# SmolLM2-135M's sizes: 30 int8 blocks of 3.8 MiB (114 MiB), a float embedding of 108 MiB
# and a head file holding the same (tied) matrix again.
BLOCK, MATRIX = 3_988_032, 113_246_336


def smollm2_like(tied: bool, cache_tokens: int | None = 0) -> ModelCost:
    return ModelCost((BLOCK,) * 30, MATRIX, MATRIX + 2368, 1536, cache_tokens,
                     MATRIX if tied else 0)


# ---------------------------------------------------------------- the runtime inside


def test_the_runtime_comes_out_of_the_ram_budget():
    model = ModelCost((10 * MiB,) * 10)
    # 150 MiB with a 50 MiB runtime: 100 MiB for the blocks, every one in RAM
    p, report = plan(model, [worker("ram=150MiB,disk=1GiB", 50 * MiB)])
    assert p.stages[0].tiers == (RAM,) * 10
    stage = report.stages[0]
    assert stage.overhead == 50 * MiB and stage.used(RAM) == 150 * MiB
    # a 70 MiB runtime leaves 80: 6 blocks and 2 staging buffers, 4 blocks on disk
    p, report = plan(model, [worker("ram=150MiB,disk=1GiB", 70 * MiB)])
    assert p.stages[0].tiers == (RAM,) * 6 + (DISK,) * 4
    assert report.stages[0].used(RAM) == 150 * MiB
    # the table shows the runtime in its own column, outside the ram one
    row = format_plan(p, report, model).splitlines()[1]
    assert "70.00 MiB" in row and "6 blk 80.00 MiB" in row


def test_a_runtime_larger_than_the_budget_is_named():
    model = ModelCost((10 * MiB,) * 4)
    with pytest.raises(PlanError) as e:
        plan(model, [worker("ram=100MiB,disk=1GiB", 120 * MiB)])
    assert "its runtime does not fit: short of 40.00 MiB" in str(e.value)
    with pytest.raises(ValueError, match="overhead must be an integer >= 0"):
        WorkerSpec(Capacity(ram=MiB), CPU, -1)


def test_two_workers_plan_around_each_runtime():
    model = ModelCost((10 * MiB,) * 10)
    workers = [worker("ram=100MiB", 40 * MiB), worker("ram=100MiB", 60 * MiB)]
    p, report = plan(model, workers)
    assert [(s.start, s.end) for s in p] == [(0, 6), (6, 10)]
    assert [r.used(RAM) for r in report.stages] == [100 * MiB, 100 * MiB]
    with pytest.raises(PlanError, match="the workers offer 90.00 MiB after their runtimes' "
                                        "110.00 MiB"):
        plan(model, [worker("ram=100MiB", 55 * MiB)] * 2)


# ---------------------------------------------------------------- tied head


def test_a_tied_head_is_counted_once_where_one_stage_holds_both():
    # ram=300MiB: a tied SmolLM2 fits in RAM with a KV cache; counted twice it did not
    p, report = plan(smollm2_like(tied=True, cache_tokens=256), [worker("ram=300MiB")])
    assert report.stages[0].resident[RAM] == MATRIX + 2368 + 30 * 1536 * 256
    assert "embed+head 108.00 MiB (tied: one matrix)" in format_plan(
        p, report, smollm2_like(tied=True, cache_tokens=256))
    with pytest.raises(PlanError) as e:
        plan(smollm2_like(tied=False, cache_tokens=256), [worker("ram=300MiB")])
    msg = str(e.value)
    assert "block 29" not in msg
    assert "the blocks" not in msg and "30 blocks does not fit: short of 41." in msg
    # split over two stages, each holds its own part whole
    model = smollm2_like(tied=True)
    p, report = plan(model, [worker("ram=200MiB")] * 2)
    assert len(p) == 2
    assert [r.resident[RAM] for r in report.stages] == [MATRIX, MATRIX + 2368]


def test_the_head_that_does_not_fit_is_named_not_the_last_block():
    # the case: ram=300MiB,disk=4GiB and a runtime of 280 MiB
    with pytest.raises(PlanError) as e:
        plan(smollm2_like(tied=True), [worker("ram=300MiB,disk=4GiB", 280 * MiB)])
    msg = str(e.value)
    assert "block 29 of 30" not in msg
    assert ("worker 0 (gpu 0 B, ram 300.00 MiB, disk 4.00 GiB): the embedding does not fit: "
            "short of ") in msg
    assert ("(ram 300.00 MiB for its runtime 280.00 MiB + the embedding 108.00 MiB + the "
            "head (tied: the embedding's matrix counted once) 2.31 KiB") in msg
    # untied, with room for the embedding only: the head is named, short by its size less
    # what is left
    model = ModelCost((BLOCK,) * 30, MATRIX, MATRIX, 0, 0)
    with pytest.raises(PlanError) as e:
        plan(model, [worker("ram=150MiB,disk=4GiB", 30 * MiB)])
    assert "the head does not fit: short of" in str(e.value)
    # several workers: none holds the head with a block
    with pytest.raises(PlanError) as e:
        plan(model, [worker("ram=150MiB,disk=4GiB", 40 * MiB)] * 2)
    assert "no worker holds the head (108.00 MiB) with a block" in str(e.value)


def test_tied_bytes_cannot_exceed_either_part():
    with pytest.raises(ValueError, match="tied_bytes 5 is more than"):
        ModelCost((1,), 4, 10, tied_bytes=5)


# ---------------------------------------------------------------- KV cache from what is left


def test_kv_cache_takes_the_memory_left_in_whole_chunks():
    model = ModelCost((10 * MiB,) * 4, cache_bytes_per_token=1024, cache_tokens=None)
    p, report = plan(model, [worker("ram=100MiB", 20 * MiB)])
    left = 100 * MiB - 20 * MiB - 40 * MiB  # per token: 4 blocks x 1 KiB
    assert report.cache_tokens == left // 4096 // CACHE_CHUNK * CACHE_CHUNK
    assert report.stages[0].used(RAM) <= 100 * MiB
    assert report.stages[0].resident[RAM] == 4 * 1024 * report.cache_tokens
    # a small node still takes a small model: one chunk reserved, not 4096 tokens
    p, report = plan(model, [worker("ram=61MiB", 20 * MiB)])
    assert report.cache_tokens == MIN_CACHE_TOKENS
    with pytest.raises(PlanError):
        plan(ModelCost((10 * MiB,) * 4, cache_bytes_per_token=1024, cache_tokens=4096),
             [worker("ram=61MiB", 20 * MiB)])
    # the stage with the least room sets the tokens every stage keeps
    p, report = plan(model, [worker("ram=60MiB", 10 * MiB), worker("ram=200MiB")],
                     use_all_workers=True)
    first = report.stages[0]
    per_token = 1024 * (first.end - first.start)
    room = 60 * MiB - 10 * MiB - first.weights[RAM]
    assert report.cache_tokens == room // per_token // CACHE_CHUNK * CACHE_CHUNK


# ---------------------------------------------------------------- disk reads in the wait


def test_disk_blocks_spread_where_their_reads_hide_in_the_wait():
    """A stage prefetches its first disk block while it waits (worker/tiers.py): the
    planner counts that read as hidden, up to the time the stages after it take, and so
    puts disk blocks where a wait covers them, not all on the last stage."""
    sizes = (30, 30, 20, 30, 10, 20, 20, 30, 30)
    model = ModelCost(tuple(s * MiB for s in sizes))
    workers = [worker(f"ram={r}MiB,disk=1GiB", speed={RAM: 10e9, DISK: 1e9})
               for r in (60, 70, 70)]
    p, report = plan(model, workers, hop_seconds=1e-3)
    on_disk = [s.tiers.count(DISK) for s in p]
    assert on_disk == [3, 3, 0]
    for s, r in zip(p, report.stages):
        first = next(b for b in s.blocks if s.tier_of(b) is DISK)
        read = model.block_bytes[first] * (1 / 1e9 - 1 / 10e9)
        later = sum(x.seconds for x in report.stages[p.stages.index(s) + 1:])
        assert r.hidden == pytest.approx(min(read, later + 1e-3 * (len(p) - 1 -
                                                                   p.stages.index(s))))
        assert r.hidden > 0
        if p.stages.index(s) == 1:
            break
    # without the hidden reads the same cost model leaves every disk block to the last stage
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(planner, "_hidden", lambda *a: 0.0)
        p0, report0 = plan(model, workers, hop_seconds=1e-3)
    assert [s.tiers.count(DISK) for s in p0] == [0, 0, 4]
    assert report.seconds_per_token < report0.seconds_per_token
    # the throughput objective keeps every pipeline stage busy: nothing hides
    _, report = plan(model, workers, objective="throughput")
    assert all(r.hidden == 0 for r in report.stages)


# ---------------------------------------------------------------- predicted vs measured


def test_prediction_errors():
    _, report = plan(ModelCost((10 * MiB,) * 4), [worker("ram=30MiB"), worker("ram=30MiB")])
    predicted = [s.seconds for s in report.stages]
    assert prediction_errors(report, [predicted[0] * 1.2, predicted[1] * 0.5]) == \
        pytest.approx([0.2, -0.5])
    with pytest.raises(ValueError, match="1 measured stage times for a plan of 2 stages"):
        prediction_errors(report, [1.0])


# ---------------------------------------------------------------- a real store


def test_model_cost_of_smollm2_asks_the_store(smollm2_stores):
    store = smollm2_stores["int8"]
    cost = model_cost(store, None)
    embed, head = store.part_bytes(Part("embed")), store.part_bytes(Part("head"))
    cfg = store.config
    # a version 1 store's float head is read through its int8 screen: a byte per weight
    # and a scale per row (version 2 keeps the head's table as int8 rows: no screen)
    v1 = store.manifest["version"] == 1
    screen = cfg.vocab_size * (cfg.hidden_size + 4) if v1 else 0
    assert head_screen_bytes(store) == screen
    assert cost.embed_bytes == embed and cost.head_bytes == head + screen
    # tied (tie_word_embeddings), but a version 1 store writes the matrix into both files
    # and a worker maps both: nothing is held once; version 2 keeps one table
    assert cfg.tie_word_embeddings
    assert cost.tied_bytes == shared_bytes(store) == (
        store.tied_bytes() if store.manifest["version"] >= 2 else 0)
    matrix = 4 * cfg.vocab_size * cfg.hidden_size if v1 else 0  # the float matrix, unread
    assert cost.head_read == head_read_bytes(store) == head - matrix + screen
    assert head_screen_bytes(smollm2_stores["fp32"]) == 0
    assert cost.cache_bytes_per_token == (cfg.cache_bytes_per_token,) * store.n_blocks
    assert cache_bytes_per_token(store) == cfg.cache_bytes_per_token
    assert cost.cache_tokens is None
    fp32 = model_cost(smollm2_stores["fp32"], 512)
    assert fp32.head_read == fp32.head_bytes and fp32.cache_tokens == 512


def test_plan_command_shows_the_runtime_and_counts_the_tie_once(smollm2_stores, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    os.symlink(smollm2_stores["int8"].path, home / "smollm2-135m")
    env = {"LLM_SHARD_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    run = CliRunner().invoke
    ok = run(cli, ["plan", "smollm2-135m", "--worker", "ram=400MiB,disk=4GiB",
                   "--overhead", "100MiB"], env=env)
    assert ok.exit_code == 0, ok.output
    lines = ok.output.splitlines()
    assert "runtime 100.00 MiB per worker, as given (--overhead)" in lines[0]
    assert lines[1].split()[3] == "runtime" and "100.00 MiB" in lines[2]
    assert "sized from the memory left" in ok.output
    short = run(cli, ["plan", "smollm2-135m", "--worker", "ram=300MiB,disk=4GiB",
                      "--overhead", "280MiB"], env=env)
    assert short.exit_code == 1
    assert "the embedding does not fit: short of" in short.stderr
    measured = run(cli, ["plan", "smollm2-135m", "--worker", "ram=2GiB"], env=env)
    assert measured.exit_code == 0, measured.output
    assert "measured here" in measured.output


# ---------------------------------------------------------------- wrap: the same contract


def test_wrap_pays_the_runtime_first():
    transformers = pytest.importorskip("transformers")
    import torch

    from llm_shard.worker.wrap import WrapError, runtime_bytes, wrap

    def tiny():
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(
            vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=12,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        return transformers.LlamaForCausalLM(cfg).eval()

    model = tiny()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    runtime = runtime_bytes(model)
    # the model's tensors are not the runtime: it is this process less them
    from llm_shard.cluster.resources import rss_bytes
    assert 0 < runtime <= rss_bytes() - weights + 4 * 2**20
    # a given overhead comes out of ram: the same budget holds fewer blocks in RAM
    ram = 600_000
    alone = wrap(tiny(), ram=ram, disk="1GiB").model.layers.tiers
    paid = wrap(tiny(), ram=ram + 100_000, overhead=100_000, disk="1GiB").model.layers.tiers
    assert paid == alone and alone.count(DISK) > 0
    with pytest.raises(WrapError, match="this process's runtime takes .* before the model"):
        wrap(tiny(), ram="1MiB", overhead="measure")
    # measured: the whole process within ram, the model in what the runtime leaves
    model = tiny()
    model = wrap(model, ram=runtime_bytes(model) + 8 * 2**20, overhead="measure")
    assert set(model.model.layers.tiers) == {RAM}
