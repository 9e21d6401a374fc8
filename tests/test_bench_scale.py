"""`llm-shard bench scale`'s plumbing on a tiny random LLaMA whose workers' RAM budgets
hold about half of its blocks: real Ray workers stream the rest from disk, and the bench
reports the figures it claims (disk bytes per token from the workers' own counters,
peak RSS per worker, the plan's prediction, the same tokens as one roomy worker). No
timing is asserted: figures on a shared CI machine mean nothing."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from llm_shard.benchmarks import report as bench_report
from llm_shard.benchmarks import scale
from llm_shard.coordinator.cli import cli


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def tiny_run(ray_cluster, tmp_path_factory):
    """`scale.run` of the tiny shape, 2 decode tokens, 1 and 3 sequences together. The
    store is built in a folder of its own: the workers (this session's Ray, the same
    $LLM_SHARD_HOME) open it where it is, and copy nothing."""
    folder = tmp_path_factory.mktemp("scale")
    return scale.run(("tiny",), tokens=2, sequences=(1, 3), folder=folder, progress=False,
                     log=lambda *_: None)


@pytest.mark.slow
def test_the_tiny_model_streams_blocks_from_disk_and_reports_every_figure(tiny_run):
    [m] = tiny_run["models"]
    assert tiny_run["workers"] == scale.WORKERS == len(m["workers"]) == len(m["worker_rss"])
    # the budgets do not hold every block: some are planned on the disk tier
    assert sum(s["tiers"].get("disk", 0) for s in m["stages"]) > 0
    assert [s["blocks"][0] for s in m["stages"]][0] == 0
    assert m["stages"][-1]["blocks"][1] == 24
    # every decode pass reads each disk block's file once: the weights and a header
    planned = m["planned_disk_bytes_per_token"]
    assert planned > 0 and planned <= m["disk_bytes_per_token"] <= 1.05 * planned
    # the workers' counters agree, give or take a block prefetched across the runs' edges
    block = m["block_bytes"] / 24
    assert abs(m["counted_disk_bytes_per_token"] - m["disk_bytes_per_token"]) <= block
    assert m["disk_roofline_tok_s"] == pytest.approx(
        max(m["cold_read_GBps"], m["cold_read_GBps_after"]) * 1e9 / m["disk_bytes_per_token"])
    assert m["of_disk_roofline"] == pytest.approx(m["one"]["tok_s"] / m["disk_roofline_tok_s"])
    assert positive(m["predicted_s_per_token"]) and positive(m["one"]["s_per_token"])
    assert all(positive(s["predicted_s"]) for s in m["stages"])
    assert len(m["one"]["tokens"]) == 3 and len(m["one"]["stage_ms"]) == len(m["stages"])
    for w in m["worker_rss"]:  # read from each worker process (VmHWM)
        assert w["pid"] > 0 and w["peak_rss"] >= w["baseline_rss"] > 0
        assert w["budget_ram"] == m["ram_budgets_bytes"] // 3
        assert w["peak_within_budget"] == (w["peak_rss"] <= w["budget_ram"])


@pytest.mark.slow
def test_throughput_mode_is_held_to_its_stages_step_times(tiny_run):
    [m] = tiny_run["models"]
    assert [b["sequences"] for b in m["batches"]] == [1, 3]
    groups = len(m["batch_stages"])
    for b, t in zip(m["batches"], m["throughput"]):
        assert len(b["tokens"]) == b["sequences"] and all(len(x) == 3 for x in b["tokens"])
        assert t["micro_batches"] == groups
        assert t["every_stage_busy_tok_s"] == pytest.approx(
            b["sequences"] / groups / (max(b["stage_ms"]) / 1e3))
        assert t["stages_one_at_a_time_tok_s"] <= t["every_stage_busy_tok_s"]
    one = m["one_micro_batch"]
    assert one["micro_batches"] == 1 and one["sequences"] == 3 and positive(one["tok_s"])


@pytest.mark.slow
def test_tight_workers_give_the_roomy_workers_tokens(tiny_run):
    [m] = tiny_run["models"]
    ref = m["reference"]
    assert ref["ran"], ref
    assert set(ref["same_tokens"]) == {"one", "batch_1", "batch_3", "one_micro_batch_3"}
    assert ref["all_same"] and all(ref["same_tokens"].values())
    # compared bit for bit: the stages pass activations unrounded (bf16 may flip a tie)
    assert m["wire_dtype"] == "fp32"


@pytest.mark.slow
def test_the_report_has_its_tables_and_plot(tiny_run, tmp_path):
    r = {"version": 1, "date": "d", "quick": True, "config": {"runs": 1, "warmup": 1},
         "machine": {"memory_GBps": 1.0, "memory_GBps_after": 1.0, "disk_read_GBps": 1.0,
                     "page_cache": "dropped", "page_cache_dropped": True, "cpus": 2,
                     "threads": 2, "torch": "t", "platform": "p"},
         "suites": {"scale": tiny_run}}
    names = bench_report.write(r, tmp_path)
    md = (tmp_path / "bench.md").read_text()
    assert "### Scale: models larger than their workers' RAM" in md
    assert md.count("random LLaMA (tiny) int8 |") == 4  # 1 + 3 rows (2 counts, 1 micro-batch)
    assert json.loads((tmp_path / "bench.json").read_text())["suites"]["scale"]["models"]
    if r["plots"] != bench_report.NO_PNG:
        assert "scale.png" in names and (tmp_path / "scale.png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_models_and_bad_counts_are_refused_by_name():
    for args, why in ((["--models", "llama-7b,nope"], "nope"),
                      (["--sequences", "8,x"], "--sequences"),
                      (["--tokens", "0"], "--tokens")):
        done = CliRunner().invoke(cli, ["bench", "scale", *args])
        assert done.exit_code == 2 and why in done.output, done.output


@pytest.mark.slow
def test_tight_budgets_hold_a_third_of_the_blocks_beside_their_buffers(tmp_path):
    from llm_shard.models.base import Part

    store = scale.build("tiny", layers=6, folder=tmp_path / "tiny", progress=False)
    runtime = 300 * 2**20
    spec = scale.tight_spec(store, cache_tokens=256, runtime=runtime)
    ram = int(spec.split(",")[0].removeprefix("ram=")) - runtime
    block = store.part_bytes(Part("block", 0))
    resident = max(store.part_bytes(Part("embed")), store.part_bytes(Part("head")))
    cache = 256 * store.config.cache_bytes_per_token * 2  # 2 of the 6 blocks per stage
    # each worker: its resident part, two staging buffers, its cache, and blocks' room
    # for a third of the model's blocks over all the workers
    weights = ram - resident - 2 * block - cache
    assert scale.WORKERS * weights == pytest.approx(6 * block / 3, abs=scale.WORKERS)
