"""Tokenizers and chat templates: every kind round-trips, saves and streams; SmolLM2's
byte-level BPE matches transformers' GGUF conversion; templates match their sources."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from llm_shard.models.checkpoint.sources import gguf_reader
from llm_shard.models.text import chat
from llm_shard.models.text.tokenizer import (
    PanGuTokenizer,
    SentencePieceTokenizer,
    StreamDecoder,
    TokenizerError,
    load_tokenizer,
    tokenizer_from_folder,
    tokenizer_from_gguf,
)

# CI clones the repo with shared/ beside it.
PANGU_VOCAB = Path(__file__).resolve().parents[2] / "shared/data/pangu_vocab.model"
CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]


def stream(tok, ids) -> list[str]:
    decoder = StreamDecoder(tok)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def save_load(tok, tmp_path):
    spec = tok.save(tmp_path / "tok")
    assert set(spec) >= {"kind", "file", "vocab_size", "bos_id", "eos_ids", "add_bos",
                         "chat_template"}
    assert (tmp_path / "tok" / spec["file"]).is_file()
    again = load_tokenizer(tmp_path / "tok", spec)
    assert (again.kind, again.vocab_size, again.bos_id, again.eos_ids, again.add_bos,
            again.chat_template) == (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_ids,
                                     tok.add_bos, tok.chat_template)
    return again


# --- chat templates ----------------------------------------------------------------------

def test_chatml_multi_turn():
    assert chat.render("chatml", CONVO) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert chat.render("chatml", CONVO[1:2], add_generation_prompt=False) == \
        "<|im_start|>user\nHi<|im_end|>\n"


def test_llama2_multi_turn_matches_meta():
    assert chat.render("llama2", CONVO) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s>"
        "<s>[INST] 2+2? [/INST]")
    assert chat.render("llama2", [{"role": "user", "content": " q \n"}]) == "<s>[INST] q [/INST]"
    with pytest.raises(ValueError, match="message 2: .*alternating"):
        chat.render("llama2", CONVO[:2] + [{"role": "user", "content": "again"}])
    with pytest.raises(ValueError, match="message 0: .*user message after"):
        chat.render("llama2", CONVO[:1])


def test_atom_and_pangu_multi_turn():
    turns = CONVO[1:]
    assert chat.render("atom", turns) == ("<s>Human: Hi\n</s><s>Assistant: Hello!\n</s>"
                                          "<s>Human: 2+2?\n</s><s>Assistant: ")
    assert chat.render("pangu", turns) == "问：Hi？答：Hello!问：2+2?？答："
    assert chat.render("pangu", turns[:1], add_generation_prompt=False) == "问：Hi？"
    assert chat.stop_strings("pangu") == ("问：", "答：")
    for name in ("atom", "pangu"):
        with pytest.raises(ValueError, match=f"message 0: template '{name}' takes a system"):
            chat.render(name, CONVO)


def test_plain_concatenates():
    assert chat.render("plain", CONVO) == "Be brief.HiHello!2+2?"
    assert chat.stop_strings("plain") == ()


@pytest.mark.parametrize("name", sorted(chat.TEMPLATES))
def test_bad_messages_name_index_and_problem(name):
    with pytest.raises(ValueError, match=r"message 1: unknown role 'bot'"):
        chat.render(name, [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}])
    with pytest.raises(ValueError, match=r"message 0: missing content"):
        chat.render(name, [{"role": "user"}])
    with pytest.raises(ValueError, match=r"message 0: expected a dict"):
        chat.render(name, ["hi"])


def test_unknown_template_and_jinja_mapping():
    with pytest.raises(ValueError, match="unknown chat template 'nope'"):
        chat.render("nope", [])
    assert chat.template_for_jinja("{{'<|im_start|>' + m}}", "plain") == "chatml"
    assert chat.template_for_jinja("{{ '[INST] ' + m }}", "plain") == "llama2"
    assert chat.template_for_jinja(None, "pangu") == "pangu"


# --- sentencepiece (a tiny model trained here: no LLaMA tokenizer is available offline) ----

@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory) -> SentencePieceTokenizer:
    import sentencepiece as spm

    rng = random.Random(0)
    words = "the model runs on many machines and every worker holds a few blocks".split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    prefix = tmp_path_factory.mktemp("sp") / "tiny"
    # LLaMA's settings: BPE, byte fallback, no normalization, whitespace kept.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), model_type="bpe",
        vocab_size=320, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2)
    return SentencePieceTokenizer.from_file(prefix.with_suffix(".model"))


def test_sentencepiece_round_trip_and_bos(sp_tok):
    for text in ("the model runs", "many  workers\nhold blocks", "中文 and émoji 😀"):
        ids = sp_tok.encode(text)
        assert ids[0] == 1 and ids.count(1) == 1
        assert sp_tok.decode(ids) == text
    assert sp_tok.encode("the", bos=False)[0] != 1
    assert (sp_tok.kind, sp_tok.bos_id, sp_tok.eos_ids, sp_tok.add_bos) == \
        ("sentencepiece", 1, (2,), True)


def test_sentencepiece_chat_ids_match_meta(sp_tok):
    """"<s>"/"</s>" in a rendered prompt become ids 1/2, exactly Meta's turn-by-turn ids."""
    sp = sp_tok.sp
    ids = sp_tok.encode(chat.render("llama2", CONVO[1:]))
    assert ids == [1, *sp.encode("[INST] Hi [/INST] Hello! "), 2,
                   1, *sp.encode("[INST] 2+2? [/INST]")]
    atom = sp_tok.encode(chat.render("atom", CONVO[1:2]))
    assert atom == [1, *sp.encode("Human: Hi\n"), 2, 1, *sp.encode("Assistant: ")]


