"""The messages that go over ZeroMQ between coordinator and workers: one frozen dataclass
per kind, validated on construction, so every decoded message is too (cluster/wire.py
builds them). A bad value raises ValueError naming its field.

The pipeline: a `Step` goes from the coordinator through the stages in order, each one
replacing its rows' activations (`hidden`); the last stage answers with a `Result`, the
sampled tokens. `Free` drops sequences' caches on every stage; `Error` tells the
coordinator a stage could not run a step. Store transfer (cluster/transfer.py): a
`ManifestRequest` or `ChunkRequest` to a store server, answered by `FileData` or a
`Refusal`. Maps keyed by sequence have the sequence id as an int key.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .types import SamplingParams

__all__ = ["Step", "Result", "Free", "Error", "ManifestRequest", "ChunkRequest", "FileData",
           "Refusal", "MAX_CHUNK_BYTES", "MAX_STEP_ROWS", "PipelineMessage", "TransferRequest",
           "TransferReply"]

# The most bytes one ChunkRequest may ask for: 2x a fetch's chunk; with the server's
# per-peer queue (transfer.SERVER_QUEUE replies) it bounds what a peer that never reads holds.
MAX_CHUNK_BYTES = 8 * 2**20
# The most rows (tokens) one step carries: the scheduler never sends more, so a stage
# refuses, unread (ZMQ_MAXMSGSIZE), any frame larger than such a step's activations.
MAX_STEP_ROWS = 128 * 1024


def _int(name: str, v: Any, lo: int = 0, hi: int | None = None) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an integer {bound}, got {v!r}")
    return v


def _float(name: str, v: Any, lo: float | None = None) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v) or \
            (lo is not None and not (lo <= v < math.inf)):
        bound = "a number" if lo is None else f"a finite number >= {lo}"
        raise ValueError(f"{name} must be {bound}, got {v!r}")
    return float(v)


def _str(name: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"{name} must be a non-empty string, got {v!r}")
    return v


def _seq(name: str, v: Any, item: Callable[[str, Any], Any]) -> tuple:
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"{name} must be a list, got {type(v).__name__}")
    return tuple(item(f"{name}[{i}]", x) for i, x in enumerate(v))


# The fast paths below check a whole list in one pass (a step is validated several times
# on its way through the stages); the slow path names the item that is wrong.
def _ints(name: str, v: Any, lo: int = 0) -> tuple[int, ...]:
    if type(v) in (tuple, list) and all(type(x) is int and x >= lo for x in v):
        return tuple(v)
    return _seq(name, v, lambda n, x: _int(n, x, lo))


def _times(name: str, v: Any) -> tuple[float, ...]:
    if type(v) in (tuple, list) and all(type(x) is float and 0.0 <= x < math.inf for x in v):
        return tuple(v)
    return _seq(name, v, lambda n, x: _float(n, x, lo=0.0))


def _by_seq(name: str, v: Any, value: Callable[[str, Any], Any]) -> dict[int, Any]:
    """{sequence id: value(...)} from a map with int keys >= 0."""
    if type(v) is dict and not v:
        return v
    if not isinstance(v, dict):
        raise ValueError(f"{name} must be a map, got {type(v).__name__}")
    return {_int(f"{name} key", k): value(f"{name}[{k}]", x) for k, x in v.items()}


def _params(name: str, v: Any) -> SamplingParams:
    if isinstance(v, SamplingParams):
        return v
    try:
        return SamplingParams.from_dict(v)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name}: {e}") from None


def _pair(name: str, v: Any) -> tuple[int, int]:
    pair = _ints(name, v)
    if len(pair) != 2:
        raise ValueError(f"{name} must be 2 integers, got {v!r}")
    return pair


def _top(name: str, v: Any) -> tuple[tuple[int, float], ...] | None:
    if v is None:
        return None

    def one(n: str, x: Any) -> tuple[int, float]:
        if not isinstance(x, (list, tuple)) or len(x) != 2:
            raise ValueError(f"{n} must be a [token, logprob] pair, got {x!r}")
        return _int(f"{n} token", x[0]), _float(f"{n} logprob", x[1])

    return _seq(name, v, one)


def _same_length(what: dict[str, tuple]) -> None:
    if len({len(v) for v in what.values()}) > 1:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in what.items())
        raise ValueError(f"{', '.join(what)} must be as long as each other, got {sizes}")


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} of shape {tuple(t.shape)}"
    return type(t).__name__


def _set(obj: Any, **values: Any) -> None:
    for k, v in values.items():
        object.__setattr__(obj, k, v)


@dataclass(frozen=True, eq=False)  # tensors have no single truth value: compare fields
class Step:
    """One micro-batch's step, coordinator -> stage 0 -> ... -> last stage.

    For each sequence `seqs[i]`: `lens[i]` new rows, and `steps[i]`, the index of the token
    the step samples. `tokens` (sum(lens),) int64: the rows' input ids, forwarded so the
    last stage keeps each sequence's history; `hidden` (sum(lens), hidden_size): the
    activations, from stage 1 on. A sequence in `reset` starts a fresh cache (with its
    `params`, for the last stage); `free` drops caches first. `reuse`: {sequence in
    `reset`: [source, n]}: it starts from a copy of the first n rows of the caches that
    finished sequence `source` left on every stage (the prefix cache), its rows then
    following them. `threads`: {first block of a
    stage: threads it computes this step with} (a stage not named keeps its count).
    Stages add what they reject (`rejected`: why), GLM prompt contexts (`prefixes`:
    [length, mask position]) and their times (`stage_ms`: compute, `busy_ms`: held)."""

    KIND: ClassVar[str] = "step"
    TENSORS: ClassVar[tuple[str, ...]] = ("tokens", "hidden")

    epoch: int
    mb: int
    seqs: tuple[int, ...]
    lens: tuple[int, ...]
    steps: tuple[int, ...]
    tokens: torch.Tensor
    hidden: torch.Tensor | None = None
    reset: tuple[int, ...] = ()
    params: dict[int, SamplingParams] = field(default_factory=dict)
    free: tuple[int, ...] = ()
    reuse: dict[int, tuple[int, int]] = field(default_factory=dict)
    threads: dict[int, int] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    prefixes: dict[int, tuple[int, int]] = field(default_factory=dict)
    stage_ms: tuple[float, ...] = ()
    busy_ms: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        _int("epoch", self.epoch)
        _int("mb", self.mb)
        _set(self, seqs=_ints("seqs", self.seqs), lens=_ints("lens", self.lens, lo=1),
             steps=_ints("steps", self.steps), reset=_ints("reset", self.reset),
             free=_ints("free", self.free), params=_by_seq("params", self.params, _params),
             reuse=_by_seq("reuse", self.reuse, _pair),
             threads=_by_seq("threads", self.threads, lambda n, x: _int(n, x, lo=1)),
             rejected=_by_seq("rejected", self.rejected, _str),
             prefixes=_by_seq("prefixes", self.prefixes, _pair),
             stage_ms=_times("stage_ms", self.stage_ms), busy_ms=_times("busy_ms", self.busy_ms))
        _same_length({"seqs": self.seqs, "lens": self.lens, "steps": self.steps})
        if len(set(self.seqs)) != len(self.seqs):
            raise ValueError(f"seqs names a sequence twice: {list(self.seqs)}")
        for i, (source, n) in self.reuse.items():
            if i not in self.reset or source in self.seqs or source in self.free or n < 1:
                raise ValueError(f"reuse[{i}] must start a sequence of `reset` from at least "
                                 f"1 row of a sequence neither in the step nor freed by it, "
                                 f"got {[source, n]}")
        rows = sum(self.lens)
        if rows > MAX_STEP_ROWS:
            raise ValueError(f"lens add up to {rows} rows, over the {MAX_STEP_ROWS} a step holds")
        t, h = self.tokens, self.hidden
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1 \
                or t.numel() != rows:
            raise ValueError(f"tokens must be int64 of shape ({rows},) (the sum of lens), "
                             f"got {_describe(t)}")
        if h is not None and (not isinstance(h, torch.Tensor) or not h.is_floating_point()
                              or h.dim() != 2 or h.shape[0] != rows):
            raise ValueError(f"hidden must be floating, of shape ({rows}, hidden size), "
                             f"got {_describe(h)}")


@dataclass(frozen=True)
class Result:
    """The last stage's answer to a step, -> coordinator: for each of `seqs` (those not
    rejected), the token it sampled and, where its params ask for log-probs, that token's
    log-prob and the top (token, log-prob) pairs (else None); the step's rejections and
    per-stage times."""

    KIND: ClassVar[str] = "result"
    TENSORS: ClassVar[tuple[str, ...]] = ()

    epoch: int
    mb: int
    seqs: tuple[int, ...]
    sampled: tuple[int, ...]
    logprobs: tuple[float | None, ...]
    top: tuple[tuple[tuple[int, float], ...] | None, ...]
    rejected: dict[int, str] = field(default_factory=dict)
    stage_ms: tuple[float, ...] = ()
    busy_ms: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        _int("epoch", self.epoch)
        _int("mb", self.mb)
        _set(self, seqs=_ints("seqs", self.seqs), sampled=_ints("sampled", self.sampled),
             logprobs=_seq("logprobs", self.logprobs,
                           lambda n, x: None if x is None else _float(n, x)),
             top=_seq("top", self.top, _top),
             rejected=_by_seq("rejected", self.rejected, _str),
             stage_ms=_times("stage_ms", self.stage_ms), busy_ms=_times("busy_ms", self.busy_ms))
        _same_length({"seqs": self.seqs, "sampled": self.sampled, "logprobs": self.logprobs,
                      "top": self.top})


@dataclass(frozen=True)
class Free:
    """Drop the caches of `seqs` on every stage (coordinator -> stage 0 -> ... ); with
    `everything`, every cache the stages hold (after a scheduler failure)."""

    KIND: ClassVar[str] = "free"
    TENSORS: ClassVar[tuple[str, ...]] = ()

    epoch: int
    seqs: tuple[int, ...]
    everything: bool = False

    def __post_init__(self) -> None:
        _int("epoch", self.epoch)
        _set(self, seqs=_ints("seqs", self.seqs))
        if not isinstance(self.everything, bool):
            raise ValueError(f"everything must be true or false, got {self.everything!r}")


@dataclass(frozen=True)
class Error:
    """A stage (blocks [start, end)) could not run micro-batch `mb`'s step, -> coordinator."""

    KIND: ClassVar[str] = "error"
    TENSORS: ClassVar[tuple[str, ...]] = ()

    epoch: int
    mb: int
    error: str
    blocks: tuple[int, int]

    def __post_init__(self) -> None:
        _int("epoch", self.epoch)
        _int("mb", self.mb)
        _str("error", self.error)
        blocks = _pair("blocks", self.blocks)
        if blocks[0] >= blocks[1]:
            raise ValueError(f"blocks must be a range [start, end), got {list(blocks)}")
        _set(self, blocks=blocks)


