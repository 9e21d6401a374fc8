"""CPM-2 parity: tiny random T5 v1.1 configs through `convert` from saved folders vs
transformers' T5ForConditionalGeneration (tied as transformers v5 saves it, with and without
output scaling, and untied as CPM-2 and v4 checkpoints are), cached decoding, splits over
the encoder/decoder boundary, int8, and the jieba + WordPiece tokenizer with BMInf's
generation and blank-filling prompts."""

from __future__ import annotations

import pytest
import torch
from conftest import CPM2_DEC as DEC
from conftest import CPM2_ENC as ENC
from conftest import CPM2_VOCAB as VOCAB
from conftest import START, chain, greedy_through, hf_t5, random_ids, save_untied

from llm_shard.models import get_arch
from llm_shard.models.archs.cpm2.model import CPM2Config, relative_bucket
from llm_shard.models.archs.cpm2.tokenizer import CPM2Tokenizer, half_width
from llm_shard.models.base import Part
from llm_shard.models.cache import Batch, Prefix, SequenceCache
from llm_shard.models.checkpoint.catalog import CATALOG, resolve
from llm_shard.models.checkpoint.convert import convert
from llm_shard.models.checkpoint.store import Store, StoreError
from llm_shard.models.runner import LocalModel, StageModel
from llm_shard.models.text.tokenizer import load_tokenizer, tokenizer_from_folder

transformers = pytest.importorskip("transformers")


def ids(n: int, seed: int = 1) -> list[int]:  # never 0 (the decoder start) nor 1 (eos)
    return random_ids(n, seed, 2, VOCAB)


@pytest.fixture(scope="module")
def cpm2(tmp_path_factory):
    """(HF model, fp32 store, int8 store), untied."""
    root = tmp_path_factory.mktemp("cpm2")
    model = hf_t5()
    save_untied(model, root / "hf")
    fp32 = convert(root / "hf", root / "fp32", dtype="fp32", progress=False)
    int8 = convert(root / "hf", root / "int8", dtype="int8", progress=False)
    return model, fp32, int8


def reference(model, enc: list[int], dec: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([enc]), decoder_input_ids=torch.tensor([dec])).logits[0]


def our_logits(model: LocalModel, enc: list[int], dec: list[int]) -> torch.Tensor:
    """Decoder rows' logits of one forward pass over encoder input + decoder prompt."""
    return model.logits(enc + dec)[len(enc):]


@pytest.mark.parametrize("case", ["v4-untied", "v5-tied", "v5-tied-scaled"])
def test_logits_match_transformers(tmp_path, case):
    model = hf_t5(seed=3, untied=case == "v4-untied", scaled=case == "v5-tied-scaled")
    if case == "v4-untied":
        save_untied(model, tmp_path / "hf")
    else:
        model.save_pretrained(tmp_path / "hf")  # ties: no lm_head.weight in the file
    store = convert(tmp_path / "hf", tmp_path / "store", dtype="fp32", progress=False)
    assert store.manifest["arch"] == "cpm2"  # found from config.json's model_type "t5"
    assert store.config.tie_word_embeddings == (case != "v4-untied")
    assert store.config.scale_decoder_outputs == (case == "v5-tied-scaled")
    worst, ours = 0.0, LocalModel(store)
    for n_enc, n_dec, seed in ((20, 9, 1), (1, 1, 2), (5, 16, 3)):  # beyond max_distance 12
        enc, dec = ids(n_enc, seed), [START, *ids(n_dec - 1, seed + 10)]
        ref, got = reference(model, enc, dec), our_logits(ours, enc, dec)
        worst = max(worst, (got - ref).abs().max().item())
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    print(f"CPM-2 {case}: max |logit - transformers| = {worst:.2e}")


def test_relative_buckets_match_transformers():
    rel = torch.arange(-300, 300)[None, :]
    bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 12)):
            assert torch.equal(relative_bucket(rel, bidirectional, buckets, distance),
                               bucket(rel, bidirectional, buckets, distance))


