"""Library use (BMInf's wrapper): `wrap` a transformers model you already have, or place its
blocks by hand with `BlockList` and `quantize`. Tiny random LLaMA configs in process; the
real SmolLM2-135M (from its GGUF) in subprocesses that measure peak RSS."""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from llm_shard.cluster.types import Tier
from llm_shard.models.quant import Int8Linear
from llm_shard.worker.wrap import BlockList, WrapError, plan_tiers, quantize, wrap

transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[1, 5, 9, 33, 7, 60]])
NEW = 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a shared 2-core machine two threads' barriers wait on each
    other (int8pack_mm went from 1 ms to 40 ms a call under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(tied: bool = False, seed: int = 0):
    """A random LLaMA whose greedy tokens vary (initializer_range 0.1): 12 blocks of
    ~150 KB in int8, ~590 KB in fp32."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=12,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tied, initializer_range=0.1)
    return transformers.LlamaForCausalLM(cfg).eval()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors in memory (each storage once; disk-tier blocks hold
    meta placeholders)."""
    return sum({(t.data_ptr(), t.device): t.numel() * t.element_size()
                for t in (*model.parameters(), *model.buffers())
                if t.device.type != "meta"}.values())


def greedy(model, ids=IDS) -> list[int]:
    out = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_int8_with_a_third_of_the_ram_gives_the_unbudgeted_tokens():
    whole = wrap(tiny())
    total = weight_bytes(whole)  # int8 blocks and head, float embedding
    ram = 560_000
    assert ram < total / 3
    model = wrap(tiny(), ram=ram)
    layers = model.model.layers
    assert isinstance(layers, BlockList) and isinstance(model.lm_head, Int8Linear)
    assert layers.tiers == [Tier.RAM] + [Tier.DISK] * 11
    assert greedy(model) == greedy(whole)
    assert (logits(model) - logits(whole)).abs().max() < 0.05  # bf16 activations (int8pack)
    streamer = layers.streamer
    assert streamer.bytes_read >= 11 * 140_000 and layers.staging_bytes < 2 * 170_000
    assert weight_bytes(model) + layers.staging_bytes <= ram
    folder = streamer.paths[1].parent
    assert folder.is_dir()
    layers.close()
    assert not folder.exists()


def test_fp32_with_a_budget_gives_identical_logits():
    ref = tiny()
    model = wrap(tiny(), ram=2_500_000, int8=False)
    tiers = model.model.layers.tiers
    assert tiers.count(Tier.DISK) >= 8 and not any(
        isinstance(m, Int8Linear) for m in model.modules())
    assert torch.equal(logits(model), logits(ref))
    assert greedy(model) == greedy(ref)
    with torch.inference_mode():  # filling a block inside inference mode works too
        assert torch.equal(model(IDS).logits, logits(ref))
    folder = model.model.layers.streamer.paths[tiers.index(Tier.DISK)].parent
    del model
    gc.collect()
    assert not folder.exists()  # the spill folder goes with the model


def test_a_tied_head_stays_float_and_tied():
    model = wrap(tiny(tied=True), ram=600_000)
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(isinstance(m, Int8Linear) for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, Int8Linear)) and n != "lm_head")
    assert len(greedy(model)) == NEW


def test_by_hand_block_list_and_quantize_with_a_predicate():
    """BMInf's manual route: quantize chosen Linears, then a BlockList of the blocks."""
    ref = quantize(tiny(), lambda name, _m: ".mlp." in name, kernel="int8pack")
    model = quantize(tiny(), lambda name, _m: ".mlp." in name, kernel="int8pack")
    assert isinstance(model.model.layers[0].mlp.up_proj, Int8Linear)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert type(model.lm_head) is nn.Linear
    model.model.layers = BlockList(model.model.layers, ram=1_500_000, name="model.layers")
    assert model.model.layers.tiers.count(Tier.DISK) >= 6
    assert torch.equal(logits(model), logits(ref))
    assert greedy(model) == greedy(ref)
    # tiers by hand; the slice HF's forward takes is a plain list of the same blocks
    blocks = BlockList(tiny().model.layers, tiers=["ram", "disk"] * 6)
    assert type(blocks[:4]) is nn.ModuleList and blocks[:4][1] is blocks[1]
    with pytest.raises(WrapError, match="move or convert the model before wrapping"):
        model.to(torch.float16)


