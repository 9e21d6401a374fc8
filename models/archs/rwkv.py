"""RWKV-4 (ChatRWKV Raven / World): a recurrent network, no attention.

Each block: `x += TimeMix(ln1 x); x += ChannelMix(ln2 x)`, block 0 first applies `pre_ln`
(ChatRWKV's ln0). Both mixes blend each row with the previous token's normed row (token
shift). TimeMix keeps a decaying weighted average of values (the WKV numerator/denominator,
stabilised by a running maximum). So a sequence's state per layer is five vectors, kept in
its `SequenceCache.state(layer)` as one float32 (5, hidden) tensor in ChatRWKV's order:
[att shift, aa (numerator), bb (denominator), pp (max exponent), ffn shift].

Parameter names follow Hugging Face's RwkvForCausalLM; ChatRWKV's .pth names map 1:1.
Hugging Face and ChatRWKV halve the hidden state every 6 layers in fp16 (`rescale_every`):
in exact arithmetic that changes nothing (every use goes through a LayerNorm), so it is not
done here: computing in fp32 or bf16, the state never nears fp16's range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llm_shard.models.base import Arch, ArchConfig, Rule
from llm_shard.models.cache import Batch

STATE_SLOTS = 5  # att shift, aa, bb, pp, ffn shift
ATT_SHIFT, AA, BB, PP, FFN_SHIFT = range(STATE_SLOTS)
NO_MAX = -1e30  # pp before any token: e^(pp) = 0


@dataclass
class RwkvConfig(ArchConfig):
    vocab_size: int = 50277
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    attention_hidden_size: int | None = None
    intermediate_size: int | None = None
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        if self.attention_hidden_size is None:
            self.attention_hidden_size = self.hidden_size
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.attention_hidden_size != self.hidden_size:
            raise ValueError(f"attention_hidden_size {self.attention_hidden_size} != hidden_size "
                             f"{self.hidden_size}: not an RWKV-4 model")

    @property
    def n_blocks(self) -> int:
        return self.num_hidden_layers

    @property
    def kv_layout(self) -> tuple[int, int]:
        return 0, 0  # the state does not grow with the sequence: see state_bytes_per_sequence

    @property
    def state_bytes_per_sequence(self) -> int:
        """Recurrent state of one sequence in one block (float32)."""
        return STATE_SLOTS * self.hidden_size * 4


def initial_state(hidden: int, device: torch.device) -> torch.Tensor:
    state = torch.zeros(STATE_SLOTS, hidden, dtype=torch.float32, device=device)
    state[PP] = NO_MAX
    return state


class Embedding(nn.Module):
    def __init__(self, cfg: RwkvConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)

    def forward(self, tokens: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.embeddings(tokens)


def shifted(x: torch.Tensor, batch: Batch, previous: list[torch.Tensor]) -> torch.Tensor:
    """Each row's previous row within its sequence; a sequence's first row gets `previous`
    (the last row of its earlier steps, from the state)."""
    parts, row = [], 0
    for n, prev in zip(batch.seq_lens, previous):
        parts += [prev[None].to(x.dtype), x[row: row + n - 1]] if n else []
        row += n
    return torch.cat(parts) if parts else x[:0]


def mix(x: torch.Tensor, prev: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    return x * mu + prev * (1 - mu)


def wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        state: torch.Tensor) -> torch.Tensor:
    """The WKV recurrence over one sequence's rows k, v (n, hidden), float32, max-stabilised
    as in ChatRWKV; w = -exp(time_decay), u = time_first. Updates state[AA, BB, PP]."""
    aa, bb, pp = state[AA], state[BB], state[PP]
    out = torch.empty_like(k)
    for t in range(k.shape[0]):
        kt, vt = k[t], v[t]
        ww = u + kt
        p = torch.maximum(pp, ww)
        e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
        out[t] = (e1 * aa + e2 * vt) / (e1 * bb + e2)
        ww = pp + w
        p = torch.maximum(ww, kt)
        e1, e2 = torch.exp(ww - p), torch.exp(kt - p)
        aa, bb, pp = e1 * aa + e2 * vt, e1 * bb + e2, p
    state[AA], state[BB], state[PP] = aa, bb, pp
    return out


class TimeMix(nn.Module):
    def __init__(self, cfg: RwkvConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.time_decay = nn.Parameter(torch.empty(h))  # w = -exp(time_decay)
        self.time_first = nn.Parameter(torch.empty(h))  # u
        self.time_mix_key = nn.Parameter(torch.empty(h))
        self.time_mix_value = nn.Parameter(torch.empty(h))
        self.time_mix_receptance = nn.Parameter(torch.empty(h))
        self.key, self.value = nn.Linear(h, h, bias=False), nn.Linear(h, h, bias=False)
        self.receptance, self.output = nn.Linear(h, h, bias=False), nn.Linear(h, h, bias=False)

    def forward(self, x: torch.Tensor, batch: Batch, states: list[torch.Tensor]) -> torch.Tensor:
        prev = shifted(x, batch, [s[ATT_SHIFT] for s in states])
        k = self.key(mix(x, prev, self.time_mix_key)).float()
        v = self.value(mix(x, prev, self.time_mix_value)).float()
        r = torch.sigmoid(self.receptance(mix(x, prev, self.time_mix_receptance)))
        w, u = -torch.exp(self.time_decay.float()), self.time_first.float()
        out, row = torch.empty_like(k), 0
        for n, state in zip(batch.seq_lens, states):
            if n:
                out[row: row + n] = wkv(w, u, k[row: row + n], v[row: row + n], state)
                state[ATT_SHIFT] = x[row + n - 1].float()
            row += n
        return self.output(r * out.to(x.dtype))


class ChannelMix(nn.Module):
    def __init__(self, cfg: RwkvConfig) -> None:
        super().__init__()
        h, f = cfg.hidden_size, cfg.intermediate_size
        self.time_mix_key = nn.Parameter(torch.empty(h))
        self.time_mix_receptance = nn.Parameter(torch.empty(h))
        self.key, self.value = nn.Linear(h, f, bias=False), nn.Linear(f, h, bias=False)
        self.receptance = nn.Linear(h, h, bias=False)

    def forward(self, x: torch.Tensor, batch: Batch, states: list[torch.Tensor]) -> torch.Tensor:
        prev = shifted(x, batch, [s[FFN_SHIFT] for s in states])
        k = torch.square(torch.relu(self.key(mix(x, prev, self.time_mix_key))))
        r = torch.sigmoid(self.receptance(mix(x, prev, self.time_mix_receptance)))
        row = 0
        for n, state in zip(batch.seq_lens, states):
            if n:
                state[FFN_SHIFT] = x[row + n - 1].float()
            row += n
        return r * self.value(k)


class Block(nn.Module):
    def __init__(self, cfg: RwkvConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.hidden = layer, cfg.hidden_size
        eps = cfg.layer_norm_epsilon
        if layer == 0:
            self.pre_ln = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.ln1 = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.ln2 = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.attention = TimeMix(cfg)
        self.feed_forward = ChannelMix(cfg)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        # work on copies: the cached states change only once the whole block has run
        caches = [c.state(self.layer) for c in batch.caches]
        states = [initial_state(self.hidden, x.device) if c.value is None else c.value.clone()
                  for c in caches]
        if self.layer == 0:
            x = self.pre_ln(x)
        x = x + self.attention(self.ln1(x), batch, states)
        x = x + self.feed_forward(self.ln2(x), batch, states)
        for cache, state, n in zip(caches, states, batch.seq_lens):
            if n:
                cache.update(state, n)
        return x


class Head(nn.Module):
    def __init__(self, cfg: RwkvConfig) -> None:
        super().__init__()
        self.ln_out = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_out(x))


# ---- checkpoint layouts: Hugging Face (rwkv.* prefix) and ChatRWKV's .pth

def _flat(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(-1)  # time_mix_* are stored (1, 1, hidden)


_ATT = {"time_decay": "time_decay", "time_first": "time_first", "time_mix_key": "time_mix_k",
        "time_mix_value": "time_mix_v", "time_mix_receptance": "time_mix_r",
        "key.weight": "key.weight", "value.weight": "value.weight",
        "receptance.weight": "receptance.weight", "output.weight": "output.weight"}
_FFN = {"time_mix_key": "time_mix_k", "time_mix_receptance": "time_mix_r",
        "key.weight": "key.weight", "value.weight": "value.weight",
        "receptance.weight": "receptance.weight"}


def _layout(p: str, att: str, ffn: str, ln0: str, emb: str, pth: bool) -> dict:
    """Key prefix p and module names; pth=True: ChatRWKV's short time_mix names."""
    def name(ours: str, table: dict[str, str]) -> str:
        return table[ours] if pth else ours

    block = {f"{ln}.{x}": Rule(f"{p}blocks.{{i}}.{ln}.{x}")
             for ln in ("ln1", "ln2") for x in ("weight", "bias")}
    for ours in _ATT:
        block[f"attention.{ours}"] = Rule(f"{p}blocks.{{i}}.{att}.{name(ours, _ATT)}",
                                          _flat if ours.startswith("time_mix") else None)
    for ours in _FFN:
        block[f"feed_forward.{ours}"] = Rule(f"{p}blocks.{{i}}.{ffn}.{name(ours, _FFN)}",
                                             _flat if ours.startswith("time_mix") else None)
    block0 = {k: Rule(r.source.format(i=0), r.transform) for k, r in block.items()}
    block0 |= {f"pre_ln.{x}": Rule(f"{p}blocks.0.{ln0}.{x}") for x in ("weight", "bias")}
    return {"embed": {"embeddings.weight": Rule(f"{p}{emb}.weight")},
            "block": block, "block 0": block0,
            "head": {"ln_out.weight": Rule(f"{p}ln_out.weight"),
                     "ln_out.bias": Rule(f"{p}ln_out.bias"),
                     "head.weight": Rule("head.weight")},
            "ignore": ()}


def layout_hf(cfg: RwkvConfig) -> dict:
    return _layout("rwkv.", "attention", "feed_forward", "pre_ln", "embeddings", pth=False)


def layout_pth(cfg: RwkvConfig) -> dict:
    return _layout("", "att", "ffn", "ln0", "emb", pth=True)


def config_from_pth(shapes: dict[str, tuple]) -> dict:
    """ChatRWKV's .pth records no config: every size is in the tensors."""
    vocab, hidden = shapes["emb.weight"]
    layers = {int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")}
    return {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": max(layers) + 1,
            "intermediate_size": shapes["blocks.0.ffn.key.weight"][0]}


ARCH = Arch(name="rwkv", config=RwkvConfig, embed=Embedding, block=Block, head=Head,
            layouts={"hf": layout_hf, "pth": layout_pth}, chat_template="rwkv-raven",
            aliases=("rwkv-4", "rwkv4"))
