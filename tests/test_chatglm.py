"""ChatGLM-6B parity against an independent reference written here from THUDM's
modeling_chatglm.py.

The reference is a plain full-sequence forward with no cache, over THUDM's checkpoint
keys, computed the way modeling_chatglm.py orders it (q scaled by 1/(√d·(layer+1)), the
-10000 mask fill, then ×(layer+1) before softmax; fp16 rotary tables).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CHATGLM_CFG as CFG
from conftest import GMASK, MASK, SOP, random_state, text_ids, write_checkpoint

from llm_shard.models.archs.chatglm import prefix_of
from llm_shard.models.cache import Batch, Prefix, SequenceCache
from llm_shard.models.checkpoint.convert import convert
from llm_shard.models.runner import LocalModel, StageModel
from llm_shard.models.text import chat

BLOCK = ("input_layernorm", "attention.query_key_value", "attention.dense",
         "post_attention_layernorm", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def reference_logits(sd: dict, ids: list[int]) -> torch.Tensor:
    h, heads, n_layers = CFG["hidden_size"], CFG["num_attention_heads"], CFG["num_layers"]
    d, t = h // heads, len(ids)
    alpha = (2 * n_layers) ** 0.5
    context = ids.index(SOP)
    mask_pos = ids.index(GMASK if GMASK in ids else MASK)
    position = torch.tensor([i if i < context else mask_pos for i in range(t)])
    block_position = torch.tensor([0 if i < context else i - context + 1 for i in range(t)])
    allowed = torch.ones(t, t).tril()
    allowed[:, :context] = 1
    masked = allowed < 0.5

    # RotaryEmbedding(d/2, base 10000, precision=half): everything in fp16
    rd = d // 2
    inv_freq = (1.0 / (10000 ** (torch.arange(0, rd, 2).float() / rd))).half()

    def tables(pos):
        freqs = pos.half()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.float().cos().half(), emb.float().sin().half()
        return cos.float()[:, None, :], sin.float()[:, None, :]

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    def rope(x, pos):
        cos, sin = tables(pos)
        return x * cos + rotate_half(x) * sin

    def ln(x, name):
        return F.layer_norm(x, (h,), sd[name + ".weight"], sd[name + ".bias"], 1e-5)

    def lin(x, name):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    x = sd["transformer.word_embeddings.weight"][ids]
    for layer in range(n_layers):
        b = f"transformer.layers.{layer}."
        a = ln(x, b + "input_layernorm")
        qkv = lin(a, b + "attention.query_key_value").view(t, heads, 3 * d)
        q, k, v = qkv[..., :d], qkv[..., d: 2 * d], qkv[..., 2 * d:]
        q = torch.cat((rope(q[..., :rd], position), rope(q[..., rd:], block_position)), -1)
        k = torch.cat((rope(k[..., :rd], position), rope(k[..., rd:], block_position)), -1)
        coeff = float(layer + 1)
        q = q / (math.sqrt(d) * coeff)
        scores = torch.einsum("qhd,khd->hqk", q, k)
        scores = scores.masked_fill(masked, -10000.0) * coeff
        out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(t, h)
        hid = a * alpha + lin(out, b + "attention.dense")
        m = ln(hid, b + "post_attention_layernorm")
        inner = lin(m, b + "mlp.dense_h_to_4h")
        gelu = 0.5 * inner * (1.0 + torch.tanh(0.7978845608028654 * inner
                                                * (1.0 + 0.044715 * inner * inner)))
        x = m * alpha + lin(gelu, b + "mlp.dense_4h_to_h")
    return ln(x, "transformer.final_layernorm") @ sd["lm_head.weight"].T


PROMPTS = {
    "gmask": text_ids(9, 1) + [GMASK, SOP] + text_ids(5, 2),  # a prompt and 5 answer tokens
    "mask-in-text": text_ids(4, 3) + [MASK] + text_ids(4, 4) + [SOP] + text_ids(3, 5),
}


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatglm")
    sd = random_state()
    write_checkpoint(root / "hf", sd)
    return sd, convert(root / "hf", root / "store", dtype="fp32", progress=False)


@pytest.mark.parametrize("name", PROMPTS)
def test_logits_match_reference(glm, name):
    sd, store = glm
    assert store.manifest["arch"] == "chatglm"
    ids = PROMPTS[name]
    torch.testing.assert_close(LocalModel(store).logits(ids), reference_logits(sd, ids),
                               atol=1e-4, rtol=0)


def test_prefix_of_follows_the_original_rules():
    cfg = dict(CFG)
    cfg.pop("model_type")
    from llm_shard.models.archs.chatglm import ChatGLMConfig

    c = ChatGLMConfig(**cfg)
    assert prefix_of(c, PROMPTS["gmask"]) == Prefix(length=10, mask_pos=9)
    assert prefix_of(c, PROMPTS["mask-in-text"]) == Prefix(length=9, mask_pos=4)
    with pytest.raises(ValueError, match="must end with"):
        prefix_of(c, text_ids(5, 1))


def test_cached_decoding_equals_recompute(glm):
    sd, store = glm
    model = LocalModel(store)
    prompt = text_ids(7, 6) + [GMASK, SOP]
    seq = list(prompt)
    for token in model.greedy(prompt, max_tokens=8):
        assert int(reference_logits(sd, seq)[-1].argmax()) == token
        seq.append(token)
    # and the cached logits themselves, step by step
    stage, cache = StageModel(store, 0, store.n_blocks), SequenceCache(kv_dtype="fp32")
    step = prompt
    for n in range(len(prompt), len(seq) + 1):
        logits = stage(torch.tensor(step), Batch.of([len(step)], [cache]))
        torch.testing.assert_close(logits[0], reference_logits(sd, seq[:n])[-1], atol=1e-4,
                                   rtol=0)
        step = seq[n: n + 1]


def run_stages(stages, chunks):
    """Each stage with its own caches; a stage passes its batch's prefixes on, as a worker
    forwards them in the step header."""
    caches = [[SequenceCache(kv_dtype="fp32") for _ in chunks[0]] for _ in stages]
    out = []
    for step in chunks:
        x, prefixes = torch.tensor([t for seq in step for t in seq]), None
        for stage, own in zip(stages, caches):
            batch = Batch.of([len(s) for s in step], own, prefixes)
            x = stage(x, batch)
            prefixes = batch.prefixes
        out.append(x)
    return out


@pytest.mark.parametrize("k", [1, 2])
def test_split_equals_unsplit(glm, k):
    _, store = glm
    chunks = [[text_ids(6, 7) + [GMASK, SOP], PROMPTS["mask-in-text"][:9] + [SOP]],
              [[5], [6]], [[7], [8]]]
    whole = run_stages([StageModel(store, 0, 3)], chunks)
    split = run_stages([StageModel(store, 0, k), StageModel(store, k, 3)], chunks)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_later_stage_needs_the_prefix_and_prompt_comes_whole(glm):
    _, store = glm
    later = StageModel(store, 1, 3)
    with pytest.raises(ValueError, match="no GLM prefix"):
        later(torch.zeros(4, CFG["hidden_size"]), Batch.of([4], [SequenceCache(kv_dtype="fp32")]))
    whole, cache = StageModel(store, 0, 3), SequenceCache(kv_dtype="fp32")
    prompt = text_ids(6, 8) + [GMASK, SOP]
    whole(torch.tensor(prompt[:3]), Batch.of([3], [cache], [prefix_of(store.config, prompt)]))
    with pytest.raises(ValueError, match="must come in one step"):
        whole(torch.tensor(prompt[3:]), Batch.of([5], [cache]))


def test_glm2_config_is_refused(tmp_path):
    sd = random_state()
    write_checkpoint(tmp_path / "hf", sd)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg | {"multi_query_attention": True}))
    with pytest.raises(ValueError, match="ChatGLM2/3"):
        convert(tmp_path / "hf", tmp_path / "store", dtype="fp32", progress=False)


# ---- tokenizer and template

def train_ice_text(path):
    """A tiny SentencePiece model with ChatGLM's pieces (<n>, <|tab|>, blanks, GLM specials)."""
    spm = pytest.importorskip("sentencepiece")
    from llm_shard.models.text.tokenizer import ChatGLMTokenizer

    specials = (["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)]
                + list(ChatGLMTokenizer.SPECIALS))
    corpus = ["你好，世界。", "hello world", "def f(x):", "问：答：", "Round one two",
              "the quick brown fox jumps over the lazy dog"] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(path), vocab_size=420,
        hard_vocab_limit=False,
        model_type="unigram", user_defined_symbols=specials, byte_fallback=True,
        character_coverage=1.0, minloglevel=2)
    return path.with_suffix(".model")