def test_cached_decoding_equals_recompute_and_transformers(cpm2):
    model, store, _ = cpm2
    ours = LocalModel(store)
    enc = ids(11, seed=4)
    generated = ours.greedy(enc + [START], max_tokens=8)
    dec = [START]
    for token in generated:  # each cached step = a full recompute of encoder + decoder
        assert int(ours.logits(enc + dec)[-1].argmax()) == token
        dec.append(token)
    model.generation_config.eos_token_id = None  # (min_new_tokens would mask eos instead)
    with torch.no_grad():
        ref = model.generate(torch.tensor([enc]), max_new_tokens=8, do_sample=False)
    assert ref[0, 1:].tolist() == generated


def test_the_cache_holds_cross_and_self_kv(cpm2):
    _, store, _ = cpm2
    stage, cache = StageModel(store, 0, ENC + DEC), SequenceCache(kv_dtype="fp32")
    enc = ids(7, seed=5)
    stage(torch.tensor(enc + [START]), Batch.of([8], [cache]))
    stage(torch.tensor([5]), Batch.of([1], [cache]))
    assert cache.prefix == Prefix(7, 7)
    assert set(cache.states) == set(cache.layers) == set(range(ENC, ENC + DEC))  # decoder only
    assert all(cache.state(i).value.shape == (2, 4, 7, 8) for i in cache.states)
    assert all(cache.layer(i).offset == 2 for i in cache.layers)  # two decoder tokens
    with pytest.raises(ValueError, match="decoder start token"):
        stage(torch.tensor(enc), Batch.of([7], [SequenceCache(kv_dtype="fp32")]))
    lonely = StageModel(store, ENC, ENC + DEC, embed=False)
    with pytest.raises(ValueError, match="no encoder states"):
        lonely(torch.zeros(1, 32), Batch.of([1], [SequenceCache(kv_dtype="fp32")]))


def run_stages(stages: list[StageModel], chunks: list[list[list[int]]]) -> list[torch.Tensor]:
    """Steps through stages as the pipeline runs them: each stage has its own caches, and
    the prefixes the first stage found travel with the step that starts a sequence."""
    caches = [[SequenceCache(kv_dtype="fp32") for _ in chunks[0]] for _ in stages]
    out = []
    for step in chunks:
        x, prefixes = torch.tensor([t for seq in step for t in seq]), None
        for stage, own in zip(stages, caches):
            batch = Batch.of([len(s) for s in step], own, prefixes)
            x = stage(x, batch, all_logits=True)
            prefixes = batch.prefixes
        out.append(x)
    return out


@pytest.mark.parametrize("k", [ENC - 1, ENC + 1])  # the seam itself: the stage-runner test
def test_split_equals_unsplit_with_a_batch(cpm2, k):
    _, store, _ = cpm2
    n = ENC + DEC
    chunks = [[ids(9, 6) + [START, 7], ids(4, 7) + [START]], [[8], [9]], [[10], [11]]]
    whole = run_stages([StageModel(store, 0, n)], chunks)
    split = run_stages([StageModel(store, 0, k), StageModel(store, k, n)], chunks)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for j in range(2):  # batching changes nothing: each sequence alone gives the same rows
        alone = run_stages([StageModel(store, 0, n)], [[c[j]] for c in chunks])
        for step, (a, b) in enumerate(zip(alone, whole)):
            mine = torch.split(b, [len(s) for s in chunks[step]])[j]
            torch.testing.assert_close(a, mine, atol=1e-5, rtol=0)


