"""Where a forward pass's time goes: each module class's self time (its time less that of
the modules it calls), from forward hooks. The hooks cost a few microseconds a module
call, so compare shares. The layers `fuse_int8` made (q/k/v, gate/up) are hooked too:
they are called in their members' place.

    with SelfTimes(stage) as times:
        stage(ids, batch)
    times.seconds  # {class name: self seconds}
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

from torch import nn

from llm_shard.models.quant import fused_layers

# classes whose self time is reading int8 weights (kernel, and the Python around it)
INT8_LINEARS = ("Int8Linear", "ScreenedLinear")


class SelfTimes:
    """Forward hooks on every module of `model` (and its fused int8 layers): self seconds
    (by `clock`) and calls per class name, summed over the forward passes run inside the
    `with`."""

    def __init__(self, model: nn.Module, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[float]] = []  # [start, seconds of the modules it called]
        self._model = model
        self._handles: list = []

    def __enter__(self) -> SelfTimes:
        for m in [*self._model.modules(), *fused_layers(self._model)]:
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, module: nn.Module, args) -> None:
        self._stack.append([self.clock(), 0.0])

    def _post(self, module: nn.Module, args, out) -> None:
        start, inner = self._stack.pop()
        took = self.clock() - start
        name = type(module).__name__
        self.seconds[name] += took - inner
        self.calls[name] += 1
        if self._stack:
            self._stack[-1][1] += took

    def int8_seconds(self) -> float:
        return sum(self.seconds.get(n, 0.0) for n in INT8_LINEARS)
