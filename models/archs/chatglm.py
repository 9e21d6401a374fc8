"""ChatGLM-6B (THUDM/chatglm-6b, the first version).

A GLM block keeps its residual from the LayerNorm *output*, scaled by α = √(2·layers):
`x̂ = LN1(x); h = α·x̂ + Attn(x̂); m = LN2(h); out = α·m + MLP(m)`. The fused QKV rows
are per head [q_h|k_h|v_h]. RoPE is 2D: the first half of each head rotates with the
position id, the second half with the block position id, each half-split (NeoX style),
with inv_freq, angles and cos/sin computed in fp16 as the original code does.

A prompt ends with [gMASK] <sop>. Rows before <sop> attend to each other both ways; from
<sop> on attention is causal, every position id is the index of [gMASK] and block position
ids count 1, 2, 3... So a sequence's `Prefix` (cache.py) must be known on every stage: the
embedding finds it in the tokens and puts it in `Batch.prefixes`; a stage without the
embedding needs it in the Batch it is given on the sequence's first step; after that each
stage's cache remembers it.

ChatGLM2/3 differ (and are refused here): pre-RMSNorm with plain residuals, multi-query
attention (2 KV groups), bias on QKV only, SwiGLU without bias, 1D RoPE on half of each
head (interleaved pairs), untied output, vocab 65024, [gMASK] <sop> as a prefix of the
prompt and plain causal attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llm_shard.models.base import Arch, ArchConfig, Rule
from llm_shard.models.cache import Batch, Prefix
from llm_shard.models.layers import Rotary, cached_attention


@dataclass
class ChatGLMConfig(ArchConfig):
    vocab_size: int = 130528
    hidden_size: int = 4096
    inner_hidden_size: int | None = None
    num_layers: int = 28
    num_attention_heads: int = 32
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    bos_token_id: int = 130004  # <sop>
    eos_token_id: int = 130005  # <eop>
    mask_token_id: int = 130000  # [MASK]
    gmask_token_id: int = 130001  # [gMASK]

    def __post_init__(self) -> None:
        if self.inner_hidden_size is None:
            self.inner_hidden_size = 4 * self.hidden_size
        if self.hidden_size % self.num_attention_heads or self.head_dim % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must split into "
                             f"{self.num_attention_heads} heads of a multiple of 4 dims")
        if not self.position_encoding_2d:
            raise ValueError("only ChatGLM-6B's 2D position encoding is supported")

    @classmethod
    def normalize(cls, raw: dict) -> dict:
        glm2 = {"multi_query_attention", "padded_vocab_size", "kv_channels"} & set(raw)
        if glm2:
            raise ValueError(f"this is a ChatGLM2/3 config ({', '.join(sorted(glm2))}); "
                             "only the first ChatGLM-6B is supported")
        return dict(raw)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def n_blocks(self) -> int:
        return self.num_layers

    @property
    def kv_layout(self) -> tuple[int, int]:
        return self.num_attention_heads, self.head_dim


def prefix_of(cfg: ChatGLMConfig, ids: list[int]) -> Prefix:
    """A prompt's GLM context, as ChatGLM-6B's get_masks/get_position_ids find it."""
    if cfg.bos_token_id not in ids:
        raise ValueError(f"a ChatGLM-6B prompt must end with [gMASK] <sop> (ids "
                         f"{cfg.gmask_token_id}, {cfg.bos_token_id}); encode it with the "
                         "model's tokenizer, and send the whole prompt in the first step")
    mask = cfg.gmask_token_id if cfg.gmask_token_id in ids else cfg.mask_token_id
    if mask not in ids:
        raise ValueError(f"a ChatGLM-6B prompt needs a [gMASK] ({cfg.gmask_token_id}) or "
                         f"[MASK] ({cfg.mask_token_id}) token")
    return Prefix(length=ids.index(cfg.bos_token_id), mask_pos=ids.index(mask))


def sequence_prefixes(batch: Batch, cfg: ChatGLMConfig,
                      tokens: torch.Tensor | None = None) -> list[Prefix]:
    """Each sequence's prefix: from the batch, else the cache, else (with tokens, on the
    first step) the tokens. Records it in the batch and in the caches."""
    out, row = [], 0
    for i, (n, cache) in enumerate(zip(batch.seq_lens, batch.caches)):
        start = int(batch.positions[row]) if n else 0
        p = (batch.prefixes[i] if batch.prefixes is not None else None) or cache.prefix
        if p is None and tokens is not None and start == 0:
            p = prefix_of(cfg, tokens[row: row + n].tolist())
        if p is None:
            raise ValueError(f"sequence {i} has no GLM prefix: the stage that embeds its "
                             "tokens puts it in Batch.prefixes, which later stages need on "
                             "the sequence's first step")
        if 0 < start < p.length:
            raise ValueError(f"sequence {i}: its prompt (up to <sop> at {p.length}) attends "
                             f"both ways and must come in one step, not from {start} on")
        cache.prefix = p
        out.append(p)
        row += n
    batch.prefixes = list(out)
    return out


class Embedding(nn.Module):
    def __init__(self, cfg: ChatGLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)

    def forward(self, tokens: torch.Tensor, batch: Batch) -> torch.Tensor:
        sequence_prefixes(batch, self.cfg, tokens)
        return self.word_embeddings(tokens)


def glm_positions(batch: Batch, prefixes: list[Prefix]) -> tuple[torch.Tensor, torch.Tensor]:
    """Position and block position ids (rows,) of every row."""
    t = batch.positions
    length = torch.repeat_interleave(torch.tensor([p.length for p in prefixes]),
                                     torch.tensor(batch.seq_lens)).to(t.device)
    mask_pos = torch.repeat_interleave(torch.tensor([p.mask_pos for p in prefixes]),
                                       torch.tensor(batch.seq_lens)).to(t.device)
    in_prompt = t < length
    return (torch.where(in_prompt, t, mask_pos),
            torch.where(in_prompt, torch.zeros_like(t), t - length + 1))


class Attention(nn.Module):
    def __init__(self, cfg: ChatGLMConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.rope = Rotary(self.head_dim // 2, 10000.0, cfg.max_sequence_length,
                           table_dtype=torch.float16)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        rows, half = x.shape[0], self.head_dim // 2
        prefixes = sequence_prefixes(batch, self.cfg)
        # per-head interleaved rows: (rows, heads, [q|k|v] * head_dim)
        q, k, v = self.query_key_value(x).view(rows, self.heads, 3 * self.head_dim).split(
            self.head_dim, dim=-1)
        pos, block_pos = glm_positions(batch, prefixes)
        (c1, s1), (c2, s2) = self.rope.cos_sin(pos), self.rope.cos_sin(block_pos)
        q = torch.cat((self.rope.apply(q[..., :half], c1, s1),
                       self.rope.apply(q[..., half:], c2, s2)), -1)
        k = torch.cat((self.rope.apply(k[..., :half], c1, s1),
                       self.rope.apply(k[..., half:], c2, s2)), -1)
        # ChatGLM divides q by √d·(layer+1) and multiplies the fp32 scores back by (layer+1)
        # (an fp16 overflow guard): in fp32 that is the plain 1/√d scale.
        o = cached_attention(q, k, v.contiguous(), batch, self.layer,
                             prefix_lens=[p.length for p in prefixes])
        return self.dense(o.reshape(rows, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ChatGLMConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(cfg.inner_hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ChatGLMConfig, layer: int) -> None:
        super().__init__()
        eps = cfg.layernorm_epsilon
        self.alpha = math.sqrt(2 * cfg.num_layers)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.attention = Attention(cfg, layer)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        a = self.input_layernorm(x)
        h = a * self.alpha + self.attention(a, batch)  # residual from the LN output
        m = self.post_attention_layernorm(h)
        return m * self.alpha + self.mlp(m)


class Head(nn.Module):
    def __init__(self, cfg: ChatGLMConfig) -> None:
        super().__init__()
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_layernorm(x))


# ---- checkpoint layout (THUDM's modeling_chatglm.py names)

_BLOCK = ("input_layernorm", "attention.query_key_value", "attention.dense",
          "post_attention_layernorm", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def layout_hf(cfg: ChatGLMConfig) -> dict:
    block = {f"{n}.{p}": Rule(f"transformer.layers.{{i}}.{n}.{p}")
             for n in _BLOCK for p in ("weight", "bias")}
    return {"embed": {"word_embeddings.weight": Rule("transformer.word_embeddings.weight")},
            "block": block,
            "head": {"final_layernorm.weight": Rule("transformer.final_layernorm.weight"),
                     "final_layernorm.bias": Rule("transformer.final_layernorm.bias"),
                     "lm_head.weight": Rule("lm_head.weight")},
            "ignore": (r"transformer\.layers\.\d+\.attention\.rotary_emb\.inv_freq",)}


ARCH = Arch(name="chatglm", config=ChatGLMConfig, embed=Embedding, block=Block, head=Head,
            layouts={"hf": layout_hf}, chat_template="chatglm", aliases=("chatglm-6b",))
