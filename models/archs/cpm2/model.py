"""CPM-2 (BMInf's "cpm2.1-new"): a T5 v1.1 encoder–decoder, block by block.

Blocks have one global index space: encoder blocks 0..E-1, decoder blocks E..E+D-1, so
the planner cuts them into contiguous ranges like any other model. Each block holds its
own copy of its stack's relative-position table (T5 shares one per stack; it is buckets ×
heads floats), the last encoder block also the encoder's final norm, and the head the
decoder's final norm and the untied output embedding.

A sequence is one row stream, as for a decoder-only model: its first step carries the
encoder input followed by the decoder prompt (the decoder start token <s>, and for
BMInf's generation <s_189>), later steps one decoder token each. How many leading rows
are encoder input travels as the sequence's `Prefix` (`length`; `mask_pos` is unused),
exactly as ChatGLM's bidirectional prompt does: the embedding finds it in the tokens (the
first decoder start token) on the step that starts the sequence and puts it in
`Batch.prefixes`; later stages receive it with that step. In that step encoder blocks
encode those rows (bidirectional, T5 bias) and leave the decoder rows alone; the last
encoder block applies the encoder's final norm to them; each decoder block computes its
cross-attention K/V from them once and keeps them in the sequence's cache
(`SequenceCache.state(layer)`, a fixed-size per-sequence entry, (2, heads, S_enc, d_kv)),
and runs only the decoder rows. Encoder rows pass through decoder blocks unchanged. On
later steps (no prefix) encoder blocks pass everything through. `Batch.positions` is not
used: a decoder row's position is its self-attention cache offset.

Parameter names are Hugging Face T5ForConditionalGeneration's within a block, so the HF
layout is a rename of the block prefix; BMInf's own checkpoint maps by name as well.
Attention is unscaled (T5), RMSNorm, FFN `wo(gelu_new(wi_0 x) * wi_1 x)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llm_shard.models.archs.cpm2.bminf import open_bminf
from llm_shard.models.archs.cpm2.tokenizer import CPM2Tokenizer
from llm_shard.models.base import Arch, ArchConfig, Rule
from llm_shard.models.cache import Batch, Prefix, kv_bytes_per_token
from llm_shard.models.layers import RMSNorm


@dataclass
class CPM2Config(ArchConfig):
    """Field names are Hugging Face T5Config's; defaults are CPM-2's."""

    vocab_size: int = 26240
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24  # encoder
    num_decoder_layers: int | None = None
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    tie_word_embeddings: bool = False
    scale_decoder_outputs: bool | None = None  # logits * d_model^-0.5 (T5 v1.0); None: tied
    decoder_start_token_id: int = 0

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings
        if self.feed_forward_proj != "gated-gelu":
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is not supported: "
                             "CPM-2 and T5 v1.1 use 'gated-gelu'")

    @classmethod
    def normalize(cls, raw: dict) -> dict:
        """Hugging Face T5 configs: v4 ties (and scales) unless tie_word_embeddings is false;
        v5 writes tie_word_embeddings true always and says scaling in scale_decoder_outputs.
        The decoder starts from pad when decoder_start_token_id is not given."""
        d = dict(raw)
        if "model_type" in d:
            d.setdefault("tie_word_embeddings", True)
            if d.get("decoder_start_token_id") is None:
                d["decoder_start_token_id"] = d.get("pad_token_id") or 0
        return d

    @property
    def hidden_size(self) -> int:  # the name the rest of llm-shard reads
        return self.d_model

    @property
    def n_encoder(self) -> int:
        return self.num_layers

    @property
    def n_blocks(self) -> int:
        return self.num_layers + self.num_decoder_layers

    @property
    def cache_bytes_per_token(self) -> int:
        """A decoder block keeps K and V for every token of a sequence: self-attention for
        decoder tokens, cross-attention for encoder tokens. Encoder blocks keep nothing
        (see cache_bytes_per_token_per_block); this is the bound for every block. The
        self-attention's are in `kv_dtype`, the cross-attention's float32 (a StateCache):
        the larger counts."""
        return max(kv_bytes_per_token(*self.kv_layout, self.kv_dtype),
                   kv_bytes_per_token(*self.kv_layout, "fp32"))

    @property
    def kv_layout(self) -> tuple[int, int]:
        return self.num_heads, self.d_kv

    @property
    def cache_bytes_per_token_per_block(self) -> tuple[int, ...]:
        return (0,) * self.num_layers + (self.cache_bytes_per_token,) * self.num_decoder_layers


# ---- relative position bias, from the config (T5's buckets, as cpm_kernels computes them)

def relative_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int,
                    max_distance: int) -> torch.Tensor:
    """Bucket of each relative position rel = key - query (Hugging Face's
    T5Attention._relative_position_bucket; cpm_kernels' position mapping agrees)."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).long() * num_buckets  # keys after the query: the upper half
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)  # a causal query sees no later keys
    exact = num_buckets // 2
    large = exact + (torch.log(rel.float() / exact) / math.log(max_distance / exact)
                     * (num_buckets - exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(rel < exact, rel, large)


def encoder_lengths(batch: Batch) -> list[int]:
    """Per sequence, how many of its leading rows in this step are encoder input: its
    prefix length on the step that starts it, else 0. A step may hold only encoder rows
    (a worker timing a block does that); its logits then mean nothing."""
    if batch.prefixes is None:
        return [0] * len(batch.seq_lens)
    out = []
    for i, (n, p) in enumerate(zip(batch.seq_lens, batch.prefixes)):
        if p is not None and not 0 < p.length <= n:
            raise ValueError(f"sequence {i}: encoder input of {p.length} rows in a step of "
                             f"{n} rows; the whole encoder input comes in the first step")
        out.append(0 if p is None else p.length)
    return out


def split_rows(batch: Batch, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of the encoder rows and of the decoder rows of a step."""
    enc, dec, row = [], [], 0
    for n, s in zip(batch.seq_lens, lengths):
        enc.append(torch.arange(row, row + s))
        dec.append(torch.arange(row + s, row + n))
        row += n
    empty = torch.zeros(0, dtype=torch.long)
    return torch.cat(enc) if enc else empty, torch.cat(dec) if dec else empty


class Embedding(nn.Module):
    def __init__(self, cfg: CPM2Config) -> None:
        super().__init__()
        self.start_id = cfg.decoder_start_token_id
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)

    def forward(self, tokens: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Embeds every row; for each sequence that starts here (no prefix in its cache yet)
        takes its prefix from the batch, else finds it in the tokens, and puts it in
        `batch.prefixes` (None for the sequences that go on)."""
        found, row = [], 0
        for i, (n, cache) in enumerate(zip(batch.seq_lens, batch.caches)):
            given = batch.prefixes[i] if batch.prefixes is not None else None
            if cache.prefix is not None:
                if given is not None:
                    raise ValueError(f"sequence {i} has started already: its encoder input "
                                     "cannot change; start a fresh cache")
                found.append(None)
            else:
                cache.prefix = given or self.prefix_of(tokens[row: row + n].tolist())
                found.append(cache.prefix)
            row += n
        batch.prefixes = found if any(p is not None for p in found) else None
        return self.shared(tokens)

    def prefix_of(self, ids: list[int]) -> Prefix:
        """The encoder input is everything before the first decoder start token."""
        length = ids.index(self.start_id) if self.start_id in ids else 0
        if length == 0:
            raise ValueError(f"a CPM-2 prompt is the encoder input (at least one token), then "
                             f"the decoder start token ({self.start_id}) and the rest of the "
                             "decoder prompt, all in the sequence's first step; encode it "
                             "with the model's tokenizer")
        return Prefix(length=length, mask_pos=length)


class T5Attention(nn.Module):
    """q, k, v, o without biases and without 1/sqrt(d) scaling; the self-attention of
    every block holds its stack's bias table (buckets, heads)."""

    def __init__(self, cfg: CPM2Config, bias_table: bool) -> None:
        super().__init__()
        self.heads, self.d_kv = cfg.num_heads, cfg.d_kv
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        if bias_table:
            self.relative_attention_bias = nn.Embedding(self.buckets, cfg.num_heads)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.heads, self.d_kv).transpose(0, 1)  # (heads, rows, d)

    def bias(self, queries: torch.Tensor, keys: int, bidirectional: bool) -> torch.Tensor:
        """(heads, len(queries), keys) float bias; -inf where a causal query may not look."""
        rel = torch.arange(keys, device=queries.device)[None, :] - queries[:, None]
        table = self.relative_attention_bias
        b = table(relative_bucket(rel, bidirectional, self.buckets, self.max_distance))
        b = b.permute(2, 0, 1)
        if not bidirectional:
            b = b.masked_fill(rel[None] > 0, float("-inf"))
        return b

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
        """(heads, n, d) against (heads, T, d) -> (n, heads * d)."""
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None
                                           else bias.to(q.dtype), scale=1.0)
        return o.transpose(0, 1).reshape(q.shape[1], -1)


class SelfAttentionLayer(nn.Module):
    def __init__(self, cfg: CPM2Config) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(cfg, bias_table=True)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)


