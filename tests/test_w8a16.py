"""The w8a16 CPU kernel (models/kernels/w8a16.py), per-channel scales and blocks of 32: exact to its
int16 activation rounding, the same bits in every batch, thread count and instruction-set
variant, built once and cached."""

from __future__ import annotations

import pytest
import torch

from llm_shard.models.kernels import build, w8a16

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


# Blocks of 32: one block, odd output counts (the min terms' tails), 33 blocks (the
# lanes' odd set), LLaMA-7B's down_proj width; with and without mins.
BLOCK_SHAPES = [(33, 32), (96, 256), (45, 1056), (64, 11008)]


def block_case(out: int, inp: int, rows: int, mins: bool, seed: int = 0, q4_0: bool = False):
    """(weight, scales, mins transposed, x, the float weight they stand for)."""
    g = torch.Generator().manual_seed(seed)
    nb = inp // 32
    if mins:  # Q4_1-like: 4-bit levels, a scale and a min per block
        w = torch.randint(0, 16, (out, inp), dtype=torch.int8, generator=g)
        m = (-torch.rand(out, nb, generator=g) / 10).half()
    elif q4_0:  # Q4_0-like: 4-bit levels around zero
        w = torch.randint(-8, 8, (out, inp), dtype=torch.int8, generator=g)
        m = None
    else:  # Q8_0-like
        w = torch.randint(-127, 128, (out, inp), dtype=torch.int8, generator=g)
        m = None
    d = (torch.rand(out, nb, generator=g) / 100).half()
    x = torch.randn(rows, inp, generator=g) * torch.logspace(-2, 2, rows)[:, None]
    x[:, 3] *= 40
    full = w.double().view(out, nb, 32) * d.double()[..., None]
    if m is not None:
        full += m.double()[..., None]
    return w, d, None if m is None else m.t().contiguous(), x, full.view(out, inp)


def matmuls(kind: str, out: int, inp: int, rows: int, seed: int = 0):
    """(the kernel as a function of (x, lib), x, the float weight)."""
    if kind == "channel":
        w, s, x = case(out, inp, rows, seed)
        full = w.double() * s.double()[:, None]
        return (lambda x, lib=None: w8a16.linear(w, s, x, lib=lib)), x, full
    w, d, mt, x, full = block_case(out, inp, rows, kind in ("blocks+mins", "q4_1 nibbles"),
                                   seed, q4_0=kind == "q4_0 nibbles")
    if kind.endswith("nibbles"):  # the same weights at 4 bits a value
        lo = w8a16.nibble_offset(w)
        assert lo == (0 if kind == "q4_1 nibbles" else -8)
        w = w8a16.pack_nibbles(w, lo)
        return (lambda x, lib=None: w8a16.blocks(w, d, mt, x, lib=lib, lo=lo)), x, full
    return (lambda x, lib=None: w8a16.blocks(w, d, mt, x, lib=lib)), x, full


CASES = ([("channel", *shape) for shape in SHAPES]
         + [(kind, *shape) for kind in ("blocks", "blocks+mins", "q4_1 nibbles", "q4_0 nibbles")
            for shape in BLOCK_SHAPES])


@pytest.mark.parametrize("kind,out,inp", CASES)
def test_exact_but_for_the_int16_rounding_of_activations(kind, out, inp):
    f, x, full = matmuls(kind, out, inp, 5)
    y = f(x).double()
    ref = x.double() @ full.T
    # each activation is off by at most half a step of absmax / 32767; float32 sums on top
    step = x.abs().amax(1, keepdim=True).double() / 32767
    bound = full.abs().sum(1)[None, :] * step / 2
    slack = 1e-6 * (x.double().abs() @ full.abs().T)
    assert ((y - ref).abs() <= bound + slack).all()


def variant_libs():
    """The kernel built for this CPU, for AVX2 and for plain C (all run here)."""
    return [w8a16.load(march) for march in ("native", "haswell", "x86-64")]


@pytest.mark.parametrize("out,inp,extreme", [*((o, i, False) for o, i in SHAPES),
                                             (77, 20000, False), (9, 20000, True),
                                             (35, 20000, True)])
