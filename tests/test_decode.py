"""models/kernels/decode.py: a decode step's block in one C call gives the modules' bits;
the blocks' forward is module code alone, the stage chooses the C call."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from llm_shard.models.archs import llama, pangu
from llm_shard.models.cache import Batch, SequenceCache
from llm_shard.models.kernels import decode, w8a16
from llm_shard.models.quant import Int8Linear, prepare_int8, quantize

pytestmark = pytest.mark.skipif(w8a16.problem() is not None,
                                reason=f"no w8a16 kernel here: {w8a16.problem()}")


def _blocks(module: nn.Module, mins: bool) -> None:
    """Every Linear of `module` replaced by random GGUF-like blocks of 32 (w8a16_blocks)."""
    g = torch.Generator().manual_seed(5)
    for name, lin in list(module.named_modules()):
        if not isinstance(lin, nn.Linear):
            continue
        o, i = lin.out_features, lin.in_features
        m = Int8Linear(i, o, bias=lin.bias is not None, group=32, mins=mins)
        with torch.no_grad():
            m.weight.copy_(torch.randint(0, 16, (o, i), generator=g, dtype=torch.int8))
            m.scales.copy_((torch.rand(o, i // 32, generator=g) / 40).half())
            if mins:
                m.mins.copy_((-torch.rand(i // 32, o, generator=g) / 5).half())
            if m.bias is not None:
                m.bias.copy_(torch.randn(o, generator=g) / 4)
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent), attr, m)


def make_block(arch: str, int8: str, fuse: bool, layer: int = 1) -> nn.Module:
    torch.manual_seed(0)
    if arch == "llama":  # GQA, SmolLM2's shape rules at a small size
        cfg = llama.LlamaConfig(hidden_size=128, intermediate_size=96, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                rms_norm_eps=1e-5, rope_theta=1e4, attention_bias=True,
                                vocab_size=50)
        block = llama.Block(cfg, layer)
        for n in (block.input_layernorm, block.post_attention_layernorm):
            nn.init.normal_(n.weight, 1.0, 0.1)
    else:  # "pangu-query": the last layer, its queries from wqe after ln_f
        cfg = pangu.PanGuConfig(hidden_size=128, num_layers=4, num_heads=4, vocab_size=50)
        block = pangu.block(cfg, cfg.num_layers - 1 if arch == "pangu-query" else layer)
        for n in (block.ln_1, block.ln_2, *([block.ln_f] if arch == "pangu-query" else [])):
            nn.init.normal_(n.weight, 1.0, 0.1)
            nn.init.normal_(n.bias, 0.0, 0.1)
    for lin in block.modules():
        if isinstance(lin, nn.Linear):
            nn.init.normal_(lin.weight, 0, 0.08)
            if lin.bias is not None:
                nn.init.normal_(lin.bias, 0, 0.2)
    if int8 == "per-channel":
        quantize(block, kernel="w8a16")
    else:
        _blocks(block, mins=int8 == "blocks+mins")
    prepare_int8(block, fuse=fuse)
    return block.eval()


def prompts(block: nn.Module, lens: list[int]) -> list[SequenceCache]:
    """Caches of len(lens) sequences, each prefilled by the modules with lens[i] rows."""
    caches = [SequenceCache(kv_dtype="fp32") for _ in lens]
    g = torch.Generator().manual_seed(7)
    for cache, n in zip(caches, lens):
        with torch.inference_mode():
            decode.run_block(block, torch.randn(n, 128, generator=g), Batch.of([n], [cache]))
    return caches


def counting(monkeypatch) -> list[int]:
    """How many blocks each try at a C call ran (0: the modules run the first)."""
    ran, real = [], decode.blocks

    def wrapped(*args, **kwargs):
        y, n = real(*args, **kwargs)
        ran.append(n)
        return y, n

    monkeypatch.setattr(decode, "blocks", wrapped)
    return ran


def step(block, x, caches, fused: bool, monkeypatch) -> tuple[torch.Tensor, list]:
    caches = copy.deepcopy(caches)
    monkeypatch.setattr(decode, "ENABLED", fused)
    ran = counting(monkeypatch)
    with torch.inference_mode():
        y = decode.run_block(block, x, Batch.of([1] * len(caches), caches))
    assert ran == [fused]  # the path asked for is the path that ran
    monkeypatch.undo()
    return y, caches


@pytest.mark.parametrize("arch", ["llama", "pangu", "pangu-query"])
@pytest.mark.parametrize("int8", ["per-channel", "blocks", "blocks+mins"])
@pytest.mark.parametrize("fuse", [True, False])
def test_one_c_call_gives_the_modules_bits(arch, int8, fuse, monkeypatch):
    """Rows of 3 sequences with caches of 5, 1 and 300 tokens (past one cache chunk: the
    cache grows in the call's reserve): the output and every cache row are bit-equal."""
    block = make_block(arch, int8, fuse)
    layer = block.attn.layer if arch.startswith("pangu") else block.self_attn.layer
    caches = prompts(block, [5, 1, 300])
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(11))
    y1, c1 = step(block, x, caches, True, monkeypatch)
    y0, c0 = step(block, x, caches, False, monkeypatch)
    assert torch.equal(y1, y0)
    assert not torch.equal(y1, x)
    for a, b in zip(c1, c0):
        kv1, kv0 = a.layer(layer), b.layer(layer)
        assert kv1.offset == kv0.offset
        assert torch.equal(kv1.k[:, :kv1.offset], kv0.k[:, :kv0.offset])
        assert torch.equal(kv1.v[:, :kv1.offset], kv0.v[:, :kv0.offset])