def test_plan_tiers():
    assert plan_tiers([10] * 4) == [Tier.RAM] * 4
    assert plan_tiers([10] * 4, gpu=25, ram=100) == [Tier.GPU] * 2 + [Tier.RAM] * 2
    assert plan_tiers([10] * 6, ram=45) == [Tier.RAM] * 2 + [Tier.DISK] * 4
    # staging buffers the size of the largest disk block, not of the largest block
    assert plan_tiers([10, 1, 1, 1], ram=12) == [Tier.RAM] + [Tier.DISK] * 3
    with pytest.raises(WrapError, match=r"ram=15 is short: streaming blocks from disk needs two"):
        plan_tiers([10] * 6, ram=15)
    with pytest.raises(WrapError, match="disk=30 is short: 4 blocks"):
        plan_tiers([10] * 6, ram=45, disk=30)
    with pytest.raises(WrapError, match="parts outside blocks need 50 B of RAM"):
        plan_tiers([10] * 6, ram=45, outside_ram=50)


# --- what cannot be wrapped ------------------------------------------------------------

class CachingBlock(nn.Module):
    """A block that keeps its KV cache inside itself (gpt-fast style)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 64)
        self.register_buffer("k_cache", torch.zeros(4, 64))

    def forward(self, x):
        return self.proj(x)


class RememberingBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 64)

    def forward(self, x):
        self.last = x  # state kept between calls
        return self.proj(x)


class CountingBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 64)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1  # changes its own tensor in place
        return self.proj(x)


class Stack(nn.Module):
    def __init__(self, block, n: int = 4) -> None:
        super().__init__()
        self.inner = nn.Module()
        self.inner.blocks = nn.ModuleList(block() for _ in range(n))

    def forward(self, x):
        for b in self.inner.blocks:
            x = b(x)
        return x


def test_clear_errors_name_the_module():
    with pytest.raises(WrapError, match="no block list found in Sequential"):
        wrap(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(WrapError, match="model.norm is a LlamaRMSNorm, not a ModuleList"):
        wrap(tiny(), blocks="model.norm")
    with pytest.raises(WrapError, match="has no module 'model.nope'"):
        wrap(tiny(), blocks="model.nope")
    with pytest.raises(WrapError, match=r"ram=90000 is short: the model's parts outside "
                                        r"model.layers need 96.62 KiB of RAM"):
        wrap(tiny(), ram=90_000, int8=False)
    with pytest.raises(WrapError, match=r"ram=500000 is short: streaming model.layers from "
                                        r"disk needs two staging buffers of 579.88 KiB on top "
                                        r"of 96.62 KiB for the parts outside model.layers"):
        wrap(tiny(), ram=500_000, int8=False)
    model = tiny()
    with pytest.raises(WrapError, match="predicate and kernel choose int8 layers"):
        wrap(model, int8=False, kernel="int8pack")
    assert type(model.model.layers) is nn.ModuleList  # nothing changed on error
    wrap(model)
    with pytest.raises(WrapError, match="wrapped already"):
        wrap(model)

    # state kept in the block: found before streaming (a cache buffer) ...
    small = 17_000  # staging for blocks of 4.5 KB, and some disk
    with pytest.raises(WrapError, match=r"block inner\.blocks\.\d keeps state between calls "
                                        r"\(its buffer k_cache looks like a cache\)"):
        wrap(Stack(CachingBlock), ram=small)
    wrap(Stack(CachingBlock))  # ... and fine when every block stays in RAM
    # ... or at its first streamed call
    x = torch.randn(2, 64)
    for block, why in ((RememberingBlock, "set the attribute last"),
                       (CountingBlock, "changed its tensor calls in place")):
        model = wrap(Stack(block), ram=small)
        first = model.inner.blocks.tiers.index(Tier.DISK)
        with pytest.raises(WrapError, match=rf"block inner.blocks.{first} keeps state.*{why}"):
            model(x)

    tied = Stack(RememberingBlock)
    tied.inner.blocks[1].proj.weight = tied.inner.blocks[0].proj.weight
    with pytest.raises(WrapError, match="inner.blocks.1.proj.weight shares its storage with "
                                        "inner.blocks.0.proj.weight"):
        wrap(tied)
    if not torch.cuda.is_available():
        with pytest.raises(WrapError, match="no CUDA device"):
            wrap(tiny(), gpu="1GiB")


# --- on a GPU ----------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_ram_and_disk_tiers_on_a_gpu():
    ids = IDS.to("cuda")
    ref = tiny()
    ref_logits, ref_tokens = logits(ref), greedy(ref)
    # fp32: the parts outside the blocks and 4 blocks on the GPU, 2 in RAM, 6 on disk
    outside = 2 * 96 * 128 * 4 + 128 * 4
    block = 590_000
    model = wrap(tiny(), int8=False, gpu=outside + 4 * block + 100_000,
                 ram=2 * 600_000 + 2 * block + 50_000)
    assert model.model.layers.tiers == [Tier.GPU] * 4 + [Tier.RAM] * 2 + [Tier.DISK] * 6
    assert model.model.embed_tokens.weight.device.type == "cuda"
    assert model.model.layers[0].mlp.up_proj.weight.device.type == "cuda"
    assert model.model.layers[4].mlp.up_proj.weight.device.type == "cpu"
    got = logits(model, ids)
    assert got.device.type == "cuda"
    assert torch.allclose(got.cpu(), ref_logits, atol=1e-4)
    assert greedy(model, ids) == ref_tokens
    # int8 all on the GPU (the dequant kernel) against the same kernel on the CPU
    cpu = wrap(tiny(), kernel="dequant")
    gpu = wrap(tiny(), gpu="1GiB")
    assert set(gpu.model.layers.tiers) == {Tier.GPU}
    assert torch.allclose(logits(gpu, ids).cpu(), logits(cpu), atol=1e-3)
    assert greedy(gpu, ids) == greedy(cpu)


# --- SmolLM2, peak RSS in subprocesses ---------------------------------------------------

MEASURE = textwrap.dedent("""
    import ctypes, gc, json, sys, time
    import torch
    torch.set_num_threads(1)
    from transformers import LlamaForCausalLM
    from llm_shard.worker.wrap import wrap

    def status():
        d = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return {k: int(d[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}

    src, ram, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    start = status()["VmRSS"]
    model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    wrap(model, ram=None if ram == "none" else int(ram))
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)  # heap freed by the swap leaves RSS before the reset
    with open("/proc/self/clear_refs", "w") as f:  # peak RSS from here on
        f.write("5")
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])  # "The capital of France is"
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    seconds = time.perf_counter() - t
    layers = model.model.layers
    print(json.dumps({"tokens": out[0, ids.shape[1]:].tolist(), "tokens_per_s": n / seconds,
                      "start": start, "peak": status()["VmHWM"],
                      "by_tier": layers.bytes_by_tier(), "staging": layers.staging_bytes}))
