"""models.sampling: greedy, penalties, top-k/top-p, seeded draws, logprobs, stop rules."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from llm_shard.cluster.types import SamplingParams
from llm_shard.models.text.sampling import (
    Sampled,
    _candidates,
    _penalize,
    finish_reason,
    sample,
    truncate_at_stop,
    uniform,
)

GREEDY = SamplingParams(temperature=0)


def tokens(logits, params, histories=None, steps=None):
    n = logits.shape[0]
    params = params if isinstance(params, list) else [params] * n
    histories = histories if histories is not None else [[]] * n
    steps = steps if steps is not None else [0] * n
    return [s.token for s in sample(logits, params, histories, steps)]


def probs_logits(probs):
    return torch.tensor([probs]).log()


def random_logits(batch, vocab, seed):
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


# ---------------------------------------------------------------- greedy


def test_greedy_is_argmax_with_ties_to_the_lowest_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 1.0, 5.0], [-2.0, -1.0, -3.0, -1.0]])
    assert tokens(logits, GREEDY) == [1, 0, 1]
    many = random_logits(16, 1000, 0)
    assert tokens(many, GREEDY) == many.argmax(-1).tolist()
    out = sample(many, [GREEDY] * 16, [[]] * 16, [0] * 16)
    assert all(isinstance(s, Sampled) and s.logprob is None and s.top_logprobs is None
               for s in out)


def test_greedy_ignores_seed_and_step():
    logits = random_logits(1, 500, 1)
    want = tokens(logits, GREEDY)
    for seed in (None, 0, 99):
        p = SamplingParams(temperature=0, seed=seed)
        assert tokens(logits, p, steps=[7]) == want


# ---------------------------------------------------------------- repetition penalty


def test_repetition_penalty_math_by_hand():
    row = torch.tensor([2.0, -1.0, 0.5, 3.0, 0.0, -4.0])
    _penalize(row, [0, 1, 1, 4, 5, 0], 2.0)  # ids 0, 1, 4, 5 seen; 2, 3 not
    assert row.tolist() == [1.0, -2.0, 0.5, 3.0, 0.0, -8.0]
    row = torch.tensor([2.0, -1.0])
    _penalize(row, [0, 1], 0.5)  # a penalty < 1 rewards seen tokens
    assert row.tolist() == [4.0, -0.5]


def test_repetition_penalty_steers_greedy_and_leaves_logits_alone():
    logits = torch.tensor([[2.0, 1.5, -1.0], [2.0, 1.5, -1.0]])
    before = logits.clone()
    p = SamplingParams(temperature=0, repetition_penalty=2.0)
    # prompt and generated tokens both count: 2.0 / 2 = 1.0 < 1.5
    assert tokens(logits, [p, GREEDY], [[0, 2], [0, 2]]) == [1, 0]
    assert torch.equal(logits, before)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sample(logits, [p, p], [[3], [0]], [0, 0])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sample(logits, [p, p], [[0], [-1]], [0, 0])


# ---------------------------------------------------------------- limits that equal greedy


def greedy_friendly_logits(batch, vocab, seed):
    """Random logits whose best token leads the next by 0.5."""
    logits = random_logits(batch, vocab, seed)
    best = logits.argmax(-1)
    logits[torch.arange(batch), best] = logits.max(-1).values + 0.5
    return logits


@pytest.mark.parametrize("kwargs", [
    {"temperature": 1e-3},          # the temperature -> 0 limit
    {"temperature": 1.0, "top_k": 1},
    {"temperature": 1.5, "top_p": 1e-6},
    {"temperature": 0.7, "top_k": 50, "top_p": 1e-6},
])
def test_sampling_limits_equal_greedy(kwargs):
    logits = greedy_friendly_logits(8, 2000, 2)
    want = tokens(logits, GREEDY)
    for seed in range(25):
        p = SamplingParams(seed=seed, **kwargs)
        assert tokens(logits, p, steps=list(range(8))) == want


def test_top_k_1_and_tiny_top_p_break_ties_like_greedy():
    logits = torch.tensor([[0.0, 4.0, 1.0, 4.0, 4.0]])
    for seed in range(20):
        assert tokens(logits, SamplingParams(top_k=1, seed=seed)) == [1]
        assert tokens(logits, SamplingParams(top_p=1e-9, seed=seed)) == [1]


# ---------------------------------------------------------------- top-k / top-p sets


def candidate_set(probs, top_k=0, top_p=1.0):
    ids, _ = _candidates(torch.tensor(probs).log(), top_k, top_p)
    return list(range(len(probs))) if ids is None else ids.tolist()


def test_top_p_keeps_the_minimal_nucleus():
    probs = [0.15, 0.05, 0.5, 0.3]  # best first: ids 2 (0.5), 3 (0.8), 0 (0.95), 1 (1.0)
    assert candidate_set(probs, top_p=0.45) == [2]
    assert candidate_set(probs, top_p=0.75) == [2, 3]
    assert candidate_set(probs, top_p=0.9) == [2, 3, 0]
    assert candidate_set(probs, top_p=0.99) == [2, 3, 0, 1]
    assert candidate_set(probs, top_p=1.0) == [0, 1, 2, 3]  # everything, in id order
    # top-p applies to the top-k renormalised mass: 0.5 / 0.8 = 0.625 reaches 0.6
    assert candidate_set(probs, top_p=0.6) == [2, 3]
    assert candidate_set(probs, top_k=2, top_p=0.6) == [2]
    assert candidate_set(probs, top_k=3) == [2, 3, 0]
    assert candidate_set([0.25, 0.25, 0.25, 0.25], top_k=2) == [0, 1]  # ties: lowest ids


def test_draws_stay_in_the_nucleus_with_renormalised_odds():
    logits = probs_logits([0.15, 0.05, 0.5, 0.3])
    p = SamplingParams(top_p=0.75, seed=3)
    n = 4000
    drawn = tokens(logits.expand(n, 4), p, steps=list(range(n)))
    assert set(drawn) == {2, 3}
    assert abs(drawn.count(2) / n - 0.5 / 0.8) < 0.03


@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (0, 0.3), (3000, 0.95), (40, 0.5)])
def test_nucleus_matches_a_full_sort_reference(top_k, top_p):
    # a flat distribution needs thousands of tokens for top_p: past the first probe
    logits = torch.randn(5000, generator=torch.Generator().manual_seed(4)) * 0.3
    probs = torch.softmax(logits, -1).double()
    order = torch.sort(logits, descending=True, stable=True).indices
    order = order[:top_k] if top_k else order
    kept = probs[order]
    cum = torch.cumsum(kept, 0) / kept.sum()
    m = int((cum < top_p).sum()) + 1
    ids, p = _candidates(logits, top_k, top_p)
    assert ids.tolist() == order[:m].tolist()
    assert torch.equal(p, probs[ids])


# ---------------------------------------------------------------- reproducibility


def test_uniform_is_pinned():
    # Changing these values would change every seeded completion: don't.
    assert uniform(1234, 5) == 0.6763895109578412
    assert uniform(0, 0) == 0.031674090301390456
    assert uniform(2**64 - 1, 2**64 - 1) == 0.3173147096558887
    assert 0 <= uniform(None, 0) < 1
    with pytest.raises(ValueError, match="step"):
        uniform(1, -1)


def test_seeded_token_is_independent_of_batch_and_position():
    vocab = 3000
    mine = random_logits(1, vocab, 5)[0]
    history = [5, 17, 17, 250]
    p = SamplingParams(temperature=0.9, top_k=200, top_p=0.9, repetition_penalty=1.3, seed=42)
    steps = range(6)
    alone = [tokens(mine[None], p, [history], [s])[0] for s in steps]
    others = random_logits(8, vocab, 6)
    other_params = [SamplingParams(temperature=t, top_p=tp, seed=s, logprobs=lp)
                    for t, tp, s, lp in [(0, 1, None, None), (1.0, 0.5, 1, 3), (2.0, 1, 2, None),
                                         (0.5, 0.9, None, 0), (1.0, 1, 42, 5), (0.8, 0.2, 7, None),
                                         (1.2, 0.95, 8, 1), (0, 1, 9, None)]]
    for pos in range(8):
        for s in steps:
            batch = others.clone()
            batch[pos] = mine
            params, hists = list(other_params), [[1, 2, 3]] * 8
            params[pos], hists[pos] = p, history
            assert sample(batch, params, hists, [s] * 8)[pos].token == alone[s]
    # simulated restart: everything rebuilt from scratch gives the same tokens
    rebuilt = random_logits(1, vocab, 5)
    p2 = SamplingParams.from_dict(p.to_dict())
    assert [tokens(rebuilt, p2, [list(history)], [s])[0] for s in steps] == alone


def test_seeded_tokens_survive_a_new_process():
    p = SamplingParams(temperature=1.1, top_p=0.8, seed=2024)
    logits = random_logits(4, 1000, 7)
    here = tokens(logits, p, steps=[0, 1, 2, 3])
    code = (
        "import torch\n"
        "torch.set_num_threads(1)\n"  # another worker, other threads
        "from llm_shard.cluster.types import SamplingParams\n"
        "from llm_shard.models.text.sampling import sample\n"
        "g = torch.Generator().manual_seed(7)\n"
        "logits = torch.randn(4, 1000, generator=g) * 3\n"
        "p = SamplingParams(temperature=1.1, top_p=0.8, seed=2024)\n"
        "print([s.token for s in sample(logits, [p] * 4, [[]] * 4, [0, 1, 2, 3])])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.stdout.strip() == str(here)


def test_different_seeds_and_steps_draw_differently():
    logits = torch.zeros(1, 100)  # uniform over 100 tokens
    by_seed = {tokens(logits, SamplingParams(seed=s))[0] for s in range(200)}
    by_step = {tokens(logits, SamplingParams(seed=5), steps=[s])[0] for s in range(200)}
    assert len(by_seed) > 70 and len(by_step) > 70  # 200 draws of 100: ~87 distinct
    unseeded = {tokens(logits, SamplingParams())[0] for _ in range(50)}
    assert len(unseeded) > 20


def chi_square(counts, expected):
    return sum((c - e) ** 2 / e for c, e in zip(counts, expected))


@pytest.mark.parametrize("params, want", [
    (SamplingParams(seed=11), [0.1, 0.2, 0.3, 0.4]),
    # temperature 2: p ** (1/2) renormalised over the top 2
    (SamplingParams(seed=12, temperature=2.0, top_k=2),
     [0, 0, 0.3**0.5 / (0.3**0.5 + 0.4**0.5), 0.4**0.5 / (0.3**0.5 + 0.4**0.5)]),
])
def test_empirical_distribution_of_seeded_draws(params, want):
    n = 20_000
    logits = probs_logits([0.1, 0.2, 0.3, 0.4]).expand(n, 4)
    drawn = tokens(logits, params, steps=list(range(n)))
    counts = [drawn.count(t) for t in range(4)]
    support = [t for t in range(4) if want[t] > 0]
    assert all(counts[t] == 0 for t in range(4) if want[t] == 0)
    stat = chi_square([counts[t] for t in support], [n * want[t] for t in support])
    assert stat < 16.3  # chi-square, 3 dof, p = 0.001 (deterministic: fixed seeds)


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_of_the_raw_distribution():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 2.0], [0.5, -1.0, 2.0, 2.0, 2.0]])
    raw = torch.log_softmax(logits, -1)
    p = SamplingParams(temperature=0.5, top_p=0.9, repetition_penalty=1.5, seed=1, logprobs=3)
    out = sample(logits, [p, SamplingParams(temperature=0, logprobs=2)], [[1, 2], []], [0, 0])
    for row, s in enumerate(out):
        assert s.logprob == pytest.approx(float(raw[row, s.token]), abs=1e-5)
        for t, lp in s.top_logprobs:
            assert lp == pytest.approx(float(raw[row, t]), abs=1e-5)
    assert [t for t, _ in out[0].top_logprobs] == [1, 2, 4]  # best first, ties to lowest id
    assert [t for t, _ in out[1].top_logprobs] == [2, 3]
    assert out[1].token == 2
    assert math.isclose(sum(math.exp(lp) for lp in raw[0].tolist()), 1, rel_tol=1e-6)


def test_logprobs_zero_gives_only_the_chosen_token():
    logits = random_logits(2, 50, 8)
    out = sample(logits, [SamplingParams(seed=1, logprobs=0), SamplingParams(seed=1)],
                 [[], []], [0, 0])
    assert out[0].top_logprobs == [] and out[0].logprob is not None
    assert out[1].logprob is None and out[1].top_logprobs is None


# ---------------------------------------------------------------- input checks


def test_bad_inputs_are_named():
    p = SamplingParams(seed=0)
    with pytest.raises(ValueError, match="batch, vocab"):
        sample(torch.zeros(5), [p], [[]], [0])
    with pytest.raises(ValueError, match="2 rows of logits but 1 params"):
        sample(torch.zeros(2, 5), [p], [[], []], [0, 0])
    bad = torch.zeros(3, 5)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        sample(bad, [p] * 3, [[]] * 3, [0] * 3)
    with pytest.raises(ValueError, match=r"rows \[1\]"):  # greedy's shortcut checks too
        sample(bad, [SamplingParams(temperature=0)] * 3, [[]] * 3, [0] * 3)
    # +inf in one row and -inf in another sum to NaN over the batch, but no row is bad
    ok = torch.zeros(2, 5)
    ok[0, 3], ok[1, 1] = float("inf"), float("-inf")
    assert [s.token for s in sample(ok, [SamplingParams(temperature=0)] * 2, [[]] * 2,
                                    [0, 0])] == [3, 0]


def test_masked_tokens_are_never_drawn():
    logits = torch.full((1, 10), float("-inf"))
    logits[0, 3], logits[0, 7] = 0.0, 0.0
    for s in range(100):
        assert tokens(logits, SamplingParams(seed=s, temperature=1.3)) in ([3], [7])


# ---------------------------------------------------------------- stop rules


def test_finish_reason_eos_stop_ids_and_length():
    p = SamplingParams(max_tokens=5, stop_token_ids=[9])
    assert finish_reason(2, "hi", p, {2}, 1) == "stop"
    assert finish_reason(9, "hi", p, {2}, 1) == "stop"
    assert finish_reason(4, "hi", p, {2}, 1) is None
    assert finish_reason(4, "hi", p, {2}, 5) == "length"
    assert finish_reason(2, "hi", p, {2}, 5) == "stop"  # stop wins a tie with length
    ignore = SamplingParams(max_tokens=5, stop_token_ids=[9], ignore_eos=True)
    assert finish_reason(2, "hi", ignore, {2}, 1) is None
    assert finish_reason(9, "hi", ignore, {2}, 1) == "stop"  # explicit stop ids still stop
    assert finish_reason(2, "hi", ignore, {2}, 5) == "length"


def test_stop_string_spanning_tokens():
    p = SamplingParams(max_tokens=50, stop=["o W", "###"])
    text = ""
    reasons = []
    for piece in ["Hel", "lo", " Wo", "rld"]:
        text += piece
        reasons.append(finish_reason(0, text, p, (), len(reasons) + 1))
    assert reasons[:3] == [None, None, "stop"]
    assert truncate_at_stop("Hello Wo", p.stop) == "Hell"
    assert truncate_at_stop("a ### b o W c", p.stop) == "a "  # the earliest stop string
    assert truncate_at_stop("no stops here", p.stop) == "no stops here"
    assert truncate_at_stop("anything", ()) == "anything"