def test_a_row_alone_gets_the_bits_it_gets_in_a_batch(monkeypatch):
    block = make_block("llama", "blocks+mins", True)
    caches = prompts(block, [4, 9])
    x = torch.randn(2, 128)
    both, _ = step(block, x, caches, True, monkeypatch)
    alone, _ = step(block, x[1:], caches[1:], True, monkeypatch)
    assert torch.equal(both[1:], alone)


def test_long_prompts_and_other_kernels_run_the_modules(monkeypatch):
    """A batch with a prompt over ROW_BY_ROW_ROWS rows, a float block, or a layer on
    another kernel: no C block, the modules' result. Short prompts go in C."""
    from llm_shard.models.layers import ROW_BY_ROW_ROWS

    block = make_block("pangu", "per-channel", True)
    caches = prompts(block, [3, 3])
    ran = counting(monkeypatch)
    long = ROW_BY_ROW_ROWS + 1
    with torch.inference_mode():
        for x, lens in ((torch.randn(long + 1, 128), [long, 1]),
                        (torch.randn(3, 128), [2, 1]),  # a short prompt
                        (torch.randn(2, 128), [1, 1])):
            decode.run_block(block, x, Batch.of(lens, copy.deepcopy(caches)))
    assert ran == [False, True, True]
    for kernel in ("dequant", None):
        float_block = make_block("pangu", "per-channel", False)
        if kernel is None:  # float Linears: not int8 at all
            float_block = pangu.block(pangu.PanGuConfig(hidden_size=128, num_layers=4,
                                                        num_heads=4, vocab_size=50), 1).eval()
        else:
            prepare_int8(float_block, kernel=kernel)
        with torch.inference_mode():
            decode.run_block(float_block, torch.randn(1, 128),
                             Batch.of([1], [SequenceCache(kv_dtype="fp32")]))
    assert ran == [False, True, True, False, False]


@pytest.mark.parametrize("arch", ["llama", "pangu", "pangu-query"])
def test_a_blocks_forward_is_its_modules_alone(arch, monkeypatch):
    """Called as a module, a block makes no C block call (the stage chooses that path),
    and gets the bits of the stage's one C call."""
    block = make_block(arch, "blocks+mins", True)
    caches = prompts(block, [4, 2])
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(17))
    fused, _ = step(block, x, caches, True, monkeypatch)
    ran = counting(monkeypatch)
    with torch.inference_mode():
        y = block(x, Batch.of([1, 1], copy.deepcopy(caches)))
    assert ran == [] and torch.equal(y, fused)