def test_tokenizer_preprocessing_and_suffix(tmp_path):
    from llm_shard.models.text.tokenizer import (
        ChatGLMTokenizer,
        load_tokenizer,
        tokenizer_from_folder,
    )

    model = train_ice_text(tmp_path / "ice_text")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "ice_text.model").write_bytes(model.read_bytes())
    tok = tokenizer_from_folder(folder, "chatglm")
    assert isinstance(tok, ChatGLMTokenizer) and tok.chat_template == "chatglm"
    sp = tok.sp
    assert ChatGLMTokenizer.preprocess("a\n\tb   c") == "a<n><|tab|>b<|blank_3|>c"
    text = "def f(x):\n    return  x\t# 你好"
    ids = tok.encode(text)
    assert ids[-2:] == [sp.piece_to_id("[gMASK]"), sp.piece_to_id("<sop>")]
    assert sp.piece_to_id("<n>") in ids and sp.piece_to_id("<|blank_4|>") in ids
    assert ids[:-2] == sp.encode(ChatGLMTokenizer.preprocess(text))
    assert tok.decode(ids[:-2]) == text
    assert tok.encode(text, bos=False) == ids[:-2]
    assert tok.encode("a[MASK]b", bos=False) == [*sp.encode("a"), sp.piece_to_id("[MASK]"),
                                                 *sp.encode("b")]
    assert tok.eos_ids == (sp.piece_to_id("<eop>"),) and tok.bos_id == sp.piece_to_id("<sop>")
    again = load_tokenizer(tmp_path / "saved", tok.save(tmp_path / "saved"))
    assert isinstance(again, ChatGLMTokenizer) and again.encode(text) == ids


def test_chatglm_template():
    one = [{"role": "user", "content": "你好"}]
    assert chat.render("chatglm", one) == "你好"
    more = one + [{"role": "assistant", "content": "我是 ChatGLM"},
                  {"role": "user", "content": "再见"}]
    assert chat.render("chatglm", more) == ("[Round 0]\n问：你好\n答：我是 ChatGLM\n"
                                           "[Round 1]\n问：再见\n答：")
