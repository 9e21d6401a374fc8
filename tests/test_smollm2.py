"""Real weights: SmolLM2-135M-Instruct from its GGUF, fp32 and int8, through the store."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llm_shard.models.base import Part
from llm_shard.models.runner import LocalModel

DATA = Path(__file__).parent / "data"


def test_capital_of_france(smollm2_stores):
    store = smollm2_stores["fp32"]
    tok = store.tokenizer()
    out = LocalModel(store).greedy(tok.encode("The capital of France is"), max_tokens=4)
    assert tok.decode(out).strip().startswith("Paris")


def test_chat_template_answers(smollm2_stores):
    store = smollm2_stores["int8"]
    tok = store.tokenizer()
    prompt = tok.render_chat([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt.endswith("<|im_start|>assistant\n")
    out = LocalModel(store).greedy(tok.encode(prompt), max_tokens=24, eos=tok.eos_ids)
    assert "Paris" in tok.decode(out)


def teacher_forced(store, ids):
    logits = LocalModel(store).logits(ids)[:-1]
    nll = F.cross_entropy(logits, torch.tensor(ids[1:]))
    return logits.argmax(-1), math.exp(float(nll))


@pytest.mark.slow
def test_int8_quality_bar(smollm2_stores):
    """The project's bar: greedy top-1 agreement with fp32 >= 99% over >= 500 tokens of a
    fixed text, perplexity within 1%. The GGUF is Q4_1, and the default int8 store keeps
    its blocks exactly (rounding "gguf", models/checkpoint/convert.py): measured 1.000 and
    1.0003 (the
    rest is w8a16's int16 activations). Rounded again per output channel (`--rounding
    nearest`) the same weights give 0.970: test_gptq_rounding_converts_and_keeps_the_bar."""
    tok = smollm2_stores["fp32"].tokenizer()
    ids = tok.encode((DATA / "eval_text.txt").read_text())
    assert len(ids) >= 500
    top_fp32, ppl_fp32 = teacher_forced(smollm2_stores["fp32"], ids)
    top_int8, ppl_int8 = teacher_forced(smollm2_stores["int8"], ids)
    agreement = float((top_fp32 == top_int8).float().mean())
    ratio = ppl_int8 / ppl_fp32
    print(f"\nint8 vs fp32 on {len(ids)} tokens: top-1 agreement {agreement:.4f}, "
          f"perplexity {ppl_int8:.3f} vs {ppl_fp32:.3f} (ratio {ratio:.4f})")
    assert agreement >= 0.99
    assert abs(ratio - 1) <= 0.01


def test_int8_store_keeps_the_gguf_blocks_exactly(smollm2_stores):
    """Every int8 weight stands for exactly the float weight the fp32 store holds, Q/K row
    permutation included, and runs on w8a16 where it can."""
    from llm_shard.models.kernels import w8a16

    fp32 = smollm2_stores["fp32"].load(Part("block", 7))
    int8 = smollm2_stores["int8"].load(Part("block", 7))
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                 "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        layer = int8.get_submodule(name)
        assert layer.group == 32 and layer.mins is not None, name
        assert torch.equal(layer.dequantized(), fp32.get_submodule(name).weight), name
        if w8a16.problem() is None:
            assert layer.running == "w8a16", name


def test_int8_store_is_int8_and_smaller(smollm2_stores):
    fp32, int8 = smollm2_stores["fp32"], smollm2_stores["int8"]
    block = int8.tensors(Part("block", 0))
    assert block["self_attn.q_proj.weight"].dtype == torch.int8
    assert block["self_attn.q_proj.scales"].shape == (576, 18)  # a float16 scale per 32
    assert block["self_attn.q_proj.mins"].shape == (18, 576)  # and a min (Q4_1)
    assert block["self_attn.q_proj.mins"].dtype == torch.float16
    assert block["input_layernorm.weight"].dtype == torch.float32
    # blocks shrink ~4x; embedding and the tied head stay float32 in both
    size = {k: sum(f["bytes"] for f in s.manifest["files"] if f["name"].startswith("blocks/"))
            for k, s in smollm2_stores.items()}
    assert size["int8"] < 0.3 * size["fp32"]
    q = int8.manifest["quantization"]
    assert q["rounding"] == "gguf" and q["kept"] == {"Q4_1": 210}
    assert fp32.manifest["quantization"] is None


def test_int8_store_screens_its_float_head(smollm2_stores):
    """The tied head stays float in the store; an int8 store reads it through an int8
    screen and recomputes in float every logit that could be the largest, so greedy
    steps pick the float head's token."""
    from llm_shard.models.quant import ScreenedLinear

    fp32_head = smollm2_stores["fp32"].load(Part("head"))
    head = smollm2_stores["int8"].load(Part("head"))
    assert isinstance(head.lm_head, ScreenedLinear)
    assert isinstance(fp32_head.lm_head, torch.nn.Linear)
    torch.manual_seed(0)
    x = torch.randn(32, 576) * 3
    with torch.no_grad():
        ref, got = fp32_head(x), head(x)
    assert torch.equal(ref.argmax(-1), got.argmax(-1))


@pytest.mark.slow
def test_generate_command_streams_the_answer(smollm2_stores):
    """`llm-shard generate STORE PROMPT` as a user runs it: the console script, real weights."""
    import shutil
    import subprocess

    exe = shutil.which("llm-shard") or str(Path(sys.executable).parent / "llm-shard")
    proc = subprocess.run([exe, "generate", str(smollm2_stores["int8"].path),
                           "What is the capital of France?", "--chat", "--max-tokens", "24"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout and "<|im_end|>" not in proc.stdout


def test_plan_command(smollm2_stores):
    from click.testing import CliRunner

    from llm_shard.coordinator.cli import cli

    store = str(smollm2_stores["int8"].path)
    # each budget: a 200 MiB runtime (as given) and 300 or 160 MiB for the model
    res = CliRunner().invoke(cli, ["plan", store, "--worker", "ram=500MiB",
                                   "--worker", "ram=360MiB,disk=1GiB", "--cache-tokens", "2048",
                                   "--overhead", "200MiB", "--use-all-workers"])
    assert res.exit_code == 0, res.output
    rows = [line.split() for line in res.output.splitlines() if line.strip()[:1].isdigit()]
    assert [r[:3] for r in rows] == [["0", "0", "[0,"], ["1", "1", rows[1][2]]]
    assert "30 blocks on 2 stages" in res.output
    res = CliRunner().invoke(cli, ["plan", store, "--worker", "ram=10MiB"])
    assert res.exit_code == 1 and "short of" in res.output and "Traceback" not in res.output


@pytest.mark.slow
def test_gptq_rounding_converts_and_keeps_the_bar(smollm2_path, smollm2_stores, tmp_path):
    """`convert --rounding gptq` and `--rounding nearest`: per-output-channel int8 rounded
    again from the float weights, recorded in the manifest; GPTQ at least as close to fp32
    as round-to-nearest in top-1 (0.975 vs 0.970 measured), both within 1% perplexity."""
    from llm_shard.models.checkpoint.convert import convert

    gptq = convert(smollm2_path, tmp_path / "gptq", dtype="int8", rounding="gptq",
                   progress=False)
    near = convert(smollm2_path, tmp_path / "near", dtype="int8", rounding="nearest",
                   progress=False)
    q = gptq.manifest["quantization"]
    assert q["rounding"] == "gptq" and q["calibration"]["tokens"] > 500
    assert near.manifest["quantization"]["method"] == "int8-symmetric-per-output-channel"
    assert near.tensors(Part("block", 0))["self_attn.q_proj.scales"].shape == (576,)
    tok = gptq.tokenizer()
    ids = tok.encode((DATA / "eval_text.txt").read_text())
    top_fp32, ppl_fp32 = teacher_forced(smollm2_stores["fp32"], ids)
    top_gptq, ppl_gptq = teacher_forced(gptq, ids)
    top_near, _ = teacher_forced(near, ids)
    agree_gptq = float((top_fp32 == top_gptq).float().mean())
    agree_near = float((top_fp32 == top_near).float().mean())
    print(f"\ntop-1 agreement: gptq {agree_gptq:.4f}, nearest {agree_near:.4f}; "
          f"gptq perplexity ratio {ppl_gptq / ppl_fp32:.4f}")
    assert agree_gptq >= agree_near and abs(ppl_gptq / ppl_fp32 - 1) <= 0.01
