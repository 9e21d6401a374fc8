"""Int8 weights: the quantizer, Int8Linear and its kernels, the swap, state dicts, and int8
vs fp32 on the real SmolLM2-135M (transformers as the fp32 reference)."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llm_shard.models import quant
from llm_shard.models.kernels import backends, w8a16
from llm_shard.models.quant import (
    KERNELS,
    Int8Linear,
    ScreenedLinear,
    int8_state_dict,
    prepare_int8,
    quantize,
    quantize_weight,
    swap_int8,
)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"

# Relative error of each kernel against fp32 math on the same (dequantized) int8 weights:
# fbgemm quantizes activations to ~14 bits (two 7-bit levels), w8a16 to 16 bits, int8pack
# rounds them to bf16.
KERNEL_RTOL = {"fbgemm": 2e-3, "w8a16": 2e-4, "int8pack": 1e-2, "auto": 1e-2, "dequant": 1e-5}
# Against the original fp32 weights: per-channel int8 of Gaussian rows is ~1% off.
WEIGHT_RTOL = 2.5e-2
# (in_features, out_features); 100, 520 and 33 are not multiples of 16.
SHAPES = [(64, 32), (576, 192), (100, 48), (520, 200), (33, 7)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def cpu_kernels() -> list[str]:
    probe = Int8Linear(16, 16)
    return [k for k in KERNELS if KERNELS[k].invalid(probe) is None]


def test_quantize_weight_round_trip():
    torch.manual_seed(0)
    w = torch.randn(48, 100) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different size
    w[5] = 0.0
    q, scales = quantize_weight(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scales.dtype == torch.float32 and scales.shape == (48,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert scales[5] == 1.0 and not q[5].any()  # all-zero row: scale 1, no division by zero
    err = (q.float() * scales[:, None] - w).abs()
    assert bool((err <= scales[:, None] / 2 * (1 + 1e-5)).all())  # at most half a step
    assert bool((q.abs().amax(1)[torch.arange(48) != 5] == 127).all())  # full range per row


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("in_f,out_f", SHAPES)
def test_int8_linear_matches_fp32(kernel, in_f, out_f):
    torch.manual_seed(in_f)
    lin = nn.Linear(in_f, out_f)
    m = Int8Linear.from_linear(lin, kernel=kernel)
    running = m.prepare()
    if kernel == "int8pack" and in_f % 16:
        assert running != "int8pack"  # the guard: int8pack is wrong or crashes here
    deq = nn.Linear(in_f, out_f)
    with torch.no_grad():
        deq.weight.copy_(m.weight.float() * m.scales[:, None])
        deq.bias.copy_(lin.bias)
    for rows in (1, 5):
        x = torch.randn(rows, in_f)
        with torch.no_grad():
            y = m(x)
            assert y.shape == (rows, out_f) and y.dtype == torch.float32
            assert rel_err(y, deq(x)) <= KERNEL_RTOL[running], (running, rows)
            assert rel_err(y, lin(x)) <= WEIGHT_RTOL, (running, rows)


@pytest.mark.parametrize("kernel", [k for k in KERNELS if k != "dequant"])
def test_a_row_gets_the_same_bits_in_any_batch(kernel):
    """Batch invariance: decode (one row per call), prefill (many rows) and a replay in
    chunks give each row the same bits, whatever its company; recovery's replay and
    continuous batching rely on it. ("dequant" is F.linear, whose BLAS is not invariant.)"""
    if kernel not in cpu_kernels():
        pytest.skip(f"{kernel} cannot run on this machine")
    torch.manual_seed(7)
    for lin in (nn.Linear(256, 96), nn.Linear(2048, 1040)):  # auto: w8a16, then fbgemm
        m = Int8Linear.from_linear(lin, kernel=kernel)
        x = torch.randn(9, lin.in_features) * torch.logspace(-2, 2, 9)[:, None]  # sizes vary
        with torch.no_grad():
            batch = m(x)
            rows = torch.cat([m(x[i:i + 1]) for i in range(9)])
            chunks = torch.cat([m(x[:2]), m(x[2:7]), m(x[7:])])
        assert torch.equal(rows, batch) and torch.equal(chunks, batch), (kernel, lin)


def near_tie_head(vocab: int = 4000, dim: int = 256, bias: bool = False) -> nn.Linear:
    """An LM-head-like Linear whose odd rows are their even neighbours plus 0.1% noise:
    their logits nearly tie, so an int8 head alone often picks the wrong one."""
    torch.manual_seed(11)
    lin = nn.Linear(dim, vocab, bias=bias)
    with torch.no_grad():
        w = torch.randn(vocab, dim) * torch.rand(vocab, 1)
        w[1::2] = w[::2] * (1 + 1e-3 * torch.randn(vocab // 2, dim))
        lin.weight.copy_(w)
    return lin


def head_inputs(rows: int, dim: int = 256) -> torch.Tensor:
    torch.manual_seed(12)
    x = torch.randn(rows, dim) * torch.logspace(-1, 1, rows)[:, None]
    x[::3, 5] = 40.0  # an outlier channel, as final hidden states have
    return x


SCREENS = ("w8a16", "fbgemm")


@pytest.mark.parametrize("kernel", SCREENS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("c_pass", [True, False], ids=["c pass", "torch ops"])
def test_screened_head_argmax_is_the_float_heads(kernel, bias, c_pass, monkeypatch):
    if kernel not in cpu_kernels():
        pytest.skip(f"{kernel} cannot run here")
    if c_pass and w8a16.problem() is not None:
        pytest.skip(f"the C pass cannot run here: {w8a16.problem()}")
    if not c_pass:  # the candidates picked and recomputed by torch's ops
        monkeypatch.setattr(w8a16, "can_screen", lambda *args: False)
    lin = near_tie_head(bias=bias)
    head = ScreenedLinear(lin, kernel=kernel)
    x = head_inputs(64)
    with torch.no_grad():
        ref = lin(x)
        got = head(x)
        screen, bound = head.screened(x)
        rows = torch.cat([head(x[i:i + 1]) for i in range(len(x))])
    assert head.kernel == kernel
    # the int8 values are within the bound everywhere, and alone they miss near-ties
    assert ((ref - screen).abs() <= bound).all()
    assert (screen.argmax(-1) != ref.argmax(-1)).sum() >= 3
    # screened: the float argmax in every row, its logit exact, the rest within the bound
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    top = ref.argmax(-1, keepdim=True)
    torch.testing.assert_close(got.gather(1, top), ref.gather(1, top), rtol=1e-5, atol=1e-5)
    assert ((got - ref).abs() <= bound + 1e-4).all()
    assert torch.equal(rows, got)  # batch invariant: a row's logits alone or in company


@pytest.mark.parametrize("worst", ["activations", "weights"])
def test_w8a16_error_bound_holds_and_is_tight_in_the_worst_cases(worst):
    """Every activation half a grid step off (rounded to 0; one entry at the absmax sets
    the step) against weights on their grid at +-127 of the same sign; or weights half a
    step off their grid, the same sign as the activations. The error must stay under the
    bound and reach at least half of it."""
    if "w8a16" not in cpu_kernels():
        pytest.skip("w8a16 cannot run here")
    torch.manual_seed(3)
    n, out = 4096, 8
    sign = torch.sign(torch.randn(n))
    scales = torch.rand(out) / 100 + 1e-3
    if worst == "activations":
        x = (0.4999 / 32767) * sign
        x[0] = 1.0  # the absmax: the grid step is 1 / 32767
        q = 127 * sign.expand(out, n)
    else:
        x = torch.rand(n) * sign
        q = torch.randint(-126, 127, (out, n)).float() + 0.4999 * sign
        q[:, 0] = 127.0  # each row's absmax: its int8 grid step is its scale
    lin = nn.Linear(n, out, bias=False)
    with torch.no_grad():
        lin.weight.copy_(q * scales[:, None])
        head = ScreenedLinear(lin, kernel="w8a16")
        screen, bound = head.screened(x[None])
        err = (x[None].double() @ lin.weight.double().T - screen.double()).abs()
    assert (err <= bound.double()).all()
    assert (err >= 0.5 * bound.double()).all()


def test_a_screened_head_names_a_kernel_it_runs():
    with pytest.raises(ValueError, match="w8a16 or fbgemm"):
        ScreenedLinear(nn.Linear(16, 16), kernel="int8pack")


@pytest.mark.skipif("fbgemm" not in cpu_kernels(), reason="needs torch's fbgemm engine")
def test_screened_head_rows_with_too_many_candidates_are_all_float():
    lin = near_tie_head()
    x = head_inputs(4)
    with torch.no_grad():
        got = ScreenedLinear(lin, max_exact=1)(x)
        torch.testing.assert_close(got, lin(x), rtol=1e-5, atol=1e-3)  # BLAS order
        copied = copy.deepcopy(ScreenedLinear(lin))  # re-prepares after a copy
        assert torch.equal(copied(x).argmax(-1), lin(x).argmax(-1))


def test_dequant_one_row_at_a_time_matches_the_batch():
    torch.manual_seed(7)
    m = Int8Linear.from_linear(nn.Linear(256, 96), kernel="dequant")
    x = torch.randn(6, 256) * torch.logspace(-2, 2, 6)[:, None]
    with torch.no_grad():
        batch = m(x)
        rows = torch.cat([m(x[i:i + 1]) for i in range(6)])
    for i in range(6):
        assert rel_err(rows[i], batch[i]) <= 1e-5, i


def outputs(lin: nn.Linear, kernel: str, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return Int8Linear.from_linear(lin, kernel=kernel)(x)


@pytest.mark.skipif("auto" not in cpu_kernels(), reason="needs torch's fbgemm engine")
def test_auto_picks_w8a16_for_small_layers_and_for_large_ones_where_it_keeps_up(caplog):
    torch.manual_seed(8)
    small, big = nn.Linear(576, 1536), nn.Linear(2048, 1040)  # 0.84 and 2.03 MiB of int8
    assert big.weight.numel() > backends.AUTO_SMALL_LAYER_BYTES >= small.weight.numel()
    for keeps_up, big_kernel in ((True, "w8a16"), (False, "fbgemm")):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(w8a16, "keeps_up", lambda k=keeps_up: k)
            for lin, expect in [(small, "w8a16"), (big, big_kernel)]:
                for rows in (1, 4, 5, 64):  # the layer's kernel, whatever the call's size
                    x = torch.randn(rows, lin.in_features)
                    assert torch.equal(outputs(lin, "auto", x), outputs(lin, expect, x)), (
                        keeps_up, lin, rows)

    backends.log_fallback.cache_clear()
    odd = nn.Linear(520, 64)  # without w8a16, int8pack is wrong here: auto stays on fbgemm
    x, x_big = torch.randn(1, 520), torch.randn(1, 2048)
    with caplog.at_level(logging.WARNING, logger=backends.__name__):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(w8a16, "problem", lambda: "no compiler (test)")
            mp.setattr(w8a16, "keeps_up", lambda: True)
            assert torch.equal(outputs(odd, "auto", x), outputs(odd, "fbgemm", x))
            assert torch.equal(outputs(big, "auto", x_big), outputs(big, "fbgemm", x_big))
    messages = [r.getMessage() for r in caplog.records]
    assert any("'w8a16'" in m and "no compiler (test)" in m and "small" in m for m in messages)
    assert any("'w8a16'" in m and "no compiler (test)" in m and "large" in m for m in messages)
    assert any("multiple of 16" in m for m in messages)


def test_int8pack_fallback_is_logged_once(caplog):
    backends.log_fallback.cache_clear()
    torch.manual_seed(0)
    layers = [Int8Linear.from_linear(nn.Linear(100, 32), kernel="int8pack") for _ in range(3)]
    with caplog.at_level(logging.WARNING, logger=backends.__name__):
        chosen = {m.prepare() for m in layers}
    assert chosen.isdisjoint({"int8pack"})
    messages = [r.getMessage() for r in caplog.records if r.name == backends.__name__]
    assert messages and len(messages) == len(set(messages))  # once per distinct fallback
    assert any("'int8pack'" in m and "multiple of 16" in m for m in messages)


def test_outlier_activations_and_zero_rows():
    """Activations with a huge channel (as LLM MLP inputs have) stay accurate; a zero row
    gives the bias, not NaN."""
    torch.manual_seed(1)
    lin = nn.Linear(256, 64)
    x = torch.randn(4, 256)
    x[:, 7] = 300.0
    x[2] = 0.0
    for kernel in cpu_kernels():
        m = Int8Linear.from_linear(lin, kernel=kernel)
        with torch.no_grad():
            y, ref = m(x), F.linear(x, m.weight.float() * m.scales[:, None], lin.bias)
        assert torch.isfinite(y).all()
        assert rel_err(y[[0, 1, 3]], ref[[0, 1, 3]]) <= KERNEL_RTOL[m.kernel], kernel
        torch.testing.assert_close(y[2], lin.bias.detach(), rtol=0, atol=1e-6)
        with torch.no_grad():  # batch 1 takes another path in fbgemm
            y1 = m(x[2:3])
            assert rel_err(m(x[:1]), ref[:1]) <= KERNEL_RTOL[m.kernel], kernel
        torch.testing.assert_close(y1[0], lin.bias.detach(), rtol=0, atol=1e-6)


def test_dtypes_and_leading_dims():
    torch.manual_seed(2)
    lin = nn.Linear(64, 48, bias=False)
    m = Int8Linear.from_linear(lin)
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        y = m(x)
        assert y.shape == (2, 3, 48)
        yb = m(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16
    assert rel_err(yb, y) <= 1e-2
    assert m.bias is None
    assert m.kernel in KERNELS  # prepared lazily by the first forward


def test_unknown_kernel_is_an_error():
    with pytest.raises(ValueError, match="unknown int8 kernel"):
        Int8Linear(16, 16, kernel="int4")
    with pytest.raises(ValueError, match="unknown int8 kernel"):
        Int8Linear(16, 16).prepare("nope")


class Tiny(nn.Module):
    """Names like a decoder: embedding, blocks of Linears, lm_head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 32)
        self.layers = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(32, 32, bias=False),
                                                   "up_proj": nn.Linear(32, 80)})
                                    for _ in range(2))
        self.lm_head = nn.Linear(32, 50, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = h + layer["q_proj"](h) + layer["up_proj"](h)[..., :32]
        return self.lm_head(h)


def test_quantize_swaps_what_the_predicate_selects():
    torch.manual_seed(3)
    model = Tiny()
    ref = copy.deepcopy(model)
    assert quantize(model, lambda name, mod: name != "lm_head") is model
    kinds = {name: type(mod) for name, mod in model.named_modules()}
    assert kinds["lm_head"] is nn.Linear and kinds["embed_tokens"] is nn.Embedding
    swapped = [f"layers.{i}.{p}" for i in range(2) for p in ("q_proj", "up_proj")]
    assert all(kinds[name] is Int8Linear for name in swapped)
    assert model.layers[1]["up_proj"].bias is not None
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert rel_err(model(ids), ref(ids)) <= WEIGHT_RTOL

    everything = quantize(copy.deepcopy(ref))  # default predicate: every Linear
    assert not any(type(m) is nn.Linear for m in everything.modules())
    with pytest.raises(TypeError):
        quantize(nn.Linear(4, 4))


def test_state_dict_load_into_swapped_model_then_prepare():
    torch.manual_seed(4)
    src = quantize(Tiny(), lambda name, mod: name != "lm_head")
    state = src.state_dict()
    for i in range(2):
        assert state[f"layers.{i}.q_proj.weight"].dtype == torch.int8
        assert state[f"layers.{i}.q_proj.scales"].dtype == torch.float32
        assert state[f"layers.{i}.q_proj.scales"].shape == (32,)
        assert f"layers.{i}.q_proj.bias" not in state
        assert state[f"layers.{i}.up_proj.bias"].dtype == torch.float32
    assert state["lm_head.weight"].dtype == torch.float32
    int8 = int8_state_dict(src)
    assert set(int8) == {k for k in state if k.startswith("layers.")}

    with torch.device("meta"):  # as a store builds a part: no memory for fp32 weights
        dst = Tiny()
    swap_int8(dst, lambda name, mod: name != "lm_head")
    dst.load_state_dict(state, strict=True, assign=True)
    chosen = prepare_int8(dst)
    assert set(chosen) == {f"layers.{i}.{p}" for i in range(2) for p in ("q_proj", "up_proj")}
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.equal(dst(ids), src(ids))


def test_loading_new_weights_drops_the_packed_ones():
    torch.manual_seed(5)
    a, b = (Int8Linear.from_linear(nn.Linear(64, 32)) for _ in range(2))
    a.prepare()
    x = torch.randn(3, 64)
    with torch.no_grad():
        a.load_state_dict(b.state_dict())
        assert a.kernel is None
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_to_bfloat16_keeps_int8_and_float32_scales():
    m = Int8Linear.from_linear(nn.Linear(32, 16))
    m.prepare()
    m.to(torch.bfloat16)
    assert m.weight.dtype == torch.int8
    assert m.scales.dtype == torch.float32 and m.bias.dtype == torch.float32
    assert m.kernel is None  # re-prepared on the next forward


def test_deepcopy_of_a_prepared_layer():
    m = Int8Linear.from_linear(nn.Linear(64, 32))
    m.prepare()
    c = copy.deepcopy(m)
    x = torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(c(x), m(x), rtol=0, atol=0)


def test_wrong_buffer_dtype_is_an_error():
    m = Int8Linear(32, 16)
    m.weight = torch.zeros(16, 32)  # e.g. a float checkpoint loaded with assign=True
    with pytest.raises(ValueError, match="weight must be torch.int8"):
        m.prepare()


# --- blocks of 32: a GGUF's own blocks, kept exactly ---------------------------------

def block_layer(in_f: int = 256, out_f: int = 96, mins: bool = True, bias: bool = True,
                kernel: str | None = None) -> Int8Linear:
    """Q4_1-like (4-bit levels, a scale and a min per 32 inputs) or Q8_0-like blocks."""
    g = torch.Generator().manual_seed(9)
    m = Int8Linear(in_f, out_f, bias=bias, kernel=kernel, group=32, mins=mins)
    lo, hi = (0, 16) if mins else (-127, 128)
    with torch.no_grad():
        m.weight.copy_(torch.randint(lo, hi, (out_f, in_f), generator=g, dtype=torch.int8))
        m.scales.copy_((torch.rand(out_f, in_f // 32, generator=g) / 50).half())
        if mins:
            m.mins.copy_((-torch.rand(in_f // 32, out_f, generator=g) / 10).half())
        if bias:
            m.bias.copy_(torch.randn(out_f, generator=g))
    return m


@pytest.mark.parametrize("mins", [False, True])
def test_blocks_match_their_float_weight_on_w8a16_and_dequant(mins):
    m = block_layer(mins=mins)
    assert m.scales.shape == (96, 8) and m.scales.dtype == torch.float16
    x = torch.randn(5, 256) * 3
    ref = F.linear(x.double(), m.dequantized(torch.float64), m.bias.double())
    for kernel, rtol in (("w8a16", 2e-4), ("dequant", 1e-5)):
        if kernel not in cpu_kernels():
            continue
        assert m.prepare(kernel) == kernel
        with torch.no_grad():
            assert rel_err(m(x), ref) <= rtol, kernel


def test_blocks_refuse_per_channel_kernels_and_fall_back(caplog, monkeypatch):
    m = block_layer()
    for kernel in ("fbgemm", "int8pack"):
        assert KERNELS[kernel].invalid(m) == (
            "its scales are per block of 32 inputs, and it takes one scale per output row")
    with caplog.at_level(logging.WARNING, logger=backends.__name__):
        assert m.prepare("int8pack") == "auto"  # auto runs blocks on w8a16, else dequant
    assert "per block of 32" in caplog.text
    x = torch.randn(3, 256)
    with torch.no_grad():
        want = m(x)
        monkeypatch.setattr(backends, "w8a16_invalid", lambda layer: "no C compiler (test)")
        with caplog.at_level(logging.WARNING, logger=backends.__name__):
            assert m.prepare("auto") == "auto"
            assert m.running == "dequant"
        assert "no C compiler (test), for auto's layers in blocks; using 'dequant'" in caplog.text
        assert rel_err(m(x), want) <= 2e-4


def test_blocks_state_dict_round_trip_and_dtypes():
    src = block_layer(in_f=64, out_f=24)
    state = src.state_dict()
    assert state["mins"].shape == (2, 24) and state["scales"].dtype == torch.float16
    formats = quant.int8_formats({f"lin.{k}": v for k, v in state.items()})
    assert formats == {"lin": (32, True)}
    with torch.device("meta"):
        holder = nn.Sequential()
        holder.add_module("lin", nn.Linear(64, 24))
    swap_int8(holder, formats=formats)
    holder.load_state_dict({f"lin.{k}": v for k, v in state.items()}, strict=True, assign=True)
    holder.to(torch.bfloat16)  # int8, its float16 scales and mins stay as they are
    assert holder.lin.scales.dtype == torch.float16 and holder.lin.mins.dtype == torch.float16
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.equal(holder.lin(x), src(x))
    with pytest.raises(ValueError, match="group=32 with in_features=100"):
        Int8Linear(100, 8, group=32)
    with pytest.raises(ValueError, match="mins come with blocks"):
        Int8Linear(64, 8, mins=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_path_with_blocks():
    m = block_layer().cuda()
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = m(x)
        ref = F.linear(x.double(), m.dequantized(torch.float64), m.bias.double())
    assert m.kernel == "triton" and y.dtype == torch.bfloat16 and y.device.type == "cuda"
    assert rel_err(y, ref) <= 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_path():
    torch.manual_seed(6)
    lin = nn.Linear(4096, 1024).cuda()
    m = Int8Linear.from_linear(lin)
    assert m.weight.device.type == "cuda"
    x = torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = m(x)
        ref = F.linear(x.float(), m.weight.float() * m.scales[:, None], lin.bias)
        last_resort = Int8Linear.from_linear(lin, kernel="dequant")(x)
    assert m.kernel == "triton" and y.dtype == torch.bfloat16 and y.device.type == "cuda"
    assert rel_err(y, ref) <= 1e-2 and rel_err(last_resort, ref) <= 1e-2


# --- SmolLM2-135M: int8 swap vs transformers fp32 ------------------------------------

# Per-output-channel int8 rounded again from SmolLM2's (Q4_1) float weights flips ~3% of
# top-1 tokens whatever the kernel: 6 of eval_text.txt's 728 positions have an fp32 top-2
# margin < 0.01 (bf16 weights: 0.997; bf16 weights and activations: 0.981). The project's
# 99% bar is met by keeping the GGUF's blocks instead (tests/test_smollm2.py).
AGREEMENT_FLOOR = 0.95  # measured 0.966-0.971 for every kernel on eval_text.txt
FLIP_MARGIN = 0.5  # logits; measured <= 0.22


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_path, smollm2_hf_folder):
    """(fp32 transformers model, token ids (1, n), {kernel: (agreement, ppl ratio)})."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_path.parent,
                                                     gguf_file=smollm2_path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_hf_folder, dtype=torch.float32).eval()  # the GGUF's weights, in fp32
    ids = tok((DATA / "eval_text.txt").read_text(), return_tensors="pt").input_ids
    assert ids.shape[1] >= 500
    return model, ids, {}


def int8_vs_fp32(smollm2_hf, kernel: str | None) -> tuple[float, float, float]:
    """Teacher-forced top-1 agreement, perplexity ratio int8 / fp32, and the largest fp32
    top-2 logit margin among the flipped positions; all Linears but lm_head (tied to the
    embedding) in int8."""
    model, ids, cache = smollm2_hf
    if kernel not in cache:
        q = quantize(copy.deepcopy(model), lambda name, mod: name != "lm_head", kernel=kernel)
        with torch.inference_mode():
            ref, got = (m(ids).logits[0, :-1] for m in (model, q))
        ppl = [math.exp(float(F.cross_entropy(lg, ids[0, 1:]))) for lg in (ref, got)]
        same = got.argmax(-1) == ref.argmax(-1)
        top2 = ref.topk(2, dim=-1).values
        margin = float((top2[:, 0] - top2[:, 1])[~same].max()) if not same.all() else 0.0
        agreement = float(same.float().mean())
        cache[kernel] = (agreement, ppl[1] / ppl[0], margin)
        running = q.get_submodule("model.layers.0.mlp.down_proj").kernel
        print(f"\nSmolLM2-135M int8 (kernel {kernel or 'default'}: {running}) vs fp32 on "
              f"{ids.shape[1]} tokens: top-1 agreement {agreement:.4f}, perplexity "
              f"{ppl[1]:.3f} vs {ppl[0]:.3f} (ratio {ppl[1] / ppl[0]:.4f}); flipped tokens "
              f"had fp32 top-2 margins <= {margin:.3f}")
    return cache[kernel]


@pytest.mark.slow
@pytest.mark.parametrize("kernel", [None, "fbgemm", "w8a16", "int8pack", "dequant"])
def test_smollm2_int8_quality(smollm2_hf, kernel):
    agreement, ratio, flip_margin = int8_vs_fp32(smollm2_hf, kernel)
    assert abs(ratio - 1) <= 0.01
    assert agreement >= AGREEMENT_FLOOR
    assert flip_margin <= FLIP_MARGIN  # int8 only flips near-ties, never a clear choice



# --- the kernels benchmark ---------------------------------------------------------------

def load_benchmark():
    path = REPO / "benchmarks" / "kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernels_benchmark_quick(tmp_path, capsys):
    bench = load_benchmark()
    out = tmp_path / "kernels.json"
    result = bench.main(["--quick", "--repeats", "1", "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["bandwidth_gbs"] > 0 and result["threads"] == 1
    assert set(result["chosen"].values()) <= set(KERNELS)
    shapes = {(r["in_features"], r["out_features"]) for r in result["rows"]}
    keys = {(r["in_features"], r["out_features"], r["batch"], r["kernel"]) for r in result["rows"]}
    assert keys == {(i, o, b, k) for i, o in shapes for b in bench.QUICK_BATCHES
                    for k in bench.KERNELS}
    for r in result["rows"]:
        assert set(r) >= {"model", "layer", "batch", "kernel", "running", "weight_bytes",
                          "seconds", "gbs", "ratio"}
        if r["running"] == r["kernel"]:
            assert r["seconds"] > 0 and r["gbs"] > 0 and r["ratio"] > 0
        else:  # a fallback is reported, not timed under the wrong name
            assert r["gbs"] is None
    table = capsys.readouterr().out
    assert "GB/s" in table and "fbgemm" in table


def test_store_files_keep_every_tensor_aligned(tmp_path):
    """_weight_int8pack_mm crashes on int8 weights that are not 16-byte aligned once a call
    has 4+ rows; a store file keeps each tensor 64-byte aligned, with fillers when needed."""
    from safetensors.torch import load_file

    from llm_shard.models.checkpoint.store import ALIGN, PAD, save_aligned, without_padding

    tensors = {"a.weight": torch.randint(-127, 127, (48, 32), dtype=torch.int8),
               "b": torch.randn(3), "c": torch.randn(5, dtype=torch.float64),
               "d.weight": torch.randint(-127, 127, (16, 48), dtype=torch.int8),
               "e": torch.zeros(0), "f": torch.tensor(True)}
    save_aligned(tensors, tmp_path / "x.safetensors")
    loaded = load_file(tmp_path / "x.safetensors")  # the stock reader opens it
    assert any(k.startswith(PAD) for k in loaded)
    loaded = without_padding(loaded)
    assert loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert torch.equal(loaded[k], t), k
        assert loaded[k].numel() == 0 or loaded[k].data_ptr() % ALIGN == 0, k
    layer = Int8Linear(48, 16, bias=False)
    layer.weight, layer.scales = loaded["d.weight"], torch.rand(16) / 127
    x = torch.randn(6, 48)  # 6 rows: the case that crashed on a misaligned weight
    y = KERNELS["int8pack"].run(layer, KERNELS["int8pack"].pack(layer), x)
    ref = KERNELS["dequant"].run(layer, None, x)
    assert (y - ref).abs().max() <= 0.02 * ref.abs().max()


def test_int8pack_refuses_misaligned_weights():
    buf = torch.randint(-127, 127, (16 * 32 + 8,), dtype=torch.int8)
    layer = Int8Linear(32, 16, bias=False)
    layer.weight, layer.scales = buf[8:].view(16, 32), torch.rand(16)
    if layer.weight.data_ptr() % 16 == 0:
        pytest.skip("the allocator placed the slice aligned")
    assert "aligned" in KERNELS["int8pack"].invalid(layer)


class Shared(nn.Module):
    """Three Int8Linears that read one input, declared as a fusable group."""

    shared_input = (("a", "b", "c"),)

    def __init__(self, layers: list[Int8Linear]) -> None:
        super().__init__()
        self.a, self.b, self.c = layers


def shared_layers(kernel: str, blocks: bool = False) -> Shared:
    g = torch.Generator().manual_seed(3)
    if blocks:  # Q4_1-like rows of 3 sizes (SmolLM2's q, k, v are 576, 192, 192)
        return Shared([block_layer(256, n, kernel=kernel) for n in (96, 32, 40)])
    layers = []
    for n in (96, 32, 40):
        lin = nn.Linear(256, n)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, 256, generator=g) / 16)
        layers.append(Int8Linear.from_linear(lin, kernel=kernel))
    return Shared(layers)


@pytest.mark.parametrize("kernel,blocks", [
    *((k, False) for k in ("fbgemm", "w8a16", "int8pack", "auto") if k in cpu_kernels()),
    *((k, True) for k in ("w8a16", "auto") if k in cpu_kernels())])  # blocks: w8a16 only
def test_fused_layers_give_each_member_the_same_bits(kernel, blocks):
    """q/k/v (gate/up) run as one layer give each output the bits the three calls give, at
    1 row (decode) and 7 (prefill); a member alone runs its slice; reloading a member
    makes it a layer of its own again, still exact."""
    from llm_shard.models.layers import project

    module = shared_layers(kernel, blocks)
    xs = [torch.randn(1, 256), torch.randn(7, 256)]
    prepare_int8(module)
    apart = [[m(x) for m in (module.a, module.b, module.c)] for x in xs]
    assert quant.fused_of([module.a, module.b, module.c]) is None

    running = {m.running for m in (module.a, module.b, module.c)}
    kernels = prepare_int8(module, fuse=True)
    assert kernels == {"a": "fused", "b": "fused", "c": "fused"}
    assert {m.running for m in (module.a, module.b, module.c)} == running  # the same kernel
    fused = quant.fused_of([module.a, module.b, module.c])
    assert fused is not None and fused.out_features == 96 + 32 + 40
    assert quant.fused_of([module.b, module.a, module.c]) is None  # order matters
    assert quant.fused_of([module.a, module.b]) is None  # so does the whole group
    calls = []
    fused.register_forward_hook(lambda *a: calls.append(1))
    for x, want in zip(xs, apart):
        got = project(x, module.a, module.b, module.c)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        assert all(g.is_contiguous() for g in got)
        assert torch.equal(module.b(x), want[1])  # alone: its slice
    assert len(calls) == 2 + 2  # one per project, one per lone member
    if fused.kernel == "fbgemm":  # it reads its packed copy only
        assert fused.weight.device.type == "meta"

    module.b.load_state_dict(module.b.state_dict())  # b is a layer of its own again
    assert module.b.kernel is None and quant.fused_of([module.a, module.b, module.c]) is None
    for x, want in zip(xs, apart):
        got = project(x, module.a, module.b, module.c)
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_layers_that_differ_are_not_fused():
    """Members must share the input width, blocks, bias and kernel: else each runs alone."""
    module = shared_layers("w8a16")
    module.c = Int8Linear(256, 40, bias=False, kernel="w8a16")  # no bias: not fusable
    assert "fused" not in prepare_int8(module, fuse=True).values()
    module = shared_layers("w8a16")
    module.c.preferred_kernel = "dequant"  # another kernel: not fused
    assert "fused" not in prepare_int8(module, fuse=True).values()
    assert prepare_int8(Shared([block_layer(256, 32), block_layer(256, 32, mins=False),
                                block_layer(256, 32)]), fuse=True) == {
        "a": "auto", "b": "auto", "c": "auto"}  # mins on two of three


@pytest.mark.skipif(not {"fbgemm", "w8a16"} <= set(cpu_kernels()),
                    reason="needs torch's fbgemm engine and the w8a16 kernel")
def test_store_load_releases_mapped_weights_only_where_a_copy_runs(tmp_path, monkeypatch):
    """fbgemm runs from its packed copy and a fused layer holds its members' rows: their
    mapped pages go; w8a16 reads the mapping, which stays."""
    from conftest import random_hf_state, write_hf_port

    from llm_shard.models.base import Part
    from llm_shard.models.checkpoint import placement
    from llm_shard.models.checkpoint import store as store_mod
    from llm_shard.models.checkpoint.convert import convert

    write_hf_port(tmp_path / "hf", random_hf_state())
    store = convert(tmp_path / "hf", tmp_path / "store", dtype="int8", progress=False)
    released = []
    for module in (store_mod, placement):
        monkeypatch.setattr(module, "release_mapped", lambda t: released.append(t.data_ptr()))
    monkeypatch.setattr(backends, "AUTO_SMALL_LAYER_BYTES", 0)  # every layer counts as large
    fused = {"attn.q_proj", "attn.k_proj", "attn.v_proj"}
    for keeps_up, running, copied in (
            (True, "w8a16", fused),
            (False, "fbgemm", fused | {"attn.c_proj", "mlp.c_fc", "mlp.c_proj"})):
        monkeypatch.setattr(w8a16, "keeps_up", lambda k=keeps_up: k)
        released.clear()
        block = store.load(Part("block", 0))
        layers = {n: m for n, m in block.named_modules() if isinstance(m, Int8Linear)}
        assert {m.running for m in layers.values()} == {running}
        assert {n for n, m in layers.items() if m.weight.data_ptr() in released} == copied


def _vma_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds `address` (/proc/self/smaps)."""
    import re

    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            if m := re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line):
                inside = int(m[1], 16) <= address < int(m[2], 16)
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif("w8a16" not in cpu_kernels(), reason="needs the w8a16 kernel")
def test_store_load_moves_what_w8a16_streams_into_huge_pages(smollm2_stores, monkeypatch):
    """Where transparent huge pages run, what w8a16 reads of a loaded block (its fused
    q/k/v and gate/up, o and down: SmolLM2's Q4_1 blocks, as packed nibbles) and of the
    head (its screen's copy) lies in one mapping whose whole 2 MiB pages are advised
    MADV_HUGEPAGE (the tail past them is not: it would be resident beyond the part's
    bytes). Without them the nibbles still lie in one mapping of their own, not advised.
    The outputs are the same either way, and the same as the int8 weights' own."""
    from llm_shard.models.base import Part
    from llm_shard.models.cache import Batch, SequenceCache
    from llm_shard.models.checkpoint import placement
    from llm_shard.models.checkpoint import store as store_mod

    if placement.huge_pages_problem() is not None:
        pytest.skip(placement.huge_pages_problem())
    store = smollm2_stores["int8"]
    parts = [Part("block", 3), Part("head")]
    huge = [store.load(p) for p in parts]
    monkeypatch.setattr(placement, "huge_pages_problem", lambda: "off for this test")
    plain = [store.load(p) for p in parts]

    def streamed(module) -> list[torch.Tensor]:
        layers = [m.nibbles_now().packed if m.nibbles_now() is not None else m.weight
                  for m in [*module.modules(), *quant.fused_layers(module)]
                  if isinstance(m, Int8Linear) and m._plan[0].name != "fused"]
        return layers + [m._screen[1] for m in module.modules()
                         if isinstance(m, ScreenedLinear)]

    def span(tensors) -> tuple[int, int]:
        return (min(t.data_ptr() for t in tensors),
                max(t.data_ptr() + t.numel() for t in tensors))

    for h, p, is_block in zip(huge, plain, (True, False)):
        moved, kept = streamed(h), streamed(p)
        assert len(moved) == len(kept) >= 1
        start, end = span(moved)
        assert start % placement.HUGE_PAGE == 0
        assert end - start < sum(t.numel() + 64 for t in moved)  # one arena, 64-byte steps
        # its whole 2 MiB pages only (a SmolLM2 block's nibbles are under one: none)
        assert ("hg" in _vma_flags(start)) == (end - start >= placement.HUGE_PAGE)
        assert "hg" not in _vma_flags(end - 1) or (end - start) % placement.HUGE_PAGE == 0
        assert not any("hg" in _vma_flags(t.data_ptr()) for t in kept)
        for a, b in zip(moved, kept):
            assert torch.equal(a, b)
        if is_block:  # nibbles, half the int8 bytes, in one arena with or without
            assert all(t.dtype == torch.uint8 for t in moved)
            a, b = span(kept)
            assert a % placement.HUGE_PAGE == 0 and b - a < sum(t.numel() + 64 for t in kept)
        else:
            assert "hg" in _vma_flags(start)  # the screen's 28 MB copy
    # a fused layer's nibbles are its members' own bytes (no second copy of them, none
    # freed back to malloc), and its int8 weight is not kept at all
    for block in (huge[0], plain[0]):
        members = [m for m in block.modules()
                   if isinstance(m, Int8Linear) and m._plan[0].name == "fused"]
        assert members
        for m in members:
            part = m._plan[1]
            rows = part.fused.nibbles_now().packed.data_ptr() + part.start * m.in_features // 2
            assert m.nibbles_now().packed.data_ptr() == rows
            assert part.fused.weight.device.type == "meta"
    monkeypatch.setattr(store_mod, "weights_to_huge_pages", lambda module, mapped: 0)
    int8 = store.load(parts[0])  # the stored int8 weights, as they are
    assert not any(m.nibbles_now() for m in int8.modules() if isinstance(m, Int8Linear))
    x = torch.randn(4, store.config.hidden_size)
    with torch.inference_mode():
        caches = SequenceCache(), SequenceCache(), SequenceCache()
        for rows in (x[:3], x[3:]):  # a prompt of 3 rows, then a decode step (one C call)
            want = int8(rows, Batch.of([len(rows)], [caches[2]]))
            assert torch.equal(huge[0](rows, Batch.of([len(rows)], [caches[0]])), want)
            assert torch.equal(plain[0](rows, Batch.of([len(rows)], [caches[1]])), want)
        assert torch.equal(huge[1](x), plain[1](x))


def test_store_load_fuses_llama_and_pangu_blocks_to_the_same_outputs(tmp_path):
    """A stored block's q/k/v and gate/up (LLaMA), q/k/v (PanGu; k/v in its query block)
    run fused after Store.load, with the unfused block's exact outputs."""
    from conftest import hf_llama, random_hf_state, write_hf_port

    from llm_shard.models.base import Part
    from llm_shard.models.cache import Batch, SequenceCache
    from llm_shard.models.checkpoint.convert import convert

    hf_llama().save_pretrained(tmp_path / "llama" / "hf")
    (tmp_path / "pangu").mkdir()
    write_hf_port(tmp_path / "pangu" / "hf", random_hf_state())
    for arch, names in (("llama", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                   "mlp.gate_proj", "mlp.up_proj"}),
                        ("pangu", {"attn.q_proj", "attn.k_proj", "attn.v_proj"})):
        store = convert(tmp_path / arch / "hf", tmp_path / arch / "store", dtype="int8",
                        progress=False)
        last = store.n_blocks - 1
        for i in (0, last):
            block = store.load(Part("block", i))
            fused = {n for n, m in block.named_modules() if getattr(m, "kernel", "") == "fused"}
            want = names - ({"attn.q_proj"} if arch == "pangu" and i == last else set())
            assert fused == want, (arch, i)
            plain = store.load(Part("block", i))
            prepare_int8(plain)  # each layer alone again
            x = torch.randn(5, store.config.hidden_size)
            caches = [SequenceCache(), SequenceCache()]
            got = block(x, Batch.of([5], caches[:1]))
            assert torch.equal(got, plain(x, Batch.of([5], caches[1:])))


# --- GPTQ rounding (models/quant/calibrate.py) --------------------------------------------------

def _gptq_by_columns(w, hessian, damp=0.01, block=128):
    """GPTQ as the paper's reference code writes it (columns of w, not rows of w^T)."""
    from llm_shard.models.quant import QMAX, quantize_weight

    _, scales = quantize_weight(w)
    W, H = w.double().clone(), hessian.double().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    perm = torch.argsort(torch.diagonal(H), descending=True)
    W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * float(torch.diagonal(H).mean()))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q, s = torch.empty_like(W), scales.double()[:, None]
    for i1 in range(0, W.shape[1], block):
        i2 = min(i1 + block, W.shape[1])
        err1 = torch.empty_like(W[:, i1:i2])
        for i in range(i2 - i1):
            col = W[:, i1 + i: i1 + i + 1]
            Q[:, i1 + i: i1 + i + 1] = q = torch.round(col / s).clamp(-QMAX, QMAX)
            err1[:, i: i + 1] = err = (col - q * s) / hinv[i1 + i, i1 + i]
            W[:, i1 + i:i2] -= err @ hinv[i1 + i: i1 + i + 1, i1 + i:i2]
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)].to(torch.int8), scales


@pytest.mark.parametrize("out,inp", [(96, 200), (40, 300)])
def test_gptq_rounds_as_the_reference_and_beats_nearest_on_its_inputs(out, inp):
    """The same integers as the paper's column-wise loop (in float64: at most a few weights
    one step apart, from float32 rounding), the scales of plain rounding, an input never seen
    in calibration allowed for, and a smaller output error on the calibration inputs than
    rounding to nearest."""
    from llm_shard.models.quant import quantize_weight
    from llm_shard.models.quant.calibrate import gptq_quantize

    g = torch.Generator().manual_seed(out)
    w = torch.randn(out, inp, generator=g) * 0.05
    x = torch.randn(400, inp, generator=g) * torch.rand(inp, generator=g) * 3
    x[:, 7] = 0  # an input calibration never saw
    H = x.double().T @ x.double()
    q, scales = gptq_quantize(w, H)
    ref, ref_scales = _gptq_by_columns(w, H)
    near, near_scales = quantize_weight(w)
    assert q.dtype == torch.int8 and torch.equal(scales, near_scales) and torch.equal(
        scales, ref_scales)
    diff = (q.int() - ref.int()).abs()
    assert diff.max() <= 1 and diff.sum() <= q.numel() // 500
    error = [float((x @ (w - qq.float() * scales[:, None]).T).square().sum())
             for qq in (q, near)]
    assert error[0] < 0.75 * error[1]  # 0.50 and 0.66 of it measured
