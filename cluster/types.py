"""Value types shared by coordinator and workers.

This module owns the plain values that cross the coordinator/worker boundary:
byte amounts (`Memory`), a worker's budget (`Capacity`, parsed from the CLI's
`--worker SPEC`), memory tiers (`Tier`), the block ranges of a pipeline
(`StageAssignment`, `Plan`), the public `SamplingParams`, and the cache accounting
that planner, scheduler and stages share (`sequence_bytes`, `block_cache_budget`).
Everything here is immutable, validated on construction, and converts to/from
JSON-able dicts. Pure Python: no torch, Ray or ZeroMQ.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from decimal import Decimal, InvalidOperation
from enum import Enum
from typing import Any

__all__ = [
    "KiB", "MiB", "GiB", "TiB", "Memory", "Capacity", "Tier", "StageAssignment", "Plan",
    "SamplingParams", "CACHE_CHUNK", "reserved_tokens", "sequence_bytes",
    "block_cache_budget",
]

# Unit suffixes, matched case-insensitively. Binary: KiB/MiB/GiB/TiB, the Kubernetes
# forms Ki/Mi/Gi/Ti, and bare K/M/G/T (as docker `--memory 800m` and `free -h` mean
# them). Decimal (SI): KB/MB/GB/TB, so "2GB" is 2e9 bytes like vLLM and exo read it.
_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "ki": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mi": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gi": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "ti": 1024**4, "tib": 1024**4, "tb": 1000**4,
}
_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_ACCEPTED = (
    "a byte count (1024) or a number with a unit: KiB/MiB/GiB/TiB (binary, also "
    "K/M/G/T and Ki/Mi/Gi/Ti) or KB/MB/GB/TB (decimal), e.g. '2GiB', '1.5GB', '800M'"
)
_HUMAN = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Memory(int):
    """A non-negative amount of bytes.

    An `int`, so it compares, hashes and serialises (JSON, msgpack) as its byte count.
    `+`, `-`, `*` an int and `//` an int give a `Memory` (a negative result is a
    ValueError); `Memory / Memory` is a float ratio and `Memory // Memory` an int count.
    `str()` is human readable ("1.50 GiB"); `to_spec()` is exact and parses back.
    """

    def __new__(cls, value: int | float | str = 0) -> Memory:
        if isinstance(value, str):
            return cls.parse(value)
        if not (_is_int(value) or isinstance(value, float)):
            raise ValueError(f"memory amount {value!r} is not {_ACCEPTED}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"memory amount {value!r} is not finite")
        if value < 0:
            raise ValueError(f"memory amount {value!r} is negative")
        return super().__new__(cls, int(value))

    @classmethod
    def parse(cls, value: int | float | str) -> Memory:
        """'2GiB' → 2*1024**3, '2GB' → 2*10**9, '800M' → 800*1024**2, '1024' or 1024 → 1024.

        Fractions round down to whole bytes.
        """
        if not isinstance(value, str):
            return cls(value)
        m = _MEMORY_RE.match(value)
        if m is None:
            why = "is negative" if value.strip().startswith("-") else "is not understood"
            raise ValueError(f"memory amount {value!r} {why}; expected {_ACCEPTED}")
        number, unit = m.groups()
        scale = _UNITS.get(unit.lower())
        if scale is None:
            raise ValueError(
                f"memory amount {value!r} has unknown unit {unit!r}; expected {_ACCEPTED}"
            )
        try:
            amount = Decimal(number) * scale
        except InvalidOperation as e:  # the regex admits only digits, kept for safety
            raise ValueError(f"memory amount {value!r} is not understood") from e
        return int.__new__(cls, int(amount))

    def to_spec(self) -> str:
        """Exact, parseable form: '2GiB', '1536MiB', or a plain byte count."""
        for unit, size in _HUMAN:
            if self and self % size == 0:
                return f"{int(self) // size}{unit}"
        return str(int(self))

    @property
    def gib(self) -> float:
        return int(self) / 1024**3

    @property
    def mib(self) -> float:
        return int(self) / 1024**2

    def __str__(self) -> str:
        for unit, size in _HUMAN:
            if self >= size:
                return f"{int(self) / size:.2f} {unit}"
        return f"{int(self)} B"

    def __repr__(self) -> str:
        return f"Memory({int(self)})"

    def _result(self, op: str, other: Any, value: int) -> Memory:
        if value < 0:
            raise ValueError(f"{self!s} {op} {other!s} is negative ({value} bytes)")
        return int.__new__(Memory, value)

    def __add__(self, other: Any) -> Memory:
        if not _is_int(other):
            return NotImplemented
        return self._result("+", other, int(self) + other)

    __radd__ = __add__  # so sum(memories) stays a Memory

    def __sub__(self, other: Any) -> Memory:
        if not _is_int(other):
            return NotImplemented
        return self._result("-", other, int(self) - other)

    def __rsub__(self, other: Any) -> Memory:
        if not _is_int(other):
            return NotImplemented
        return self._result("subtracted from", other, other - int(self))

    def __mul__(self, other: Any) -> Memory:
        if isinstance(other, Memory) or not _is_int(other):
            return NotImplemented  # bytes * bytes is no amount of bytes; * float gives a float
        return self._result("*", other, int(self) * other)

    __rmul__ = __mul__

    def __floordiv__(self, other: Any) -> Any:
        if isinstance(other, Memory):
            return int(self) // int(other)  # how many times `other` fits
        if not _is_int(other):
            return NotImplemented
        return self._result("//", other, int(self) // other)

    def __reduce__(self) -> tuple:  # pickle/Ray: rebuild from the byte count
        return (Memory, (int(self),))


KiB = Memory(1024)
MiB = Memory(1024**2)
GiB = Memory(1024**3)
TiB = Memory(1024**4)


def _memory_field(name: str, value: Any) -> Memory:
    try:
        return Memory.parse(value)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


_CAPACITY_KEYS = {"gpu": "gpu_mem", "gpu_mem": "gpu_mem", "gpu-mem": "gpu_mem",
                  "ram": "ram", "disk": "disk", "threads": "threads", "node": "node"}


@dataclass(frozen=True)
class Capacity:
    """A worker's budget: bytes of GPU memory, RAM and disk it may use.

    `threads` is the number of torch threads the worker should use (None: its
    default); `node` pins the worker to a Ray node id or IP (None: anywhere).
    """

    gpu_mem: Memory = Memory(0)
    ram: Memory = Memory(0)
    disk: Memory = Memory(0)
    threads: int | None = None
    node: str | None = None

    def __post_init__(self) -> None:
        for name in ("gpu_mem", "ram", "disk"):
            object.__setattr__(self, name, _memory_field(name, getattr(self, name)))
        if self.threads is not None and (not _is_int(self.threads) or self.threads < 1):
            raise ValueError(f"threads must be an integer >= 1, got {self.threads!r}")
        if self.node is not None and (not isinstance(self.node, str) or not self.node):
            raise ValueError(f"node must be a non-empty node id or IP, got {self.node!r}")

    @classmethod
    def parse(cls, spec: str) -> Capacity:
        """Parse a worker SPEC: 'ram=2GiB,disk=8GiB,gpu=1GiB,threads=4,node=10.0.0.7'.

        Keys: ram, disk, gpu (alias gpu_mem, gpu-mem), threads, node; missing
        memory keys are 0.
        """
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"empty worker spec {spec!r}; expected e.g. 'ram=2GiB,disk=8GiB'")
        values: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            key, sep, raw = (s.strip() for s in item.partition("="))
            if not sep or not key or not raw:
                raise ValueError(f"worker spec {spec!r}: {item!r} is not KEY=VALUE")
            name = _CAPACITY_KEYS.get(key.lower())
            if name is None:
                raise ValueError(
                    f"worker spec {spec!r}: unknown key {key!r}; "
                    f"expected ram, disk, gpu (gpu_mem), threads, node"
                )
            if name in values:
                raise ValueError(f"worker spec {spec!r}: duplicate key {key!r}")
            if name == "threads":
                if not (raw.isascii() and raw.isdigit()):
                    raise ValueError(f"worker spec {spec!r}: threads={raw!r} is not an integer")
                values[name] = int(raw)
            else:
                values[name] = raw
        return cls(**values)

    @property
    def total(self) -> Memory:
        return self.gpu_mem + self.ram + self.disk

    def to_spec(self) -> str:
        """The exact SPEC string that `parse` reads back."""
        memory = {"ram": self.ram, "disk": self.disk, "gpu": self.gpu_mem}
        parts = [f"{k}={v.to_spec()}" for k, v in memory.items() if v]
        parts += [f"{k}={v}" for k, v in (("threads", self.threads), ("node", self.node)) if v]
        return ",".join(parts) or "ram=0"

    def __str__(self) -> str:
        return f"gpu {self.gpu_mem}, ram {self.ram}, disk {self.disk}"

    def to_dict(self) -> dict[str, Any]:
        return {"gpu_mem": int(self.gpu_mem), "ram": int(self.ram), "disk": int(self.disk),
                "threads": self.threads, "node": self.node}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Capacity:
        return cls(**_check_keys(cls, d))


def _check_keys(cls: type, d: Any) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__} must be built from a dict, got {type(d).__name__}")
    unknown = sorted(set(d) - {f.name for f in fields(cls)}, key=str)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}")
    return d


class Tier(str, Enum):
    """Where a worker keeps a block's weights between uses."""

    GPU = "gpu"
    RAM = "ram"
    DISK = "disk"

    def __str__(self) -> str:
        return self.value


