"""coordinator.planner: the pure block-range planner, against its cost model and budgets."""

import itertools
import math
import random
import subprocess
import sys

import pytest

from llm_shard.cluster.types import Capacity, GiB, MiB, Tier
from llm_shard.coordinator import planner
from llm_shard.coordinator.planner import (
    DISK_STAGING_SLOTS,
    STREAM_SLOTS,
    ModelCost,
    PlanError,
    WorkerSpec,
    format_plan,
    plan,
    streams_to_gpu,
)

GPU, RAM, DISK = Tier.GPU, Tier.RAM, Tier.DISK
CPU = {RAM: 20e9, DISK: 1.5e9}


def worker(spec: str, speed=None) -> WorkerSpec:
    return WorkerSpec(Capacity.parse(spec), dict(CPU if speed is None else speed))


def ranges(p) -> list[tuple[int, int, int]]:
    return [(s.worker, s.start, s.end) for s in p]


# ---------------------------------------------------------------- splits


def test_equal_workers_equal_blocks_split_evenly():
    model = ModelCost((100 * MiB,) * 8)
    # each worker holds 5 of 8 blocks: latency ties on time, broken toward balance
    workers = [worker("ram=500MiB", {RAM: 1e9})] * 2
    p, report = plan(model, workers)
    assert ranges(p) == [(0, 0, 4), (1, 4, 8)]
    assert all(t is RAM for s in p for t in s.tiers)
    assert report.seconds_per_token == pytest.approx(8 * 100 * MiB / 1e9 + 0.5e-3)
    # roomy workers and the throughput objective: every worker gets its share
    p, _ = plan(model, [worker("ram=4GiB")] * 4, objective="throughput")
    assert ranges(p) == [(0, 0, 2), (1, 2, 4), (2, 4, 6), (3, 6, 8)]


def test_latency_uses_one_worker_when_it_holds_everything():
    model = ModelCost((10 * MiB,) * 8)
    p, _ = plan(model, [worker("ram=4GiB")] * 3)
    assert ranges(p) == [(0, 0, 8)]
    p, _ = plan(model, [worker("ram=4GiB")] * 3, use_all_workers=True)
    assert [s.worker for s in p] == [0, 1, 2]


def test_faster_worker_gets_more_blocks():
    model = ModelCost((50 * MiB,) * 30)
    p, report = plan(model, [worker("ram=8GiB", {RAM: 2e9}), worker("ram=8GiB", {RAM: 1e9})],
                     objective="throughput")
    assert ranges(p) == [(0, 0, 20), (1, 20, 30)]
    assert report.stages[0].seconds == pytest.approx(report.stages[1].seconds)
    # memory-bound latency: the fast worker fills up, the slow one takes the rest
    p, _ = plan(model, [worker("ram=1GiB", {RAM: 1e9}), worker("ram=1GiB", {RAM: 4e9})])
    assert ranges(p) == [(0, 0, 10), (1, 10, 30)]


def test_throughput_balances_the_bottleneck():
    sizes = (10, 30, 20, 20, 10, 40, 30, 20, 10, 10)  # MiB, 200 in all
    model = ModelCost(tuple(s * MiB for s in sizes))
    p, report = plan(model, [worker("ram=4GiB", {RAM: 1e9})] * 3, objective="throughput")
    # best bottleneck is 70 MiB worth: [10 30 20] [20 10 40] [30 20 10 10]
    assert ranges(p) == [(0, 0, 3), (1, 3, 6), (2, 6, 10)]
    assert report.bottleneck_seconds == pytest.approx(70 * MiB / 1e9)
    assert report.pipeline_tokens_per_second == pytest.approx(1e9 / (70 * MiB))


# ---------------------------------------------------------------- tiers


def test_ram_limited_worker_streams_the_rest_from_disk():
    model = ModelCost((100 * MiB,) * 10)
    # 600 MiB of RAM: 4 blocks + a 2-block staging buffer; 6 blocks stream from disk
    p, report = plan(model, [worker("ram=600MiB,disk=10GiB")])
    assert p.stages[0].tiers == (RAM,) * 4 + (DISK,) * 6
    stage = report.stages[0]
    assert stage.buffers == DISK_STAGING_SLOTS * 100 * MiB
    assert stage.used(RAM) == 600 * MiB and stage.used(DISK) == 600 * MiB
    assert stage.seconds == pytest.approx(400 * MiB / 20e9 + 600 * MiB / 1.5e9)
    # enough RAM for all: no disk and no buffer
    p, report = plan(model, [worker("ram=1000MiB,disk=10GiB")])
    assert p.stages[0].tiers == (RAM,) * 10 and report.stages[0].buffers == 0


