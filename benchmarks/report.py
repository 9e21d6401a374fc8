"""The suite's report: DIR/bench.json (every figure), DIR/bench.md (a Markdown table per
suite, under the benchmark issue's targets, each measured and met or not) and DIR/*.png
(one bar chart per suite, with matplotlib: pip install llm-shard[bench]).
"""

from __future__ import annotations

import json
from pathlib import Path

NO_PNG = "no PNG: pip install llm-shard[bench]"


def _table(head: list[str], rows: list[list]) -> list[str]:
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head),
            *("| " + " | ".join(cell(v) for v in r) + " |" for r in rows), ""]


def markdown(r: dict) -> str:
    """bench.md's text: the machine and its bandwidths, the targets, a table per suite."""
    from llm_shard.benchmarks.kernels import cpu_line

    m = r["machine"]
    quick = " (quick: tiny counts, figures mean little)" if r["quick"] else ""
    dropped = "" if m["page_cache_dropped"] else (
        "; NOTE: the cold read ran near memory speed, so the pages were probably not dropped")
    cpu = f"{cpu_line(m)}; " if "cpu" in m else ""  # older reports lack them
    lines = [f"Benchmarks of {r['date']}{quick}: {cpu}{m['cpus']} CPUs, {m['threads']} torch "
             f"threads, torch {m['torch']}, "
             f"{m['platform']}. Each figure is the median of {r['config']['runs']} run(s) "
             f"after {r['config']['warmup']} warm-up run(s).", "",
             f"Measured in the same run: memory read **{m['memory_GBps']:.1f} GB/s** "
             f"({m['memory_GBps_after']:.1f} GB/s at the end), cold disk read "
             f"**{m['disk_read_GBps']:.2f} GB/s** ({m['page_cache']}"
             f"{dropped}).",
             ""]
    rows = targets(r)
    if rows:
        lines += ["### Targets", "",
                  "The benchmark issue's targets, from the figures below. Where one is not "
                  "met, the profile under *Decode and prefill* shows where a step goes, "
                  "and the cold-start table splits imports, load and first token."
                  + (" A quick run's tiny counts say nothing about them." if r["quick"]
                     else ""), ""]
        lines += _table(["target", "measured", "met"], rows)
    for name, section in SECTIONS.items():
        if name in r["suites"]:
            lines += section(r["suites"][name])
    return "\n".join(lines)


def _decode_md(d: dict) -> list[str]:
    lines = ["### Decode and prefill", "",
             f"{d['prompt_tokens']} prompt tokens, {d['tokens']} new tokens per sequence. "
             "Roofline: batch × memory bandwidth / weight bytes read per step. The "
             "bandwidth is read between the decode steps of every timed run, and each "
             "run's share of the roofline is against the bandwidth of its own moments "
             "(medians shown).", ""]
    lines += _table(["model", "batch", "prefill tok/s", "decode tok/s", "memory GB/s",
                     "roofline tok/s", "of roofline"],
                    [[x["model"], b, x[f"batch_{b}"]["prefill_tok_s"],
                      x[f"batch_{b}"]["decode_tok_s"], x[f"batch_{b}"]["bandwidth_GBps"],
                      x[f"batch_{b}"]["roofline_tok_s"],
                      f"{x[f'batch_{b}']['of_roofline']:.0%}"]
                     for x in d["models"] for b in d["batches"]])
    gains = [f"{x['model']} {x['modules_batch_1']['decode_tok_s']:.3g} tok/s, "
             f"{x['modules_batch_1']['fused_blocks_speedup']:.2f}x"
             for x in d["models"] if "modules_batch_1" in x]
    if gains:
        lines += ["", "A batch-1 decode step runs each block in one C call "
                  "(models/kernels/decode.py). With every module called from Python instead, "
                  "decode ran at: " + "; ".join(gains) + " (the one-call blocks' "
                  "speedup).", ""]
    return lines + _profile_lines(d)


