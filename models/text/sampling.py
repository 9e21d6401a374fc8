"""Choosing the next token from the last stage's logits, and the stop rules.

`sample` turns a batch of logits (batch, vocab) into one token per sequence, each row
under its own `SamplingParams`: repetition penalty (HF/CTRL), temperature, top-k,
top-p, then one draw. Greedy rows (temperature 0) are one batched argmax.

Reproducibility: the draw of sequence i is one uniform u, a hash of (seed, step),
inverted through the cumulative mass of its candidates in a canonical order (logit
descending, ties to the lowest id; id order when nothing is cut). So a token depends
only on that sequence's logits, params, history and step: not on the batch it shares,
its row, the process, or a restart that replays it. `seed=None` means fresh OS
randomness for that draw; the coordinator gives every request a seed so that a replay
after a failure draws the same tokens.

`finish_reason` and `truncate_at_stop` are the stop rules the coordinator applies.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Collection, Sequence
from typing import NamedTuple

import torch

from llm_shard.cluster.types import SamplingParams

__all__ = ["Sampled", "sample", "uniform", "finish_reason", "truncate_at_stop"]

_NUCLEUS_PROBE = 256  # top-p looks at this many best tokens first, 8x more until covered


class Sampled(NamedTuple):
    """The chosen token; with logprobs requested, its log-prob and the top-N pairs.

    Log-probs are of the raw model distribution, log_softmax(logits), before the
    repetition penalty, temperature, top-k and top-p (vLLM's default, "raw_logprobs").
    `top_logprobs` is best first, ties to the lowest id; [] when logprobs=0.
    """

    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


def uniform(seed: int | None, step: int) -> float:
    """The draw in [0, 1) for token `step` of a sequence seeded `seed`.

    A hash of (seed, step): the same on every machine, process and run. None: OS randomness.
    """
    if not 0 <= step < 2**64:
        raise ValueError(f"step must be in [0, 2**64), got {step!r}")
    if seed is None:
        return secrets.randbits(53) * 2.0**-53
    key = seed.to_bytes(8, "little") + step.to_bytes(8, "little")
    digest = hashlib.blake2b(key, digest_size=8, person=b"llm-shard-u").digest()
    return (int.from_bytes(digest, "little") >> 11) * 2.0**-53


def _top(values: torch.Tensor, n: int) -> torch.Tensor:
    """Ids of the n largest of `values` (vocab,), largest first, ties to the lowest id."""
    if n >= values.numel():
        return torch.sort(values, descending=True, stable=True).indices
    kth = torch.topk(values, n, sorted=False).values.min()
    ids = torch.nonzero(values >= kth).flatten()  # id order, n or more when kth is tied
    return ids[torch.sort(values[ids], descending=True, stable=True).indices[:n]]


def _candidates(scaled: torch.Tensor, top_k: int, top_p: float):
    """(ids, probs) that top-k then top-p leave of `scaled` (vocab,), the logits / temperature.

    Canonical order: logit descending, ties to the lowest id; ids None: the whole vocab
    in id order. probs float64, not renormalised. The nucleus is the shortest prefix
    whose mass reaches top_p of the top-k mass (at least one token).
    """
    vocab = scaled.numel()
    probs = torch.softmax(scaled, -1)
    k = top_k if 0 < top_k < vocab else vocab
    if k == vocab and top_p >= 1:
        return None, probs.double()
    n = k if k < vocab or top_p >= 1 else min(vocab, _NUCLEUS_PROBE)
    total = probs.sum(dtype=torch.float64) if k == vocab else None
    while True:
        ids = _top(scaled, n)  # the canonical order's first n: a prefix of any longer probe
        p = probs[ids].double()
        if top_p >= 1:
            return ids, p
        cum = torch.cumsum(p, 0)
        m = int(torch.searchsorted(cum, top_p * (cum[-1] if total is None else total))) + 1
        if m <= n or n == k:  # covered, or rounding left top_p out of reach of all k
            return ids[:m], p[:m]
        n = min(k, n * 8)


def _draw(logits: torch.Tensor, params: SamplingParams, step: int) -> int:
    """One token from one row (vocab,) of penalized logits."""
    ids, p = _candidates(logits / params.temperature, params.top_k, params.top_p)
    cdf = torch.cumsum(p, 0)
    j = int(torch.searchsorted(cdf, uniform(params.seed, step) * cdf[-1], right=True))
    if j >= p.numel():  # u * mass rounded up to the mass: take the last token with mass
        j = int(torch.nonzero(p).max())
    return j if ids is None else int(ids[j])


def _penalize(row: torch.Tensor, history: Sequence[int], penalty: float) -> None:
    """HF/CTRL repetition penalty, in place: seen tokens' logits > 0 / penalty, else * penalty."""
    if not history or penalty == 1:
        return
    ids = torch.unique(torch.as_tensor(history, dtype=torch.long))
    if ids[0] < 0 or ids[-1] >= row.numel():
        raise ValueError(f"history has token id {int(ids[0] if ids[0] < 0 else ids[-1])} "
                         f"outside the vocabulary [0, {row.numel()})")
    seen = row[ids]
    row[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           histories: Sequence[Sequence[int]], steps: Sequence[int],
           argmax: Sequence[int] | None = None) -> list[Sampled]:
    """One token per row of `logits` (batch, vocab); `argmax`, where given, each row's
    argmax already found (the head's C call: runner.StageModel.greedy).

    `histories[i]`: all token ids of sequence i so far (prompt and generated), for the
    repetition penalty. `steps[i]`: the index of the token being generated (0 for the
    first), which with `params[i].seed` fixes the draw. `logits` is not modified.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, vocab), got shape {tuple(logits.shape)}")
    batch = logits.shape[0]
    if not len(params) == len(histories) == len(steps) == batch:
        raise ValueError(f"{batch} rows of logits but {len(params)} params, "
                         f"{len(histories)} histories and {len(steps)} steps")
    # A decode step's few ops run with caches cold from the weights streamed before them
    # (tens of us each here): the common case takes the fewest.
    if torch.isnan(logits.sum()):  # NaN somewhere, or +inf and -inf (maybe in two rows)
        nan = torch.isnan(logits.sum(-1))  # (batch,): a NaN anywhere in a row
        if nan.any():
            rows = nan.nonzero().flatten().tolist()
            raise ValueError(f"logits of rows {rows} contain NaN (or both +inf and -inf)")
    logits = logits.float()

    tokens = [0] * batch
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if len(greedy) == batch and all(p.repetition_penalty == 1 for p in params):
        # no copy to penalize: every row's argmax
        tokens = list(argmax) if argmax is not None else logits.argmax(-1).tolist()
    elif greedy:
        rows = logits[greedy]  # a copy, (len(greedy), vocab), to penalize in place
        for row, i in zip(rows, greedy):
            _penalize(row, histories[i], params[i].repetition_penalty)
        # torch.argmax returns the first maximum: ties go to the lowest id
        for i, t in zip(greedy, rows.argmax(-1).tolist()):
            tokens[i] = t
    for i, p in enumerate(params):
        if not p.greedy:
            row = logits[i].clone() if p.repetition_penalty != 1 else logits[i]
            _penalize(row, histories[i], p.repetition_penalty)
            tokens[i] = _draw(row, p, steps[i])

    out = [Sampled(t) for t in tokens]
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    if wanted:  # log_softmax of the raw logits: logit - logsumexp
        raw = logits[wanted]  # (len(wanted), vocab)
        for row, lse, i in zip(raw, torch.logsumexp(raw, -1).tolist(), wanted):
            top = _top(row, params[i].logprobs).tolist() if params[i].logprobs else []
            out[i] = Sampled(tokens[i], float(row[tokens[i]]) - lse,
                             [(t, float(row[t]) - lse) for t in top])
    return out


def finish_reason(token: int, text_so_far: str, params: SamplingParams,
                  eos_ids: Collection[int], n_generated: int) -> str | None:
    """Why a sequence ends after generating `token`, or None if it goes on.

    `text_so_far`: the generated text, this token's piece included (not the prompt).
    "stop": an eos id (unless ignore_eos), a stop_token_id, or a stop string in the
    text; else "length" once n_generated >= max_tokens. Stop wins a tie, as in vLLM.
    """
    if (not params.ignore_eos and token in eos_ids) or token in params.stop_token_ids:
        return "stop"
    if any(s in text_so_far for s in params.stop):
        return "stop"
    return "length" if n_generated >= params.max_tokens else None


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` cut before the earliest stop string; the stop string is not kept (vLLM)."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(cuts)] if cuts else text