def test_per_channel_outputs_are_the_exact_integer_sums_rounded_once(out, inp, extreme):
    """y = float(sum_i w[o, i] q[m, i]) * step[m] * s[o], q the activations rounded to
    int16: the integer sum exact past int32 (20000 inputs; all weights -128 against
    full-scale activations, each lane at its bound), in every variant; 35 rows take the
    wide rows' groups of R (16, or 8 on AVX2) and an edge of single rows."""
    if extreme:
        w = torch.full((out, inp), -128, dtype=torch.int8)
        s, x = torch.rand(out) / 100, -torch.ones(3, inp)
    else:
        w, s, x = case(out, inp, 7)
    step = x.abs().amax(1, keepdim=True) / 32767
    q = torch.round(x * (1 / step)).clamp(-32767, 32767).long()
    want = (q @ w.long().T).float() * step * s
    bias = torch.randn(out)
    for lib in variant_libs():
        assert torch.equal(w8a16.linear(w, s, x, lib=lib), want), lib.w8a16_variant()
        assert torch.equal(w8a16.linear(w, s, x[1:2], lib=lib), want[1:2])
        # the bias added in the kernel: the bits of torch's add after it
        assert torch.equal(w8a16.linear(w, s, x, bias, lib=lib), want + bias)
        assert torch.equal(w8a16.linear(w, s, x[1:2], bias, lib=lib), want[1:2] + bias)


@pytest.mark.parametrize("kind,out,inp", CASES)
def test_a_row_gets_the_same_bits_in_any_batch_thread_count_and_variant(kind, out, inp):
    f, x, _ = matmuls(kind, out, inp, 9, seed=1)
    want = f(x)
    variants = {lib.w8a16_variant(): f(x, lib=lib) for lib in variant_libs()}
    assert set(variants) == {0, 1, 2} or set(variants) == {0, 1}
    for got in variants.values():
        assert torch.equal(got, want)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = f(x)
    finally:
        torch.set_num_threads(threads)
    rows = torch.cat([f(x[i:i + 1]) for i in range(9)])
    chunks = torch.cat([f(x[:2]), f(x[2:7]), f(x[7:])])
    assert torch.equal(one_thread, want) and torch.equal(rows, want)
    assert torch.equal(chunks, want)


