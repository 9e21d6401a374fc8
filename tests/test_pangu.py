"""PanGu-α parity against an independent reference written here from the published model.

The reference is a plain full-sequence forward with no cache, over the HF-port keys.
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from conftest import PANGU_CFG, random_hf_state, write_hf_port

from llm_shard.models.archs.pangu import config_from_megatron
from llm_shard.models.checkpoint.convert import convert
from llm_shard.models.runner import LocalModel


def reference_logits(sd: dict, ids: list[int]) -> torch.Tensor:
    """Pre-LN GPT-2 blocks, then the query layer (its query from wqe), tied logits."""
    h_dim, heads, n = PANGU_CFG["hidden_size"], PANGU_CFG["num_heads"], PANGU_CFG["num_layers"]
    d = h_dim // heads
    t = len(ids)
    pos = torch.arange(t)
    causal = torch.full((t, t), -1e4).triu(1)

    def ln(x, name):
        return F.layer_norm(x, (h_dim,), sd[name + ".weight"], sd[name + ".bias"], 1e-5)

    def lin(x, name):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    def attend(q, k, v, b):
        split = [z.view(t, heads, d).transpose(0, 1) for z in (q, k, v)]
        scores = split[0] @ split[1].transpose(1, 2) / math.sqrt(d) + causal
        out = (scores.softmax(-1) @ split[2]).transpose(0, 1).reshape(t, h_dim)
        return lin(out, b + "attn.c_proj")

    def mlp(x, b):
        return lin(F.gelu(lin(x, b + "mlp.c_fc")), b + "mlp.c_proj")  # erf GELU

    x = sd["transformer.wte.weight"][ids] + sd["transformer.wpe.weight"][pos]
    for i in range(n - 1):
        b = f"transformer.h.{i}."
        a = ln(x, b + "ln_1")
        x = x + attend(lin(a, b + "attn.q_proj"), lin(a, b + "attn.k_proj"),
                       lin(a, b + "attn.v_proj"), b)
        x = x + mlp(ln(x, b + "ln_2"), b)
    b = f"transformer.h.{n - 1}."
    h = ln(x, "transformer.ln_f")
    a = ln(h, b + "ln_1")
    q = lin(sd["transformer.wqe.weight"][pos], b + "attn.q_proj")  # wqe is not normalised
    h = h + attend(q, lin(a, b + "attn.k_proj"), lin(a, b + "attn.v_proj"), b)
    out = h + mlp(ln(h, b + "ln_2"), b)
    return out @ sd["transformer.wte.weight"].T


def megatron_state(sd: dict) -> dict:
    """The same weights in the Megatron port's nested layout."""
    n = PANGU_CFG["num_layers"]
    names = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm",
             "attn.q_proj": "attention.query", "attn.k_proj": "attention.key",
             "attn.v_proj": "attention.value", "attn.c_proj": "attention.dense",
             "mlp.c_fc": "mlp.dense_h_to_4h", "mlp.c_proj": "mlp.dense_4h_to_h"}
    transformer = {}
    for i in range(n):
        prefix = f"layers.{i}." if i < n - 1 else "topQueryLayer."
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                transformer[f"{prefix}{theirs}.{p}"] = sd[f"transformer.h.{i}.{ours}.{p}"]
    for p in ("weight", "bias"):
        transformer[f"final_layernorm.{p}"] = sd[f"transformer.ln_f.{p}"]
    lm = {"embedding": {"word_embeddings": {"weight": sd["transformer.wte.weight"]},
                        "position_embeddings": {"weight": sd["transformer.wpe.weight"]}},
          "topQueryEmbedding": {"top_query_embeddings": {"weight": sd["transformer.wqe.weight"]}},
          "transformer": transformer}
    return {"model": {"language_model": lm}}


def test_pangu_matches_reference(tmp_path):
    sd = random_hf_state()
    write_hf_port(tmp_path / "hf", sd)
    store = convert(tmp_path / "hf", tmp_path / "store", dtype="fp32", progress=False)
    assert store.manifest["arch"] == "pangu-alpha"
    ids = torch.randint(0, PANGU_CFG["vocab_size"], (20,),
                        generator=torch.Generator().manual_seed(3)).tolist()
    torch.testing.assert_close(LocalModel(store).logits(ids), reference_logits(sd, ids),
                               atol=1e-4, rtol=0)


def test_pangu_cached_decoding_equals_recompute(tmp_path):
    sd = random_hf_state(seed=5)
    write_hf_port(tmp_path / "hf", sd)
    model = LocalModel(convert(tmp_path / "hf", tmp_path / "store", dtype="fp32",
                               progress=False))
    prompt = [3, 14, 15, 92, 65]
    seq = list(prompt)
    for token in model.greedy(prompt, max_tokens=10):
        assert int(reference_logits(sd, seq)[-1].argmax()) == token
        seq.append(token)


def test_megatron_and_hf_port_give_the_same_store(tmp_path):
    sd = random_hf_state(seed=7)
    write_hf_port(tmp_path / "hf", sd)
    (tmp_path / "mg").mkdir()
    torch.save(megatron_state(sd), tmp_path / "mg" / "model_optim_rng.pt")
    # Megatron files record no head count: tiny configs need a config.json beside them
    (tmp_path / "mg" / "config.json").write_text(json.dumps(PANGU_CFG))
    a = convert(tmp_path / "hf", tmp_path / "a", dtype="fp32", progress=False)
    b = convert(tmp_path / "mg", tmp_path / "b", dtype="fp32", progress=False)
    assert b.manifest["source"]["layout"] == "megatron"
    assert a.manifest["config"] == b.manifest["config"]
    assert [f["sha256"] for f in a.manifest["files"]] == [f["sha256"] for f in b.manifest["files"]]


def test_megatron_config_from_shapes_uses_the_presets():
    shapes = {"embedding.word_embeddings.weight": (40000, 2560),
              "embedding.position_embeddings.weight": (1024, 2560),
              "transformer.layers.0.mlp.dense_h_to_4h.weight": (10240, 2560)}
    shapes |= {f"transformer.layers.{i}.input_layernorm.weight": (2560,) for i in range(31)}
    assert config_from_megatron(shapes) == {
        "vocab_size": 40000, "hidden_size": 2560, "num_layers": 32, "num_heads": 32,
        "intermediate_size": 10240, "max_position_embeddings": 1024}
