"""LLaMA family parity: tiny random configs through `convert` vs transformers' LlamaForCausalLM."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import hf_llama, random_ids

from llm_shard.models.archs.llama import interleaved_to_half
from llm_shard.models.checkpoint.convert import convert
from llm_shard.models.runner import LocalModel

pytest.importorskip("transformers")  # the references are transformers models

CONFIGS = {
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "gqa-dynamic-rope": dict(num_attention_heads=4, num_key_value_heads=1,
                             tie_word_embeddings=False, max_position_embeddings=16,
                             rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
}


def ids(n: int, seed: int = 1) -> list[int]:
    return random_ids(n, seed, 0, 97)


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_layout_matches_transformers(tmp_path, name):
    model = hf_llama(**CONFIGS[name])
    model.save_pretrained(tmp_path / "hf")
    store = convert(tmp_path / "hf", tmp_path / "store", dtype="fp32", progress=False)
    ours = LocalModel(store)
    seq = ids(24)  # longer than max_position_embeddings=16 for the dynamic-rope config
    with torch.no_grad():
        ref = model(torch.tensor([seq])).logits[0]
    torch.testing.assert_close(ours.logits(seq), ref, atol=1e-4, rtol=0)


def half_to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    out, inp = w.shape
    return w.view(heads, 2, out // heads // 2, inp).transpose(1, 2).reshape(out, inp)


def test_interleave_permutation_round_trips():
    w = torch.randn(32, 8)
    assert torch.equal(interleaved_to_half(half_to_interleaved(w, 4), 4), w)


def test_meta_layout_matches_transformers(tmp_path):
    model = hf_llama(**CONFIGS["gqa-tied"] | {"tie_word_embeddings": False})
    c = model.config
    sd = model.state_dict()
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"],
            "norm.weight": sd["model.norm.weight"], "output.weight": sd["lm_head.weight"]}
    names = {"attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    for i in range(c.num_hidden_layers):
        hf = f"model.layers.{i}."
        for theirs, ours in names.items():
            meta[f"layers.{i}.{theirs}.weight"] = sd[hf + ours + ".weight"]
        meta[f"layers.{i}.attention.wq.weight"] = half_to_interleaved(
            sd[hf + "self_attn.q_proj.weight"], c.num_attention_heads)
        meta[f"layers.{i}.attention.wk.weight"] = half_to_interleaved(
            sd[hf + "self_attn.k_proj.weight"], c.num_key_value_heads)
    folder = tmp_path / "meta"
    folder.mkdir()
    torch.save(meta, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(
        {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
         "n_kv_heads": c.num_key_value_heads, "norm_eps": c.rms_norm_eps, "vocab_size": -1,
         "multiple_of": 32}))
    store = convert(folder, tmp_path / "store", dtype="fp32", progress=False)
    assert store.manifest["source"]["layout"] == "meta"
    seq = ids(12)
    with torch.no_grad():
        ref = model(torch.tensor([seq])).logits[0]
    torch.testing.assert_close(LocalModel(store).logits(seq), ref, atol=1e-4, rtol=0)


def test_cached_decoding_equals_recompute(tmp_path):
    model = hf_llama(**CONFIGS["gqa-tied"])
    model.save_pretrained(tmp_path / "hf")
    ours = LocalModel(convert(tmp_path / "hf", tmp_path / "store", dtype="fp32",
                              progress=False))
    prompt = ids(5)
    generated = ours.greedy(prompt, max_tokens=12)
    # recompute: each step's greedy token from a full uncached pass over everything so far
    seq = list(prompt)
    for token in generated:
        assert int(ours.logits(seq)[-1].argmax()) == token
        seq.append(token)
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                             min_new_tokens=12)
    assert ref[0, len(prompt):].tolist() == generated


@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 4.0}])
@pytest.mark.parametrize("dim", [64, 80])
def test_rope_tables_are_cos_sin_of_each_row_bit_for_bit(dim, scaling):
    """A decode step's rotary rows come from the process's position tables (grown as
    sequences pass their end): the bits Rotary.cos_sin computes for those positions alone,
    on batches of one row, several rows and several sequences."""
    from llm_shard.models.cache import Batch, SequenceCache
    from llm_shard.models.layers import Rotary, _signed, rope_tables

    rope = Rotary(dim, 10000.0, 4096, scaling)
    like = torch.zeros(1)
    g = torch.Generator().manual_seed(dim)
    for lens, top in (([1], 10), ([1], 3000), ([7], 200), ([3, 1, 5], 5000)):
        batch = Batch.of(lens, [SequenceCache() for _ in lens])
        batch.positions = torch.randint(0, top, (sum(lens),), generator=g)
        cos, sin = rope_tables(rope, batch, like)
        want_cos, want_sin = rope.cos_sin(batch.positions)
        assert cos.shape == (sum(lens), 1, dim)
        assert torch.equal(cos[:, 0], want_cos)
        assert torch.equal(sin[:, 0], _signed(want_sin))