@pytest.mark.parametrize("kind", ["q4_1 nibbles", "q4_0 nibbles"])
@pytest.mark.parametrize("out,inp", [(33, 32), (45, 1056), (64, 2048)])
def test_nibbles_give_the_int8_weights_bits(kind, out, inp):
    """A Q4 layer packed at 4 bits a value (`pack_nibbles`) computes each row with the
    bits of its int8 weight, at 1 row (unpacked in registers), at 2-4 (one pass) and past
    4 (each weight row unpacked once), in every variant: an odd block count takes the
    AVX512 path's single-block tail."""
    w, d, mt, x, _ = block_case(out, inp, 9, kind == "q4_1 nibbles", seed=2,
                                q4_0=kind == "q4_0 nibbles")
    lo = w8a16.nibble_offset(w)
    packed = w8a16.pack_nibbles(w, lo)
    assert packed.shape == (out, inp // 2) and packed.dtype == torch.uint8
    # byte j of a block: value j in its low nibble, value j + 16 in its high one
    assert int(packed[0, 0]) == (int(w[0, 0]) - lo) | ((int(w[0, 16]) - lo) << 4)
    for lib in variant_libs():
        for rows in (x[:1], x[:3], x[:4], x):
            assert torch.equal(w8a16.blocks(packed, d, mt, rows, lib=lib, lo=lo),
                               w8a16.blocks(w, d, mt, rows, lib=lib)), lib.w8a16_variant()


def test_nibble_offset_takes_q4_ranges_only():
    assert w8a16.nibble_offset(torch.tensor([[0, 15] * 16], dtype=torch.int8)) == 0
    assert w8a16.nibble_offset(torch.tensor([[-8, 7] * 16], dtype=torch.int8)) == -8
    assert w8a16.nibble_offset(torch.tensor([[3, 10] * 16], dtype=torch.int8)) == 0
    assert w8a16.nibble_offset(torch.tensor([[-8, 8] * 16], dtype=torch.int8)) is None
    assert w8a16.nibble_offset(torch.tensor([[0, 16] * 16], dtype=torch.int8)) is None
    assert w8a16.nibble_offset(torch.zeros(2, 48, dtype=torch.int8)) is None  # not blocks
    with pytest.raises(ValueError, match="in % 32 == 0 and an offset"):
        w8a16.pack_nibbles(torch.zeros(2, 48, dtype=torch.int8), 0)


def test_blocks_need_whole_blocks():
    w, d, _, x, _ = block_case(8, 64, 1, mins=False)
    with pytest.raises(ValueError, match="in_features=48 is not a multiple of 32"):
        w8a16.blocks(w[:, :48].contiguous(), d, None, x[:, :48])


def test_zero_rows_and_zero_activations():
    w, s, _ = case(16, 64, 1)
    assert w8a16.linear(w, s, torch.zeros(0, 64)).shape == (0, 16)
    assert not w8a16.linear(w, s, torch.zeros(2, 64)).any()


def test_built_once_and_a_missing_compiler_is_a_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_SHARD_KERNEL_CACHE", str(tmp_path))
    first = build.library("x86-64")
    assert first.parent == tmp_path and first.exists()
    mtime = first.stat().st_mtime_ns
    assert build.library("x86-64") == first and first.stat().st_mtime_ns == mtime  # cached
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(RuntimeError, match="no C compiler .*no-such-cc.*set CC or install gcc"):
        build.library("x86-64")


@pytest.mark.parametrize("variant,flags,keeps", [
    (2, "avx2 avx512f avx512bw avx512_vnni", True),  # AVX512-VNNI
    (1, "sse4_2 avx2 fma", True),  # an AVX2 CPU: fbgemm runs AVX2 kernels too
    (1, "avx2 avx512f avx512bw", False),  # AVX512 without VNNI: fbgemm's AVX512 kernels
    (0, "sse4_2", False)])
def test_keeps_up_with_fbgemm_on_avx512_vnni_and_on_cpus_whose_best_is_avx2(
        monkeypatch, variant, flags, keeps):
    class Lib:
        def w8a16_variant(self):
            return variant

    monkeypatch.setattr(w8a16, "load", lambda: Lib())
    monkeypatch.setattr(w8a16, "problem", lambda: None if variant else "no AVX2")
    monkeypatch.setattr(w8a16, "_cpu_flags", lambda: f"flags\t\t: fpu {flags}\n")
    w8a16.keeps_up.cache_clear()
    try:
        assert w8a16.keeps_up() is keeps
    finally:
        w8a16.keeps_up.cache_clear()


@pytest.mark.parametrize("heads,kv_heads,total,d", [(9, 3, 1, 64), (9, 3, 77, 64),
                                                    (32, 32, 300, 80), (4, 1, 5000, 128)])
def test_attend_matches_torch_on_a_cache_view(heads, kv_heads, total, d):
    """Decode's one-row attention against a cache's view (capacity past `total`), grouped
    query heads included, against softmax(q k^T * scale) v in float64."""
    from llm_shard.models import layers

    torch.manual_seed(total)
    cap = total + 13
    k = torch.randn(kv_heads, cap, d)[:, :total] * 3
    v = torch.randn(kv_heads, cap, d)[:, :total]
    q = torch.randn(heads, d)
    assert w8a16.can_attend(q, k, v)
    got = w8a16.attend(q, k, v, 0.1)
    per = heads // kv_heads
    kk, vv = k.double().repeat_interleave(per, 0), v.double().repeat_interleave(per, 0)
    probs = torch.softmax(torch.einsum("hd,htd->ht", q.double() * 0.1, kk), -1)
    want = torch.einsum("ht,htd->hd", probs, vv)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # the model's entry point takes it, and gives the same
    assert torch.equal(layers._one_query(q, k, v, 0.1), got)


def test_attend_leaves_what_it_cannot_run_to_torch():
    q, k = torch.randn(4, 8), torch.randn(2, 5, 8)
    assert not w8a16.can_attend(q.bfloat16(), k.bfloat16(), k.bfloat16())
    assert not w8a16.can_attend(q, k.transpose(1, 2).contiguous().transpose(1, 2), k)
    assert not w8a16.can_attend(torch.randn(3, 8), k, k)  # 2 kv heads don't divide 3
    assert not w8a16.can_attend(q, k[:, :0], k[:, :0])


@pytest.mark.parametrize("rows,heads,d", [(1, 9, 64), (5, 3, 64), (2, 32, 80), (3, 1, 2)])
def test_rotate_gives_torchs_bits(rows, heads, d):
    from llm_shard.models import layers

    torch.manual_seed(d)
    x = torch.randn(rows, heads, d)
    cos, sin = torch.randn(rows, 1, d), torch.randn(rows, 1, d)
    assert w8a16.can_rotate(x, cos, sin)
    want = x * cos + x.roll(d // 2, -1) * sin
    assert torch.equal(w8a16.rotate(x, cos, sin), want)
    assert torch.equal(layers.rotate(x, cos, sin), want)
    assert not w8a16.can_rotate(x.transpose(0, 1), cos, sin)
    assert not w8a16.can_rotate(x.bfloat16(), cos.bfloat16(), sin.bfloat16())


@pytest.mark.parametrize("rows,d", [(1, 576), (7, 2560), (3, 5), (2, 1)])
def test_rms_norm_matches_float64_and_the_model_layer_takes_it(rows, d):
    """RMSNorm rows against their float64 values (large and tiny rows); each row alone
    gives the same bits as in its batch, and the model's RMSNorm runs it (same bits)
    unless autograd is building a graph (torch's op, same values to float32)."""
    from llm_shard.models import layers

    torch.manual_seed(rows * d)
    x = torch.randn(rows, d) * 3 + 50
    x[-1] *= 1e-3
    w = torch.randn(d)
    xd = x.double()
    want = xd / (xd.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * w.double()
    assert w8a16.can_rms_norm(x, w)
    got = w8a16.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    for r in range(rows):
        assert torch.equal(w8a16.rms_norm(x[r:r + 1], w, 1e-5), got[r:r + 1])
    layer = layers.RMSNorm(d, 1e-5)
    layer.weight.data.copy_(w)
    with torch.no_grad():
        assert torch.equal(layer(x), got)
    torched = layer(x)
    assert torched.grad_fn is not None
    torch.testing.assert_close(torched.detach().double(), want, rtol=1e-5, atol=1e-5)
    layer.requires_grad_(False)
    assert layer(x.clone().requires_grad_()).grad_fn is not None  # a graph for x's grad


def test_rms_norm_leaves_what_it_cannot_run_to_torch():
    x, w = torch.randn(3, 8), torch.randn(8)
    assert not w8a16.can_rms_norm(x.bfloat16(), w.bfloat16())
    assert not w8a16.can_rms_norm(x.t(), torch.randn(3))
    assert not w8a16.can_rms_norm(x, torch.randn(9))
    assert not w8a16.can_rms_norm(x, torch.randn(16)[::2])


def test_append_attend_is_the_cache_update_then_attend():
    """Decode steps through layers._decode_row (one C call) against update_and_fetch then
    attend: the same outputs and cache rows, across the cache's growth past a chunk."""
    from llm_shard.models import layers
    from llm_shard.models.cache import CHUNK, KVCache

    torch.manual_seed(3)
    heads, g, d, scale = 9, 3, 64, 0.1
    fused, plain = KVCache("fp32"), KVCache("fp32")  # the C attention reads fp32 caches
    first = CHUNK - 2
    k, v = torch.randn(g, first, d), torch.randn(g, first, d)
    for c in (fused, plain):
        c.update_and_fetch(k, v)
    for _ in range(4):  # rows CHUNK - 2 .. CHUNK + 1: the buffers grow at the third
        q, k1, v1 = torch.randn(heads, d), torch.randn(g, d), torch.randn(g, d)
        assert w8a16.can_append_attend(q, k1, v1, *(fused.k, fused.v))
        out = torch.full((heads, d), float("nan"))
        layers._decode_row(q, k1, v1, fused, scale, out)
        keys, values = plain.update_and_fetch(k1.unsqueeze(1), v1.unsqueeze(1))
        assert torch.equal(out, w8a16.attend(q, keys, values, scale))
        assert fused.offset == plain.offset
        assert torch.equal(fused.k[:, :fused.offset], keys)
        assert torch.equal(fused.v[:, :fused.offset], values)
    assert fused.k.shape[1] == 2 * CHUNK


def test_append_attend_refuses_a_row_outside_the_cache_or_a_wrong_out():
    q, k1 = torch.randn(4, 8), torch.randn(2, 8)
    keys = torch.zeros(2, 5, 8)
    with pytest.raises(ValueError, match="row 5 is outside a cache of 5 rows"):
        w8a16.append_attend(q, k1, k1, keys, keys.clone(), 6, 1.0)
    with pytest.raises(ValueError, match=r"out must be a contiguous .* of \(4, 8\)"):
        w8a16.append_attend(q, k1, k1, keys, keys.clone(), 1, 1.0, out=torch.empty(8, 4).t())
    assert not w8a16.can_append_attend(q, k1.t().contiguous().t(), k1, keys, keys)
    assert not w8a16.can_append_attend(q, torch.randn(3, 8), k1, keys, keys)


@pytest.mark.parametrize("out,inp", [(1007, 37), (49152 // 8, 576)])
def test_screen_recomputes_torchs_candidates_alike_in_every_variant(out, inp):
    """A screened head's C pass (ScreenedLinear): the outputs whose upper bound reaches the
    largest lower bound, as torch's elementwise ops pick them, get their float logit; the
    rest keep their bits; a row with more than max_exact candidates is left whole; every
    variant gives the same bits, and a row the same alone as in company."""
    g = torch.Generator().manual_seed(5)
    rows, max_exact = 6, 40
    weight = torch.randn(out, inp, generator=g)
    x = torch.randn(rows, inp, generator=g)
    logits = x @ weight.T + torch.randn(rows, out, generator=g) * 1e-3
    scales = torch.rand(out, generator=g) / 100
    row_bound = torch.rand(rows, 1, generator=g) / 4
    row_bound[3] = 1e4  # every output a candidate: more than max_exact
    bound = row_bound * scales[None, :]
    maybe = (logits + bound) >= (logits - bound).amax(-1, keepdim=True)
    ref = (x.double() @ weight.double().T).float()
    outs = []
    for lib in variant_libs():
        got = logits.clone()
        counts = w8a16.screen(got, row_bound, scales, weight, None, x, max_exact, lib=lib)
        assert counts[3] > max_exact and torch.equal(got[3], logits[3])
        keep = torch.ones(rows, dtype=torch.bool)
        keep[3] = False
        assert torch.equal(counts[keep], maybe[keep].sum(1).int())
        assert torch.equal(got[keep][~maybe[keep]], logits[keep][~maybe[keep]])
        torch.testing.assert_close(got[keep][maybe[keep]], ref[keep][maybe[keep]],
                                   rtol=1e-5, atol=1e-5)
        alone = logits[1:2].clone()
        w8a16.screen(alone, row_bound[1:2], scales, weight, None, x[1:2], max_exact, lib=lib)
        assert torch.equal(alone, got[1:2])
        outs.append(got)
    assert all(torch.equal(o, outs[0]) for o in outs)
    bias = torch.randn(out, generator=g)
    with_bias = (logits + bias).contiguous()
    w8a16.screen(with_bias, row_bound, scales, weight, bias, x, max_exact)
    pick = (with_bias != logits + bias) & maybe
    torch.testing.assert_close(with_bias[pick], (ref + bias)[pick], rtol=1e-5, atol=1e-5)


def test_screen_over_float16_rows_is_the_screen_over_their_float32_copy():
    """A tied head reads the embedding's fp16 table: the candidates' float logits over the
    fp16 rows are the bits of the same pass over the rows' exact float32 copy, in every
    variant, with and without a bias."""
    g = torch.Generator().manual_seed(6)
    rows, out, inp, max_exact = 5, 300, 72, 60
    half = (torch.randn(out, inp, generator=g) * 0.05).half()
    x = torch.randn(rows, inp, generator=g)
    logits = x @ half.float().T + torch.randn(rows, out, generator=g) * 1e-3
    scales = torch.rand(out, generator=g) / 50
    row_bound = torch.rand(rows, 1, generator=g)
    for lib in variant_libs():
        for bias in (None, torch.randn(out, generator=g)):
            got, want = logits.clone(), logits.clone()
            n = w8a16.screen(got, row_bound, scales, half, bias, x, max_exact, lib=lib)
            m = w8a16.screen(want, row_bound, scales, half.float(), bias, x, max_exact, lib=lib)
            assert torch.equal(n, m) and 0 < int(n.min()) and torch.equal(got, want)
            assert not torch.equal(got, logits)  # the candidates were recomputed


def _half_edges() -> torch.Tensor:
    """float32 values where float16 rounding can go wrong: every finite float16, the ties
    halfway between neighbours (subnormal, normal, at each exponent step) and one float32
    step either side of them, the overflow edge, and random values over float16's range
    and past it (NaN left out: its payload bits are the hardware's)."""
    h = torch.arange(-0x7c00, 0x7c00 + 1, dtype=torch.int32)  # -inf .. inf in sign-magnitude
    bits = torch.where(h < 0, 0x8000 - h, h).to(torch.int16)
    exact = bits.view(torch.float16).float().sort().values
    mid = (exact[:-1].double() + exact[1:].double()) / 2
    mid = mid[mid.isfinite()].float()
    steps = torch.cat([mid, mid.nextafter(mid + 1), mid.nextafter(mid - 1)])
    g = torch.Generator().manual_seed(17)
    wide = torch.randn(20000, generator=g) * torch.exp2(torch.randint(-30, 20, (20000,),
                                                                       generator=g).float())
    edge = torch.tensor([65504.0, 65519.996, 65520.0, 65536.0, 1e30, 2.0 ** -25,
                         2.0 ** -25 * 1.0000001, 2.0 ** -24 * 1.5, 2.0 ** -26, 0.0, -0.0])
    return torch.cat([exact[exact.isfinite()], steps, wide, edge, -edge])


@pytest.mark.parametrize("lib", variant_libs(), ids=lambda lib: lib.path.name.split("-")[1])
def test_a_float16_cache_row_gets_torchs_half_bits_in_every_variant(lib):
    """append_attend into float16 caches: the rows written are torch's .half() of k1, v1,
    bit for bit (round to nearest even, ties, subnormals, overflow to inf), the F16C and
    AVX512 conversions and the plain-C one alike."""
    x = _half_edges()
    n = x.numel() // 2 * 2
    k1, v1 = x[:n // 2].reshape(1, -1).contiguous(), x[n // 2:n].reshape(1, -1).contiguous()
    keys = torch.zeros(1, 3, n // 2, dtype=torch.float16)
    values = keys.clone()
    q = torch.zeros(1, n // 2)
    assert w8a16.can_append_attend(q, k1, v1, keys, values)
    w8a16.append_attend(q, k1, v1, keys, values, 2, 1.0, lib=lib)
    assert torch.equal(keys[0, 1].view(torch.int16), k1[0].half().view(torch.int16))
    assert torch.equal(values[0, 1].view(torch.int16), v1[0].half().view(torch.int16))
    assert not keys[0, 2].any() and not values[0, 0].any()  # no other row written


@pytest.mark.parametrize("lib", variant_libs(), ids=lambda lib: lib.path.name.split("-")[1])
@pytest.mark.parametrize("heads,kv_heads,total,d", [(9, 3, 37, 64), (4, 4, 300, 80)])
def test_attend_over_a_float16_cache_is_attend_over_its_float32_copy(lib, heads, kv_heads,
                                                                     total, d):
    """A float16 cache's view (capacity past `total`): the bits of attend over its exact
    float32 copy, and softmax(q k^T * scale) v over the half values in float64 to float32
    rounding; append_attend then attends over the row it wrote alike."""
    torch.manual_seed(total)
    cap = total + 13
    k = (torch.randn(kv_heads, cap, d) * 3).half()
    v = torch.randn(kv_heads, cap, d).half()
    q = torch.randn(heads, d)
    kt, vt = k[:, :total], v[:, :total]
    assert w8a16.can_attend(q, kt, vt)
    got = w8a16.attend(q, kt, vt, 0.1, lib=lib)
    assert torch.equal(got, w8a16.attend(q, kt.float(), vt.float(), 0.1, lib=lib))
    per = heads // kv_heads
    kk, vv = kt.double().repeat_interleave(per, 0), vt.double().repeat_interleave(per, 0)
    probs = torch.softmax(torch.einsum("hd,htd->ht", q.double() * 0.1, kk), -1)
    torch.testing.assert_close(got.double(), torch.einsum("ht,htd->hd", probs, vv),
                               rtol=1e-5, atol=1e-5)
    k1, v1 = torch.randn(kv_heads, d), torch.randn(kv_heads, d)
    out = w8a16.append_attend(q, k1, v1, k, v, total + 1, 0.1, lib=lib)
    assert torch.equal(k[:, total], k1.half()) and torch.equal(v[:, total], v1.half())
    assert torch.equal(out, w8a16.attend(q, k[:, :total + 1].float(),
                                         v[:, :total + 1].float(), 0.1, lib=lib))


@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (4, 4, 80), (8, 2, 128),
                                             (6, 3, 72), (2, 1, 16), (4, 2, 256)])
def test_attend_gets_the_same_bits_in_every_variant(heads, kv_heads, d):
    """The vector variants score 16 (AVX512) or 8 (AVX2) cache rows at once and hold the
    output in registers: each score and output has the plain C code's bits, for row counts
    on both sides of those groups, head sizes that are not a multiple of 16, and either
    cache dtype; and the scores' order does not mix rows up (a row's bits alone)."""
    g = torch.Generator().manual_seed(d)
    libs = variant_libs()
    for total in (1, 7, 8, 15, 16, 17, 33, 100):
        k = torch.randn(kv_heads, total + 3, d, generator=g)[:, :total] * 3
        v = torch.randn(kv_heads, total + 3, d, generator=g)[:, :total]
        q = torch.randn(heads, d, generator=g)
        for kt, vt in ((k, v), (k.half(), v.half())):
            got = [w8a16.attend(q, kt, vt, 0.125, lib=lib) for lib in libs]
            for other, lib in zip(got[1:], libs[1:]):
                assert torch.equal(other, got[0]), (lib.w8a16_variant(), total, kt.dtype)
    # one row's score moved: only heads reading it change, as a row apart would say
    q = torch.randn(heads, d, generator=g)
    k = torch.randn(kv_heads, 40, d, generator=g)
    v = torch.randn(kv_heads, 40, d, generator=g)
    for lib in libs:
        base = w8a16.attend(q, k, v, 0.125, lib=lib)
        bumped = k.clone()
        bumped[0, 21] *= 2
        moved = w8a16.attend(q, bumped, v, 0.125, lib=lib)
        per = heads // kv_heads
        assert not torch.equal(moved[:per], base[:per])
        assert torch.equal(moved[per:], base[per:])


def test_attend_takes_float32_and_float16_caches_only():
    q, k = torch.randn(4, 8), torch.randn(2, 5, 8)
    assert w8a16.can_attend(q, k.half(), k.half())
    assert not w8a16.can_attend(q, k.half(), k)  # keys and values of one dtype
    assert not w8a16.can_attend(q.half(), k.half(), k.half())  # float32 queries
    assert not w8a16.can_attend(q, k.to(torch.int8), k.to(torch.int8))
    assert not w8a16.can_append_attend(q, k[:, 0].half(), k[:, 0].half(), k.half(), k.half())