def _versus_md(v: dict) -> list[str]:
    lines = ["### Versus transformers (SmolLM2-135M, batch 1)", "",
             f"Greedy, {v['prompt_tokens']} prompt tokens, {v['new_tokens']} new tokens; "
             f"{v['timing']}. transformers: {v['transformers']}."
             + (f" fp32 tokens identical: {v['fp32_same_tokens']}."
                if "fp32_same_tokens" in v else ""), ""]
    return lines + _table(["engine", "weights", "tok/s", "of roofline", "vs transformers fp32",
                           "vs transformers bf16"],
                          [[x["engine"], x["dtype"], x["tok_s"], f"{x['of_roofline']:.0%}",
                            x.get("vs_transformers_fp32", "-"),
                            x.get("vs_transformers_bf16", "-")]
                           for x in v["rows"]])


def _load_md(ld: dict) -> list[str]:
    lines = ["### Cold start to first token (SmolLM2-135M)", "",
             f"{ld['timing']}; {ld['page_cache']}. Disk bound: weight bytes / measured "
             f"disk bandwidth. transformers: {ld['transformers']}; vs transformers: its cold "
             "start from the fp32 safetensors over ours.", ""]
    return lines + _table(["engine", "weights", "MB", "cold start s", "load s", "disk bound s",
                           "of disk bound", "vs transformers"],
                          [[x["engine"], x["source"], x["weight_file_bytes"] / 1e6,
                            x["cold_start_s"], x["load_s"], x["disk_bound_s"],
                            f"{x['of_disk_bound']:.0%}", x.get("vs_transformers", "-")]
                           for x in ld["rows"]])


def _split_md(sp: dict) -> list[str]:
    lines = ["### Split over local workers (one sequence)", "",
             f"{sp['tokens']} new tokens; {sp['runs']} rounds, the worker counts "
             "taking turns. Each round times a generate of one token and one of "
             f"{sp['tokens'] + 1} on each count: their difference is the decode. "
             "*decode tok/s* is the median over the rounds; *of unsplit* and *ms per "
             "hop* are medians of the rounds' own ratios and differences (runs of the "
             "same moments). Every worker gets all the CPUs, so this "
             "measures the hops alone. Per stage, *compute* is the model's time, and "
             "*held* is from receiving a step to sending it on. *wire* is the rest of "
             "the round trip, all hops together. Both are averaged over the last "
             "steps. *in one process* is the same cut with no transport: the stages "
             "called one after another in the benchmark's process, the hidden rows "
             "through the wire's dtype (a third of the rounds, after the workers are "
             "gone), as a share of the whole model in that process.", ""]
    for model in sp["models"]:
        lines += [f"{model['model']}: roofline {model['roofline_tok_s']:.0f} tok/s.", ""]
        lines += _table(["workers", "blocks", "decode tok/s", "of unsplit", "ms per hop",
                         "compute ms", "held ms", "wire ms", "of roofline",
                         "in one process"],
                        [[x["workers"], x["plan"], x["decode_tok_s"],
                          f"{x['of_unsplit']:.0%}", x["hop_ms"],
                          " + ".join(f"{v:.2f}" for v in x["stage_ms"]),
                          " + ".join(f"{v:.2f}" for v in x["busy_ms"]), x["wire_ms"],
                          f"{x['of_roofline']:.0%}", f"{x['in_process_of_unsplit']:.0%}"]
                         for x in model["rows"]])
    return lines


def _throughput_md(t: dict) -> list[str]:
    lines = ["### Throughput (continuous batching, 2 workers)", "",
             f"{t['requests']} requests at once, max_tokens {t['max_tokens']}.", ""]
    return lines + _table(["micro-batches", "tok/s"],
                          [["off (1 in flight)", t["micro_batches_off_tok_s"]],
                           ["on (2 in flight)", t["micro_batches_on_tok_s"]],
                           ["gain", t["micro_batching_gain"]]])