@pytest.mark.parametrize("arch", ["llama", "pangu", "pangu-query"])
@pytest.mark.parametrize("fused", [True, False])
def test_a_short_prompt_gets_the_bits_of_decoding_it_token_by_token(arch, fused,
                                                                    monkeypatch):
    """Up to ROW_BY_ROW_ROWS new rows of a sequence attend row by row, each as its decode
    step would, in one C call (fused) and in the modules alike: the prompt's outputs and
    cache rows are those of feeding its tokens one at a time, and the same either way.
    A longer prompt runs SDPA: close, not equal."""
    from llm_shard.models.layers import ROW_BY_ROW_ROWS

    block = make_block(arch, "blocks+mins", True)
    layer = block.attn.layer if arch.startswith("pangu") else block.self_attn.layer
    caches = prompts(block, [3])
    g = torch.Generator().manual_seed(13)
    monkeypatch.setattr(decode, "ENABLED", fused)

    def run(rows: torch.Tensor, one_by_one: bool) -> tuple[torch.Tensor, SequenceCache]:
        cache = copy.deepcopy(caches[0])
        with torch.inference_mode():
            if one_by_one:
                return torch.cat([decode.run_block(block, rows[j: j + 1], Batch.of([1], [cache]))
                                  for j in range(len(rows))]), cache
            return decode.run_block(block, rows, Batch.of([len(rows)], [cache])), cache

    x = torch.randn(6, 128, generator=g)
    (whole, c1), (steps, c0) = run(x, False), run(x, True)
    assert torch.equal(whole, steps)
    kv1, kv0 = c1.layer(layer), c0.layer(layer)
    assert kv1.offset == kv0.offset == 9
    assert torch.equal(kv1.k[:, :9], kv0.k[:, :9]) and torch.equal(kv1.v[:, :9], kv0.v[:, :9])
    monkeypatch.setattr(decode, "ENABLED", not fused)
    assert torch.equal(run(x, False)[0], whole)
    x = torch.randn(ROW_BY_ROW_ROWS + 1, 128, generator=g)
    (whole, _), (steps, _) = run(x, False), run(x, True)
    assert torch.allclose(whole, steps, rtol=1e-3, atol=1e-3)  # int16 rounding of the inputs


