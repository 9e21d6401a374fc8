"""The prefix cache's index: the finished sequences whose caches the stages still hold,
by the token ids those caches cover, and which of them a new prompt can start from.

Chat clients resend the whole history every turn. When a sequence finishes, the
scheduler keeps its caches on every stage (counted in the cache budget) and records
here the ids they cover: its prompt and every generated token but the last (that one
was sampled, never fed). A new prompt that shares at least MIN_TOKENS leading ids with
one of them starts from a copy of its first n rows on every stage (Step.reuse), and only
the rest is prefilled. n stops one short of the prompt: the last prompt token's logits
must be computed. Entries leave least recently used first when a new sequence needs the
room (the scheduler frees them with a Free message), or when a longer entry that holds
all their ids is retained.

Recurrent state (RWKV) folds every token into one tensor, which cannot be cut at an
arbitrary n: there an entry is reused only whole (`exact`: n equals its length).
Architectures whose cached rows depend on later prompt tokens (`refusal`) get no index.
Plain Python over token id tensors: no Ray, no ZeroMQ.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

log = logging.getLogger("llm_shard.coordinator")

# Shorter shared prefixes are prefilled: a chat template's first few tokens cost little
# to compute, and a hit pins an entry and copies rows on every stage.
MIN_TOKENS = 16

# Architectures whose cached rows cannot start another prompt, and why.
_REFUSED = {
    "chatglm": "ChatGLM's prompt attends both ways up to <sop>, so every cached row "
               "depends on the whole prompt, not only on the tokens before it",
    "cpm2": "CPM-2's decoder cache depends on the encoder's whole input (its Prefix)",
}


def refusal(arch: str) -> str | None:
    """Why architecture `arch` cannot reuse cached prefixes; None where it can."""
    return _REFUSED.get(arch)


def prefix_index(store, wanted: bool) -> PrefixIndex | None:
    """The index for a scheduler serving `store` (None: off, as asked or as its
    architecture needs, which is logged)."""
    why = refusal(store.arch.name) if wanted else None
    if why:
        log.warning("prefix cache off for %s: %s", store.arch.name, why)
    if not wanted or why:
        return None
    # a recurrent state (RWKV) is reused only whole
    return PrefixIndex(exact=getattr(store.config, "state_bytes_per_sequence", 0) > 0)


def prefix_metrics(p: PrefixIndex | None) -> dict:
    """The index's figures for /metrics (zeros when the cache is off)."""
    return {"prefix_cache": p is not None, "prefix_hits_total": p.hits if p else 0,
            "prefix_tokens_reused_total": p.tokens_reused if p else 0,
            "prefix_evictions_total": p.evictions if p else 0,
            "prefix_cached_sequences": len(p) if p else 0,
            "prefix_cached_bytes": p.nbytes if p else 0}


@dataclass
class Entry:
    seq: int  # the finished sequence whose caches the stages hold
    tokens: torch.Tensor  # (n,) int64: the ids those caches cover
    nbytes: int  # cache bytes per block it holds (types.sequence_bytes)
    pins: int = 0  # new sequences admitted to start from it whose first step is unsent


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading ids 1-D tensors a and b share."""
    m = min(a.numel(), b.numel())
    differ = (a[:m] != b[:m]).nonzero()
    return int(differ[0]) if differ.numel() else m


class PrefixIndex:
    """Retained sequences, least recently used first. `exact`: reuse an entry only whole
    (recurrent state). Counters feed /metrics."""

    def __init__(self, exact: bool = False, min_tokens: int = MIN_TOKENS) -> None:
        self.exact, self.min_tokens = exact, min_tokens
        self.entries: OrderedDict[int, Entry] = OrderedDict()
        self.nbytes = 0  # kept, not summed: metrics() reads it from other threads
        self.hits = self.tokens_reused = self.evictions = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, seq: int) -> bool:
        return seq in self.entries

    def match(self, prompt: list[int]) -> tuple[int, int] | None:
        """The entry to start `prompt` from and how many of its rows to copy, pinned
        until `unpin` or `sent`; None when no entry shares MIN_TOKENS ids (the longest
        wins, the most recently used of equals)."""
        ids = torch.tensor(prompt, dtype=torch.int64)
        best, rows = None, 0
        for e in reversed(self.entries.values()):
            n = min(common_prefix(e.tokens, ids), len(prompt) - 1)
            if self.exact and n != e.tokens.numel():
                continue
            if n > rows:
                best, rows = e, n
        if best is None or rows < self.min_tokens:
            return None
        best.pins += 1
        self.entries.move_to_end(best.seq)
        return best.seq, rows

    def unpin(self, seq: int) -> None:
        """A match given up (its sequence left, or waits for room)."""
        e = self.entries.get(seq)
        if e is not None:
            e.pins -= 1

    def sent(self, seq: int, rows: int) -> None:
        """A match used: the first step that copies `rows` of entry `seq` is sent, and
        every stage copies before it reads a later message, so the entry may go."""
        self.unpin(seq)
        self.hits, self.tokens_reused = self.hits + 1, self.tokens_reused + rows

    def retain(self, seq: int, tokens: list[int], nbytes: int) -> list[int]:
        """Record finished sequence `seq`, whose caches hold `tokens`; returns the entries
        it makes useless (their ids all lead its own, and none is pinned), removed: the
        stages should free them."""
        t = torch.tensor(tokens, dtype=torch.int64)
        dropped = [e.seq for e in self.entries.values() if not e.pins
                   and e.tokens.numel() <= t.numel() and common_prefix(e.tokens, t)
                   == e.tokens.numel()]
        for s in dropped:
            self._remove(s)
        self.entries[seq] = Entry(seq, t, nbytes)
        self.nbytes += nbytes
        return dropped

    def evict(self, need: int) -> list[int]:
        """Remove unpinned entries, least recently used first, until they held `need`
        bytes or none is left; returns them (the stages should free them)."""
        out, freed = [], 0
        for e in list(self.entries.values()):
            if freed >= need:
                break
            if e.pins:
                continue
            out.append(e.seq)
            freed += e.nbytes
            self._remove(e.seq)
        self.evictions += len(out)
        return out

    def clear(self) -> list[int]:
        """Forget every entry (the stages' caches are gone, or about to be); returns them."""
        out = list(self.entries)
        self.entries.clear()
        self.nbytes = 0
        return out

    def _remove(self, seq: int) -> None:
        self.nbytes -= self.entries.pop(seq).nbytes