class CrossAttentionLayer(nn.Module):
    def __init__(self, cfg: CPM2Config) -> None:
        super().__init__()
        self.EncDecAttention = T5Attention(cfg, bias_table=False)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)


class GatedGelu(nn.Module):
    def __init__(self, cfg: CPM2Config) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)  # BMInf linear_in
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)  # BMInf linear_gated
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class FFLayer(nn.Module):
    def __init__(self, cfg: CPM2Config) -> None:
        super().__init__()
        self.DenseReluDense = GatedGelu(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class EncoderBlock(nn.Module):
    """Encodes the encoder rows of the sequences that start in this step."""

    def __init__(self, cfg: CPM2Config, layer: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList([SelfAttentionLayer(cfg), FFLayer(cfg)])
        if layer == cfg.n_encoder - 1:
            self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        lengths = encoder_lengths(batch)
        if not any(lengths):
            return x
        rows, _ = split_rows(batch, lengths)
        rows = rows.to(x.device)
        e = x[rows]
        sa = self.layer[0].SelfAttention
        h = self.layer[0].layer_norm(e)
        q, k, v = sa.split(sa.q(h)), sa.split(sa.k(h)), sa.split(sa.v(h))
        out, row = [], 0
        for s in lengths:
            if s:
                pos = torch.arange(s, device=x.device)
                out.append(sa.attend(q[:, row: row + s], k[:, row: row + s],
                                     v[:, row: row + s], sa.bias(pos, s, bidirectional=True)))
                row += s
        e = self.layer[1](e + sa.o(torch.cat(out)))
        if hasattr(self, "final_layer_norm"):
            e = self.final_layer_norm(e)
        return x.index_copy(0, rows, e)


class DecoderBlock(nn.Module):
    """Self-attention over the decoder tokens (cached), cross-attention over the encoder
    output (K/V computed on the sequence's first step, then cached), FFN."""

    def __init__(self, cfg: CPM2Config, layer: int) -> None:
        super().__init__()
        self.index = layer
        self.layer = nn.ModuleList([SelfAttentionLayer(cfg), CrossAttentionLayer(cfg),
                                    FFLayer(cfg)])

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        lengths = encoder_lengths(batch)
        enc_rows, dec_rows = split_rows(batch, lengths)
        sa, ca = self.layer[0].SelfAttention, self.layer[1].EncDecAttention
        cross, row = [], 0
        for i, (n, s, cache) in enumerate(zip(batch.seq_lens, lengths, batch.caches)):
            state = cache.state(self.index)
            if s:
                if state.value is not None:
                    raise ValueError(f"sequence {i} already has encoder states in block "
                                     f"{self.index}: a new encoder input needs a fresh cache")
                e = x[row: row + s]  # the encoder output (final-normed by block E-1)
                state.update(torch.stack((ca.split(ca.k(e)), ca.split(ca.v(e)))), s)
            elif state.value is None:
                raise ValueError(f"sequence {i} has no encoder states in block {self.index}: "
                                 "the step that starts it carries its Prefix (the encoder "
                                 "input's length) in Batch.prefixes")
            cross.append(state.value)
            row += n
        if dec_rows.numel() == 0:
            return x
        dec_rows = dec_rows.to(x.device)
        d = x[dec_rows]
        h = self.layer[0].layer_norm(d)
        q, k, v = sa.split(sa.q(h)), sa.split(sa.k(h)), sa.split(sa.v(h))
        out, r = [], 0
        for n, s, cache in zip(batch.seq_lens, lengths, batch.caches):
            m = n - s  # this sequence's decoder rows
            if m:
                kv = cache.layer(self.index)
                pos = torch.arange(kv.offset, kv.offset + m, device=x.device)
                keys, values = kv.update_and_fetch(k[:, r: r + m], v[:, r: r + m])
                out.append(sa.attend(q[:, r: r + m], keys, values,
                                     sa.bias(pos, keys.shape[1], bidirectional=False)))
                r += m
        d = d + sa.o(torch.cat(out))
        q = ca.split(ca.q(self.layer[1].layer_norm(d)))
        out, r = [], 0
        for n, s, kv in zip(batch.seq_lens, lengths, cross):
            m = n - s
            if m:
                out.append(ca.attend(q[:, r: r + m], kv[0], kv[1], None))
                r += m
        d = self.layer[2](d + ca.o(torch.cat(out)))
        return x.index_copy(0, dec_rows, d)


def block(cfg: CPM2Config, layer: int) -> nn.Module:
    return EncoderBlock(cfg, layer) if layer < cfg.n_encoder else DecoderBlock(cfg, layer)


class Head(nn.Module):
    def __init__(self, cfg: CPM2Config) -> None:
        super().__init__()
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.scale = cfg.d_model ** -0.5 if cfg.scale_decoder_outputs else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.final_layer_norm(x)
        return self.lm_head(h if self.scale is None else h * self.scale)


# ---- checkpoint layouts: per global block, since encoder and decoder blocks differ

_ATT = ("q", "k", "v", "o")


def _t5_block(cfg: CPM2Config, index: int) -> dict[str, Rule]:
    encoder = index < cfg.n_encoder
    stack, i = ("encoder", index) if encoder else ("decoder", index - cfg.n_encoder)
    p = f"{stack}.block.{i}.layer."
    rules = {f"layer.0.SelfAttention.{n}.weight": Rule(f"{p}0.SelfAttention.{n}.weight")
             for n in _ATT}
    rules["layer.0.SelfAttention.relative_attention_bias.weight"] = Rule(
        f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    ff = 1 if encoder else 2
    if not encoder:
        rules |= {f"layer.1.EncDecAttention.{n}.weight": Rule(f"{p}1.EncDecAttention.{n}.weight")
                  for n in _ATT}
    rules |= {f"layer.{ff}.DenseReluDense.{n}.weight": Rule(f"{p}{ff}.DenseReluDense.{n}.weight")
              for n in ("wi_0", "wi_1", "wo")}
    rules |= {f"layer.{j}.layer_norm.weight": Rule(f"{p}{j}.layer_norm.weight")
              for j in range(ff + 1)}
    if index == cfg.n_encoder - 1:
        rules["final_layer_norm.weight"] = Rule("encoder.final_layer_norm.weight")
    return rules


def layout_hf(cfg: CPM2Config) -> dict:
    """T5ForConditionalGeneration: `shared` embeds both stacks; the head is `lm_head`, or
    `shared` when tied (every transformers v5 save)."""
    head = "shared.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    layout = {f"block {i}": _t5_block(cfg, i) for i in range(cfg.n_blocks)}
    ignore = [r"(encoder|decoder)\.embed_tokens\.weight",  # copies of shared
              # T5 v1.0 checkpoints carry an unused cross-attention bias table
              r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight"]
    if cfg.tie_word_embeddings:
        ignore.append(r"lm_head\.weight")
    return layout | {
        "block": {},  # every block has its own entry above
        "embed": {"shared.weight": Rule("shared.weight")},
        "head": {"final_layer_norm.weight": Rule("decoder.final_layer_norm.weight"),
                 "lm_head.weight": Rule(head)},
        "ignore": tuple(ignore)}


def _transposed(w: torch.Tensor) -> torch.Tensor:
    return w.t()  # BMInf's position bias is (heads, buckets), T5's (buckets, heads)


def _bminf_block(cfg: CPM2Config, index: int) -> dict[str, Rule]:
    encoder = index < cfg.n_encoder
    p = f"enc_layers.{index}." if encoder else f"dec_layers.{index - cfg.n_encoder}."
    att = {"q": "project_q", "k": "project_k", "v": "project_v", "o": "linear_out"}
    ff = 1 if encoder else 2
    rules = {f"layer.0.SelfAttention.{n}.weight": Rule(f"{p}self_attn.{b}.weight")
             for n, b in att.items()}
    rules["layer.0.SelfAttention.relative_attention_bias.weight"] = Rule(
        f"position_bias_{'enc' if encoder else 'dec'}.weight", _transposed)
    rules["layer.0.layer_norm.weight"] = Rule(f"{p}ln_attn.weight")
    if not encoder:
        rules |= {f"layer.1.EncDecAttention.{n}.weight": Rule(f"{p}cross_attn.{b}.weight")
                  for n, b in att.items()}
        rules["layer.1.layer_norm.weight"] = Rule(f"{p}ln_cross_attn.weight")
    rules |= {f"layer.{ff}.DenseReluDense.{n}.weight": Rule(f"{p}ff.{b}.weight")
              for n, b in (("wi_0", "linear_in"), ("wi_1", "linear_gated"), ("wo", "linear_out"))}
    rules[f"layer.{ff}.layer_norm.weight"] = Rule(f"{p}ln_ff.weight")
    if index == cfg.n_encoder - 1:
        rules["final_layer_norm.weight"] = Rule("ln_enc.weight")
    return rules


def layout_bminf(cfg: CPM2Config) -> dict:
    """BMInf's checkpoint.pt, as models/archs/cpm2/bminf.py presents it (Linear weights
    dequantized)."""
    return {f"block {i}": _bminf_block(cfg, i) for i in range(cfg.n_blocks)} | {
        "block": {},
        "embed": {"shared.weight": Rule("input_embedding.weight")},
        "head": {"final_layer_norm.weight": Rule("ln_dec.weight"),
                 "lm_head.weight": Rule("output_embedding.weight")},
        "ignore": ()}


ARCH = Arch(name="cpm2", config=CPM2Config, embed=Embedding, block=block, head=Head,
            layouts={"hf": layout_hf, "bminf": layout_bminf}, chat_template="plain",
            aliases=("cpm-2", "t5", "mt5"), reader=open_bminf, tokenizer=CPM2Tokenizer)
