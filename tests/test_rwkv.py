"""RWKV-4 parity: a tiny random config through `convert` vs transformers' RwkvForCausalLM
(rescale_every=0), from the Hugging Face layout and from ChatRWKV's .pth layout; the
recurrent state in SequenceCache; split = unsplit."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import RWKV_HIDDEN as HIDDEN
from conftest import RWKV_LAYERS as LAYERS
from conftest import RWKV_VOCAB as VOCAB
from conftest import hf_rwkv, random_ids

from llm_shard.models.archs.rwkv import STATE_SLOTS, config_from_pth
from llm_shard.models.cache import Batch, SequenceCache
from llm_shard.models.checkpoint.convert import convert
from llm_shard.models.runner import LocalModel, StageModel
from llm_shard.models.text import chat

transformers = pytest.importorskip("transformers")


def ids(n: int, seed: int = 1) -> list[int]:
    return random_ids(n, seed, 0, VOCAB)


def to_pth(sd: dict) -> dict:
    """Hugging Face keys -> ChatRWKV's (the inverse of transformers' conversion script)."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("rwkv.").replace("embeddings.", "emb.").replace("pre_ln", "ln0")
        k = k.replace(".attention.", ".att.").replace(".feed_forward.", ".ffn.")
        k = re.sub(r"time_mix_(key|value|receptance)$", lambda m: "time_mix_" + m[1][0], k)
        out[k] = v.clone()
    return out


@pytest.fixture(scope="module")
def rwkv(tmp_path_factory):
    root = tmp_path_factory.mktemp("rwkv")
    model = hf_rwkv()
    model.save_pretrained(root / "hf")
    return model, convert(root / "hf", root / "fp32", dtype="fp32", progress=False), root


def test_logits_match_transformers(rwkv):
    model, store, _ = rwkv
    assert store.manifest["arch"] == "rwkv"
    seq = ids(40)
    with torch.no_grad():
        ref = model(torch.tensor([seq])).logits[0]
    torch.testing.assert_close(LocalModel(store).logits(seq), ref, atol=1e-4, rtol=0)


def test_pth_layout_gives_the_same_store(rwkv):
    model, store, root = rwkv
    (root / "pth").mkdir()
    torch.save(to_pth(model.state_dict()), root / "pth" / "RWKV-4-tiny.pth")
    other = convert(root / "pth", root / "from-pth", dtype="fp32", progress=False)
    assert other.manifest["source"]["layout"] == "pth" and other.manifest["arch"] == "rwkv"
    assert other.config == store.config
    assert [f["sha256"] for f in other.manifest["files"]] == \
        [f["sha256"] for f in store.manifest["files"]]


def test_config_from_pth_shapes():
    shapes = {"emb.weight": (50277, 4096), "blocks.0.ffn.key.weight": (16384, 4096)}
    shapes |= {f"blocks.{i}.ln1.weight": (4096,) for i in range(32)}
    assert config_from_pth(shapes) == {"vocab_size": 50277, "hidden_size": 4096,
                                       "num_hidden_layers": 32, "intermediate_size": 16384}


def test_state_decode_equals_full_forward(rwkv):
    model, store, _ = rwkv
    stage, cache = StageModel(store, 0, LAYERS), SequenceCache()
    seq = ids(12, seed=2)
    full = LocalModel(store).logits(seq)
    got = [stage(torch.tensor(seq[:5]), Batch.of([5], [cache]), all_logits=True)]
    for t in seq[5:]:
        got.append(stage(torch.tensor([t]), Batch.of([1], [cache])))
    torch.testing.assert_close(torch.cat(got), full, atol=1e-5, rtol=0)
    assert set(cache.states) == set(range(LAYERS)) and not cache.layers
    assert cache.nbytes == LAYERS * STATE_SLOTS * HIDDEN * 4 == \
        LAYERS * store.config.state_bytes_per_sequence
    assert Batch.of([1], [cache]).positions.tolist() == [len(seq)]
    with pytest.raises(ValueError, match="cannot forget"):
        cache.trim(1)
    # greedy with the state, against transformers' own generate (which uses its state)
    prompt = ids(5, seed=3)
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                             min_new_tokens=10)
    assert LocalModel(store).greedy(prompt, max_tokens=10) == ref[0, len(prompt):].tolist()


def run_stages(stages, chunks):
    caches = [[SequenceCache() for _ in chunks[0]] for _ in stages]
    out = []
    for step in chunks:
        x = torch.tensor([t for seq in step for t in seq])
        for stage, own in zip(stages, caches):
            x = stage(x, Batch.of([len(s) for s in step], own), all_logits=True)
        out.append(x)
    return out


@pytest.mark.parametrize("k", [1, 2, 3])
def test_split_equals_unsplit_with_a_batch(rwkv, k):
    _, store, _ = rwkv
    chunks = [[ids(6, 4), ids(3, 5), ids(1, 6)], [ids(1, 7), ids(2, 8), ids(1, 9)]]
    whole = run_stages([StageModel(store, 0, LAYERS)], chunks)
    split = run_stages([StageModel(store, 0, k), StageModel(store, k, LAYERS)], chunks)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # batching changes nothing: each sequence alone gives the same rows
    for j in range(3):
        alone = run_stages([StageModel(store, 0, LAYERS)], [[chunks[0][j]], [chunks[1][j]]])
        for step, (a, b) in enumerate(zip(alone, whole)):
            mine = torch.split(b, [len(q) for q in chunks[step]])[j]
            torch.testing.assert_close(a, mine, atol=1e-5, rtol=0)


def test_rwkv_templates():
    one = [{"role": "user", "content": "hi"}]
    assert chat.render("rwkv-raven", one) == "Bob: hi\n\nAlice:"
    assert chat.render("rwkv-world", one) == "User: hi\n\nAssistant:"


def test_raven_tokenizer_beside_a_pth(tmp_path):
    """ChatRWKV's 20B_tokenizer.json beside a .pth (a byte-level BPE written here): its ids,
    <|endoftext|> (id 0) ends a turn, nothing is prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from llm_shard.models.text.tokenizer import tokenizer_from_folder

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["Bob: hello there\n\nAlice: hi, how are you?"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(str(tmp_path / "20B_tokenizer.json"))
    tok = tokenizer_from_folder(tmp_path, "rwkv")
    text = "Bob: hello\n\nAlice:"
    assert tok.encode(text) == bpe.encode(text).ids and tok.decode(tok.encode(text)) == text
    assert tok.eos_ids == (0,) and bpe.token_to_id("<|endoftext|>") == 0
    assert tok.bos_id is None and tok.chat_template == "rwkv-raven"
