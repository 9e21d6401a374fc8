"""worker/stage.py: a stage's compute on message fields and tensors, stages chained in
this process (no Ray, no ZeroMQ): splits give the logits and tokens of the whole model,
caches are bounded, and steps it cannot run are refused by name."""

from __future__ import annotations

import pytest
import torch
from conftest import STAGE_GREEDY as GREEDY
from conftest import chain, greedy_through, random_hf_state, run, step, write_hf_port

from llm_shard.cluster.types import SamplingParams
from llm_shard.models.runner import LocalModel
from llm_shard.worker.stage import CACHE_FULL, StageError


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
    """fp32 activations on the wire (and fp32 caches, as LocalModel's): every split's
    logits within 1e-4 of the whole."""
    store = smollm2_stores["fp32"].with_kv_dtype("fp32")
    ids = store.tokenizer().encode("The capital of France is")
    want = LocalModel(store).logits(ids)[-1]
    stages = chain(store, bounds)
    msg = step([0], [len(ids)], ids, reset=[0], params={0: GREEDY})
    for s in stages[:-1]:
        msg = s.step(msg)
    # the last stage's logits, before sampling
    from llm_shard.models.cache import Batch

    last = stages[-1]
    last._admit([0], [len(ids)], {0})
    batch = Batch.of([len(ids)], [last.sequences[0].cache])
    got = last.model(msg.hidden, batch, run_blocks=last.blocks.run)[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_cache_budget_rejects_what_does_not_fit(pangu_store):
    (stage,) = chain(pangu_store, [0, 4], cache_budget=0)
    stage.cache_budget = pangu_store.config.cache_bytes_per_token * 256  # one chunk
    r = run([stage], step([0, 1], [3, 2], [1, 2, 3, 4, 5], reset=[0, 1],
                          params={0: GREEDY, 1: GREEDY}))
    assert r.seqs == (0,) and len(r.sampled) == 1
    assert CACHE_FULL in r.rejected[1]
    assert sorted(stage.sequences) == [0]
    stage.free([0])
    assert stage.sequences == {}


def test_rejections_travel_to_the_last_stage(pangu_store):
    first, last = chain(pangu_store, [0, 2, 4])
    last.cache_budget = 0
    r = run([first, last], step([0], [2], [1, 2], reset=[0], params={0: GREEDY}))
    assert r.seqs == () and r.sampled == () and 0 in r.rejected


def test_steps_it_cannot_run_are_refused_by_name(pangu_store):
    """What a step's own fields cannot say (cluster/messages.py checks those): a sequence
    with no cache here, a later stage's step without activations, a new sequence without
    sampling params on the last stage."""
    first, last = chain(pangu_store, [0, 2, 4])
    with pytest.raises(StageError, match="sequence 9 has no cache on blocks"):
        first.step(step([9], [1], [1]))
    with pytest.raises(StageError, match=r"blocks \[2, 4\) need the step's `hidden`"):
        last.step(step([0], [1], [1], reset=[0], params={0: GREEDY}))
    with pytest.raises(StageError, match="sequence 0 starts without sampling params"):
        last.step(first.step(step([0], [1], [1], reset=[0])))


def test_seeded_sampling_is_the_same_whatever_the_split_and_company(pangu_store):
    p = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    prompts = [[3, 14, 15], [9, 2, 6, 5, 3]]

    def sample_two(stages, together):
        groups = [[0, 1]] if together else [[0], [1]]
        got = {}
        for g in groups:
            r = run(stages, step(g, [len(prompts[i]) for i in g],
                                 sum((prompts[i] for i in g), []), reset=g,
                                 params={i: p for i in g}))
            got.update(zip(r.seqs, r.sampled))
        return got

    alone = sample_two(chain(pangu_store, [0, 4]), together=False)
    assert sample_two(chain(pangu_store, [0, 1, 4]), together=True) == alone
