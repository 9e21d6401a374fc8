"""worker/stage.py: a stage's compute on message fields and tensors, stages chained in
this process (no Ray, no ZeroMQ): splits give the logits and tokens of the whole model,
caches are bounded, and steps it cannot run are refused by name."""

from __future__ import annotations

import pytest
import torch
from conftest import random_hf_state, write_hf_port

from llm_shard.cluster import wire
from llm_shard.cluster.types import SamplingParams
from llm_shard.models.runner import LocalModel
from llm_shard.worker.stage import CACHE_FULL, RESULT, STEP, StageError, StageRunner

BIG = 1 << 34  # cache bytes: no limit in these tests unless they set one
GREEDY = SamplingParams(max_tokens=8, temperature=0).to_dict()


def chain(store, bounds, **kw):
    return [StageRunner(store, a, b, cache_budget=kw.get("cache_budget", BIG),
                        wire_dtype=kw.get("wire_dtype", torch.float32))
            for a, b in zip(bounds, bounds[1:])]


def run(stages, fields, tokens):
    """One step through every stage, with the wire in between (encode/decode)."""
    tensors = {"tokens": torch.tensor(tokens)}
    kind = STEP
    for s in stages:
        assert kind == STEP
        msg = wire.decode(wire.encode(kind, fields, tensors))
        kind, fields, tensors = s.step(msg.fields, msg.tensors)
    assert kind == RESULT
    return fields


def greedy_through(stages, prompts, n):
    """Decode n tokens for each prompt together, as the scheduler does."""
    out = {i: [] for i in range(len(prompts))}
    seqs = list(range(len(prompts)))
    f = run(stages, {"epoch": 0, "mb": 0, "seqs": seqs, "lens": [len(p) for p in prompts],
                     "reset": seqs, "params": {str(i): GREEDY for i in seqs},
                     "steps": [0] * len(seqs)}, sum(prompts, []))
    for step in range(1, n + 1):
        for i, t in zip(f["seqs"], f["sampled"]):
            out[i].append(t)
        if step == n:
            break
        f = run(stages, {"epoch": 0, "mb": 0, "seqs": seqs, "lens": [1] * len(seqs),
                         "reset": [], "steps": [step] * len(seqs)},
                [out[i][-1] for i in seqs])
    return [out[i] for i in seqs]


@pytest.fixture(scope="module")
def pangu_store(tmp_path_factory):
    from llm_shard.models.checkpoint.convert import convert

    root = tmp_path_factory.mktemp("pangu")
    write_hf_port(root / "hf", random_hf_state(seed=11))
    return convert(root / "hf", root / "store", dtype="fp32", progress=False)


@pytest.mark.parametrize("bounds", [[0, 4], [0, 2, 4], [0, 1, 3, 4]])
def test_pangu_split_gives_the_unsplit_tokens(pangu_store, bounds):
    prompts = [[3, 14, 15, 92, 65], [2, 7], [1, 8, 28, 18, 28, 45, 90]]
    want = [LocalModel(pangu_store).greedy(p, 6) for p in prompts]
    assert greedy_through(chain(pangu_store, bounds), prompts, 6) == want


@pytest.mark.parametrize("bounds", [[0, 15, 30], [0, 7, 21, 30]])
def test_smollm2_split_logits_match_unsplit(smollm2_stores, bounds):
    """fp32 activations on the wire: every split's logits within 1e-4 of the whole."""
    store = smollm2_stores["fp32"]
    ids = store.tokenizer().encode("The capital of France is")
    want = LocalModel(store).logits(ids)[-1]
    stages = chain(store, bounds)
    tensors, kind = {"tokens": torch.tensor(ids)}, STEP
    fields = {"epoch": 0, "mb": 0, "seqs": [0], "lens": [len(ids)], "reset": [0],
              "params": {"0": GREEDY}, "steps": [0]}
    for s in stages[:-1]:
        kind, fields, tensors = s.step(fields, tensors)
    # the last stage's logits, before sampling
    from llm_shard.models.cache import Batch

    last = stages[-1]
    last._admit([0], [len(ids)], {0})
    batch = Batch.of([len(ids)], [last.sequences[0].cache])
    got = last.model(tensors["hidden"], batch, run_blocks=last.blocks.run)[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_cache_budget_rejects_what_does_not_fit(pangu_store):
    (stage,) = chain(pangu_store, [0, 4], cache_budget=0)
    stage.cache_budget = pangu_store.config.cache_bytes_per_token * 256  # one chunk
    f = run([stage], {"epoch": 0, "mb": 0, "seqs": [0, 1], "lens": [3, 2], "reset": [0, 1],
                      "params": {"0": GREEDY, "1": GREEDY}, "steps": [0, 0]},
            [1, 2, 3, 4, 5])
    assert f["seqs"] == [0] and len(f["sampled"]) == 1
    assert CACHE_FULL in f["rejected"]["1"]
    assert sorted(stage.sequences) == [0]
    stage.free([0])
    assert stage.sequences == {}


def test_rejections_travel_to_the_last_stage(pangu_store):
    first, last = chain(pangu_store, [0, 2, 4])
    last.cache_budget = 0
    f = run([first, last], {"epoch": 0, "mb": 0, "seqs": [0], "lens": [2], "reset": [0],
                            "params": {"0": GREEDY}, "steps": [0]}, [1, 2])
    assert f["seqs"] == [] and f["sampled"] == [] and "0" in f["rejected"]


@pytest.mark.parametrize("fields, tokens, error", [
    ({"seqs": [0], "lens": [2]}, [1], "tokens` of 2 rows"),
    ({"seqs": [0, 0], "lens": [1, 1]}, [1, 2], "names sequences"),
    ({"seqs": [0], "lens": [0]}, [], "at least one row"),
    ({"seqs": [9], "lens": [1]}, [1], "sequence 9 has no cache"),
])
def test_steps_it_cannot_run_are_refused_by_name(pangu_store, fields, tokens, error):
    (stage,) = chain(pangu_store, [0, 4])
    with pytest.raises(StageError, match=error):
        stage.step({"epoch": 0, "mb": 0, "reset": [], "steps": [0] * len(fields["seqs"]),
                    **fields}, {"tokens": torch.tensor(tokens, dtype=torch.long)})


def test_seeded_sampling_is_the_same_whatever_the_split_and_company(pangu_store):
    p = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=7).to_dict()
    prompts = [[3, 14, 15], [9, 2, 6, 5, 3]]

    def sample_two(stages, together):
        groups = [[0, 1]] if together else [[0], [1]]
        got = {}
        for g in groups:
            f = run(stages, {"epoch": 0, "mb": 0, "seqs": g, "lens": [len(prompts[i]) for i in g],
                             "reset": g, "params": {str(i): p for i in g}, "steps": [0] * len(g)},
                    sum((prompts[i] for i in g), []))
            got.update(zip(f["seqs"], f["sampled"]))
        return got

    alone = sample_two(chain(pangu_store, [0, 4]), together=False)
    assert sample_two(chain(pangu_store, [0, 1, 4]), together=True) == alone
