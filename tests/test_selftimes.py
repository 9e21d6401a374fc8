"""Self time per module class (benchmarks/selftimes.py): a module's time less that of the
modules it calls, fused int8 layers included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llm_shard.benchmarks.selftimes import SelfTimes
from llm_shard.models import quant


class Clock:
    """A clock for SelfTimes that moves only when a module says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Takes(nn.Module):
    """Takes `seconds` of the clock itself, then calls `inner`."""

    def __init__(self, clock: Clock, seconds: float, inner: nn.Module | None = None) -> None:
        super().__init__()
        self.clock, self.seconds, self.inner = clock, seconds, inner

    def forward(self, x):
        self.clock.now += self.seconds
        return x if self.inner is None else self.inner(x)


class Outer(Takes):
    pass


def test_self_time_excludes_the_modules_a_module_calls():
    clock = Clock()
    model = Outer(clock, 2.0, Takes(clock, 5.0))
    with SelfTimes(model, clock) as times:
        model(torch.zeros(1))
        model(torch.zeros(1))
    assert times.calls == {"Outer": 2, "Takes": 2}
    assert times.seconds == {"Outer": 4.0, "Takes": 10.0}  # its own, not the inner's
    model(torch.zeros(1))  # the hooks are gone after the with
    assert times.calls == {"Outer": 2, "Takes": 2}


class QKV(nn.Module):
    shared_input = (("q", "k", "v"),)

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(64, 32) for _ in range(3))

    def forward(self, x):
        from llm_shard.models.layers import project

        return torch.cat(project(x, self.q, self.k, self.v), -1)


def test_fused_int8_layers_are_timed_as_int8_linears():
    model = QKV()
    quant.swap_int8(model)
    if not quant.fuse_int8(model):
        pytest.skip("no int8 kernel here fuses layers")
    with SelfTimes(model) as times, torch.no_grad():
        model(torch.randn(2, 64))
    assert times.calls["Int8Linear"] == 1  # the fused layer, in its members' place
    assert times.int8_seconds() == times.seconds["Int8Linear"] > 0