def _swap_md(w: dict) -> list[str]:
    lines = ["### Swap: every block on the disk tier", "",
             f"{w['model']}: {w['block_bytes'] / 2**30:.2f} GiB of blocks, "
             f"{w['model_over_budget']:.1f}x the stage's RAM budget; cold disk read "
             f"{w['cold_read_GBps']:.2f} GB/s.", ""]
    return lines + _table(["prefetch", "tok/s", "disk GB/s", "of disk bandwidth"],
                          [[k, w[f"prefetch_{k}"]["tok_s"], w[f"prefetch_{k}"]["disk_GBps"],
                            f"{w[f'prefetch_{k}']['of_bandwidth']:.0%}"] for k in ("on", "off")])


def _scale_md(sc: dict) -> list[str]:
    from llm_shard.benchmarks import scale

    return scale.markdown(sc)


# bench.md's sections, in the suites' order
SECTIONS = {"decode": _decode_md, "versus": _versus_md, "load": _load_md, "split": _split_md,
            "throughput": _throughput_md, "swap": _swap_md, "scale": _scale_md}


def targets(r: dict) -> list[list]:
    """[target, measured, "yes"/"no"] for each target whose suite ran."""
    s, rows = r["suites"], []

    def row(target: str, measured: str, met: bool) -> None:
        rows.append([target, measured, "yes" if met else "no"])

    if "decode" in s:
        for m in s["decode"]["models"]:
            if "PanGu" in m["model"] and "batch_1" in m:
                f = m["batch_1"]["of_roofline"]
                row(f"{m['model']} decode at batch 1 >= 85% of the bandwidth roofline",
                    f"{f:.0%}", f >= 0.85)
    if "versus" in s:
        ours = next((x for x in s["versus"]["rows"]
                     if x["engine"] == "llm-shard" and x["dtype"] == "int8"), None)
        if ours is not None and "vs_transformers_fp32" in ours:
            fp32, bf16 = ours["vs_transformers_fp32"], ours["vs_transformers_bf16"]
            row("int8 decode >= 4x transformers fp32, and ahead of its bf16",
                f"{fp32:.2f}x fp32, {bf16:.2f}x bf16", fp32 >= 4 and bf16 > 1)
    if "split" in s:
        for m in s["split"]["models"]:
            three = next((x for x in m["rows"] if x["workers"] == 3), None)
            if three is not None:
                row(f"{m['model']} split over 3 local workers >= 0.95x unsplit",
                    f"{three['of_unsplit']:.2f}x (the same cut in one process: "
                    f"{three['in_process_of_unsplit']:.2f}x)", three["of_unsplit"] >= 0.95)
    if "load" in s:
        ours = next((x for x in s["load"]["rows"] if x["source"] == "store int8"), None)
        if ours is not None and "vs_transformers" in ours:
            row("cold start to first token >= 2x faster than transformers (int8 store)",
                f"{ours['vs_transformers']:.2f}x", ours["vs_transformers"] >= 2)
    return rows


def _profile_lines(d: dict) -> list[str]:
    lines = []
    for m in d["models"]:
        p = m.get("profile_batch_1")
        if not p:
            continue
        step = p["step_ms"]
        gbps = p["int8_linear_GBps"]
        read = (f"read the step's {m['step_weight_bytes'] / 1e9:.2f} GB of weights at "
                f"{gbps:.1f} GB/s ({gbps / p['bandwidth_GBps']:.0%} of the "
                f"{p['bandwidth_GBps']:.1f} GB/s read between the same steps)"
                if gbps and p["bandwidth_GBps"] else "ran")
        lines += [f"Where a batch-1 decode step of {m['model']} goes: {p['timing']}. The "
                  f"hooked step took {step:.1f} ms. The int8 linear layers (kernel and its "
                  f"Python) {read} in {p['int8_linear_ms']:.1f} ms; everything else took "
                  f"{step - p['int8_linear_ms']:.1f} ms "
                  f"({(step - p['int8_linear_ms']) / step:.0%} of the step).", ""]
        rows = [[k, v, f"{v / step:.0%}", p["calls_per_step"][k]]
                for k, v in p["modules_ms"].items() if v >= 0.01 * step]
        rows.append(["(outside every module: argmax, batch setup, hooks)",
                     p["outside_modules_ms"], f"{p['outside_modules_ms'] / step:.0%}", "-"])
        lines += _table(["module (self time)", "ms per step", "of the step",
                         "calls per step"], rows)
    return lines


