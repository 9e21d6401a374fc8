"""The screened LM head: `ScreenedLinear`, the bounds on an int8 copy's error that it
screens with, and `screen_head`, the swap that puts it in a head."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llm_shard.models.kernels import w8a16
from llm_shard.models.kernels.backends import (
    ACT_LEVELS,
    fbgemm_invalid,
    fbgemm_matmul,
    fbgemm_pack,
    w8a16_first,
    w8a16_invalid,
)
from llm_shard.models.quant.linear import (
    PREPARE_LOCK,
    QMAX,
    Int8Linear,
    quantize_weight,
    replace_linears,
)

# A screened head's error bounds: for each (row, output), a bound on |x @ W.T - int8(x)|,
# where W is the float weight the int8 weight and its per-output scales s were rounded
# from (round to nearest), is the row's factor below times s[o].


def fbgemm_row_bound(x: torch.Tensor) -> torch.Tensor:
    """Each row's factor (rows, 1) of the bound on fbgemm's error.

    With w = s q + d, |d| <= s / 2, and x = x' + e the two-level activations with
    |e| <= absmax / (2 * 63 * 126) per element, the error is at most
    s (|x|_1 / 2 + 127 n absmax / 15876). Added: one activation rounded the other way at
    a tie (2 s 127 absmax / 63), and float32 rounding (1e-4 s 127 |x|_1).
    """
    xf = x.float()
    l1 = xf.abs().sum(-1, keepdim=True)
    amax = xf.abs().amax(-1, keepdim=True)
    n = xf.shape[-1]
    return (0.5 + 1e-4 * QMAX) * l1 + QMAX * (n / (2 * ACT_LEVELS * 2 * ACT_LEVELS)
                                              + 2 / ACT_LEVELS) * amax


def w8a16_row_bound(x: torch.Tensor) -> torch.Tensor:
    """Each row's factor (rows, 1) of the bound on w8a16's error.

    With w = s q + d, |d| <= s / 2, and x = step r + e, r the int16 activations (step =
    absmax / 32767; x / step is rounded to float32 before the integer, so |e| <= 0.506
    step), and the integer sum exact, the error is at most s (|x|_1 / 2 + 127 * 0.506 n
    step). Added: float32 rounding of that sum and its two products (1e-4 s 127 |x|_1, as
    fbgemm's, and 0.52 for 0.506).

    Where the kernel is built, one C call (w8a16.row_bound, the sum in double): the
    bits of a head in one call (models/kernels/decode.py run_head).
    """
    xf = x.float()
    if xf.dim() == 2 and w8a16.can_elementwise(xf):
        return w8a16.row_bound(xf, *w8a16_bound_terms(xf.shape[-1]))
    l1 = xf.abs().sum(-1, keepdim=True)
    amax = xf.abs().amax(-1, keepdim=True)
    return (0.5 + 1e-4 * QMAX) * l1 + QMAX * 0.52 * xf.shape[-1] * amax / w8a16.LEVELS


def w8a16_bound_terms(n: int) -> tuple[float, float]:
    """(factor of |x|_1, factor of absmax) of `w8a16_row_bound` for rows of n inputs."""
    return 0.5 + 1e-4 * QMAX, QMAX * 0.52 * n / w8a16.LEVELS


class ScreenedLinear(nn.Module):
    """An LM head that reads int8 weights per step and still returns the float logits
    wherever a token could be the largest.

    Each step computes every logit with an int8 copy of the weight (a quarter of the bytes
    of float32; w8a16 where "auto" would run it on a layer of this size, else fbgemm) and a
    per-logit bound on that copy's error (`w8a16_row_bound`, `fbgemm_row_bound`).
    Every token whose upper bound reaches the largest lower bound could be the float
    argmax: its logit is recomputed from its float weight row. So the argmax (greedy
    decoding) is the float head's, and every logit near the top is exact; the others are
    the int8 values, off by at most their bound. A row with more than `max_exact` such
    tokens gets all its logits in float. (An int8 head alone changes 2.4% of SmolLM2-135M's
    greedy tokens.)

    Picking and recomputing the candidates is one C pass where the kernel is built
    (`w8a16.screen`: the same candidates as torch's ops on the (rows, out) bounds, and a
    float dot in a fixed order, so a row's logits do not depend on its batch); elsewhere
    torch's ops run it.
    """

    # float32 bytes of the weight rounded at a time: each float temporary stays ~1 MiB.
    # Larger ones stayed resident after loading as free memory at the top of the loading
    # thread's malloc arena, which glibc's malloc_trim does not return to the kernel (only
    # the main arena's top).
    ROUND_BYTES = 1 << 20
    BOUNDS = {"w8a16": w8a16_row_bound, "fbgemm": fbgemm_row_bound}  # times the scales

    def __init__(self, linear: nn.Linear, max_exact: int | None = None,
                 release: Callable[[torch.Tensor], None] | None = None,
                 kernel: str | None = None,
                 place: Callable[[int], torch.Tensor | None] | None = None) -> None:
        """`release(rows)`, if given, is called on each slice of the float weight once
        it is rounded: a memory-mapped weight's pages can leave the resident set, since
        only the recomputed rows are read afterwards. `kernel` ("w8a16" or "fbgemm")
        overrides the screen's kernel. `place(nbytes)`, if given, is where the int8 copy
        is written (uint8 CPU memory, e.g. Store.load's 2 MiB pages), or None for memory
        of its own: the copy is made there, never moved."""
        super().__init__()
        if kernel is not None and kernel not in self.BOUNDS:
            raise ValueError(f"a screened head runs w8a16 or fbgemm, not {kernel!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.max_exact = max_exact or max(64, self.out_features // 16)
        self.preferred_kernel = kernel
        self._screen: tuple[str, object, torch.Tensor] | None = None
        self._release = release
        self._place = place
        self.prepare()

    @property
    def kernel(self) -> str | None:
        """The screen's kernel, or None before it is prepared."""
        return None if self._screen is None else self._screen[0]

    def prepare(self) -> None:
        """Rounds the float weight to int8 for the screen's kernel (fbgemm keeps it only
        packed). Runs again after the module is moved or copied."""
        if self.weight.device.type != "cpu":
            raise RuntimeError(f"a screened head runs on CPU only: its weight is on "
                               f"{self.weight.device}")
        out_f, in_f = self.out_features, self.in_features
        screen = Int8Linear(in_f, out_f, bias=False, device="meta")
        where = self._place(out_f * in_f) if self._place is not None else None
        if where is None:
            where = torch.empty(out_f * in_f, dtype=torch.uint8)
        screen.weight = where.view(torch.int8).view(out_f, in_f)  # every row written below
        screen.scales = torch.empty(out_f)
        kernel, reason = screen_kernel(screen, self.preferred_kernel)
        if reason is not None:
            raise RuntimeError(f"a screened head cannot run {kernel} here: {reason}")
        step = max(1, self.ROUND_BYTES // (4 * in_f))
        with PREPARE_LOCK, torch.no_grad():
            for a in range(0, out_f, step):
                rows = self.weight[a: a + step]
                screen.weight[a: a + len(rows)], screen.scales[a: a + len(rows)] = (
                    quantize_weight(rows))
                if self._release is not None:
                    self._release(rows)
            state = screen.weight if kernel == "w8a16" else fbgemm_pack(screen)
            self._screen = (kernel, state, screen.scales)

    def screened(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 copy's logits of x (rows, in), bias added, and the bound on their
        error against the float head's: both float32 (rows, out)."""
        logits, row_bound, scales = self._screened(x)
        return logits, row_bound * scales[None, :]

    def _screened(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The int8 copy's logits, each row's bound factor (rows, 1) and the scales: the
        bound on a logit's error is its row's factor times its output's scale."""
        if self._screen is None:
            self.prepare()
        kernel, state, scales = self._screen
        logits = (w8a16.linear(state, scales, x) if kernel == "w8a16"
                  else fbgemm_matmul(state, x))
        if self.bias is not None:
            logits.add_(self.bias.float())
        return logits, self.BOUNDS[kernel](x), scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, x = x.shape[:-1], x.reshape(-1, self.in_features)
        with torch.no_grad():
            logits, row_bound, scales = self._screened(x)
            xf = x.float().contiguous()
            if w8a16.can_screen(logits, row_bound, scales, self.weight, self.bias, xf):
                # the candidates' float logits in one C pass
                counts = w8a16.screen(logits, row_bound, scales, self.weight, self.bias, xf,
                                      self.max_exact).tolist()
            else:
                counts = self._recompute(logits, row_bound * scales[None, :], xf)
            for r, count in enumerate(counts):  # too many candidates: every logit in float
                if count > self.max_exact:
                    logits[r] = F.linear(xf[r], self.weight.float(), _float(self.bias))
        return logits.to(x.dtype).reshape(*lead, self.out_features)

    def _recompute(self, logits: torch.Tensor, bound: torch.Tensor, xf: torch.Tensor
                   ) -> list[int]:
        """w8a16.screen in torch's ops: each row's candidates get their float logits (but a
        row's with more than max_exact); returns each row's candidate count."""
        maybe = (logits + bound).ge_((logits - bound).amax(-1, keepdim=True))
        counts = []
        for r in range(xf.shape[0]):
            idx = maybe[r].nonzero().squeeze(1)
            counts.append(idx.numel())
            if idx.numel() > self.max_exact:
                continue
            exact = self.weight[idx].float() @ xf[r]
            if self.bias is not None:
                exact += self.bias[idx].float()
            logits[r, idx] = exact
        return counts

    def _apply(self, fn, recurse: bool = True):
        self._screen, self._release = None, None  # packed from the old weight
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_screen": None, "_release": None, "_place": None}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, screen=int8 "
                f"{self.kernel or self.preferred_kernel or 'auto'}, max_exact={self.max_exact}")


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def screen_kernel(screen: Int8Linear, preferred: str | None = None) -> tuple[str, str | None]:
    """The kernel of a screened head's int8 copy `screen`, and why it cannot run (None when
    it can): `preferred`, else w8a16 where "auto" would try it first or fbgemm cannot run,
    else fbgemm."""
    if preferred is None:
        w8_reason = w8a16_invalid(screen)
        use_w8 = w8_reason is None and (w8a16_first(screen) or fbgemm_invalid(screen))
        preferred = "w8a16" if use_w8 else "fbgemm"
    why = w8a16_invalid if preferred == "w8a16" else fbgemm_invalid
    return preferred, why(screen)


def screen_head(module: nn.Module,
                release: Callable[[nn.Linear], Callable | None] | None = None,
                place: Callable[[int], torch.Tensor | None] | None = None) -> list[str]:
    """Replaces every float nn.Linear on CPU in `module` (a head part) by a
    ScreenedLinear, when w8a16 or fbgemm can run here; returns the names replaced.
    `release(linear)` gives the ScreenedLinear's `release` for that Linear's weight (or
    None); `place`, its `place`."""
    if screen_kernel(Int8Linear(16, 16, bias=False))[1] is not None:
        return []
    return [name for name, _ in replace_linears(
        module, lambda name, lin: lin.weight.device.type == "cpu",
        lambda name, lin: ScreenedLinear(lin, release=release and release(lin),
                                         place=place))]
