"""The GPU paths on random weights, so that they run on a bare GPU machine (no real
weights, no Ray): our CUDA int8 kernel (models/kernels/cuda_int8.py) against float64, and a GPU
worker's stage (blocks resident on the GPU, and RAM and disk blocks streamed through its
two device slots) against the same store on the CPU, and the CUDA graphs of resident
blocks' decode steps against their modules. Without a GPU they skip; the
kernel's test also runs in Triton's interpreter (`TRITON_INTERPRET=1`, Triton installed),
which is how it is developed on a machine with no GPU."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from llm_shard.cluster.types import Tier
from llm_shard.models.cache import Batch, SequenceCache
from llm_shard.models.kernels import cuda_int8
from llm_shard.models.quant import Int8Linear

CUDA = torch.cuda.is_available()
INTERPRETED = (not CUDA and os.environ.get("TRITON_INTERPRET") == "1"
               and importlib.util.find_spec("triton") is not None)
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def device() -> str:
    if not (CUDA or INTERPRETED):
        pytest.skip("needs a CUDA GPU (or TRITON_INTERPRET=1 with Triton installed)")
    return "cuda" if CUDA else "cpu"


def int8_layer(out: int, inp: int, group: int, mins: bool, bias: bool, seed: int):
    """Random int8 weights, scales (and mins, bias) as Int8Linear keeps them, and the
    float64 weight they stand for."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (out, inp), generator=g, dtype=torch.int8)
    if group:
        s = (torch.rand(out, inp // group, generator=g) * 0.01 + 1e-3).half()
        m = (torch.randn(inp // group, out, generator=g) * 0.01).half() if mins else None
        ref = w.double() * s.double().repeat_interleave(group, 1)
        if m is not None:
            ref += m.double().t().repeat_interleave(group, 1)
    else:
        s, m = torch.rand(out, generator=g) * 0.01 + 1e-3, None
        ref = w.double() * s.double()[:, None]
    b = torch.randn(out, generator=g) if bias else None
    return w, s, m, b, ref


CASES = [  # (out, in, group, mins, bias): row and input counts off the tiles, blocks
    (40, 96, 0, False, True), (1000, 2560, 0, False, False), (33, 64, 32, True, False),
    (300, 608, 32, False, True), (17, 300, 0, False, False)]


@pytest.mark.parametrize("kernel", ["row", "tile"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:3])) +
                         ("-mins" if c[3] else "") + ("-bias" if c[4] else ""))
def test_the_kernels_match_float64(device, case, dtype, kernel):
    out, inp, group, mins, bias = case
    w, s, m, b, ref_w = int8_layer(*case, seed=out + inp)
    x = torch.randn(21, inp, generator=torch.Generator().manual_seed(1)).to(dtype)
    on = [t if t is None else t.to(device) for t in (w, s, m, b, x)]
    y = cuda_int8.linear(on[0], on[1], on[4], on[3], on[2], group, kernel=kernel)
    assert y.dtype == dtype and y.shape == (21, out) and y.device.type == device
    ref = F.linear(x.double(), ref_w, None if b is None else b.double())
    # float32 sums of exact products (16-bit x: of the weight in x's dtype), rounded to
    # x's dtype once
    eps = torch.finfo(dtype).eps
    terms = x.double().abs() @ ref_w.abs().t()
    bound = eps * ref.abs() + (1e-6 if dtype == torch.float32 else eps) * terms + 1e-30
    assert ((y.cpu().double() - ref).abs() <= bound).all(), \
        ((y.cpu().double() - ref).abs() / bound).max()
    if kernel == "row":  # a row's bits are its own: alone, or elsewhere in another batch
        for r in (0, 3):
            alone = cuda_int8.linear(on[0], on[1], on[4][r: r + 1], on[3], on[2], group)
            assert torch.equal(alone[0], y[r])
        shuffled = cuda_int8.linear(on[0], on[1], on[4].flip(0), on[3], on[2], group,
                                    kernel="row")
        assert torch.equal(shuffled.flip(0), y)


def test_rows_choose_the_kernel(device, monkeypatch):
    """Up to ROW_KERNEL_MAX_ROWS rows the row kernel runs, from more the tile kernel."""
    w, s, _, b, _ = int8_layer(64, 128, 0, False, True, seed=0)
    w, s, b = w.to(device), s.to(device), b.to(device)
    for rows in (1, cuda_int8.ROW_KERNEL_MAX_ROWS, cuda_int8.ROW_KERNEL_MAX_ROWS + 1, 70):
        x = torch.randn(rows, 128, device=device)
        expect = "row" if rows <= cuda_int8.ROW_KERNEL_MAX_ROWS else "tile"
        assert torch.equal(cuda_int8.linear(w, s, x, b),
                           cuda_int8.linear(w, s, x, b, kernel=expect))
    with pytest.raises(ValueError, match="kernel is 'row' or 'tile', not 'gemm'"):
        cuda_int8.linear(w, s, x, b, kernel="gemm")


def test_the_kernel_says_what_it_cannot_run(device):
    w = torch.zeros(8, 64, dtype=torch.int8, device=device)
    with pytest.raises(ValueError, match="x has 32 inputs, the weight 64"):
        cuda_int8.linear(w, torch.ones(8, device=device), torch.ones(1, 32, device=device))
    with pytest.raises(ValueError, match="must be contiguous"):
        cuda_int8.linear(w.t(), torch.ones(64, device=device), torch.ones(1, 8, device=device))
    assert cuda_int8.problem("cpu") == "it runs on CUDA GPUs only, weights are on cpu"


@needs_cuda
def test_a_cuda_int8_layer_runs_the_kernel():
    torch.manual_seed(6)
    lin = torch.nn.Linear(512, 384).cuda()
    layer = Int8Linear.from_linear(lin)
    x = torch.randn(3, 512, device="cuda")
    with torch.no_grad():
        y = layer(x)
    assert layer.kernel == "triton"
    assert torch.equal(y, cuda_int8.linear(layer.weight, layer.scales, x, layer.bias))
    dequant = Int8Linear.from_linear(lin, kernel="dequant")
    with torch.no_grad():
        assert torch.allclose(dequant(x), y, rtol=1e-4, atol=1e-5)


# --- a GPU worker's stage on random stores ------------------------------------------

def tiny_store(root, arch: str):
    from llm_shard.benchmarks.swap import random_store
    from llm_shard.models.archs.llama import LlamaConfig
    from llm_shard.models.archs.pangu import PanGuConfig

    cfg = (LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=640,
                       num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2)
           if arch == "llama" else
           PanGuConfig(vocab_size=512, hidden_size=256, num_layers=6, num_heads=8))
    return random_store(root / arch, arch, cfg, f"random {arch}", progress=False)


def stage_logits(runner, steps: int = 4) -> torch.Tensor:
    """Logits (steps + 1, 2, vocab) of two sequences, prefilled together (7 and 3 rows),
    then fed fixed tokens one at a time: the same inputs whatever computes them."""
    g = torch.Generator().manual_seed(3)
    vocab = runner.cfg.vocab_size
    caches = [SequenceCache(), SequenceCache()]
    ids = torch.randint(vocab, (10,), generator=g)
    out = [runner.model(ids, Batch.of([7, 3], caches), run_blocks=runner.blocks.run)]
    for _ in range(steps):
        ids = torch.randint(vocab, (2,), generator=g)
        out.append(runner.model(ids, Batch.of([1, 1], caches), run_blocks=runner.blocks.run))
    return torch.stack(out).float()


@needs_cuda
@pytest.mark.parametrize("arch", ["llama", "pangu-alpha"])
def test_a_gpu_stage_streams_its_tiers_and_matches_the_cpu(tmp_path_factory, arch):
    """All blocks resident on the GPU, and a GPU worker's mix (GPU, RAM and disk blocks,
    every one computing on the GPU through two device slots), against the CPU's kernels:
    the streamed blocks give the resident blocks' bits; the CPU agrees within the int8
    kernels' rounding."""
    from llm_shard.worker.stage import StageRunner

    store = tiny_store(tmp_path_factory.mktemp("stores"), arch)
    n = store.n_blocks
    runners = {
        "cpu": StageRunner(store, 0, n, cache_budget=1 << 30),
        "gpu": StageRunner(store, 0, n, cache_budget=1 << 30, tiers=[Tier.GPU] * n),
        "mix": StageRunner(store, 0, n, cache_budget=1 << 30, stream_to="cuda",
                           tiers=[Tier.GPU, Tier.RAM, Tier.DISK] * (n // 3)),
    }
    got = {}
    for name, runner in runners.items():
        got[name] = stage_logits(runner)
        if name != "cpu":
            int8 = [m for b in runner.blocks.resident.values() for m in b.modules()
                    if isinstance(m, Int8Linear)]
            assert int8 and {m.kernel for m in int8} == {"triton"}
            assert {p.device.type for b in runner.blocks.resident.values()
                    for p in b.buffers()} == {"cuda"}
        runner.close()
    streamer = runners["mix"].blocks.streamer
    assert streamer.held and streamer.disk and streamer.bytes_copied > 0
    assert torch.equal(got["mix"], got["gpu"])
    scale = got["cpu"].abs().amax()
    assert (got["gpu"] - got["cpu"]).abs().amax() <= 1e-3 * scale
    assert torch.equal(got["gpu"].argmax(-1), got["cpu"].argmax(-1))


@needs_cuda
@pytest.mark.parametrize("arch", ["llama", "pangu-alpha"])
def test_cuda_graphs_replay_the_modules_bits(tmp_path_factory, arch):
    """GPU-resident blocks replay CUDA graphs around the attention from a row count's
    second decode step (models/kernels/cuda_graphs.py): two sequences, then one, give the
    modules' exact logits; every block but PanGu-α's query layer has its graphs; a block
    moved off the GPU and back gets new ones, with the same bits."""
    from llm_shard.models.kernels import cuda_graphs, decode
    from llm_shard.worker.stage import StageRunner

    store = tiny_store(tmp_path_factory.mktemp("stores"), arch)
    n = store.n_blocks
    runner = StageRunner(store, 0, n, cache_budget=1 << 30, tiers=[Tier.GPU] * n)
    blocks = list(runner.blocks.resident.values())

    def logits() -> torch.Tensor:
        one = SequenceCache()
        g = torch.Generator().manual_seed(5)
        vocab = store.config.vocab_size
        out = [runner.model(torch.randint(vocab, (4,), generator=g), Batch.of([4], [one]),
                            run_blocks=runner.blocks.run)]
        for _ in range(4):
            out.append(runner.model(torch.randint(vocab, (1,), generator=g),
                                    Batch.of([1], [one]), run_blocks=runner.blocks.run))
        return torch.cat([stage_logits(runner, steps=5).flatten(0, 1), *out]).float()

    def graphed() -> list:
        return [g for b in blocks for g in cuda_graphs._BLOCKS.get(b, (None, {}))[1].values()
                if g is not None]

    try:
        with decode.modules_only():
            want = logits()
        assert not graphed()
        assert torch.equal(logits(), want)
        rows = {g.x.shape[0] for g in graphed()}
        assert rows == {1, 2} and len(graphed()) == 2 * (n - (arch == "pangu-alpha"))
        first = graphed()
        blocks[0].to("cpu").to("cuda")  # new tensors: its graphs are captured again
        assert torch.equal(logits(), want)
        assert len(graphed()) == len(first) and graphed()[0] is not first[0]
    finally:
        runner.close()