def _tier(value: Any) -> Tier:
    try:
        return Tier(value.lower() if isinstance(value, str) else value)
    except ValueError:
        raise ValueError(f"unknown tier {value!r}; expected gpu, ram or disk") from None


@dataclass(frozen=True)
class StageAssignment:
    """Worker `worker` hosts global blocks [start, end); `tiers[i]` holds block start+i."""

    worker: int
    start: int
    end: int
    tiers: tuple[Tier, ...]

    def __post_init__(self) -> None:
        for name in ("worker", "start", "end"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise ValueError(f"stage {name} must be an integer >= 0, got {v!r}")
        if self.end <= self.start:
            raise ValueError(
                f"stage of worker {self.worker} is empty: blocks [{self.start}, {self.end})"
            )
        tiers = tuple(_tier(t) for t in self.tiers)
        if len(tiers) != self.end - self.start:
            raise ValueError(
                f"stage of worker {self.worker} has {len(tiers)} tiers for "
                f"{self.end - self.start} blocks [{self.start}, {self.end})"
            )
        object.__setattr__(self, "tiers", tiers)

    @property
    def blocks(self) -> range:
        return range(self.start, self.end)

    @property
    def n_blocks(self) -> int:
        return self.end - self.start

    @property
    def first(self) -> bool:
        """Owns the embedding."""
        return self.start == 0

    def is_last(self, n_blocks: int) -> bool:
        """Owns final norm, LM head and sampling."""
        return self.end == n_blocks

    def tier_of(self, block: int) -> Tier:
        if block not in self.blocks:
            raise ValueError(f"block {block} is not in [{self.start}, {self.end})")
        return self.tiers[block - self.start]

    def to_dict(self) -> dict[str, Any]:
        return {"worker": self.worker, "start": self.start, "end": self.end,
                "tiers": [t.value for t in self.tiers]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageAssignment:
        return cls(**_check_keys(cls, d))


@dataclass(frozen=True)
class Plan:
    """The pipeline: stages in order, contiguous, covering blocks [0, n_blocks) once."""

    stages: tuple[StageAssignment, ...]
    n_blocks: int

    def __post_init__(self) -> None:
        stages = tuple(self.stages)
        object.__setattr__(self, "stages", stages)
        if not _is_int(self.n_blocks) or self.n_blocks < 1:
            raise ValueError(f"n_blocks must be an integer >= 1, got {self.n_blocks!r}")
        if not stages:
            raise ValueError("plan has no stages")
        expected = 0
        for i, s in enumerate(stages):
            if not isinstance(s, StageAssignment):
                raise ValueError(f"stage {i} is a {type(s).__name__}, expected StageAssignment")
            if i and s.start < stages[i - 1].start:
                raise ValueError(
                    f"stages out of order: stage {i} starts at block {s.start}, "
                    f"before stage {i - 1} at block {stages[i - 1].start}"
                )
            if s.start > expected:
                raise ValueError(f"gap: blocks [{expected}, {s.start}) are in no stage")
            if s.start < expected:
                raise ValueError(
                    f"overlap: blocks [{s.start}, {min(expected, s.end)}) are in stage {i} "
                    f"(worker {s.worker}) and stage {i - 1} (worker {stages[i - 1].worker})"
                )
            expected = s.end
        if expected != self.n_blocks:
            what = ("beyond the model's" if expected > self.n_blocks else "short of the")
            raise ValueError(f"stages end at block {expected}, {what} {self.n_blocks} blocks")
        workers = [s.worker for s in stages]
        if len(set(workers)) != len(workers):
            raise ValueError(f"a worker hosts more than one stage: workers {workers}")

    def __len__(self) -> int:
        return len(self.stages)

    def __iter__(self):
        return iter(self.stages)

    @property
    def workers(self) -> tuple[int, ...]:
        return tuple(s.worker for s in self.stages)

    def is_last(self, stage: StageAssignment) -> bool:
        return stage.is_last(self.n_blocks)

    def stage_of_worker(self, worker: int) -> StageAssignment:
        for s in self.stages:
            if s.worker == worker:
                return s
        raise KeyError(f"worker {worker} has no stage in this plan (workers {list(self.workers)})")

    def stage_of_block(self, block: int) -> StageAssignment:
        for s in self.stages:
            if block in s.blocks:
                return s
        raise KeyError(f"block {block} is not in [0, {self.n_blocks})")

    def next_worker(self, worker: int) -> int | None:
        """The worker after `worker` in the pipeline, None after the last stage."""
        self.stage_of_worker(worker)  # raises KeyError naming the plan's workers
        i = self.workers.index(worker)
        return self.stages[i + 1].worker if i + 1 < len(self.stages) else None

    def to_dict(self) -> dict[str, Any]:
        return {"n_blocks": self.n_blocks, "stages": [s.to_dict() for s in self.stages]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        d = _check_keys(cls, d)
        if not isinstance(d.get("stages"), list):
            raise ValueError("Plan: 'stages' must be a list")
        return cls(stages=tuple(StageAssignment.from_dict(s) for s in d["stages"]),
                   n_blocks=d.get("n_blocks"))


def _number(name: str, v: Any, *, integer: bool = False) -> Any:
    ok = _is_int(v) or (not integer and isinstance(v, float) and math.isfinite(v))
    if not ok:
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{name} must be {kind}, got {v!r}")
    return v if integer else float(v)


# The largest max_tokens, top_k or token id a SamplingParams holds: every field fits the
# wire (msgpack) and a torch int32, whatever the model (its own vocabulary bounds them more).
MAX_SAMPLING_INT = 2**31 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to sample a completion; names and defaults follow vLLM.

    top_k=0 turns top-k off; logprobs=N returns the N most likely tokens' log-probs
    at each step (0: only the chosen token's), None returns none. Immutable: use
    `dataclasses.replace(params, max_tokens=...)` to vary one.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = field(default=())
    stop_token_ids: tuple[int, ...] = field(default=())
    seed: int | None = None
    logprobs: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, allowed: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        set_ = object.__setattr__
        check("max_tokens", 1 <= _number("max_tokens", self.max_tokens, integer=True)
              <= MAX_SAMPLING_INT, f"in [1, {MAX_SAMPLING_INT}]")
        set_(self, "temperature", _number("temperature", self.temperature))
        check("temperature", self.temperature >= 0, ">= 0 (0 is greedy)")
        set_(self, "top_p", _number("top_p", self.top_p))
        check("top_p", 0 < self.top_p <= 1, "in (0, 1]")
        check("top_k", 0 <= _number("top_k", self.top_k, integer=True) <= MAX_SAMPLING_INT,
              f"in [0, {MAX_SAMPLING_INT}] (0 is off)")
        set_(self, "repetition_penalty", _number("repetition_penalty", self.repetition_penalty))
        check("repetition_penalty", self.repetition_penalty > 0, "> 0 (1 is off)")
        stop = (self.stop,) if isinstance(self.stop, str) else (self.stop or ())
        check("stop", isinstance(stop, (list, tuple)), "a string or a list of strings")
        set_(self, "stop", tuple(stop))
        check("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings")
        ids = self.stop_token_ids or ()
        check("stop_token_ids", isinstance(ids, (list, tuple)), "a list of token ids")
        set_(self, "stop_token_ids", tuple(ids))
        check("stop_token_ids",
              all(_is_int(t) and 0 <= t <= MAX_SAMPLING_INT for t in ids),
              f"integers in [0, {MAX_SAMPLING_INT}]")
        if self.seed is not None:
            check("seed", 0 <= _number("seed", self.seed, integer=True) < 2**64,
                  "None or an integer in [0, 2**64)")
        if self.logprobs is not None:
            check("logprobs", 0 <= _number("logprobs", self.logprobs, integer=True) <= 20,
                  "None or an integer in [0, 20]")
        check("ignore_eos", isinstance(self.ignore_eos, bool), "True or False")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"], d["stop_token_ids"] = list(self.stop), list(self.stop_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        return cls(**_check_keys(cls, d))


# Cache rows grow in steps of this many tokens: models/cache.py's CHUNK (a test pins it).
CACHE_CHUNK = 256


def reserved_tokens(n: int) -> int:
    """Cache rows a sequence of n tokens occupies: caches grow in CACHE_CHUNK-row steps."""
    return -(-n // CACHE_CHUNK) * CACHE_CHUNK


# Cache accounting is in bytes per block of the caches' dtype (the config's kv_dtype, which
# a Store's config carries), the same for the planner, the scheduler's admission and each
# stage's budget.
def sequence_bytes(cfg, n_tokens: int) -> int:
    """What one sequence of n tokens holds in one block of a model of config `cfg`: K/V
    rows (in CACHE_CHUNK steps) and, for a recurrent model (RWKV), its fixed-size state."""
    return (reserved_tokens(n_tokens) * cfg.cache_bytes_per_token
            + getattr(cfg, "state_bytes_per_sequence", 0))


def block_cache_budget(cfg, cache_tokens: int) -> int:
    """The per-block budget for `cache_tokens` rows of K/V, all sequences together; a
    recurrent model gets one sequence state per CACHE_CHUNK of those tokens instead."""
    return (cache_tokens * cfg.cache_bytes_per_token
            + cache_tokens // CACHE_CHUNK * getattr(cfg, "state_bytes_per_sequence", 0))


@dataclass
class Completion:
    """One finished request, as `LLM.generate` and `Client.generate` return it.

    `token_ids` are the generated ids only (an eos or stop id that ended it included,
    as vLLM does; its text is not). `logprobs[i]`, when asked for, maps the chosen token
    and the top-N tokens of step i to their log-probs. `finish_reason`: "stop" (eos, stop
    id or stop string) or "length".
    """

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    logprobs: list[dict[int, float]] | None = None
    prompt: str | None = None
    index: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.logprobs is not None:  # JSON object keys are strings
            d["logprobs"] = [{str(k): v for k, v in step.items()} for step in self.logprobs]
        return d