PipelineMessage = Step | Result | Free | Error


@dataclass(frozen=True)
class ManifestRequest:
    """Store transfer: ask for the store's manifest."""

    OP: ClassVar[str] = "manifest"


@dataclass(frozen=True)
class ChunkRequest:
    """Store transfer: ask for `size` bytes of a manifest's `file` from `offset`."""

    OP: ClassVar[str] = "chunk"

    file: str
    offset: int
    size: int

    def __post_init__(self) -> None:
        _str("file", self.file)
        _int("offset", self.offset)
        _int("size", self.size, lo=1, hi=MAX_CHUNK_BYTES)


@dataclass(frozen=True)
class FileData:
    """Store transfer: the bytes of `file` from `offset` that a request (`op`) asked for."""

    op: str
    file: str
    offset: int
    data: bytes | memoryview

    def __post_init__(self) -> None:
        if self.op not in (ManifestRequest.OP, ChunkRequest.OP):
            raise ValueError(f"op must be {ManifestRequest.OP!r} or {ChunkRequest.OP!r}, "
                             f"got {self.op!r}")
        _str("file", self.file)
        _int("offset", self.offset)
        if not isinstance(self.data, (bytes, memoryview)):
            raise ValueError(f"data must be bytes, got {type(self.data).__name__}")


@dataclass(frozen=True)
class Refusal:
    """Store transfer: a request the server will not answer, and why."""

    error: str

    def __post_init__(self) -> None:
        _str("error", self.error)


TransferRequest = ManifestRequest | ChunkRequest
TransferReply = FileData | Refusal
