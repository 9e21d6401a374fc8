"""MOSS parity: a tiny random CodeGen config through `convert` vs transformers'
CodeGenForCausalLM (same names and maths as MOSS's modeling_moss.py), plus cache, split,
int8, the GPT-2 BPE tokenizer files and the chat template."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MOSS_VOCAB as VOCAB
from conftest import hf_codegen, random_ids

from llm_shard.models.cache import Batch, SequenceCache
from llm_shard.models.checkpoint.convert import convert
from llm_shard.models.runner import LocalModel, StageModel
from llm_shard.models.text import chat
from llm_shard.models.text.tokenizer import load_tokenizer, tokenizer_from_folder

transformers = pytest.importorskip("transformers")


def ids(n: int, seed: int = 1) -> list[int]:
    return random_ids(n, seed, 0, VOCAB)


@pytest.fixture(scope="module")
def moss(tmp_path_factory):
    """(HF model, fp32 store, int8 store)."""
    root = tmp_path_factory.mktemp("moss")
    model = hf_codegen()
    model.save_pretrained(root / "hf")
    fp32 = convert(root / "hf", root / "fp32", arch="moss", dtype="fp32", progress=False)
    int8 = convert(root / "hf", root / "int8", arch="moss", dtype="int8", progress=False)
    return model, fp32, int8


@pytest.mark.parametrize("rotary_dim", [4, 8])  # 8 = the whole head: no pass-through dims
def test_logits_match_transformers(tmp_path, rotary_dim):
    model = hf_codegen(seed=rotary_dim, rotary_dim=rotary_dim)
    model.save_pretrained(tmp_path / "hf")
    store = convert(tmp_path / "hf", tmp_path / "store", dtype="fp32", progress=False)
    assert store.manifest["arch"] == "moss"  # found from config.json's model_type "codegen"
    seq = ids(30)
    with torch.no_grad():
        ref = model(torch.tensor([seq])).logits[0]
    torch.testing.assert_close(LocalModel(store).logits(seq), ref, atol=1e-4, rtol=0)


def test_cached_decoding_equals_recompute(moss):
    model, store, _ = moss
    ours = LocalModel(store)
    prompt = ids(6, seed=2)
    generated = ours.greedy(prompt, max_tokens=12)
    seq = list(prompt)
    for token in generated:
        assert int(ours.logits(seq)[-1].argmax()) == token
        seq.append(token)
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                             min_new_tokens=12)
    assert ref[0, len(prompt):].tolist() == generated


def run_stages(stages: list[StageModel], chunks: list[list[list[int]]]) -> list[torch.Tensor]:
    """Feed chunks[step][seq] through the stages, each stage with its own caches; returns
    the last stage's logits (sequences, vocab) per step."""
    caches = [[SequenceCache() for _ in chunks[0]] for _ in stages]
    out = []
    for step in chunks:
        x = torch.tensor([t for seq in step for t in seq])
        for stage, own in zip(stages, caches):
            x = stage(x, Batch.of([len(s) for s in step], own))
        out.append(x)
    return out


@pytest.mark.parametrize("k", [1, 2, 3])
def test_split_equals_unsplit(moss, k):
    _, store, _ = moss
    whole = [StageModel(store, 0, 4)]
    split = [StageModel(store, 0, k), StageModel(store, k, 4)]
    chunks = [[ids(7, 3), ids(4, 4)], [ids(1, 5), ids(2, 6)], [ids(1, 7), ids(1, 8)]]
    for a, b in zip(run_stages(whole, chunks), run_stages(split, chunks)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_int8_top1_agreement(moss):
    _, fp32, int8 = moss
    seq = ids(60, seed=9)
    a, b = LocalModel(fp32).logits(seq), LocalModel(int8).logits(seq)
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    print(f"MOSS tiny config: int8 vs fp32 top-1 agreement {agree:.3f} over {len(seq)} tokens")
    assert agree >= 0.9


# ---- tokenizer and template

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


ADDED = ["<|endoftext|>", "<|Human|>", "<eoh>", "<|MOSS|>", "<eom>"]


def write_moss_tokenizer(folder):
    """A tiny tokenizer in MOSS's file format: vocab.json, merges.txt, added_tokens.json."""
    folder.mkdir()
    chars = list(bytes_to_unicode().values())
    merges = [("Ġ", "h"), ("Ġh", "i"), ("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"),
              ("ä", "½"), ("ä½", "ł")]
    vocab = {c: i for i, c in enumerate(chars)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    added = {t: len(vocab) + i for i, t in enumerate(ADDED)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges)
                                       + "\n", encoding="utf-8")
    (folder / "added_tokens.json").write_text(json.dumps(added), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<eom>", "unk_token": "<|endoftext|>",
         "add_bos_token": False}))
    return added


def test_gpt2_files_tokenizer_matches_transformers(tmp_path):
    added = write_moss_tokenizer(tmp_path / "tok")
    ours = tokenizer_from_folder(tmp_path / "tok", "moss")
    assert ours.kind == "bpe" and ours.chat_template == "moss"
    assert ours.eos_ids == (added["<eom>"],) and ours.bos_id == added["<|endoftext|>"]
    ref = transformers.GPT2Tokenizer(str(tmp_path / "tok" / "vocab.json"),
                                     str(tmp_path / "tok" / "merges.txt"))
    ref.add_special_tokens({"additional_special_tokens": ADDED})
    text = chat.render("moss", [{"role": "system", "content": "hello  you"},
                                {"role": "user", "content": "hi 你好\n x"}])
    assert text == "hello  you<|Human|>: hi 你好\n x<eoh>\n<|MOSS|>:"
    got = ours.encode(text)
    assert got == ref.encode(text)
    assert ours.decode(got) == text
    assert got[-2:] == [added["<|MOSS|>"], ours.tok.token_to_id(":")]
    assert added["<eoh>"] in got
    store_dir = tmp_path / "saved"
    again = load_tokenizer(store_dir, ours.save(store_dir))
    assert again.encode(text) == got and again.eos_ids == ours.eos_ids


def test_moss_template_turns():
    text = chat.render("moss", [{"role": "user", "content": "a"},
                                {"role": "assistant", "content": "b"},
                                {"role": "user", "content": "c"}])
    assert text.startswith(chat.MOSS_SYSTEM)
    assert text[len(chat.MOSS_SYSTEM):] == ("<|Human|>: a<eoh>\n<|MOSS|>: b<eom>\n"
                                           "<|Human|>: c<eoh>\n<|MOSS|>:")
    assert "<eom>" in chat.stop_strings("moss")