def test_sentencepiece_save_load(sp_tok, tmp_path):
    again = save_load(sp_tok, tmp_path)
    assert again.encode("the model 中") == sp_tok.encode("the model 中")
    with pytest.raises(TokenizerError, match="lacks eos_ids"):
        load_tokenizer(tmp_path / "tok", {"kind": "sentencepiece", "file": "tokenizer.model",
                                          "bos_id": 1, "add_bos": True, "chat_template": "plain"})
    with pytest.raises(TokenizerError, match="unknown tokenizer kind 'wordpiece'"):
        load_tokenizer(tmp_path / "tok", {"kind": "wordpiece"})


def test_stream_decoder_holds_partial_utf8(sp_tok):
    text = "the 中文 model"
    ids = sp_tok.encode(text)
    pieces = stream(sp_tok, ids)
    assert "".join(pieces) == text
    # 中 is three byte-fallback tokens: nothing comes out until the third.
    assert sum(sp_tok.sp.id_to_piece(i).startswith("<0x") for i in ids) == 6
    assert "中" in pieces and pieces.count("") >= 4


def test_folder_prefers_tokenizer_model(sp_tok, tmp_path):
    sp_tok.save(tmp_path)
    tok = tokenizer_from_folder(tmp_path, "llama")
    assert tok.kind == "sentencepiece" and tok.chat_template == "llama2"
    with pytest.raises(TokenizerError, match=re.escape(f"no tokenizer in {tmp_path / 'x'}") +
                       ".*tokenizer.model, tokenizer.json"):
        tokenizer_from_folder(tmp_path / "x", "llama")


# --- PanGu-α -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pangu() -> PanGuTokenizer:
    if not PANGU_VOCAB.is_file():
        pytest.skip(f"PanGu-α vocab not found at {PANGU_VOCAB} (shared/ beside the repo)")
    return PanGuTokenizer.from_file(PANGU_VOCAB)


@pytest.mark.parametrize("text", ["今天天气怎么样?我们去公园散步吧。",
                                  "PanGu-alpha is a Chinese language model.",
                                  "混合 English 和中文,  两个空格\n换行\n\n结束"])
def test_pangu_round_trip(pangu, text):
    ids = pangu.encode(text)
    assert pangu.decode(ids) == text
    assert ids[0] != 1  # no BOS


def test_pangu_specifics(pangu):
    assert pangu.sp.piece_to_id("<eot>") == 9 and 9 in pangu.eos_ids
    assert (pangu.kind, pangu.bos_id, pangu.add_bos, pangu.chat_template) == \
        ("pangu", None, False, "pangu")
    # PanGu-α's recipe spelled out: jieba words with ' ' and '\n' as U+2582 / U+2583,
    # joined by ' ', then SentencePiece.
    words = [w.replace(" ", "\u2582").replace("\n", "\u2583")
             for w in pangu.jieba().cut("你好 世界\n", cut_all=False)]
    assert pangu.encode("你好 世界\n") == pangu.sp.encode(" ".join(words))
    assert {3, 4} <= set(pangu.encode("a b\nc"))  # ▃ and ▂
    # The vocab normalizes NFKC: full-width punctuation comes back half-width.
    assert pangu.decode(pangu.encode("你好，世界！")) == "你好,世界!"