def test_the_elementwise_steps_match_torch():
    """silu_mul and layer_norm: torch's formulas, to float32's last bits; gelu: the exact
    GELU within its erf's error (Abramowitz-Stegun 7.1.26, 1.5e-7, times |x| / 2) and
    float32 rounding. torch's own GELU is no reference for that: its AVX512 kernel (an
    Intel Xeon) is up to 1.2e-6 off the exact one where ours is 4.6e-7 off."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 10000, generator=g) * 4, torch.randn(3, 10000, generator=g)
    torch.testing.assert_close(w8a16.silu_mul(a, b), torch.nn.functional.silu(a) * b,
                               rtol=2e-6, atol=1e-6)
    xs = torch.cat([a.flatten(), torch.linspace(-20, 20, 40001)])
    exact = torch.nn.functional.gelu(xs.double())
    eps = torch.finfo(torch.float32).eps  # 1 + erf rounds to float32 twice, then y once
    bound = 0.5 * xs.double().abs() * (1.5e-7 + 2 * eps) + 4 * eps * exact.abs() + 1e-12
    assert ((w8a16.gelu(xs).double() - exact).abs() <= bound).all()
    y = w8a16.gelu(a)  # 8 lanes at a time, the rest one at a time: the same bits
    for shift in range(1, 8):
        assert torch.equal(w8a16.gelu(a.flatten()[shift:]), y.flatten()[shift:])
    w, bias = torch.randn(10000, generator=g), torch.randn(10000, generator=g)
    x = a + 100  # a large mean: the variance in double stays exact
    torch.testing.assert_close(w8a16.layer_norm(x, w, bias, 1e-5),
                               torch.nn.functional.layer_norm(x, (10000,), w, bias, 1e-5),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_smollm2_decodes_the_same_logits_with_its_blocks_in_c(smollm2_stores, monkeypatch):
    """The real checkpoint (GGUF blocks, fused q/k/v and gate/up): the prompts and 8
    greedy steps of two sequences give bit-equal logits with the one-call blocks and
    head and without, and the C path ran for every block of every step, the prompts'
    too; the head's C call gives each row's argmax as its greedy pick."""
    from llm_shard.models.runner import StageModel

    store = smollm2_stores["int8"]
    stage = StageModel(store, 0, store.n_blocks)
    prompts_ = [[1, 504, 3458, 282, 4649, 314], [1, 19, 4]]

    def run(fused: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(decode, "ENABLED", fused)
        caches = [SequenceCache(kv_dtype="fp32") for _ in prompts_]
        ids = torch.tensor([t for p in prompts_ for t in p])
        # each step's logits: one row per sequence, its last
        logits = [stage(ids, Batch.of([len(p) for p in prompts_], caches))]
        for _ in range(8):
            logits.append(stage(logits[-1].argmax(-1), Batch.of([1, 1], caches)))
            picks = logits[-1].argmax(-1).tolist() if fused else None
            assert stage.greedy == picks
        return logits

    ran = counting(monkeypatch)
    with torch.inference_mode():
        on = run(True)
        assert [n for n in ran if n] == [store.n_blocks] * 9  # a step's blocks in one call
        off = run(False)
    assert all(torch.equal(a, b) for a, b in zip(on, off))


def kv_caches(n: int, layers, kv_heads: int, head_dim: int,
              dtype: torch.dtype) -> list[SequenceCache]:
    """n sequences' caches whose `layers` hold K/V in `dtype`: each KVCache's first chunk
    made in it (a cache grows in its own dtype)."""
    from llm_shard.models.cache import CHUNK

    caches = [SequenceCache() for _ in range(n)]
    for cache in caches:
        for layer in layers:
            kv = cache.layer(layer)
            kv.k, kv.v = (torch.zeros(kv_heads, CHUNK, head_dim, dtype=dtype) for _ in "kv")
    return caches


def test_smollm2_decodes_with_float16_caches_in_c(smollm2_stores, monkeypatch):
    """The real checkpoint with float16 KV caches: every block of every step (the prompts'
    too) runs in the one C call, the modules give the same logits bit for bit (their
    attention over the same float16 rows), and the greedy tokens of two sequences are
    those of float32 caches."""
    from llm_shard.models.runner import StageModel

    store = smollm2_stores["int8"]
    stage, cfg = StageModel(store, 0, store.n_blocks), store.config
    prompts_ = [[1, 504, 3458, 282, 4649, 314], [1, 19, 4]]

    def run(fused: bool, dtype: torch.dtype) -> tuple[list, list]:
        monkeypatch.setattr(decode, "ENABLED", fused)
        caches = kv_caches(2, range(store.n_blocks), cfg.num_key_value_heads, cfg.head_dim,
                           dtype)
        ids = torch.tensor([t for p in prompts_ for t in p])
        logits = [stage(ids, Batch.of([len(p) for p in prompts_], caches))]
        for _ in range(10):
            logits.append(stage(logits[-1].argmax(-1), Batch.of([1, 1], caches)))
        assert all(c.layer(0).k.dtype == dtype for c in caches)
        return logits, [lg.argmax(-1).tolist() for lg in logits]

    ran = counting(monkeypatch)
    with torch.inference_mode():
        half, half_tokens = run(True, torch.float16)
        assert [n for n in ran if n] == [store.n_blocks] * 11
        modules, _ = run(False, torch.float16)
        _, full_tokens = run(True, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(half, modules))
    assert half_tokens == full_tokens


def test_float16_caches_in_one_c_call_give_the_modules_bits(monkeypatch):
    """Three sequences with float16 caches of 5, 1 and 200 tokens: the one C call's output
    and cache rows are the modules' bits; a cache full at 256 rows grows in the call,
    still float16, with the bits of one made bigger first; a batch mixing float16 and
    float32 caches runs the modules, each row with the bits it gets alone in C."""
    from llm_shard.models.cache import CHUNK

    for arch in ("llama", "pangu-query"):
        block = make_block(arch, "blocks+mins", True)
        attn = block.attn if arch.startswith("pangu") else block.self_attn
        layer, kvh = attn.layer, 2 if arch == "llama" else 4
        caches = kv_caches(4, [layer], kvh, 32, torch.float16)
        g = torch.Generator().manual_seed(7)
        with torch.inference_mode():
            for cache, n in zip(caches, [5, 1, 200, CHUNK]):
                for at in range(0, n, 64):
                    rows = min(64, n - at)
                    decode.run_block(block, torch.randn(rows, 128, generator=g),
                                     Batch.of([rows], [cache]))
        x = torch.randn(3, 128, generator=g)
        y1, c1 = step(block, x, caches[:3], True, monkeypatch)
        y0, c0 = step(block, x, caches[:3], False, monkeypatch)
        assert torch.equal(y1, y0) and not torch.equal(y1, x)
        for a, b in zip(c1, c0):
            kv1, kv0 = a.layer(layer), b.layer(layer)
            assert kv1.k.dtype == kv0.k.dtype == torch.float16 and kv1.offset == kv0.offset
            assert torch.equal(kv1.k[:, :kv1.offset], kv0.k[:, :kv0.offset])
            assert torch.equal(kv1.v[:, :kv1.offset], kv0.v[:, :kv0.offset])
        full = caches[3]
        bigger = copy.deepcopy(full)
        kv = bigger.layer(layer)
        kv.k, kv.v = (torch.cat([t, torch.zeros_like(t)], 1) for t in (kv.k, kv.v))
        (y, (grown,)), (want, (made,)) = (step(block, x[:1], [c], True, monkeypatch)
                                          for c in (full, bigger))
        kv, kv0 = grown.layer(layer), made.layer(layer)
        assert torch.equal(y, want) and kv.k.dtype == torch.float16
        assert kv.k.shape[1] == 2 * CHUNK and kv.offset == CHUNK + 1
        assert torch.equal(kv.k[:, :CHUNK + 1], kv0.k[:, :CHUNK + 1])
        assert torch.equal(kv.v[:, :CHUNK + 1], kv0.v[:, :CHUNK + 1])
        mixed = [caches[0], *kv_caches(1, [layer], kvh, 32, torch.float32)]
        with torch.inference_mode():
            decode.run_block(block, torch.randn(4, 128, generator=g), Batch.of([4], mixed[1:]))
        y, _ = step(block, x[:2], mixed, False, monkeypatch)
        ran = counting(monkeypatch)
        with torch.inference_mode():
            assert torch.equal(decode.run_block(block, x[:2], Batch.of(
                [1, 1], copy.deepcopy(mixed))), y)
        assert ran == [0]
        monkeypatch.undo()
        for r in range(2):
            assert torch.equal(step(block, x[r:r + 1], mixed[r:r + 1], True, monkeypatch)[0],
                               y[r:r + 1])


def test_a_cache_of_another_dtype_runs_the_modules_and_says_so(caplog):
    """int8 K/V (the torch path's, with scales): not one the C call reads; said once."""
    from llm_shard.models.cache import KVCache

    kv = KVCache()
    kv.k, kv.v = (torch.zeros(2, 4, 8, dtype=torch.int8) for _ in "kv")
    decode._TOLD.discard(torch.int8)
    with caplog.at_level("INFO", logger=decode.__name__):
        assert decode._half(kv) is None and decode._half(kv) is None
    said = [r.getMessage() for r in caplog.records if r.name == decode.__name__]
    assert len(said) == 1 and "torch.int8" in said[0] and "modules" in said[0]
    kv.k, kv.v = (torch.zeros(2, 4, 8, dtype=torch.float16) for _ in "kv")
    assert decode._half(kv) == 1
    kv.v = kv.v.float()
    assert decode._half(kv) is None  # keys and values of one dtype


def test_pangu_stages_run_their_blocks_in_one_call(tmp_path, monkeypatch):
    """An int8 PanGu-α store, as one stage and as tiers with a disk block between RAM
    blocks: the prompts and every decode step give the modules' logits bit for bit; the
    RAM blocks on either side of the disk block run in a call each, the last (query)
    layer, whose queries come from its position embedding after ln_f, with them."""
    from conftest import random_hf_state, write_hf_port

    from llm_shard.cluster.types import Tier
    from llm_shard.models.checkpoint.convert import convert
    from llm_shard.models.runner import StageModel
    from llm_shard.worker.tiers import TieredBlocks

    write_hf_port(tmp_path / "hf", random_hf_state(seed=11))
    store = convert(tmp_path / "hf", tmp_path / "store", dtype="int8", progress=False)
    n = store.n_blocks
    stage = StageModel(store, 0, n)
    tiered = TieredBlocks(store, 0, n, [Tier.RAM] + [Tier.DISK] + [Tier.RAM] * (n - 2))
    bare = StageModel(store, 0, n, load_blocks=False)

    def run(model, fused: bool, **kw) -> list[torch.Tensor]:
        monkeypatch.setattr(decode, "ENABLED", fused)
        caches = [SequenceCache(kv_dtype="fp32") for _ in range(2)]
        logits = [model(torch.tensor([3, 14, 15, 92, 7, 8]), Batch.of([4, 2], caches), **kw)]
        for _ in range(5):
            logits.append(model(logits[-1].argmax(-1), Batch.of([1, 1], caches), **kw))
        return logits

    ran = counting(monkeypatch)
    with torch.inference_mode():
        on = run(stage, True)
        assert [k for k in ran if k] == [n] * 6  # the prompts (4 and 2 rows) and 5 steps
        ran.clear()
        tiers = run(bare, True, run_blocks=tiered.run)
        assert [k for k in ran if k] == [1, 1, n - 2] * 6
        off = run(stage, False)
    tiered.close()
    for a, b, c in zip(on, tiers, off):
        assert torch.equal(a, c) and torch.equal(b, c)


def test_a_block_whose_shapes_do_not_add_up_is_refused_not_read_past(monkeypatch):
    """heads x head_dim that is not what o_proj reads: an error naming the shapes, and no
    cache row taken (also after a step that ran with the right heads kept its spec)."""
    block = make_block("llama", "per-channel", True)
    caches = prompts(block, [2])
    with torch.inference_mode():
        decode.run_block(block, torch.randn(1, 128), Batch.of([1], caches))
    block.self_attn.heads, block.self_attn.kv_heads = 2, 1  # q/k/v widths no longer match
    with torch.inference_mode(), pytest.raises(ValueError, match="shapes do not match"):
        decode.run_block(block, torch.randn(1, 128), Batch.of([1], caches))
    assert caches[0].layer(1).offset == 3


def test_a_call_of_blocks_stops_at_one_whose_shapes_do_not_add_up():
    """Blocks 1 and 2 in one call, block 2's heads wrong: the error names layer 2; block
    1 ran and took its cache row, block 2 took none. (A run's kept plan reads the heads
    when it is made: a plan change, here block 2's layers prepared again, remakes it.)"""
    first, second = make_block("llama", "per-channel", True, 1), make_block(
        "llama", "per-channel", True, 2)
    caches = [SequenceCache(kv_dtype="fp32")]
    with torch.inference_mode():
        decode.run_blocks([first, second], torch.randn(2, 128), Batch.of([2], caches))
    second.self_attn.heads, second.self_attn.kv_heads = 2, 1
    prepare_int8(second)
    with torch.inference_mode(), pytest.raises(ValueError, match="block of layer 2"):
        decode.run_blocks([first, second], torch.randn(1, 128), Batch.of([1], caches))
    assert (caches[0].layer(1).offset, caches[0].layer(2).offset) == (3, 2)


@pytest.mark.parametrize("change", ["load", "norm", "unfuse"])
def test_a_block_whose_weights_change_runs_the_new_ones(change, monkeypatch):
    """A block runs in C once (its spec is kept), then its weights change as a disk tier
    reloads a block (load_state_dict with assign, prepare_int8), a norm's weight is
    replaced, or its layers are prepared unfused: the next C call has the modules' bits
    with the new weights, not the first weights'."""
    block, other = (make_block("pangu", "per-channel", True) for _ in range(2))
    with torch.no_grad():
        for t in [*other.parameters(), *other.buffers()]:
            t.copy_(t.roll(1, 0))
    caches = prompts(block, [4])
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(3))
    first, _ = step(block, x, caches, True, monkeypatch)
    if change == "load":
        block.load_state_dict({k: v.clone() for k, v in other.state_dict().items()},
                              strict=True, assign=True)
        prepare_int8(block)
    elif change == "norm":
        block.ln_2.weight = nn.Parameter(block.ln_2.weight.detach() * 1.5)
    else:
        prepare_int8(block, fuse=False)
    y1, _ = step(block, x, caches, True, monkeypatch)
    y0, _ = step(block, x, caches, False, monkeypatch)
    assert torch.equal(y1, y0)
    assert (change == "unfuse") == torch.equal(y1, first)  # unfused: the same bits