def plots(r: dict, out: Path) -> list[str]:
    """One PNG per suite; [] when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    s, written = r["suites"], []

    def bars(name: str, title: str, labels: list[str], series: dict[str, list[float]],
             ylabel: str) -> None:
        import textwrap

        labels = [textwrap.fill(x, 16) for x in labels]
        fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(labels) + 2), 3.8))
        width = 0.8 / max(1, len(series))
        for k, (label, values) in enumerate(series.items()):
            ax.bar([i + k * width for i in range(len(labels))], values, width, label=label)
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))], labels,
                      fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        if len(series) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
        written.append(f"{name}.png")

    if "decode" in s:
        d = s["decode"]
        labels = [f"{x['model']}, batch {b}" for x in d["models"] for b in d["batches"]]
        cells = [x[f"batch_{b}"] for x in d["models"] for b in d["batches"]]
        bars("decode", "decode: share of the memory-bandwidth roofline", labels,
             {"of roofline": [c["of_roofline"] for c in cells]}, "decode / roofline")
    if "versus" in s:
        v = s["versus"]["rows"]
        bars("versus", "SmolLM2-135M greedy generate, batch 1",
             [f"{x['engine']} {x['dtype']}" for x in v], {"tok/s": [x["tok_s"] for x in v]},
             "tok/s")
    if "load" in s:
        ld = s["load"]["rows"]
        bars("load", "cold start to first token", [f"{x['engine']}: {x['source']}" for x in ld],
             {"cold start": [x["cold_start_s"] for x in ld],
              "disk bound": [x["disk_bound_s"] for x in ld]}, "seconds")
    if "split" in s:
        sp = s["split"]["models"]
        bars("split", "decode over local workers, of unsplit",
             [f"{x['workers']} worker(s)" for x in sp[0]["rows"]],
             {m["model"]: [x["of_unsplit"] for x in m["rows"]] for m in sp}, "of unsplit")
    if "throughput" in s:
        t = s["throughput"]
        bars("throughput", f"{t['requests']} requests, continuous batching",
             ["micro-batches off", "micro-batches on"],
             {"tok/s": [t["micro_batches_off_tok_s"], t["micro_batches_on_tok_s"]]}, "tok/s")
    if "swap" in s:
        w = s["swap"]
        bars("swap", "disk tier: share of the cold disk bandwidth", ["prefetch on",
                                                                     "prefetch off"],
             {"of bandwidth": [w["prefetch_on"]["of_bandwidth"],
                               w["prefetch_off"]["of_bandwidth"]]}, "disk / bandwidth")
    if "scale" in s:
        from llm_shard.benchmarks import scale

        scale.plot(s["scale"], bars)
    return written


def write(r: dict, out: Path) -> list[str]:
    """DIR/bench.json, DIR/bench.md and the PNGs; returns the names written."""
    out.mkdir(parents=True, exist_ok=True)
    pngs = plots(r, out)
    r["plots"] = pngs or NO_PNG
    (out / "bench.json").write_text(json.dumps(r, indent=1, default=str))
    md = markdown(r)
    if pngs:
        md += "\n" + "\n".join(f"![{p[:-4]}]({p})" for p in pngs) + "\n"
    else:
        md += f"\n({NO_PNG})\n"
    (out / "bench.md").write_text(md)
    return ["bench.json", "bench.md", *pngs]

