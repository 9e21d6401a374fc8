"""The benchmark harness works: `llm-shard bench suite --quick`, as a user runs it, runs
every suite with tiny counts on SmolLM2-135M (and a three-block random PanGu-α for
decode, split and swap) and writes bench.json with every field, bench.md and the plots.
No timing is asserted: figures on a shared CI machine mean nothing."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from llm_shard.benchmarks import kernels, suite, turns, versus
from llm_shard.benchmarks import report as bench_report
from llm_shard.cluster import transfer
from llm_shard.coordinator.cli import cli

MACHINE = {"memory_GBps", "memory_GBps_after", "disk_read_GBps", "disk_read_of", "page_cache",
           "page_cache_dropped", "cpus", "threads", "torch", "python", "platform", "machine",
           "cpu", "cpu_vector", "int8_kernel"}
BATCH = {"prefill_tok_s", "decode_tok_s", "bandwidth_GBps", "roofline_tok_s", "of_roofline"}
PROFILE = {"step_ms", "modules_ms", "calls_per_step", "outside_modules_ms", "int8_linear_ms",
           "int8_linear_GBps", "bandwidth_GBps", "timing"}
VERSUS_ROW = {"engine", "dtype", "tok_s", "seconds", "step_weight_bytes", "of_roofline"}
LOAD_ROW = {"engine", "source", "weight_file_bytes", "cold_start_s", "import_s", "load_s",
            "first_token_s", "disk_bound_s", "of_disk_bound"}
SPLIT_ROW = {"workers", "plan", "decode_tok_s", "of_unsplit", "hop_ms", "stage_ms", "busy_ms",
             "wire_ms", "step_ms", "of_roofline", "in_process_tok_s", "in_process_of_unsplit"}
THROUGHPUT = {"model", "requests", "workers", "max_tokens", "micro_batches_off_tok_s",
              "micro_batches_on_tok_s", "micro_batching_gain", "suite_seconds"}
SWAP = {"model", "store", "blocks", "block_bytes", "stage_ram_budget_bytes",
        "model_over_budget", "cold_read_GBps", "prefetch_on", "prefetch_off",
        "prefetch_speedup", "tokens", "threads", "runs", "suite_seconds"}


# the quick run of every suite starts a dozen Ray pipelines: on a loaded 2-core host it
# takes longer than pytest's default timeout (pyproject.toml)
pytestmark = pytest.mark.timeout(1500)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick_run(ray_cluster, smollm2_stores, tmp_path_factory, request):
    """`llm-shard bench suite --quick` of every suite through the command line, on the
    session's SmolLM2 stores (linked where the catalog looks for them), into a folder:
    (bench.json's dict, the folder, what it printed). A suite that raises fails it."""
    home = tmp_path_factory.mktemp("home")
    (home / "smollm2-135m").symlink_to(smollm2_stores["int8"].path)
    (home / "smollm2-135m-fp32").symlink_to(smollm2_stores["fp32"].path)
    if versus.transformers_available():  # the peer's fp32 folder, made once a session
        (home / "smollm2-135m-hf-fp32").symlink_to(request.getfixturevalue("smollm2_hf_folder"))
    out = tmp_path_factory.mktemp("bench")
    # This session's Ray workers keep stores under their own $LLM_SHARD_HOME (the one the
    # session started with), not this test's: each fetches a copy of every store it loads
    # (cluster/transfer.py). The copies this run makes are removed after it.
    theirs = worker_home()
    stores = [smollm2_stores["int8"].path, smollm2_stores["fp32"].path, out / "pangu",
              *(home / name for name in ("smollm2-135m", "smollm2-135m-fp32",
                                         "bench-scale-tiny"))]
    copies = {transfer.local_store_path(p, home, theirs) for p in stores} - {*stores}
    copies = {p for p in copies if not p.exists()}
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LLM_SHARD_HOME", str(home))
            # --threads 1: on a shared CI machine, more threads than free cores crawl
            done = CliRunner().invoke(cli, ["bench", "suite", "--quick", "--threads", "1",
                                            "--out", str(out), "--pangu-dir",
                                            str(out / "pangu")])
    finally:
        for p in copies:
            shutil.rmtree(p, ignore_errors=True)
    if done.exception is not None and not isinstance(done.exception, SystemExit):
        raise done.exception
    assert done.exit_code == 0, done.output
    r = json.loads((out / "bench.json").read_text())
    print({k: round(v["suite_seconds"], 1) for k, v in r["suites"].items()})
    return r, out, done.output


def worker_home() -> Path:
    """$LLM_SHARD_HOME (or its default) of this session's Ray workers."""
    import ray

    from llm_shard.models.checkpoint.catalog import home

    return Path(ray.get(ray.remote(lambda: str(home())).remote()))


@pytest.mark.slow
def test_every_suite_runs_and_its_json_has_every_field(quick_run):
    r, out, printed = quick_run
    assert set(r) >= {"version", "date", "quick", "config", "machine", "suites", "plots"}
    # --quick's counts, --threads's threads
    assert r["quick"] and r["config"] == json.loads(json.dumps(
        {**asdict(suite.quick_config()), "threads": 1}))
    assert set(r["machine"]) >= MACHINE
    assert positive(r["machine"]["memory_GBps"]) and positive(r["machine"]["disk_read_GBps"])
    s = r["suites"]
    assert set(s) == set(suite.SUITES)

    decode = s["decode"]
    assert decode["batches"] == [1, 16] and len(decode["models"]) == 2
    assert "SmolLM2" in decode["models"][0]["model"]
    assert "PanGu" in decode["models"][1]["model"]
    for m in decode["models"]:
        assert positive(m["step_weight_bytes"]) and positive(m["roofline_tok_s_batch_1"])
        for b in (1, 16):
            row = m[f"batch_{b}"]
            assert set(row) == BATCH and all(positive(v) for v in row.values())
            assert row["roofline_tok_s"] == pytest.approx(
                b * row["bandwidth_GBps"] * 1e9 / m["step_weight_bytes"])
        p = m["profile_batch_1"]
        assert set(p) == PROFILE and positive(p["int8_linear_GBps"])
        # every linear of every block, fused q/k/v and gate/up included, and the head:
        # SmolLM2's screened one (none where its one C call, w8a16_head, runs it), PanGu's
        # random untied head an int8 layer among the Int8Linears
        calls = p["calls_per_step"]
        assert calls["Int8Linear"] > 0
        assert calls.get("ScreenedLinear", 0) <= (1 if "SmolLM2" in m["model"] else 0)
        assert sum(p["modules_ms"].values()) <= p["step_ms"]
        assert p["int8_linear_ms"] == pytest.approx(
            p["modules_ms"]["Int8Linear"] + p["modules_ms"].get("ScreenedLinear", 0))

    vs = s["versus"]
    engines = {(x["engine"], x["dtype"]) for x in vs["rows"]}
    assert {("llm-shard", "fp32"), ("llm-shard", "bf16"), ("llm-shard", "int8")} <= engines
    for row in vs["rows"]:
        assert set(row) >= VERSUS_ROW and positive(row["tok_s"])
    if versus.transformers_available():
        assert {("transformers", "fp32"), ("transformers", "bf16")} <= engines
        # the same weights and prompt, greedy: the same tokens in fp32
        assert vs["fp32_same_tokens"] == f"{vs['new_tokens']}/{vs['new_tokens']}"
        for row in vs["rows"]:
            if row["engine"] == "llm-shard":
                assert positive(row["vs_transformers_fp32"])
                assert positive(row["vs_transformers_bf16"])
    else:
        assert "not installed" in vs["transformers"]

    load = s["load"]
    assert "posix_fadvise" in load["page_cache"]
    sources = [x["source"] for x in load["rows"]]
    assert sources[:2] == ["store int8", "store fp32"]
    for row in load["rows"]:
        assert set(row) >= LOAD_ROW and positive(row["cold_start_s"])
    if versus.transformers_available():
        assert [x["source"] for x in load["rows"][2:]] == [
            "safetensors fp32", "GGUF Q4_1, dequantized to fp32"]
        assert all(positive(x["vs_transformers"]) for x in load["rows"][:2])

    split = s["split"]["models"]
    assert ["SmolLM2" in split[0]["model"], "PanGu" in split[1]["model"]] == [True, True]
    for model in split:
        assert [x["workers"] for x in model["rows"]] == [1, 2, 3]
        for row in model["rows"]:
            assert set(row) == SPLIT_ROW and positive(row["decode_tok_s"])
            assert len(row["plan"]) == len(row["stage_ms"]) == len(row["busy_ms"]) == row["workers"]
            assert positive(row["wire_ms"]) and positive(row["step_ms"])
            assert positive(row["in_process_tok_s"]) and positive(row["in_process_of_unsplit"])

    assert set(s["throughput"]) == THROUGHPUT
    assert positive(s["throughput"]["micro_batching_gain"])

    assert set(s["swap"]) == SWAP
    for k in ("prefetch_on", "prefetch_off"):
        assert set(s["swap"][k]) == {"tok_s", "disk_GBps", "of_bandwidth"}

    [tiny] = s["scale"]["models"]  # --quick: the tiny random LLaMA (test_bench_scale.py)
    assert tiny["model"] == "random LLaMA (tiny) int8" and positive(tiny["one"]["tok_s"])
    assert positive(tiny["of_disk_roofline"]) and tiny["reference"]["all_same"]

    # it printed the tables and the files it wrote
    assert bench_report.markdown(r) in printed
    assert f"wrote {out / 'bench.json'}, {out / 'bench.md'}" in printed


@pytest.mark.slow
def test_markdown_has_a_table_per_suite(quick_run):
    r, out, _ = quick_run
    md = (out / "bench.md").read_text()
    for title in ("Targets", "Decode and prefill", "Versus transformers", "Cold start",
                  "Split over", "Throughput", "Swap", "Scale"):
        assert f"### {title}" in md
    assert "GB/s" in md and "| --- |" in md
    m = r["machine"]  # which CPU and int8 kernel the figures are of
    assert m["cpu"] and kernels.cpu_line(m) in md.splitlines()[0]
    assert m["int8_kernel"].startswith(("w8a16 ", "fbgemm (w8a16 cannot run here"))
    assert md.count("Where a batch-1 decode step of") == 2
    # a row per target: PanGu's roofline, transformers (when installed), split of each
    # model, cold start (when transformers is installed)
    rows = bench_report.targets(r)
    assert len(rows) == (5 if versus.transformers_available() else 3)
    assert all(row[2] in ("yes", "no") and f"| {row[0]} |" in md for row in rows)


@pytest.mark.slow
def test_plots_or_a_note_saying_how_to_get_them(quick_run):
    r, out, printed = quick_run
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert r["plots"] == bench_report.NO_PNG
        assert bench_report.NO_PNG in (out / "bench.md").read_text()
        assert f"\n{bench_report.NO_PNG}\n" in printed  # and says so
    else:
        assert sorted(r["plots"]) == sorted(f"{n}.png" for n in suite.SUITES)
        for name in r["plots"]:
            assert (out / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_the_markdown_works_without_matplotlib(quick_run, tmp_path, monkeypatch):
    r, _, _ = quick_run
    import builtins

    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    names = bench_report.write(dict(r), tmp_path)
    assert names == ["bench.json", "bench.md"]
    assert json.loads((tmp_path / "bench.json").read_text())["plots"] == bench_report.NO_PNG
    assert bench_report.NO_PNG in (tmp_path / "bench.md").read_text()


def test_unknown_suites_are_refused_by_name():
    with pytest.raises(ValueError, match="nope"):
        suite.run(["decode", "nope"])
    with pytest.raises(SystemExit):
        suite.main(["--suites", "decode,nope"])


def test_bench_kernels_names_the_cpu_and_times_every_kernel(capsys):
    """`llm-shard bench kernels --quick`: a row per kernel, shape and batch, each timed
    unless it fell back to another kernel (then named, not timed under the wrong name),
    under a first line naming the CPU and the int8 kernel "auto" runs."""
    r = kernels.main(["--quick", "--repeats", "1"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == kernels.cpu_line(r) and r["int8_kernel"] in out[0]
    assert {row["kernel"] for row in r["rows"]} == set(kernels.KERNELS)
    for row in r["rows"]:
        assert (row["gbs"] is None) == (row["running"] != row["kernel"]), row
        assert row["gbs"] is None or positive(row["gbs"])
    assert len(out) == 5 + len(r["rows"]) // len(kernels.KERNELS)  # 5 lines of heading


def test_versus_engines_take_turns_and_ratios_pair_the_same_rounds(monkeypatch):
    # the rounds' ratios are 5, 2 and 1: their median is 2 (the ratio of the medians
    # would say 4)
    assert turns.paired_speedup([1.0, 1.0, 4.0], [5.0, 2.0, 4.0]) == 2.0
    with pytest.raises(ValueError):
        turns.paired_speedup([1.0], [1.0, 2.0])

    calls, clock = [], iter(range(1000))
    monkeypatch.setattr(turns.time, "perf_counter", lambda: float(next(clock)))

    def engine(name, cost):
        def run():
            calls.append(name)
            for _ in range(cost - 1):  # each call advances the clock: cost seconds
                next(clock)
            return [name]
        return run

    seconds, tokens = turns.take_turns({"a": engine("a", 1), "b": engine("b", 3),
                                        "c": engine("c", 2)}, runs=3, warmup=1)
    # every round calls each engine once, the order rotating; warm-up rounds untimed
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert seconds == {"a": [1.0] * 3, "b": [3.0] * 3, "c": [2.0] * 3}
    assert tokens == {"a": ["a"], "b": ["b"], "c": ["c"]}


def test_split_decode_times_pair_each_rounds_long_and_short_generates(monkeypatch):
    """Per round, a long generate less a short one on the same LLM; the host's speed
    changes from round to round (factor f), so only pairs of one round give the ratio."""
    from llm_shard.benchmarks import pipeline

    clock, calls = [0.0], []
    factors = [1.0, 3.0, 1.5, 2.0]  # the warm-up round's, then 3 timed rounds'
    monkeypatch.setattr(turns.time, "perf_counter", lambda: clock[0])

    class FakeLLM:
        tokenizer = None

        def __init__(self, step: float) -> None:
            self.step = step

        def generate(self, prompt_token_ids, params):
            f = factors[len(calls) // 4]  # 2 LLMs x (long, short) calls a round
            calls.append((self.step, params.max_tokens))
            clock[0] += f * (0.5 + self.step * params.max_tokens)  # prefill + decode

    per_token = pipeline.decode_seconds({1: FakeLLM(0.02), 3: FakeLLM(0.025)}, tokens=8,
                                        runs=3)
    assert len(calls) == 16
    assert per_token[1] == pytest.approx([0.02 * f for f in factors[1:]])
    assert per_token[3] == pytest.approx([0.025 * f for f in factors[1:]])
    assert turns.paired_speedup(per_token[3], per_token[1]) == pytest.approx(0.8)


@pytest.mark.parametrize("command, option", [("kernels", "--threads"), ("swap", "--preset"),
                                             ("pipeline", "--tokens"), ("suite", "--suites"),
                                             ("gpu", "--layers")])
def test_bench_help_shows_the_benchmarks_own_options(command, option):
    from click.testing import CliRunner

    from llm_shard.coordinator.cli import cli

    r = CliRunner().invoke(cli, ["bench", command, "--help"])
    assert r.exit_code == 0, r.output
    assert f"usage: llm-shard bench {command}" in r.output and option in r.output


def test_bench_gpu_says_when_there_is_no_gpu_and_reports_a_gpu_run(monkeypatch):
    """CI has no GPU: `bench gpu` refuses with why; its report renders the stored H200 run
    (benchmarks/results-gpu/gpu.json) with every kernel column and the three decode modes."""
    from pathlib import Path

    from click.testing import CliRunner

    from llm_shard.benchmarks import gpu
    from llm_shard.coordinator.cli import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = CliRunner().invoke(cli, ["bench", "gpu", "--layers", "1"])
    assert r.exit_code == 1 and "torch sees no CUDA GPU here" in r.output
    stored = json.loads((Path(__file__).parents[1] / "benchmarks/results-gpu/gpu.json")
                        .read_text())
    text = gpu.report(stored)
    assert "GPU NVIDIA H200 (compute capability 9.0" in text
    header = next(line for line in text.splitlines() if line.startswith("| layer | rows |"))
    for kernel in ("triton_row_fp32", "dequant_fp32", "linear_fp32", "int8pack_bf16"):
        assert kernel in header
    rows = [line for line in text.splitlines() if line.startswith("| pangu-2.6b mlp-up")]
    assert len(rows) == len(gpu.ROWS) and all(line.count("|") == header.count("|")
                                              for line in rows)
    assert "- resident (CUDA graphs): blocks 196.0 tok/s" in text
    assert "- resident, no CUDA graphs: blocks 55.9 tok/s" in text
    assert "- streamed: blocks 12.0 tok/s" in text