def test_pangu_save_load_and_stream(pangu, tmp_path):
    again = save_load(pangu, tmp_path)
    assert again.file == "vocab.model" and (tmp_path / "tok/vocab.model").is_file()
    text = "鹏程·盘古 is here,\n 你好"
    ids = again.encode(text)
    assert ids == pangu.encode(text)
    assert "".join(stream(again, ids)) == pangu.decode(ids) == text


def test_pangu_from_folder(tmp_path):
    if not PANGU_VOCAB.is_file():
        pytest.skip(f"PanGu-α vocab not found at {PANGU_VOCAB}")
    with pytest.raises(TokenizerError, match="looked for vocab.model"):
        tokenizer_from_folder(tmp_path, "pangu-alpha")
    (tmp_path / "vocab.model").write_bytes(PANGU_VOCAB.read_bytes())
    assert tokenizer_from_folder(tmp_path, "pangu-alpha").kind == "pangu"


# --- SmolLM2 byte-level BPE from the GGUF ------------------------------------------------

VARIED = [
    "Hello, world! The capital of France is Paris.",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "中文测试，你好世界。日本語のテキスト、한국어",
    "emoji 😀🎉 👍🏽 family 👨‍👩‍👧 and ✓ symbols ©®",
    "   leading, inner   runs and trailing   ", "\n\n\ttabs\t\tand\r\nCRLF\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "numbers 1234567 3.14159 x=42 2024-01-01", "don't I'll we've THEY'RE", "ünïcödé ßtraße",
    "", " ", "<|endoftext|><repo_name>x<file_sep>y",
]


@pytest.fixture(scope="module")
def smol_reader(smollm2_path):
    return gguf_reader(smollm2_path)  # the converter's, parsed once a session


@pytest.fixture(scope="module")
def smol(smol_reader):
    return tokenizer_from_gguf(smol_reader)


@pytest.fixture(scope="module")
def smol_ref(smollm2_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm2_path.parent,
                                                      gguf_file=smollm2_path.name)


def test_smollm2_matches_transformers(smol, smol_ref):
    for text in VARIED:
        assert smol.encode(text) == smol_ref.encode(text, add_special_tokens=False), text
        assert smol.decode(smol.encode(text)) == text
    assert smol.encode("<|im_start|>") == [1]
    assert (smol.kind, smol.vocab_size, smol.bos_id, smol.eos_ids, smol.add_bos) == \
        ("bpe", 49152, 1, (2,), False)


def test_smollm2_splits_digits_like_llama_cpp(smol):
    """The one place we part from transformers: the GGUF says pre="smollm", which llama.cpp
    splits digits-first (as SmolLM2's own tokenizer.json does); transformers ignores it. The
    vocab shows the training split: no token joins a digit to anything, not even "Ġ1"."""
    vocab = smol.tok.get_vocab()
    assert [t for t in vocab if re.search("[0-9]", t) and len(t) > 1] == []
    space, two_spaces = smol.tok.token_to_id("Ġ"), smol.tok.token_to_id("ĠĠ")
    assert smol.encode("a  1")[1:] == [two_spaces, smol.tok.token_to_id("1")]
    assert two_spaces != space


def test_smollm2_chat_template_matches_gguf_jinja(smol, smol_reader):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from llm_shard.models.text.tokenizer import _gguf_value

    source = _gguf_value(smol_reader, "tokenizer.chat_template")
    assert chat.SMOLLM_SYSTEM in source and smol.chat_template == "smollm2"
    jinja = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = jinja.from_string(source)
    for messages in (CONVO, CONVO[1:], CONVO[1:2], CONVO[1:3], []):
        for gen in (True, False):
            assert smol.render_chat(messages, gen) == template.render(
                messages=messages, add_generation_prompt=gen)


def test_smollm2_save_load_stream(smol, tmp_path):
    again = save_load(smol, tmp_path)
    text = "héllo 😀 世界 <|im_end|>"
    ids = again.encode(text)
    assert ids == smol.encode(text)
    pieces = stream(again, ids)
    assert "".join(pieces) == text and "" in pieces[:-1]  # the emoji spans byte tokens


def test_bpe_from_hf_folder(smol, tmp_path):
    import json

    smol.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
         "chat_template": "{{ '<|im_start|>' }}"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = tokenizer_from_folder(tmp_path, "llama")
    assert (tok.kind, tok.bos_id, tok.eos_ids, tok.add_bos, tok.chat_template) == \
        ("bpe", 1, (2, 0), False, "chatml")
    assert tok.encode(VARIED[0]) == smol.encode(VARIED[0])
