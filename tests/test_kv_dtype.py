"""KV caches in fp16 (the default), fp32 or int8 (a scale per head and token): what they
store, what they count, and the same greedy tokens on the tests' prompts."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import (
    CPM2_VOCAB,
    GMASK,
    MOSS_VOCAB,
    PROMPTS,
    SOP,
    START,
    chain,
    greedy_through,
    hf_llama,
    random_ids,
    text_ids,
    tiny_store,
)

from llm_shard.cluster.types import reserved_tokens, sequence_bytes
from llm_shard.models.cache import KV_DTYPES, Batch, KVCache, SequenceCache
from llm_shard.models.checkpoint.convert import convert
from llm_shard.models.errors import KV_DTYPE_NAMES
from llm_shard.models.runner import StageModel

pytest.importorskip("transformers")  # the tiny checkpoints are transformers models


def test_the_command_lines_kv_dtype_names_are_the_caches():
    assert tuple(KV_DTYPES) == KV_DTYPE_NAMES


@pytest.mark.parametrize("kv", KV_DTYPE_NAMES)
def test_a_kv_cache_stores_its_dtype_and_reads_float32(kv):
    cache = KVCache(kv)
    k, v = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    keys, values = cache.update_and_fetch(k, v)
    assert cache.k.dtype == KV_DTYPES[kv] and keys.dtype == values.dtype == torch.float32
    assert keys.shape == values.shape == (2, 5, 8)
    tol = {"fp32": 0, "fp16": 1e-3, "int8": 1 / 127}[kv]  # relative to each row's amax
    bound = tol * k.abs().amax(-1, keepdim=True)
    assert ((keys - k).abs() <= bound + 1e-7).all() and ((values - v).abs() <= bound + 1e-7).all()
    more = torch.randn(2, 300, 8)  # past one CHUNK: the buffers (and scales) grow
    keys, _ = cache.update_and_fetch(more, more)
    assert keys.shape == (2, 305, 8) and cache.k.shape[1] == 512
    assert ((keys[:, 5:] - more).abs() <= tol * more.abs().amax(-1, keepdim=True) + 1e-7).all()
    scales = 2 * 2 * 512 * 4 if kv == "int8" else 0
    assert cache.nbytes == 2 * 2 * 512 * 8 * KV_DTYPES[kv].itemsize + scales


def test_an_unknown_kv_dtype_is_refused():
    with pytest.raises(ValueError, match="unknown KV cache dtype 'bf8'; choose one of fp16"):
        SequenceCache(kv_dtype="bf8")


@pytest.fixture(scope="module")
def llama_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("kv")
    hf_llama(num_attention_heads=4, num_key_value_heads=2,
             tie_word_embeddings=False).save_pretrained(root / "hf")
    return convert(root / "hf", root / "store", dtype="fp32", progress=False)


@pytest.mark.parametrize("kv", KV_DTYPE_NAMES)
def test_cache_bytes_follow_the_kv_dtype(llama_store, kv):
    """What the accounting counts per token (planner, scheduler, stages) is what a
    sequence's caches hold."""
    store = llama_store.with_kv_dtype(kv)
    cfg = store.config
    assert cfg.kv_dtype == kv
    heads, d = cfg.num_key_value_heads, cfg.head_dim
    assert cfg.cache_bytes_per_token == {"fp32": 2 * heads * d * 4, "fp16": 2 * heads * d * 2,
                                         "int8": 2 * heads * (d + 4)}[kv]
    stage, cache = StageModel(store, 0, store.n_blocks), SequenceCache(kv_dtype=kv)
    stage(torch.tensor(random_ids(7, 0, 0, 97)), Batch.of([7], [cache]))
    assert cache.nbytes == store.n_blocks * sequence_bytes(cfg, 7)
    assert sequence_bytes(cfg, 7) == reserved_tokens(7) * cfg.cache_bytes_per_token
    # the default is fp16
    assert type(cfg)().kv_dtype == llama_store.kv_dtype == SequenceCache().kv_dtype == "fp16"


def _llama(root):
    hf_llama(num_attention_heads=4, num_key_value_heads=2,
             tie_word_embeddings=False).save_pretrained(root / "hf")
    return convert(root / "hf", root / "store", dtype="fp32", progress=False)


