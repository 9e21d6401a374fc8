"""Every architecture through the real pipeline (Ray actors, ZeroMQ, fp32 on the wire):
split over 3 workers gives the unsplit greedy tokens, and after a worker is killed
mid-generation every sequence is replayed (K/V caches, GLM prefixes, RWKV states,
CPM-2's encoder output and cross-attention caches) and
finishes with the same tokens. Tiny random configs: no tokenizer, token ids in and out."""

from __future__ import annotations

import os
import signal
import time
from functools import partial

import pytest
from conftest import (
    CPM2_VOCAB,
    GMASK,
    MOSS_VOCAB,
    RWKV_VOCAB,
    SOP,
    START,
    random_ids,
    text_ids,
    tiny_store,
)

from llm_shard import LLM, SamplingParams
from llm_shard.models.runner import LocalModel


def _glm_prompt(seed):
    return text_ids(5 + seed, seed) + [GMASK, SOP]


ARCHS = {
    "pangu-alpha": (partial(tiny_store, "pangu-alpha"),
                    lambda seed: [3 + seed, 14, 15, 92, 65][: 3 + seed % 3]),
    "chatglm": (partial(tiny_store, "chatglm"), _glm_prompt),
    "rwkv": (partial(tiny_store, "rwkv"), lambda seed: random_ids(4 + seed, seed, 0, RWKV_VOCAB)),
    "moss": (partial(tiny_store, "moss"), lambda seed: random_ids(4 + seed, seed, 0, MOSS_VOCAB)),
    # encoder input, then the decoder's start token: one stream of rows per sequence
    "cpm2": (partial(tiny_store, "cpm2"),
             lambda seed: random_ids(4 + seed, seed, 2, CPM2_VOCAB) + [START]),
}
N_PROMPTS, MAX_TOKENS = 6, 24


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_split_and_recovery(ray_cluster, tmp_path, arch):
    make, prompt = ARCHS[arch]
    store = make(tmp_path)
    prompts = [prompt(seed) for seed in range(N_PROMPTS)]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    local = LocalModel(store)
    want = [local.greedy(p, MAX_TOKENS) for p in prompts]

    with LLM(str(store.path), workers=["ram=512MiB"] * 3, use_all_workers=True,
             wire_dtype="fp32", cache_tokens=1024) as model:
        assert len(model.plan.stages) == 3
        got = model.generate(prompt_token_ids=prompts, params=params)
        assert [c.token_ids for c in got] == want

        futures = [model.submit(p, params) for p in prompts]
        deadline = time.monotonic() + 60
        while model.metrics()["tokens_total"] < len(got) * MAX_TOKENS + N_PROMPTS:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        middle = model.pipeline.workers[model.plan.stages[1].worker]
        os.kill(middle.info["pid"], signal.SIGKILL)
        assert not all(f.done() for f in futures), "finished before the kill: nothing replayed"
        assert [f.result(timeout=120).token_ids for f in futures] == want
        stats = model.stats()  # the lost worker was replaced on its node: still 3 stages
        assert stats["recoveries"] == 1 and len(model.plan.stages) == 3
        assert [w["restarts"] for w in stats["workers"]] == [
            int(w["index"] == middle.index) for w in stats["workers"]]