""")


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_hf_folder):
    """SmolLM2-135M loaded by transformers from its GGUF, saved as an fp32 HF folder; and
    its parameters' fp32 bytes (the tied head once)."""
    from safetensors import safe_open

    with safe_open(smollm2_hf_folder / "model.safetensors", "pt") as f:
        total = sum(math.prod(f.get_slice(k).get_shape()) * 4 for k in f.keys())
    return smollm2_hf_folder, total


@pytest.mark.slow
def test_smollm2_with_a_small_ram_budget(smollm2_hf):
    """Same greedy tokens as int8 with no budget, and a peak RSS lower by at least the
    blocks that went to disk (less the staging buffers and one block)."""
    path, fp32_bytes = smollm2_hf
    ram = 140 * 2**20  # the float embedding (tied head, 113 MB), staging, 5 int8 blocks
    assert ram < fp32_bytes / 3
    procs = {budget: subprocess.Popen([sys.executable, "-c", MEASURE, str(path), budget, "16"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for budget in ("none", str(ram))}
    runs = {}
    for budget, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        runs[budget] = json.loads(out.strip().splitlines()[-1])
    whole, small = runs["none"], runs[str(ram)]
    print({k: {"tokens_per_s": round(r["tokens_per_s"], 2), "peak_MiB": r["peak"] >> 20,
               "start_MiB": r["start"] >> 20, "by_tier": r["by_tier"]}
           for k, r in runs.items()})
    assert small["tokens"] == whole["tokens"]
    assert whole["by_tier"]["disk"] == 0 and small["by_tier"]["disk"] > 20 * 3_000_000
    # the staging buffers (two of the largest block) are not saved, and neither are two
    # more blocks' worth: the streamed block's per-pass state and allocator slack (peaks
    # moved by 4 MiB between runs: 66-71 MiB saved of 78 MiB on disk, 7 MiB of staging)
    block = small["staging"] // 2
    assert (whole["peak"] - small["peak"]
            >= small["by_tier"]["disk"] - small["staging"] - 2 * block)
