"""PanGu-α (2.6B, 13B): GPT-2-style pre-LN blocks with learned positions, then a query layer.

The last block (global index num_layers-1) is the query layer: it applies ln_f first,
takes its queries from a learned table of positions (wqe, not normalised) and its
keys/values from ln_1(ln_f(h)); logits are out·wteᵀ with no norm after. So the last
block owns ln_f and wqe, and the head is only the tied output matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llm_shard.models.base import Arch, ArchConfig, Rule
from llm_shard.models.cache import Batch
from llm_shard.models.layers import (
    BlockParts,
    GeluMLP,
    LayerNorm,
    cached_attention,
    default_scale,
    project,
)


@dataclass
class PanGuConfig(ArchConfig):
    vocab_size: int = 40000
    hidden_size: int = 2560
    intermediate_size: int | None = None
    num_layers: int = 32  # including the query layer
    num_heads: int = 32
    max_position_embeddings: int = 1024
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_heads {self.num_heads}")

    @property
    def n_blocks(self) -> int:
        return self.num_layers

    @property
    def kv_layout(self) -> tuple[int, int]:
        return self.num_heads, self.head_dim

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


PRESETS = {  # the released sizes; Megatron checkpoints don't record their head count
    "2.6b": PanGuConfig(hidden_size=2560, num_layers=32, num_heads=32),
    "13b": PanGuConfig(hidden_size=5120, num_layers=40, num_heads=40),
}


class Embedding(nn.Module):
    def __init__(self, cfg: PanGuConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, tokens: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.wte(tokens) + self.wpe(batch.positions)


class Attention(nn.Module):
    def __init__(self, cfg: PanGuConfig, layer: int) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.layer, self.heads, self.head_dim = layer, cfg.num_heads, cfg.head_dim
        self.q_proj, self.k_proj = nn.Linear(h, h), nn.Linear(h, h)
        self.v_proj, self.c_proj = nn.Linear(h, h), nn.Linear(h, h)
        # one int8 call (quant.fuse_int8); the last block's queries read another input
        self.shared_input = ((("k_proj", "v_proj"),) if layer == cfg.num_layers - 1
                             else (("q_proj", "k_proj", "v_proj"),))

    def forward(self, q_in: torch.Tensor, kv_in: torch.Tensor, batch: Batch) -> torch.Tensor:
        rows, shape = q_in.shape[0], (q_in.shape[0], self.heads, self.head_dim)
        if q_in is kv_in:
            q, k, v = project(q_in, self.q_proj, self.k_proj, self.v_proj)
        else:
            q, (k, v) = self.q_proj(q_in), project(kv_in, self.k_proj, self.v_proj)
        q, k, v = q.view(shape), k.view(shape), v.view(shape)
        return self.c_proj(cached_attention(q, k, v, batch, self.layer).reshape(rows, -1))


class Block(nn.Module):
    def __init__(self, cfg: PanGuConfig, layer: int) -> None:
        super().__init__()
        eps = cfg.layer_norm_epsilon
        self.ln_1 = LayerNorm(cfg.hidden_size, eps=eps)
        self.attn = Attention(cfg, layer)
        self.ln_2 = LayerNorm(cfg.hidden_size, eps=eps)
        self.mlp = GeluMLP(cfg.hidden_size, cfg.intermediate_size)

    def decode_args(self) -> BlockParts:
        """This block's parts, for a stage that runs it whole (read from `_modules`, not
        through nn.Module.__getattr__)."""
        own = self._modules
        at, mlp = own["attn"], own["mlp"]._modules
        a = at._modules
        return BlockParts(
            layer=at.layer, norm1=own["ln_1"], qkv=(a["q_proj"], a["k_proj"], a["v_proj"]),
            o=a["c_proj"], norm2=own["ln_2"], up=(mlp["c_fc"],), down=mlp["c_proj"],
            heads=at.heads, kv_heads=at.heads, head_dim=at.head_dim,
            scale=default_scale(at.head_dim), gelu=True, rope=None)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        a = self.ln_1(x)
        x = x + self.attn(a, a, batch)
        return x + self.mlp(self.ln_2(x))


class QueryBlock(Block):
    def __init__(self, cfg: PanGuConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        self.ln_f = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.wqe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def decode_args(self) -> BlockParts:
        """Block's, with its queries from wqe's rows at the positions and ln_f first."""
        own = self._modules
        at = own["attn"]._modules
        return super().decode_args()._replace(
            qkv=(at["k_proj"], at["v_proj"]), query=(own["ln_f"], at["q_proj"], own["wqe"]))

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        h = self.ln_f(x)
        h = h + self.attn(self.wqe(batch.positions.to(h.device)), self.ln_1(h), batch)
        return h + self.mlp(self.ln_2(h))


def block(cfg: PanGuConfig, layer: int) -> nn.Module:
    return (QueryBlock if layer == cfg.num_layers - 1 else Block)(cfg, layer)


class Head(nn.Module):
    def __init__(self, cfg: PanGuConfig) -> None:
        super().__init__()
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)


# ---- checkpoint layouts

def _block_rules(names: dict[str, str], prefix: str) -> dict[str, Rule]:
    return {ours + "." + p: Rule(prefix + theirs + "." + p)
            for ours, theirs in names.items() for p in ("weight", "bias")}


_HF_BLOCK = {n: n for n in ("ln_1", "ln_2", "attn.q_proj", "attn.k_proj", "attn.v_proj",
                            "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
_MEGATRON_BLOCK = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm",
                   "attn.q_proj": "attention.query", "attn.k_proj": "attention.key",
                   "attn.v_proj": "attention.value", "attn.c_proj": "attention.dense",
                   "mlp.c_fc": "mlp.dense_h_to_4h", "mlp.c_proj": "mlp.dense_4h_to_h"}


def layout_hf(cfg: PanGuConfig) -> dict:
    last = cfg.num_layers - 1
    query = _block_rules(_HF_BLOCK, f"transformer.h.{last}.")
    query.update(_block_rules({"ln_f": "ln_f"}, "transformer."))
    query["wqe.weight"] = Rule("transformer.wqe.weight")
    return {"embed": {"wte.weight": Rule("transformer.wte.weight"),
                      "wpe.weight": Rule("transformer.wpe.weight")},
            "block": _block_rules(_HF_BLOCK, "transformer.h.{i}."),
            f"block {last}": query,
            "head": {"lm_head.weight": Rule("transformer.wte.weight")},
            "ignore": (r"lm_head\.weight", r"transformer\.h\.\d+\.attn\.(masked_)?bias")}


def layout_megatron(cfg: PanGuConfig) -> dict:
    last = cfg.num_layers - 1
    query = _block_rules(_MEGATRON_BLOCK, "transformer.topQueryLayer.")
    query.update(_block_rules({"ln_f": "final_layernorm"}, "transformer."))
    query["wqe.weight"] = Rule("topQueryEmbedding.top_query_embeddings.weight")
    return {"embed": {"wte.weight": Rule("embedding.word_embeddings.weight"),
                      "wpe.weight": Rule("embedding.position_embeddings.weight")},
            "block": _block_rules(_MEGATRON_BLOCK, "transformer.layers.{i}."),
            f"block {last}": query,
            "head": {"lm_head.weight": Rule("embedding.word_embeddings.weight")},
            "ignore": ()}


def config_from_megatron(shapes: dict[str, tuple]) -> dict:
    """Megatron files record no config: sizes from the tensors, heads from the presets."""
    vocab, hidden = shapes["embedding.word_embeddings.weight"]
    heads = {p.hidden_size: p.num_heads for p in PRESETS.values()}
    if hidden not in heads:
        raise ValueError(f"no PanGu-α preset for hidden size {hidden} (known: "
                         f"{sorted(heads)}); pass a config.json beside the checkpoint")
    n_normal = len({k.split(".")[2] for k in shapes if k.startswith("transformer.layers.")})
    return {"vocab_size": vocab, "hidden_size": hidden, "num_layers": n_normal + 1,
            "num_heads": heads[hidden],
            "intermediate_size": shapes["transformer.layers.0.mlp.dense_h_to_4h.weight"][0],
            "max_position_embeddings": shapes["embedding.position_embeddings.weight"][0]}


ARCH = Arch(name="pangu-alpha", config=PanGuConfig, embed=Embedding, block=block, head=Head,
            layouts={"hf": layout_hf, "megatron": layout_megatron}, chat_template="pangu",
            aliases=("pangu", "pangualpha", "gpt-pangu"))
