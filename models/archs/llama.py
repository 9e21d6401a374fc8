"""The LLaMA family: LLaMA, LLaMA-2, Atom-7B, SmolLM2 (GQA, tied or untied, RoPE scaling).

Parameter names follow Hugging Face's LlamaForCausalLM, so its layout maps almost 1:1;
Meta's and GGUF's layouts rotate Q/K rows in interleaved pairs and are un-permuted here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llm_shard.models.base import Arch, ArchConfig, Rule
from llm_shard.models.cache import Batch
from llm_shard.models.layers import (
    BlockParts,
    RMSNorm,
    Rotary,
    SwiGLU,
    cached_attention,
    default_scale,
    project,
    rope_tables,
    rotate,
)


@dataclass
class LlamaConfig(ArchConfig):
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads {self.num_key_value_heads}")

    @classmethod
    def normalize(cls, raw: dict) -> dict:
        """Transformers v5 moved rope_theta/rope_scaling into rope_parameters."""
        d = dict(raw)
        params = d.pop("rope_parameters", None) or {}
        if "rope_theta" in params and "rope_theta" not in d:
            d["rope_theta"] = params["rope_theta"]
        kind = params.get("rope_type") or params.get("type")
        if kind and kind != "default" and not d.get("rope_scaling"):
            d["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
        return d

    @property
    def n_blocks(self) -> int:
        return self.num_hidden_layers

    @property
    def kv_layout(self) -> tuple[int, int]:
        return self.num_key_value_heads, self.head_dim


class Embedding(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)

    def forward(self, tokens: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.embed_tokens(tokens)


class Attention(nn.Module):
    shared_input = (("q_proj", "k_proj", "v_proj"),)  # one int8 call (quant.fuse_int8)

    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.heads, self.kv_heads, self.head_dim = (
            layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        h, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=b)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=b)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=b)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=b)
        self.rope = Rotary(self.head_dim, cfg.rope_theta, cfg.max_position_embeddings,
                           cfg.rope_scaling)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        rows = x.shape[0]
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(rows, self.heads, self.head_dim)
        kv = (rows, self.kv_heads, self.head_dim)
        k, v = k.view(kv), v.view(kv)
        cos, sin = rope_tables(self.rope, batch, q)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        o = cached_attention(q, k, v, batch, self.layer)
        return self.o_proj(o.reshape(rows, -1))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def decode_args(self) -> BlockParts:
        """This block's parts, for a stage that runs it whole (read from `_modules`: this
        runs every decode step, and nn.Module.__getattr__ is slow)."""
        own = self._modules
        at, mlp = own["self_attn"], own["mlp"]
        a, m = at._modules, mlp._modules
        return BlockParts(
            layer=at.layer, norm1=own["input_layernorm"],
            qkv=(a["q_proj"], a["k_proj"], a["v_proj"]), o=a["o_proj"],
            norm2=own["post_attention_layernorm"], up=(m["gate_proj"], m["up_proj"]),
            down=m["down_proj"], heads=at.heads, kv_heads=at.kv_heads, head_dim=at.head_dim,
            scale=default_scale(at.head_dim), gelu=False, rope=at.rope)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class Head(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def decode_args(self) -> tuple[nn.Module, nn.Module]:
        """(norm, lm_head): lm_head(norm(x)), for a stage that runs the head whole
        (models/kernels/decode.py run_head)."""
        return self._modules["norm"], self._modules["lm_head"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))


# ---- checkpoint layouts: store key -> source key template ({i} = global block index)

def interleaved_to_half(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta/GGUF rotate adjacent pairs; Hugging Face rotates halves: reorder Q/K rows."""
    out, inp = w.shape[0], w.shape[-1]
    return w.view(heads, out // heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def _q(cfg: LlamaConfig):
    return lambda w: interleaved_to_half(w, cfg.num_attention_heads)


def _k(cfg: LlamaConfig):
    return lambda w: interleaved_to_half(w, cfg.num_key_value_heads)


_BLOCK_NAMES = ("input_layernorm.weight", "post_attention_layernorm.weight",
                "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                "mlp.down_proj.weight")


def layout_hf(cfg: LlamaConfig) -> dict[str, dict[str, Rule]]:
    block = {n: Rule(f"model.layers.{{i}}.{n}") for n in _BLOCK_NAMES}
    if cfg.attention_bias:
        block.update({f"self_attn.{p}.bias": Rule(f"model.layers.{{i}}.self_attn.{p}.bias")
                      for p in ("q_proj", "k_proj", "v_proj", "o_proj")})
    if cfg.mlp_bias:
        block.update({f"mlp.{p}.bias": Rule(f"model.layers.{{i}}.mlp.{p}.bias")
                      for p in ("gate_proj", "up_proj", "down_proj")})
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    return {"embed": {"embed_tokens.weight": Rule("model.embed_tokens.weight")},
            "block": block,
            "head": {"norm.weight": Rule("model.norm.weight"), "lm_head.weight": Rule(head)},
            "ignore": (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)}


def layout_meta(cfg: LlamaConfig) -> dict[str, dict[str, Rule]]:
    p = "layers.{i}."
    return {"embed": {"embed_tokens.weight": Rule("tok_embeddings.weight")},
            "block": {
                "input_layernorm.weight": Rule(p + "attention_norm.weight"),
                "post_attention_layernorm.weight": Rule(p + "ffn_norm.weight"),
                "self_attn.q_proj.weight": Rule(p + "attention.wq.weight", _q(cfg)),
                "self_attn.k_proj.weight": Rule(p + "attention.wk.weight", _k(cfg)),
                "self_attn.v_proj.weight": Rule(p + "attention.wv.weight"),
                "self_attn.o_proj.weight": Rule(p + "attention.wo.weight"),
                "mlp.gate_proj.weight": Rule(p + "feed_forward.w1.weight"),
                "mlp.down_proj.weight": Rule(p + "feed_forward.w2.weight"),
                "mlp.up_proj.weight": Rule(p + "feed_forward.w3.weight")},
            "head": {"norm.weight": Rule("norm.weight"), "lm_head.weight": Rule("output.weight")},
            "ignore": (r"rope\.freqs",)}


def layout_gguf(cfg: LlamaConfig) -> dict[str, dict[str, Rule]]:
    p = "blk.{i}."
    head = "token_embd.weight" if cfg.tie_word_embeddings else "output.weight"
    return {"embed": {"embed_tokens.weight": Rule("token_embd.weight")},
            "block": {
                "input_layernorm.weight": Rule(p + "attn_norm.weight"),
                "post_attention_layernorm.weight": Rule(p + "ffn_norm.weight"),
                "self_attn.q_proj.weight": Rule(p + "attn_q.weight", _q(cfg)),
                "self_attn.k_proj.weight": Rule(p + "attn_k.weight", _k(cfg)),
                "self_attn.v_proj.weight": Rule(p + "attn_v.weight"),
                "self_attn.o_proj.weight": Rule(p + "attn_output.weight"),
                "mlp.gate_proj.weight": Rule(p + "ffn_gate.weight"),
                "mlp.up_proj.weight": Rule(p + "ffn_up.weight"),
                "mlp.down_proj.weight": Rule(p + "ffn_down.weight")},
            "head": {"norm.weight": Rule("output_norm.weight"), "lm_head.weight": Rule(head)},
            "ignore": (r"rope_freqs\.weight",)}


def config_from_meta(params: dict, shapes: dict[str, tuple]) -> dict:
    """Meta's params.json leaves vocab and FFN width to the tensors: read them there."""
    return {"hidden_size": params["dim"], "num_hidden_layers": params["n_layers"],
            "num_attention_heads": params["n_heads"],
            "num_key_value_heads": params.get("n_kv_heads") or params["n_heads"],
            "rms_norm_eps": params.get("norm_eps", 1e-6),
            "rope_theta": params.get("rope_theta", 10000.0),
            "vocab_size": shapes["tok_embeddings.weight"][0],
            "intermediate_size": shapes["layers.0.feed_forward.w1.weight"][0],
            "max_position_embeddings": params.get("max_seq_len", 2048)}


def config_from_gguf(meta: dict) -> dict:
    a = "llama."
    return {"hidden_size": meta[a + "embedding_length"],
            "intermediate_size": meta[a + "feed_forward_length"],
            "num_hidden_layers": meta[a + "block_count"],
            "num_attention_heads": meta[a + "attention.head_count"],
            "num_key_value_heads": meta.get(a + "attention.head_count_kv"),
            "rms_norm_eps": meta.get(a + "attention.layer_norm_rms_epsilon", 1e-5),
            "rope_theta": meta.get(a + "rope.freq_base", 10000.0),
            "max_position_embeddings": meta.get(a + "context_length", 2048),
            "vocab_size": meta.get(a + "vocab_size") or len(meta["tokenizer.ggml.tokens"]),
            "tie_word_embeddings": "output.weight" not in meta["tensor_names"]}


ARCH = Arch(name="llama", config=LlamaConfig, embed=Embedding, block=Block, head=Head,
            layouts={"hf": layout_hf, "meta": layout_meta, "gguf": layout_gguf},
            chat_template="llama2")