def test_the_c_steps_leave_a_graph_being_built_to_torch():
    """With autograd recording, the MLPs' activations stay torch ops: gradients flow."""
    from llm_shard.models.layers import GeluMLP, SwiGLU

    for mlp in (SwiGLU(64, 96), GeluMLP(64, 96)):
        x = torch.randn(3, 64, requires_grad=True)
        mlp(x).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("max_exact", [None, 1])
def test_a_head_in_one_c_call_gives_the_modules_bits_and_their_argmax(max_exact):
    """A llama head (RMSNorm, screened LM head on w8a16) in one C call: bit-equal logits
    to its modules', and each row's argmax as its pick; with max_exact=1 rows with more
    candidates get every logit in float, as the modules give them."""
    from llm_shard.models.quant.screened import ScreenedLinear

    torch.manual_seed(4)
    cfg = llama.LlamaConfig(hidden_size=128, intermediate_size=96, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                            rms_norm_eps=1e-5, rope_theta=1e4, vocab_size=1000)
    head = llama.Head(cfg).eval()
    nn.init.normal_(head.norm.weight, 1.0, 0.1)
    head.lm_head = ScreenedLinear(head.lm_head, max_exact=max_exact, kernel="w8a16")
    x = torch.randn(5, 128)
    with torch.inference_mode():
        logits, picks = decode.run_head(head, x)
        ref = head(x)
    assert torch.equal(logits, ref)
    assert picks == ref.argmax(-1).tolist()