def test_a_gpu_worker_keeps_every_cache_and_two_stream_slots_on_its_gpu():
    model = ModelCost((100 * MiB,) * 6, cache_bytes_per_token=1024, cache_tokens=1024)
    speed = {GPU: 500e9, RAM: 20e9, DISK: 1.5e9}
    p, report = plan(model, [worker("gpu=512MiB,ram=304MiB,disk=1GiB", speed)])
    # GPU: 6 caches of 1 MiB, 2 stream slots of 100 MiB, then 3 resident blocks
    assert p.stages[0].tiers == (GPU, GPU, GPU, RAM, RAM, RAM)
    stage = report.stages[0]
    assert stage.resident[GPU] == 6 * MiB and stage.resident[RAM] == 0
    assert stage.stream_buffers == 200 * MiB and stage.buffers == 0
    assert stage.used(GPU) == 506 * MiB and stage.used(RAM) == 300 * MiB
    assert stage.seconds == pytest.approx(300 * MiB / 500e9 + 300 * MiB / 20e9)
    # all of it fits: no stream slots
    p, report = plan(model, [worker("gpu=606MiB,ram=0", speed)])
    assert p.stages[0].tiers == (GPU,) * 6 and report.stages[0].stream_buffers == 0
    # no room for resident blocks: RAM holds 1 block and the 2-block disk staging buffer
    p, report = plan(model, [worker("gpu=256MiB,ram=304MiB,disk=1GiB", speed)])
    assert p.stages[0].tiers == (RAM,) + (DISK,) * 5
    assert report.stages[0].used(GPU) == 206 * MiB and report.stages[0].used(RAM) == 300 * MiB
    # too little GPU memory for the caches and stream slots: refused, with the shortfall
    with pytest.raises(PlanError, match=r"worker 0 computes on its GPU, whose 150.00 MiB cannot "
                       r"hold the 200.00 MiB of buffers that stream blocks to it"):
        plan(model, [worker("gpu=150MiB,ram=1GiB,disk=1GiB", speed)])
    # without a GPU budget the same worker computes on the CPU, caches in RAM
    p, report = plan(model, [worker("gpu=0,ram=1GiB", speed)])
    assert set(p.stages[0].tiers) == {RAM} and report.stages[0].resident[RAM] == 6 * MiB
    # a worker without a GPU speed ignores its GPU budget
    p, _ = plan(model, [worker("gpu=8GiB,ram=1GiB")])
    assert set(p.stages[0].tiers) == {RAM}


def test_embed_and_head_go_to_the_end_stages():
    model = ModelCost((100 * MiB,) * 4, embed_bytes=150 * MiB, head_bytes=150 * MiB)
    p, report = plan(model, [worker("ram=350MiB", {RAM: 1e9})] * 2)
    assert ranges(p) == [(0, 0, 2), (1, 2, 4)]
    assert [s.resident[RAM] for s in report.stages] == [150 * MiB, 150 * MiB]
    head_seconds = 150 * MiB / 1e9
    assert report.stages[1].seconds == pytest.approx(200 * MiB / 1e9 + head_seconds)


# ---------------------------------------------------------------- infeasible


def test_infeasible_names_the_total_shortfall():
    model = ModelCost((40 * MiB,) * 30)
    with pytest.raises(PlanError) as e:
        plan(model, [worker("ram=256MiB", {RAM: 1e9})] * 2)
    msg = str(e.value)
    assert msg.startswith("cannot place 30 blocks (1.17 GiB) on 2 workers")
    assert "short of 688.00 MiB of memory" in msg
    assert "need 1.17 GiB, the workers offer 512.00 MiB" in msg
    assert "cannot hold even" not in msg


def test_infeasible_names_the_worker_that_cannot_hold_one_block():
    sizes = [45 * MiB] * 30
    sizes[12] = 40 * MiB  # the smallest block: the closest a small worker comes
    model = ModelCost(tuple(sizes))
    one_block = ("worker 1 (gpu 0 B, ram 32.00 MiB, disk {disk}) cannot hold even block 12 "
                 "(40.00 MiB) plus its KV cache and buffers (0 B): short of 8.00 MiB")
    with pytest.raises(PlanError) as e:
        plan(model, [worker("ram=1GiB", {RAM: 1e9}), worker("ram=32MiB", {RAM: 1e9})])
    msg = str(e.value)
    assert "on 2 workers: short of 289.00 MiB of memory" in msg
    assert one_block.format(disk="0 B") in msg
    # enough memory in all, but worker 1 can't take a stage of its own: streaming its
    # smallest block needs 80 MiB of buffers, keeping it in RAM is 8 MiB short
    with pytest.raises(PlanError) as e:
        plan(model, [worker("ram=8GiB,disk=8GiB"), worker("ram=32MiB,disk=8GiB")],
             use_all_workers=True)
    msg = str(e.value)
    assert "but not with a stage on every worker" in msg
    assert one_block.format(disk="8.00 GiB") in msg
    assert "worker 0" not in msg


