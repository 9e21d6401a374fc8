"""MOSS (moss-moon-003) and CodeGen: GPT-J-style parallel-residual blocks.

`x + Attn(ln_1 x) + MLP(ln_1 x)`. The fused `qkv_proj` is laid out for 4 TPU cores
(CodeGen's mp_num=4): its output is 4 chunks, each [q|v|k] for heads/4 heads. RoPE rotates
adjacent pairs of the first `rotary_dim` dims of each head. The LM head has a bias.
Parameter names follow Hugging Face's CodeGenForCausalLM (and MOSS's own modeling_moss.py,
which has the same names), so the layout is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llm_shard.models.base import Arch, ArchConfig, Rule
from llm_shard.models.cache import Batch
from llm_shard.models.layers import Rotary, cached_attention

MP_NUM = 4  # CodeGen's fixed model-parallel chunking of qkv_proj (not in the config)


@dataclass
class MossConfig(ArchConfig):
    vocab_size: int = 107008
    n_embd: int = 6144
    n_layer: int = 34
    n_head: int = 24
    n_positions: int = 2048
    rotary_dim: int | None = 64
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"

    def __post_init__(self) -> None:
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd
        if self.n_embd % self.n_head or self.n_head % MP_NUM:
            raise ValueError(f"n_embd {self.n_embd} must be a multiple of n_head {self.n_head}, "
                             f"and n_head a multiple of {MP_NUM} (the qkv_proj chunking)")
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim
        if self.activation_function != "gelu_new":
            raise ValueError(f"activation {self.activation_function!r} is not supported "
                             "(MOSS and CodeGen use gelu_new)")

    @classmethod
    def normalize(cls, raw: dict) -> dict:
        """Accept Hugging Face's generic names too (CodeGenConfig's attribute_map)."""
        d = dict(raw)
        for generic, ours in (("hidden_size", "n_embd"), ("num_hidden_layers", "n_layer"),
                              ("num_attention_heads", "n_head"),
                              ("max_position_embeddings", "n_positions")):
            if generic in d and ours not in d:
                d[ours] = d[generic]
        return d

    @property
    def hidden_size(self) -> int:  # the name the rest of llm-shard reads
        return self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_blocks(self) -> int:
        return self.n_layer

    @property
    def kv_layout(self) -> tuple[int, int]:
        return self.n_head, self.head_dim


class Embedding(nn.Module):
    def __init__(self, cfg: MossConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)

    def forward(self, tokens: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.wte(tokens)


class Attention(nn.Module):
    def __init__(self, cfg: MossConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.heads, self.head_dim = layer, cfg.n_head, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.out_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.rotary_dim = cfg.rotary_dim
        self.rope = Rotary(cfg.rotary_dim, 10000.0, cfg.n_positions)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        rows, rd = x.shape[0], self.rotary_dim
        # (rows, chunk, [q|v|k], heads per chunk, head_dim): head h is chunk h // (heads/4)
        qkv = self.qkv_proj(x).view(rows, MP_NUM, 3, self.heads // MP_NUM, self.head_dim)
        q, v, k = (t.reshape(rows, self.heads, self.head_dim) for t in qkv.unbind(2))
        cos, sin = self.rope.cos_sin(batch.positions)
        q = torch.cat((Rotary.apply_interleaved(q[..., :rd], cos, sin), q[..., rd:]), -1)
        k = torch.cat((Rotary.apply_interleaved(k[..., :rd], cos, sin), k[..., rd:]), -1)
        o = cached_attention(q, k, v, batch, self.layer)
        return self.out_proj(o.reshape(rows, -1))


class MLP(nn.Module):
    def __init__(self, cfg: MossConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(cfg.n_embd, cfg.n_inner)
        self.fc_out = nn.Linear(cfg.n_inner, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))  # gelu_new


class Block(nn.Module):
    def __init__(self, cfg: MossConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        h = self.ln_1(x)
        return self.attn(h, batch) + self.mlp(h) + x  # parallel residual, one norm


class Head(nn.Module):
    def __init__(self, cfg: MossConfig) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size)  # with bias, untied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


# ---- checkpoint layout: HF / MOSS names are ours with a prefix

_BLOCK = ("ln_1.weight", "ln_1.bias", "attn.qkv_proj.weight", "attn.out_proj.weight",
          "mlp.fc_in.weight", "mlp.fc_in.bias", "mlp.fc_out.weight", "mlp.fc_out.bias")


def layout_hf(cfg: MossConfig) -> dict:
    return {"embed": {"wte.weight": Rule("transformer.wte.weight")},
            "block": {n: Rule(f"transformer.h.{{i}}.{n}") for n in _BLOCK},
            "head": {"ln_f.weight": Rule("transformer.ln_f.weight"),
                     "ln_f.bias": Rule("transformer.ln_f.bias"),
                     "lm_head.weight": Rule("lm_head.weight"),
                     "lm_head.bias": Rule("lm_head.bias")},
            # buffers older CodeGen/MOSS code saved with the weights
            "ignore": (r"transformer\.h\.\d+\.attn\.(causal_mask|masked_bias|embed_positions)",)}


ARCH = Arch(name="moss", config=MossConfig, embed=Embedding, block=Block, head=Head,
            layouts={"hf": layout_hf}, chat_template="moss", aliases=("codegen",))