def test_a_sequence_starts_beside_one_that_decodes(cpm2):
    """Continuous batching: B's encoder input and prompt share a step with A's next token."""
    _, store, _ = cpm2
    stages = [StageModel(store, 0, ENC), StageModel(store, ENC, ENC + DEC)]
    a, b = ids(8, 60) + [START], ids(5, 61) + [START]

    def step(rows: list[list[int]], caches: list[list[SequenceCache]]) -> torch.Tensor:
        x, prefixes = torch.tensor(sum(rows, [])), None
        for stage, own in zip(stages, caches):
            batch = Batch.of([len(r) for r in rows], own, prefixes)
            x, prefixes = stage(x, batch), batch.prefixes
        return x

    ca, cb = ([SequenceCache(kv_dtype="fp32") for _ in range(2)],
              [SequenceCache(kv_dtype="fp32") for _ in range(2)])
    step([a], [[c] for c in ca])
    both = step([[7], b], [[x, y] for x, y in zip(ca, cb)])
    alone_a = LocalModel(store).logits(a + [7])[-1]
    alone_b = LocalModel(store).logits(b)[-1]
    torch.testing.assert_close(both, torch.stack((alone_a, alone_b)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bounds", [[0, ENC, ENC + DEC], [0, 2, 4, ENC + DEC]])
def test_stage_runners_give_the_unsplit_tokens(cpm2, bounds):
    """worker/stage.py's StageRunner as it is, stages chained over the wire format: the
    prefix the first stage finds travels in the step's `prefixes` field, so a CPM-2 prompt
    (encoder input + <s>) needs nothing more from the pipeline."""
    _, store, _ = cpm2
    prompts = [ids(6, 50) + [START], ids(3, 51) + [START, 9], ids(13, 52) + [START]]
    want = [LocalModel(store).greedy(p, 5) for p in prompts]
    assert greedy_through(chain(store, bounds), prompts, 5) == want


def test_int8_top1_agreement(cpm2):
    model, fp32, int8 = cpm2
    assert int8.manifest["quantization"]["lm_head"] == "int8"  # untied: the head is int8 too
    agree, total, fp32, int8 = 0, 0, LocalModel(fp32), LocalModel(int8)
    for seed in range(4):
        enc, dec = ids(24, 20 + seed), [START, *ids(15, 30 + seed)]
        a, b = our_logits(fp32, enc, dec), our_logits(int8, enc, dec)
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(dec)
    rate = agree / total
    print(f"CPM-2 tiny config: int8 vs fp32 top-1 agreement {rate:.3f} over {total} tokens")
    assert rate >= 0.9


def test_a_worker_can_time_every_block(cpm2):
    """worker/actor.py times a block with one row and Prefix(1, 0) on a fresh cache."""
    _, store, _ = cpm2
    for i in (0, ENC - 1, ENC):
        block = store.load(Part("block", i))
        with torch.inference_mode():
            out = block(torch.randn(1, 32),
                        Batch.of([1], [SequenceCache(kv_dtype="fp32")], [Prefix(1, 0)]))
        assert out.shape == (1, 32) and torch.isfinite(out).all()


# ---- BMInf's own checkpoint format

def quantize_like_bminf(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w.abs().amax(1) / 127).half()
    return torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8), scale


def write_bminf(path, params: dict[str, torch.Tensor]) -> None:
    """BMInf's Layer.dump: per layer (n_params, n_sublayers), its parameters, its sublayers."""
    import struct

    tree: dict = {}
    for key, t in params.items():
        *layers, leaf = key.split(".")
        node = tree
        for name in layers:
            node = node.setdefault(name, {})
        node[leaf] = t

    def string(s: str) -> bytes:
        return struct.pack("<I", len(s.encode())) + s.encode()

    def dump(node: dict) -> bytes:
        leaves = {k: v for k, v in node.items() if isinstance(v, torch.Tensor)}
        subs = {k: v for k, v in node.items() if isinstance(v, dict)}
        out = struct.pack("<II", len(leaves), len(subs))
        for k, t in leaves.items():
            data = t.contiguous().numpy().tobytes()
            out += string(k) + struct.pack(f"<B{t.dim()}I", t.dim(), *t.shape)
            out += struct.pack("<IB", len(data), 0 if t.dtype == torch.int8 else 1) + data
        return out + b"".join(string(k) + dump(v) for k, v in subs.items())

    path.write_bytes(dump(tree))


def as_bminf(model) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """BMInf's tensors for a tiny HF T5 (int8 Linears with fp16 scales, fp16 the rest), and
    sets the HF model's weights to exactly what they hold. Also returns {hf key: (q, scale)}."""
    sd, params, quantized = model.state_dict(), {}, {}

    def linear(ours: str, hf: str) -> None:
        q, scale = quantize_like_bminf(sd[hf])
        sd[hf].copy_(q.float() * scale.float()[:, None])
        params[ours + ".weight"], params[ours + ".scale"] = q, scale
        quantized[hf] = (q, scale)

    def half(ours: str, hf: str, transpose: bool = False) -> None:
        sd[hf].copy_(sd[hf].half().float())
        params[ours] = (sd[hf].t() if transpose else sd[hf]).half().contiguous()

    att = {"q": "project_q", "k": "project_k", "v": "project_v", "o": "linear_out"}
    ff = {"wi_0": "linear_in", "wi_1": "linear_gated", "wo": "linear_out"}
    for stack, ours, n in (("encoder", "enc_layers", ENC), ("decoder", "dec_layers", DEC)):
        for i in range(n):
            p, b = f"{stack}.block.{i}.layer.", f"{ours}.{i}."
            norms = ["ln_attn", "ln_ff"] if stack == "encoder" else [
                "ln_attn", "ln_cross_attn", "ln_ff"]
            for j, ln in enumerate(norms):
                half(b + ln + ".weight", f"{p}{j}.layer_norm.weight")
            for hf, bm in att.items():
                linear(f"{b}self_attn.{bm}", f"{p}0.SelfAttention.{hf}.weight")
                if stack == "decoder":
                    linear(f"{b}cross_attn.{bm}", f"{p}1.EncDecAttention.{hf}.weight")
            for hf, bm in ff.items():
                linear(f"{b}ff.{bm}", f"{p}{len(norms) - 1}.DenseReluDense.{hf}.weight")
    half("ln_enc.weight", "encoder.final_layer_norm.weight")
    half("ln_dec.weight", "decoder.final_layer_norm.weight")
    half("input_embedding.weight", "shared.weight")
    half("output_embedding.weight", "lm_head.weight")
    for stack in ("enc", "dec"):
        half(f"position_bias_{stack}.weight", f"{stack}oder.block.0.layer.0.SelfAttention."
             "relative_attention_bias.weight", transpose=True)
    return params, quantized


def test_bminf_checkpoint_gives_the_same_store(tmp_path):
    model = hf_t5(seed=5)
    model.config.relative_attention_num_buckets = 8  # BMInf's file records buckets ...
    model.config.relative_attention_max_distance = 128  # ... but not max_distance: 128
    for blk in (model.encoder.block[0], model.decoder.block[0]):
        blk.layer[0].SelfAttention.relative_attention_max_distance = 128
    params, quantized = as_bminf(model)
    (tmp_path / "bminf").mkdir()
    write_bminf(tmp_path / "bminf" / "checkpoint.pt", params)
    v = write_vocab(tmp_path / "bminf")
    model.config.decoder_start_token_id = v["<s>"]
    save_untied(model, tmp_path / "hf")
    hf = convert(tmp_path / "hf", tmp_path / "from-hf", dtype="fp32", progress=False)
    bm = convert(tmp_path / "bminf", tmp_path / "from-bminf", dtype="fp32", progress=False)
    assert bm.manifest["source"]["layout"] == "bminf" and bm.manifest["arch"] == "cpm2"
    assert bm.config == hf.config and bm.manifest["tokenizer"]["kind"] == "cpm2"
    assert [f["sha256"] for f in bm.manifest["files"]] == \
        [f["sha256"] for f in hf.manifest["files"]]
    enc, dec = ids(9, 40), [v["<s>"], *ids(5, 41)]
    torch.testing.assert_close(our_logits(LocalModel(bm), enc, dec), reference(model, enc, dec),
                               atol=1e-4, rtol=0)
    # int8: BMInf's integers and scales come back exactly
    int8 = convert(tmp_path / "bminf", tmp_path / "int8", dtype="int8", rounding="nearest",
                   progress=False)
    block = int8.tensors(Part("block", ENC))
    q, scale = quantized["decoder.block.0.layer.1.EncDecAttention.k.weight"]
    assert torch.equal(block["layer.1.EncDecAttention.k.weight"], q)
    assert torch.equal(block["layer.1.EncDecAttention.k.scales"], scale.float())


def test_a_damaged_bminf_file_is_named(tmp_path):
    from llm_shard.models.checkpoint.sources import SourceError, open_source

    path = tmp_path / "checkpoint.pt"
    write_bminf(path, {"enc_layers.0.ln_attn.weight": torch.ones(4).half(),
                       **{f"x{i}.weight": torch.ones(1).half() for i in range(7)}})
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(SourceError, match="checkpoint.pt"):
        open_source(path)


# ---- config

def test_config_reads_t5_tie_and_scale_semantics():
    arch = get_arch("t5")
    assert arch.name == "cpm2" and get_arch("cpm2") is arch and get_arch("mt5") is arch
    v4_untied = CPM2Config.from_dict({"model_type": "t5", "tie_word_embeddings": False})
    assert not v4_untied.tie_word_embeddings and not v4_untied.scale_decoder_outputs
    v4_t5 = CPM2Config.from_dict({"model_type": "t5"})  # original T5: tied and scaled
    assert v4_t5.tie_word_embeddings and v4_t5.scale_decoder_outputs
    v5 = CPM2Config.from_dict({"model_type": "t5", "tie_word_embeddings": True,
                               "scale_decoder_outputs": False, "pad_token_id": 0})
    assert v5.tie_word_embeddings and not v5.scale_decoder_outputs
    assert v5.decoder_start_token_id == 0
    cpm2 = CPM2Config()  # CPM-2's sizes: 24 + 24 blocks in one index space
    assert cpm2.n_blocks == 48 and not cpm2.tie_word_embeddings and cpm2.max_context is None
    assert cpm2.cache_bytes_per_token_per_block == (0,) * 24 + (2 * 64 * 64 * 4,) * 24
    assert CPM2Config.from_dict(cpm2.to_dict()) == cpm2
    with pytest.raises(ValueError, match="gated-gelu"):
        CPM2Config(feed_forward_proj="relu")


def test_cpm2_is_a_catalog_name(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_SHARD_HOME", str(tmp_path))
    assert CATALOG["cpm2"].arch == "cpm2"
    with pytest.raises(StoreError, match="--arch cpm2"):
        resolve("cpm2")


# ---- tokenizer and prompt templates

WORDS = ["今天", "天气", "很", "好", "你好", "北京", "天安门", "我", "爱", "的", "模型", "清华",
         "大学", "h", "he", "hell", "hello", "w", "o", "r", "l", "d", "world", "A", "B", "C",
         "，", "-", "2", "\u2582", "\u2583"]


def write_vocab(folder):
    """A tiny vocab.txt in CPM-2's format (its specials, the 190 sentinels, some words)."""
    folder.mkdir(exist_ok=True)
    pieces = ["<pad>", "<unk>", "<s>", "</s>", "<eod>", "<sep>",
              *(f"<s_{i}>" for i in range(190)), *WORDS]
    (folder / "vocab.txt").write_text("\n".join(pieces) + "\n\n", encoding="utf-8")
    return {p: i for i, p in enumerate(pieces)}


def test_tokenizer_pieces_and_round_trip(tmp_path):
    v = write_vocab(tmp_path / "tok")
    tok = tokenizer_from_folder(tmp_path / "tok", "cpm2")
    assert isinstance(tok, CPM2Tokenizer) and tok.vocab_size == len(v)
    assert tok.bos_id == v["<s>"] and tok.eos_ids == (v["<eod>"],)
    assert "".join(map(half_width, "ＡＢＣ１，\u3000")) == "ABC1， "
    # jieba: 今天天气|很|好 then greedy pieces; full-width ASCII becomes half-width
    assert tok.encode("今天天气很好", bos=False) == [v["今天"], v["天气"], v["很"], v["好"]]
    assert tok.encode("ＡＢ", bos=False) == [v["A"], v["B"]]
    # spaces and newlines are pieces of their own (▂ ▃); unknown characters are <unk>
    got = tok.encode("hello world\n你好!", bos=False)
    assert got == [v["hello"], v["\u2582"], v["world"], v["\u2583"], v["你好"], v["<unk>"]]
    assert tok.decode(got) == "hello world\n你好<unk>"
    text = "我爱北京天安门\n清华大学的模型 hello"
    assert tok.decode(tok.encode(text, bos=False)) == text


def test_generation_and_blank_templates(tmp_path):
    v = write_vocab(tmp_path / "tok")
    tok = CPM2Tokenizer.from_file(tmp_path / "tok" / "vocab.txt")
    # BMInf generate(): encoder "text <s_189>", decoder prompt "<s> <s_189>", stop at <eod>
    assert tok.encode("你好") == [v["你好"], v["<s_189>"], v["<s>"], v["<s_189>"]]
    # BMInf fill_blank(): each <span> is the next sentinel, decoder prompt "<s> <s_0>"
    prompt = tok.encode("今天<span>很好，<span>")
    assert prompt == [v["今天"], v["<s_0>"], v["很"], v["好"], v["，"], v["<s_1>"],
                      v["<s>"], v["<s_0>"]]
    assert tok.fill_blank_stop(prompt) == v["<s_2>"]
    answer = [v["天气"], v["<s_1>"], v["你好"], v["<s_2>"]]
    assert tok.blanks(answer) == [[v["天气"]], [v["你好"]], []]
    # specials written in the text are whole tokens; a text holding <s> is a full prompt
    full = tok.encode("你好<s_189><s><s_189>")
    assert full == [v["你好"], v["<s_189>"], v["<s>"], v["<s_189>"]]
    # the embedding finds the encoder input: everything before the first <s>
    cfg = CPM2Config(vocab_size=len(v), d_model=8, d_kv=2, d_ff=8, num_layers=1, num_heads=4,
                     decoder_start_token_id=v["<s>"])
    embed = get_arch("cpm2").embed(cfg)
    batch = Batch.of([len(prompt)], [SequenceCache(kv_dtype="fp32")])
    embed(torch.tensor(prompt), batch)
    assert batch.prefixes == [Prefix(6, 6)]
    saved = load_tokenizer(tmp_path / "store", tok.save(tmp_path / "store"))
    assert saved.encode("今天<span>很好，<span>") == prompt and saved.eos_ids == tok.eos_ids


def test_a_vocab_without_sentinels_is_refused(tmp_path):
    (tmp_path / "vocab.txt").write_text("<unk>\n<s>\n<eod>\na\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not CPM-2's vocabulary"):
        CPM2Tokenizer.from_file(tmp_path / "vocab.txt")


def test_convert_keeps_the_tokenizer(cpm2, tmp_path):
    model, _, _ = cpm2
    save_untied(model, tmp_path / "hf")
    write_vocab(tmp_path / "hf")
    store = convert(tmp_path / "hf", tmp_path / "store", dtype="fp32", progress=False)
    assert store.manifest["tokenizer"]["kind"] == "cpm2"
    tok = Store.open(store.path).tokenizer()
    assert tok.encode("你好", bos=False) == tokenizer_from_folder(tmp_path / "hf", "cpm2").encode(
        "你好", bos=False)