def test_infeasible_when_only_buffers_are_short():
    model = ModelCost((100 * MiB,) * 4)
    with pytest.raises(PlanError) as e:
        plan(model, [worker("ram=150MiB,disk=1GiB", {DISK: 1e9})])
    msg = str(e.value)
    # one worker: the parts of its RAM, the one that does not fit and by how much
    assert ("worker 0 (gpu 0 B, ram 150.00 MiB, disk 1.00 GiB): 4 blocks (0 B of them beyond "
            "disk 1.00 GiB, and staging buffers) does not fit: short of 50.00 MiB") in msg


def test_bad_arguments():
    model = ModelCost((1,))
    with pytest.raises(PlanError, match="no workers"):
        plan(model, [])
    with pytest.raises(ValueError, match="objective"):
        plan(model, [worker("ram=1GiB")], objective="fast")
    with pytest.raises(ValueError, match="speed"):
        WorkerSpec(Capacity(ram=GiB), {RAM: 0})
    with pytest.raises(ValueError, match="2 cache sizes for 1 blocks"):
        ModelCost((1,), cache_bytes_per_token=(1, 2))


# ---------------------------------------------------------------- properties


def random_case(rng: random.Random, n_blocks: int, n_workers: int, unit: int):
    embed, head = rng.randint(0, 5) * unit, rng.randint(0, 5) * unit
    model = ModelCost(tuple(rng.randint(1, 10) * unit for _ in range(n_blocks)),
                      embed, head, tuple(rng.randint(0, 3) for _ in range(n_blocks)),
                      rng.choice([0, unit]), rng.choice([0, min(embed, head)]),
                      rng.choice([None, head // 4]))
    workers = []
    for _ in range(n_workers):
        tiers = [t for t in (GPU, RAM, DISK) if rng.random() < 0.7] or [RAM]
        speed = {t: rng.choice([0.5, 1, 2, 4]) * {GPU: 50e9, RAM: 10e9, DISK: 1e9}[t]
                 for t in tiers}
        cap = Capacity(*(rng.randint(0, 12 * n_blocks // n_workers) * unit for _ in range(3)))
        workers.append(WorkerSpec(cap, speed, rng.choice([0, 0, unit, 3 * unit])))
    return model, workers


def check_budgets(model: ModelCost, workers, p, report) -> None:
    n = model.n_blocks
    for stage, rep in zip(p.stages, report.stages, strict=True):
        cap, speed = workers[stage.worker].capacity, workers[stage.worker].speed
        assert set(stage.tiers) <= set(speed)
        weights = {t: sum(model.block_bytes[b] for b in stage.blocks if stage.tier_of(b) is t)
                   for t in (GPU, RAM, DISK)}
        disk = [model.block_bytes[b] for b in stage.blocks if stage.tier_of(b) is DISK]
        buffers = DISK_STAGING_SLOTS * max(disk, default=0)
        resident = (sum(model.cache_bytes(b) for b in stage.blocks)
                    + model.embed_bytes * (stage.start == 0) + model.head_bytes * (stage.end == n)
                    - model.tied_bytes * (stage.start == 0 and stage.end == n))
        assert rep.weights == weights and rep.buffers == buffers
        assert rep.resident[GPU] + rep.resident[RAM] == resident and rep.resident[DISK] == 0
        caches = sum(model.cache_bytes(b) for b in stage.blocks)  # where the blocks compute
        assert rep.resident[GPU] == (caches if streams_to_gpu(workers[stage.worker]) else 0)
        streamed = [model.block_bytes[b] for b in stage.blocks if stage.tier_of(b) is not GPU]
        slots = STREAM_SLOTS * max(model.block_bytes[stage.start:stage.end])
        assert rep.stream_buffers == (slots if streams_to_gpu(workers[stage.worker]) and streamed
                                      else 0)
        assert weights[GPU] + rep.resident[GPU] + rep.stream_buffers <= cap.gpu_mem
        overhead = workers[stage.worker].overhead
        assert rep.overhead == overhead and rep.used(RAM) == (weights[RAM] + rep.resident[RAM]
                                                              + buffers + overhead)
        assert weights[RAM] + rep.resident[RAM] + buffers + overhead <= cap.ram
        assert weights[DISK] <= cap.disk


def test_plans_respect_every_budget():
    rng, feasible = random.Random(1234), 0
    for _ in range(300):
        model, workers = random_case(rng, rng.randint(1, 24), rng.randint(1, 6), MiB)
        try:
            p, report = plan(model, workers, objective=rng.choice(["latency", "throughput"]))
        except PlanError as e:
            assert str(e).startswith(f"cannot place {model.n_blocks} blocks")
            continue
        feasible += 1
        check_budgets(model, workers, p, report)
    assert feasible > 100


def reference_stage(model: ModelCost, w: WorkerSpec, s: int, e: int) -> float | None:
    """plan()'s cost model, by exhaustive scan: seconds before any read hidden while
    waiting, or None if it can't fit."""
    got = reference_stage_hidden(model, w, s, e)
    return None if got is None else got[0]


def reference_stage_hidden(model: ModelCost, w: WorkerSpec, s: int,
                           e: int) -> tuple[float, float] | None:
    """(seconds, the most seconds of its first disk block's read that waiting hides)."""
    blocks, speed, n = model.block_bytes, w.speed, model.n_blocks
    cache = [model.cache_bytes(b) for b in range(n)]
    gpu = int(w.capacity.gpu_mem) if GPU in speed else 0
    head = model.head_bytes * (e == n)
    # the runtime first, then embedding and head, always in RAM (a tied matrix once)
    ram = (int(w.capacity.ram) - w.overhead - model.embed_bytes * (s == 0) - head
           + model.tied_bytes * (s == 0 and e == n))
    g = s
    if streams_to_gpu(w):  # every cache on the GPU, then stream slots if not all fit
        room = gpu - sum(cache[s:e])
        if sum(blocks[s:e]) <= room:
            g = e
        else:
            room -= STREAM_SLOTS * max(blocks[s:e])
            if room < 0:
                return None
            while sum(blocks[s:g + 1]) <= room:
                g += 1
    else:
        ram -= sum(cache[s:e])
    for r in range(e, g - 1, -1):  # the largest RAM part that fits wins
        disk = blocks[r:e]
        if (r > g and RAM not in speed) or (disk and DISK not in speed):
            continue
        if (sum(blocks[g:r]) + DISK_STAGING_SLOTS * max(disk, default=0) <= ram
                and sum(disk) <= w.capacity.disk):
            t = sum(blocks[s:g]) / speed.get(GPU, 1) + sum(blocks[g:r]) / speed.get(RAM, 1)
            t += sum(disk) / speed.get(DISK, 1)
            read = (max(0.0, 1 / speed[DISK] - 1 / speed[RAM]) * disk[0]
                    if disk and RAM in speed else 0.0)
            return t + model.head_read * (e == n) / speed.get(RAM, min(speed.values())), read
    return None


def test_incremental_fill_matches_the_reference_on_every_range():
    """Pins the claims that let the DP stop early: fits are monotone in the range end."""
    rng = random.Random(5)
    for _ in range(150):
        model, workers = random_case(rng, rng.randint(1, 20), 1, MiB)
        n, w = model.n_blocks, workers[0]
        costs = planner._model(model)
        for s in range(n):
            got = {p[0]: (p[1], p[8]) for p in planner._stages_from(costs, w, s)}
            want = {e: t for e in range(s + 1, n + 1)
                    if (t := reference_stage_hidden(model, w, s, e)) is not None}
            assert got.keys() == want.keys()
            assert all(got[e] == pytest.approx(want[e]) for e in got)


def stage_times(model: ModelCost, stages, objective: str, hop: float) -> list[float] | None:
    """Each stage's seconds for (worker, start, end) stages in order, None if one misfits.
    Latency: a stage's first disk read hides in its wait, no longer than the stages after
    it and the hop to them take."""
    got = [reference_stage_hidden(model, w, s, e) for w, s, e in stages]
    if None in got:
        return None
    times, after = [], 0.0
    for k in reversed(range(len(got))):
        t, read = got[k]
        if objective == "latency" and k < len(got) - 1:
            t -= min(read, hop + after)
        times.append(t)
        after += t + (hop if k < len(got) - 1 else 0.0)
    return times[::-1]


def brute_force(model: ModelCost, workers, objective: str, hop: float) -> float:
    n, best = model.n_blocks, math.inf
    for counts in itertools.product(range(n + 1), repeat=len(workers)):
        if sum(counts) != n:
            continue
        stages, s = [], 0
        for w, k in zip(workers, counts, strict=True):
            if k:
                stages.append((w, s, s + k))
                s += k
        times = stage_times(model, stages, objective, hop)
        if times is None:
            continue
        cost = sum(times) + hop * (len(times) - 1) if objective == "latency" else max(times)
        best = min(best, cost)
    return best


def test_dp_is_optimal_against_brute_force():
    rng, compared = random.Random(99), 0
    for _ in range(500):
        model, workers = random_case(rng, rng.randint(1, 8), rng.randint(1, 3), 10 * MiB)
        objective, hop = rng.choice(["latency", "throughput"]), rng.choice([0.0, 1e-3, 0.05])
        expected = brute_force(model, workers, objective, hop)
        if expected == math.inf:
            with pytest.raises(PlanError):
                plan(model, workers, objective=objective, hop_seconds=hop)
            continue
        p, report = plan(model, workers, objective=objective, hop_seconds=hop)
        got = report.seconds_per_token if objective == "latency" else report.bottleneck_seconds
        assert got == pytest.approx(expected, rel=1e-9)
        want = stage_times(model, [(workers[s.worker], s.start, s.end) for s in p.stages],
                           objective, hop)
        assert [rep.seconds for rep in report.stages] == pytest.approx(want)
        compared += 1
    assert compared > 150


def test_deterministic_on_a_large_cluster():
    rng = random.Random(7)
    model = ModelCost(tuple(rng.randint(90, 110) * MiB for _ in range(80)), 500 * MiB,
                      500 * MiB, 256 * 1024, 64)
    speed = {GPU: 500e9, RAM: 20e9, DISK: 1.5e9}
    workers = [worker(f"gpu={g}GiB,ram={r}GiB,disk=64GiB", speed)
               for g, r in [(4, 8), (0, 16), (2, 4), (0, 2), (8, 8), (0, 8), (1, 1), (0, 32)]]
    for objective in ("latency", "throughput"):
        first = plan(model, workers, objective=objective)
        assert plan(model, workers, objective=objective) == first


def test_planner_imports_no_ray_or_torch():
    code = ("import sys, llm_shard.coordinator.planner; "
            "print(sorted({'ray', 'torch', 'zmq'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- manifest and table


def test_from_manifest():
    manifest = {"n_blocks": 3, "files": [
        {"name": "embed.safetensors", "bytes": 1000, "sha256": "x"},
        {"name": "blocks/002.safetensors", "bytes": 30},
        {"name": "blocks/000.safetensors", "bytes": 10},
        {"name": "blocks/001.safetensors", "bytes": 20},
        {"name": "head.safetensors", "bytes": 2000},
        {"name": "tokenizer/tokenizer.json", "bytes": 5}]}
    model = ModelCost.from_manifest(manifest, cache_tokens=4096,
                                    cache_bytes_per_token_per_block=512)
    assert model == ModelCost((10, 20, 30), 1000, 2000, (512,) * 3, 4096)
    assert model.cache_bytes(1) == 2 * MiB
    tied = ModelCost.from_manifest(manifest, None, 512, tied=True, head_read_bytes=500)
    assert tied == ModelCost((10, 20, 30), 1000, 2000, 512, None, 1000, 500)
    assert tied.outside_bytes(True, True) == 2000 and tied.outside_bytes(False, True) == 2000
    del manifest["files"][1]
    with pytest.raises(ValueError, match=r"lists no blocks/002\.safetensors"):
        ModelCost.from_manifest(manifest, 1, 1)


def test_format_plan_has_a_row_per_stage_and_totals():
    model = ModelCost((100 * MiB,) * 10, 50 * MiB, 50 * MiB, 1024, 1024)
    workers = [worker("gpu=1GiB,ram=1GiB", {GPU: 500e9, RAM: 20e9}),
               worker("ram=400MiB,disk=4GiB"), worker("ram=2GiB")]
    p, report = plan(model, workers, objective="throughput")
    text = format_plan(p, report, model)
    lines = text.splitlines()
    assert lines[0].split() == ["stage", "worker", "blocks", "runtime", "gpu", "ram", "disk",
                                "ms/token"]
    assert len(lines) == 1 + len(p) + 2
    for i, (stage, line) in enumerate(zip(p.stages, lines[1:], strict=False)):
        assert line.split()[:2] == [str(i), str(stage.worker)]
        assert f"[{stage.start}, {stage.end})" in line
    assert "blk" in lines[1] and "total: 10 blocks" in text and "ms/token" in lines[-1]
    with pytest.raises(ValueError, match="does not describe"):
        format_plan(p, plan(model, workers[:1] * 3, objective="throughput")[1], model)