# the prompts of the architectures' pipeline tests (tests/test_pipeline_archs.py)
ARCHS = {
    "llama": (_llama, lambda seed: random_ids(4 + seed, seed, 0, 97)),
    "pangu-alpha": (partial(tiny_store, "pangu-alpha"),
                    lambda seed: [3 + seed, 14, 15, 92, 65][: 3 + seed % 3]),
    "chatglm": (partial(tiny_store, "chatglm"),
                lambda seed: text_ids(5 + seed, seed) + [GMASK, SOP]),
    "moss": (partial(tiny_store, "moss"), lambda seed: random_ids(4 + seed, seed, 0, MOSS_VOCAB)),
    "cpm2": (partial(tiny_store, "cpm2"),
             lambda seed: random_ids(4 + seed, seed, 2, CPM2_VOCAB) + [START]),
}


def _forced(stage, prompt, path, kv):
    """Logits (len(path), vocab) of each step of feeding `path` after `prompt`, caches in
    `kv`: the prefill's last row, then one row a step (teacher-forced)."""
    cache, rows, step = SequenceCache(kv_dtype=kv), [], list(prompt)
    for token in path:
        rows.append(stage(torch.tensor(step), Batch.of([len(step)], [cache]))[0])
        step = [token]
    return torch.stack(rows)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_greedy_tokens_are_the_same_in_fp16_and_fp32_kv(tmp_path, arch):
    """Through chained stage runners (a worker's caches): the same greedy tokens; int8
    caches give the same argmax along that path at nearly every step, and logits within
    1% of their range (a tiny random model has near ties: ChatGLM's first token is
    3.240 against 3.226, which int8 K/V turn)."""
    build, prompt = ARCHS[arch]
    store = build(tmp_path)
    prompts = [prompt(seed) for seed in range(4)]
    bounds = [0, store.n_blocks // 2, store.n_blocks]
    out = {}
    for kv in ("fp32", "fp16"):
        stages = chain(store.with_kv_dtype(kv), bounds)
        out[kv] = greedy_through(stages, prompts, 16)
        held = [c for s in stages for seq in s.sequences.values()
                for c in seq.cache.layers.values()]
        assert held and all(c.k.dtype == KV_DTYPES[kv] for c in held)
    assert out["fp16"] == out["fp32"]
    stage, agree, steps = StageModel(store, 0, store.n_blocks), 0, 0
    for p, path in zip(prompts, out["fp32"]):
        ref, int8 = _forced(stage, p, path, "fp32"), _forced(stage, p, path, "int8")
        spread = ref.amax(-1) - ref.amin(-1)
        assert ((int8 - ref).abs().amax(-1) <= 0.01 * spread).all()
        agree += int((int8.argmax(-1) == ref.argmax(-1)).sum())
        steps += len(path)
    assert agree >= 0.9 * steps


@pytest.mark.slow
def test_smollm2_kv_dtypes_along_the_fp32_greedy_path(smollm2_stores):
    """SmolLM2-135M (int8 weights) on four of the tests' prompts, 16 tokens each, teacher-forced
    along the fp32-cache greedy path: fp16 and int8 caches pick the same token at nearly
    every step, with logits close."""
    store = smollm2_stores["int8"]
    tok, stage = store.tokenizer(), StageModel(store, 0, store.n_blocks)
    agree, steps = {"fp16": 0, "int8": 0}, 0
    for text in PROMPTS[:4]:
        prompt = tok.encode(text)
        cache, path, step = SequenceCache(kv_dtype="fp32"), [], list(prompt)
        for _ in range(16):
            path.append(int(stage(torch.tensor(step), Batch.of([len(step)], [cache]))[0].argmax()))
            step = path[-1:]
        ref = _forced(stage, prompt, path, "fp32")
        assert ref.argmax(-1).tolist() == path
        spread = ref.amax(-1) - ref.amin(-1)
        for kv in agree:
            got = _forced(stage, prompt, path, kv)
            assert ((got - ref).abs().amax(-1) <= {"fp16": 0.005, "int8": 0.04}[kv] * spread).all()
            agree[kv] += int((got.argmax(-1) == ref.argmax(-1)).sum())
        steps += len(path)
    print(f"argmax agreement with fp32 caches over {steps} steps: {agree}")
    assert agree["fp16"] >= 0.97 * steps and agree["int8"] >= 0.95 * steps
