"""The w8a16 CPU kernel (models/w8a16.py): exact to its int16 activation rounding, the same
bits in every batch, thread count and instruction-set variant, built once and cached."""

from __future__ import annotations

import pytest
import torch

from llm_shard.models import w8a16

pytestmark = pytest.mark.skipif(w8a16.problem() is not None,
                                reason=f"w8a16 cannot run here: {w8a16.problem()}")

# (out, in): in not a multiple of 32 (the scalar tail), over 512 (several exact partial
# sums), LLaMA-7B's down_proj width (partial sums that would overflow int32 if not flushed)
SHAPES = [(96, 256), (48, 100), (33, 7), (200, 1040), (64, 11008)]


def case(out: int, inp: int, rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (out, inp), dtype=torch.int8, generator=g)
    s = torch.rand(out, generator=g) / 100
    x = torch.randn(rows, inp, generator=g) * torch.logspace(-2, 2, rows)[:, None]
    x[:, 3 % inp] *= 40  # an outlier channel, as LLM activations have
    return w, s, x


@pytest.mark.parametrize("out,inp", SHAPES)
def test_exact_but_for_the_int16_rounding_of_activations(out, inp):
    w, s, x = case(out, inp, 5)
    y = w8a16.linear(w, s, x).double()
    ref = (x.double() @ w.double().T) * s.double()
    # each activation is off by at most half a step of absmax / 32767; float32 sums on top
    step = x.abs().amax(1, keepdim=True).double() / 32767
    bound = (w.double().abs().sum(1) * s.double())[None, :] * step / 2
    slack = 1e-6 * (x.double().abs() @ w.double().abs().T) * s.double()
    assert ((y - ref).abs() <= bound + slack).all()


@pytest.mark.parametrize("out,inp", SHAPES)
def test_a_row_gets_the_same_bits_in_any_batch_thread_count_and_variant(out, inp):
    w, s, x = case(out, inp, 9, seed=1)
    want = w8a16.linear(w, s, x)
    variants = {w8a16.load("native").w8a16_variant(): want}
    for march in ("haswell", "x86-64"):  # the AVX2 and plain C paths, on this CPU
        lib = w8a16.load(march)
        variants[lib.w8a16_variant()] = w8a16.linear(w, s, x, lib=lib)
    assert set(variants) == {0, 1, 2} or set(variants) == {0, 1}
    for got in variants.values():
        assert torch.equal(got, want)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = w8a16.linear(w, s, x)
    finally:
        torch.set_num_threads(threads)
    rows = torch.cat([w8a16.linear(w, s, x[i:i + 1]) for i in range(9)])
    chunks = torch.cat([w8a16.linear(w, s, x[:2]), w8a16.linear(w, s, x[2:7]),
                        w8a16.linear(w, s, x[7:])])
    assert torch.equal(one_thread, want) and torch.equal(rows, want)
    assert torch.equal(chunks, want)


def test_zero_rows_and_zero_activations():
    w, s, _ = case(16, 64, 1)
    assert w8a16.linear(w, s, torch.zeros(0, 64)).shape == (0, 16)
    assert not w8a16.linear(w, s, torch.zeros(2, 64)).any()


def test_built_once_and_a_missing_compiler_is_a_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_SHARD_KERNEL_CACHE", str(tmp_path))
    first = w8a16.build("x86-64")
    assert first.parent == tmp_path and first.exists()
    mtime = first.stat().st_mtime_ns
    assert w8a16.build("x86-64") == first and first.stat().st_mtime_ns == mtime  # cached
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(RuntimeError, match="no C compiler .*no-such-cc.*set CC or install gcc"):
        w8a16.build("x86-64")
