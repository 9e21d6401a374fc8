"""The prefix cache (issue #37): the index alone (coordinator/prefix.py); stages that start
a sequence from a copy of a finished one's rows (Step.reuse, worker/stage.py,
models/cache.py copy_prefix); and chats through the real pipeline (Ray + ZeroMQ,
SmolLM2-135M, 2 workers) whose greedy output is the same with the cache and without,
while it is hit, shared by sequences running together, and evicted under a small budget."""

from __future__ import annotations

import pytest
import torch
from conftest import chain, hf_rwkv, random_ids, run, step

from llm_shard.cluster.types import SamplingParams
from llm_shard.coordinator.prefix import MIN_TOKENS, PrefixIndex, common_prefix, refusal
from llm_shard.models.cache import KVCache, Prefix, SequenceCache, copy_prefix
from llm_shard.worker.stage import StageError

GREEDY = SamplingParams(max_tokens=10, temperature=0)


# ---------------------------------------------------------------------- the index

def ids(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def test_common_prefix():
    a = torch.tensor([1, 2, 3, 4])
    assert common_prefix(a, torch.tensor([1, 2, 9])) == 2
    assert common_prefix(a, torch.tensor([1, 2])) == 2
    assert common_prefix(a, torch.tensor([7])) == 0
    assert common_prefix(a, torch.tensor([], dtype=torch.int64)) == 0


def test_match_takes_the_longest_prefix_and_leaves_the_last_prompt_token():
    index = PrefixIndex()
    index.retain(1, ids(40), 100)
    index.retain(2, ids(30) + [999] * 10, 100)
    assert index.match(ids(40) + [5, 6]) == (1, 40)
    index.unpin(1)
    # the whole prompt is held: its last token is still computed, for its logits
    assert index.match(ids(40)) == (1, 39)
    index.unpin(1)
    assert index.match(ids(30) + [999, 3]) == (2, 31)
    index.unpin(2)
    assert index.match(ids(MIN_TOKENS - 1) + [777, 778]) is None  # too short a share
    assert index.match([5000] * 50) is None
    assert index.hits == 0  # counted when the step that copies is sent
    index.sent(2, 31)
    assert (index.hits, index.tokens_reused) == (1, 31)


def test_exact_index_reuses_only_whole_entries():
    """A recurrent state (RWKV) cannot be cut: only an entry the prompt holds whole."""
    index = PrefixIndex(exact=True)
    index.retain(1, ids(40), 100)
    assert index.match(ids(30) + [999] * 20) is None
    assert index.match(ids(40)) is None  # whole, but then no token is left to compute
    assert index.match(ids(40) + [7]) == (1, 40)


def test_eviction_is_least_recently_used_and_spares_pinned_entries():
    index = PrefixIndex()
    for seq in (1, 2, 3):
        index.retain(seq, ids(20, start=100 * seq), 10)
    assert index.nbytes == 30
    assert index.match(ids(20, start=100) + [1]) == (1, 20)  # 1 is now the most recent
    assert index.evict(15) == [2, 3]
    assert index.evictions == 2 and list(index.entries) == [1] and index.nbytes == 10
    assert index.evict(10) == []  # 1 is pinned: its first step is not sent yet
    index.sent(1, 20)
    assert index.evict(1) == [1] and len(index) == 0 and index.nbytes == 0


def test_retaining_a_longer_entry_drops_those_it_holds_whole():
    index = PrefixIndex()
    index.retain(1, ids(20), 10)
    index.retain(2, ids(18) + [5000, 5001], 10)  # diverges: kept
    assert index.retain(3, ids(25), 10) == [1]
    assert index.match(ids(25) + [0]) == (3, 25)
    assert index.retain(4, ids(40), 10) == []  # 3 is pinned: kept until its step is sent
    index.sent(3, 25)
    assert index.retain(5, ids(50), 10) == [3, 4]
    assert list(index.entries) == [2, 5] and index.nbytes == 20
    assert index.clear() == [2, 5] and index.nbytes == 0


def test_archs_whose_rows_depend_on_the_whole_prompt_are_refused():
    assert "both ways" in refusal("chatglm")
    assert "encoder" in refusal("cpm2")
    assert refusal("llama") is None and refusal("rwkv") is None


# ---------------------------------------------------------------------- caches

@pytest.mark.parametrize("kv_dtype", ["fp32", "fp16", "int8"])
def test_copy_prefix_copies_rows_and_leaves_the_source(kv_dtype):
    src = SequenceCache(kv_dtype=kv_dtype)
    kv = src.layer(3)
    k, v = torch.randn(2, 300, 4), torch.randn(2, 300, 4)
    kv.update_and_fetch(k, v)
    held = [t.clone() for t in (kv.k, kv.v, kv.k_scales, kv.v_scales) if t is not None]
    out = copy_prefix(src, 257)
    assert out.kv_dtype == kv_dtype
    got = out.layer(3)
    assert got.offset == 257 and got.k.shape == (2, 512, 4) and got.k.dtype == kv.k.dtype
    copied = [t for t in (got.k, got.v, got.k_scales, got.v_scales) if t is not None]
    assert len(copied) == len(held) == (4 if kv_dtype == "int8" else 2)
    for a, b in zip(copied, held):
        assert torch.equal(a[:, :257], b[:, :257])
    got.update_and_fetch(torch.zeros(2, 1, 4), torch.zeros(2, 1, 4))
    assert kv.offset == 300 and torch.equal(kv.k[:, 257], held[0][:, 257])  # not shared


def test_copy_prefix_refuses_what_cannot_be_cut():
    rwkv = SequenceCache()
    rwkv.state(0).update(torch.randn(5, 8), 12)
    whole = copy_prefix(rwkv, 12)
    assert torch.equal(whole.state(0).value, rwkv.state(0).value)
    assert whole.state(0).value is not rwkv.state(0).value
    with pytest.raises(ValueError, match="recurrent state holds all 12 tokens"):
        copy_prefix(rwkv, 11)
    glm = SequenceCache(prefix=Prefix(4, 3))
    glm.layer(0).update_and_fetch(torch.randn(1, 6, 2), torch.randn(1, 6, 2))
    with pytest.raises(ValueError, match="GLM prompt context"):
        copy_prefix(glm, 5)
    with pytest.raises(ValueError, match="from 7 rows of a cache that holds 6"):
        copy_prefix(SequenceCache(layers={0: glm.layer(0)}), 7)
    with pytest.raises(ValueError, match="from 0 rows"):
        copy_prefix(SequenceCache(layers={0: KVCache()}), 0)


# ---------------------------------------------------------------------- stages in-process

def _generate(stages, seqs, prompts, n, reuse=None):
    """Greedy tokens of `seqs` started together (`reuse`: {seq: (source, rows)})."""
    reuse = reuse or {}
    rows = [p[reuse[i][1]:] if i in reuse else p for i, p in zip(seqs, prompts)]
    r = run(stages, step(seqs, [len(x) for x in rows], sum(rows, []), reset=seqs,
                         params={i: GREEDY for i in seqs}, reuse=reuse))
    out = {i: [t] for i, t in zip(r.seqs, r.sampled)}
    for k in range(1, n):
        r = run(stages, step(seqs, [1] * len(seqs), [out[i][-1] for i in seqs],
                             steps=[k] * len(seqs)))
        for i, t in zip(r.seqs, r.sampled):
            out[i].append(t)
    return [out[i] for i in seqs]


@pytest.fixture(scope="module")
def int8(smollm2_stores):
    return smollm2_stores["int8"]


@pytest.mark.slow
def test_sequences_started_from_a_finished_one_give_its_tokens(int8):
    """Two sequences start from the same finished sequence's rows in one step and decode
    side by side: each gives the tokens of its whole prompt prefilled on fresh stages, and
    the source is left for later ones."""
    tok = int8.tokenizer()
    first = tok.encode("The history of the city of Paris begins with the Parisii, a tribe")
    stages = chain(int8, [0, 13, 30], wire_dtype=torch.bfloat16)
    (made,) = _generate(stages, [1], [first], 8)
    held = first + made[:-1]  # the last sampled token was never fed
    turns = [held + tok.encode(" Tell me more."), held + tok.encode(" Who ruled it?")]
    reuse = {2: (1, len(held)), 3: (1, len(held) - 4)}
    got = _generate(stages, [2, 3], turns, 8, reuse)
    fresh = chain(int8, [0, 13, 30], wire_dtype=torch.bfloat16)
    assert got == _generate(fresh, [2, 3], turns, 8)
    assert all(s.sequences[1].tokens == len(held) for s in stages)
    assert stages[-1].sequences[2].history[:len(held)] == held  # repetition penalty's


def test_a_recurrent_state_starts_a_sequence_only_whole(tmp_path):
    """RWKV over 2 stages: a sequence started from a finished one's whole state gives the
    tokens of its whole prompt prefilled; from part of it, the stage refuses by name."""
    from llm_shard.models.checkpoint.convert import convert

    hf_rwkv().save_pretrained(tmp_path / "hf")
    store = convert(tmp_path / "hf", tmp_path / "fp32", dtype="fp32", progress=False)
    first = random_ids(9, seed=3, low=1, high=97)
    stages = chain(store, [0, 2, 4])
    (made,) = _generate(stages, [1], [first], 5)
    held = first + made[:-1]
    turn = held + random_ids(4, seed=4, low=1, high=97)
    got = _generate(stages, [2], [turn], 5, {2: (1, len(held))})
    assert got == _generate(chain(store, [0, 2, 4]), [2], [turn], 5)
    with pytest.raises(ValueError, match="recurrent state holds all 13 tokens"):
        run(stages, step([3], [4], turn[9:13], reset=[3], params={3: GREEDY},
                         reuse={3: (1, 9)}))


def test_a_stage_refuses_rows_it_does_not_hold(int8):
    stages = chain(int8, [0, 30])
    _generate(stages, [1], [ids(20, start=500)], 2)  # holds 21 rows
    with pytest.raises(StageError, match="start from 22 rows of sequence 1, which holds 21"):
        run(stages, step([2], [3], [1, 2, 3], reset=[2], params={2: GREEDY},
                         reuse={2: (1, 22)}))
    with pytest.raises(StageError, match="sequence 9, which holds 0"):
        run(stages, step([2], [3], [1, 2, 3], reset=[2], params={2: GREEDY},
                         reuse={2: (9, 1)}))


# ---------------------------------------------------------------------- the real pipeline

CHAT = ["What is the capital of France?", "And the capital of Italy?", "Which is larger?"]
FOLLOW_UPS = ["Thanks! Tell me about Rome.", "What should I see in Paris?"]
# plain text, no chat template: they share no prefix with the chat or with each other
TEXTS = ["The rain in Spain stays mainly in the plain, said the professor to his student",
         "In a hole in the ground there lived a hobbit, not a nasty dirty wet hole",
         "It was the best of times, it was the worst of times, it was the age of wisdom",
         "Call me Ishmael. Some years ago, never mind how long precisely, having little"]


def _scenario(model) -> dict:
    """The same requests on any engine: a chat of 3 turns (each resends the history),
    two follow-ups of it submitted together, then 4 plain texts (more than the cache
    holds beside the rest) and continuations of the first and last of them. Returns every
    output, and the prefix counters and cached entries after each part."""
    tok = model.tokenizer
    log = {"out": [], "after": [], "entries": []}

    def part(prompts):
        futures = [model.submit(p, GREEDY) for p in prompts]
        done = [f.result(timeout=600) for f in futures]
        log["out"] += [c.token_ids for c in done]
        m = model.metrics()
        log["after"].append((m["prefix_hits_total"], m["prefix_tokens_reused_total"],
                             m["prefix_evictions_total"]))
        index = model.scheduler.prefix
        log["entries"].append([e.tokens.tolist() for e in index.entries.values()]
                              if index is not None else [])
        return done

    chat = []
    for text in CHAT:
        chat.append({"role": "user", "content": text})
        (c,) = part([tok.encode(tok.render_chat(chat))])
        chat.append({"role": "assistant", "content": c.text})
    part([tok.encode(tok.render_chat(chat + [{"role": "user", "content": t}]))
          for t in FOLLOW_UPS])
    texts = [tok.encode(t) for t in TEXTS]
    made = [part([p])[0].token_ids for p in texts]
    log["held"] = [p + m[:-1] for p, m in zip(texts, made)]
    part([texts[0] + made[0] + tok.encode(" And then")])
    part([texts[-1] + made[-1] + tok.encode(" And then")])
    log["metrics"] = model.metrics()
    if model.scheduler.prefix is not None:
        from prometheus_client import generate_latest

        from llm_shard.coordinator.http.metrics import registry

        log["exposition"] = generate_latest(registry(model)[0]).decode()
    return log


@pytest.fixture(scope="module")
def chats(ray_cluster, smollm2_stores):
    """The scenario on 2 workers (Ray + ZeroMQ, int8, bf16 activations on the wire), with
    a cache of 3 chunks of 256 tokens: without the prefix cache, then with it."""
    from llm_shard import LLM

    logs = {}
    for cached in (False, True):
        with LLM(str(smollm2_stores["int8"].path), workers=["ram=1GiB"] * 2,
                 use_all_workers=True, cache_tokens=768, prefix_cache=cached) as model:
            logs[cached] = _scenario(model)
    return logs


@pytest.mark.slow
def test_greedy_output_is_the_same_with_the_prefix_cache(chats):
    assert chats[True]["out"] == chats[False]["out"]
    assert chats[False]["metrics"]["prefix_cache"] is False
    assert chats[False]["after"][-1] == (0, 0, 0)
    assert "llm_shard_prefix_hits_total" in chats[True]["exposition"]


@pytest.mark.slow
def test_each_chat_turn_starts_from_the_last(chats):
    """Turns 2 and 3 each start from the turn before (the chat template's every token up
    to the new question); the two follow-ups submitted together both start from turn 3's
    entry while both run."""
    after = chats[True]["after"]
    hits = [h for h, _, _ in after]
    assert hits[:4] == [0, 1, 2, 4]
    reused = [r - q for (_, r, _), (_, q, _) in zip(after[1:4], after[:3])]
    assert reused[0] >= 30 and reused[1] > reused[0] and reused[2] > 2 * reused[1]


@pytest.mark.slow
def test_the_least_recently_used_prefix_is_evicted_and_prefilled_again(chats):
    """4 plain texts need more room than the cache has beside the chat's entries: the
    oldest go first, the first text's with them, so its continuation is prefilled whole
    (and right: the same output as without the cache), while the last text's entry is
    still there and its continuation starts from it."""
    log = chats[True]
    held = log["held"]
    assert held[0] not in log["entries"][-3] and held[-1] in log["entries"][-3]
    hits, reused, evicted = zip(*log["after"])
    assert evicted[-3] >= 2
    assert (hits[-2], reused[-2]) == (hits[-3], reused[-3])  # the first text: no hit
    assert (hits[-1], reused[-1]) == (hits[-2] + 1, reused[-2] + len(held[-1]))


def test_the_cache_is_on_unless_no_prefix_cache_says_off():
    import click
    from click.testing import CliRunner

    from llm_shard.coordinator.cli import cli, engine_options
    from llm_shard.coordinator.config import EngineConfig

    seen = []

    @click.command()
    @engine_options
    def probe(engine: EngineConfig) -> None:
        seen.append(engine.prefix_cache)

    for flags in ([], ["--no-prefix-cache"]):
        assert CliRunner().invoke(probe, flags).exit_code == 0
    assert seen == [True, False] and EngineConfig().prefix_cache is True
    r = CliRunner().invoke(cli, ["bench", "prefix", "--help"])
    assert r.exit_code == 0 and "usage: llm-shard bench prefix" in r.output
    assert "--turns" in r.output
