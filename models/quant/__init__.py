"""Int8 weights: the per-channel quantizer, `Int8Linear`, the swap, and the int8 kernels.

Quantization is a swap, not a branch: build the model as usual, then `quantize(model)`
replaces chosen `nn.Linear`s by `Int8Linear`s. Block code never sees int8.

    quantize(model, predicate)          # fp32 weights in memory -> int8 (offline quantizer)
    swap_int8(model, predicate)         # empty Int8Linears of the same shapes, then
    model.load_state_dict(int8_state)   #   load an int8 checkpoint into them,
    prepare_int8(model)                 #   and pack weights for the kernel (optional: lazy)

State dict of an `Int8Linear` named `<name>`: `<name>.weight` int8 (out, in), `<name>.scales`
float32 (out,), and `<name>.bias` float32 (out,) only when the Linear had a bias;
w ~= weight * scales[:, None].

Blocks (`group=32`): a GGUF's Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 weights kept exactly as the file has
them, one float16 scale (and for Q4_1/Q5_1 one float16 min) per 32 inputs of a row:
`<name>.scales` float16 (out, in / 32) and `<name>.mins` float16 (in / 32, out), stored
transposed as the kernel reads them; w[o, i] = weight[o, i] * scales[o, i // 32]
+ mins[i // 32, o]. Only "w8a16" (else "dequant") runs them: fbgemm and int8pack take
per-channel scales. Why: SmolLM2's GGUF is Q4_1, and rounding its weights again to
per-channel int8 flips ~3% of top-1 tokens; kept as they are, none (tests/test_quant.py).
Where a layer's values fit 4 bits (Q4_0: -8..7, Q4_1: 0..15), Store.load also packs them
as nibbles (`Nibbles`, `w8a16.pack_nibbles`), which w8a16 reads with the same bits at half
the bytes: SmolLM2-135M's decode step went from 8.2 to 6.3 ms on a Xeon here.

Kernels. A forward runs through a kernel from `KERNELS`, chosen per layer by `prepare()`
from the device's preference list (`PREFERENCE`), each kernel saying when it is valid:

- "fbgemm" (CPU, x86/fbgemm quantized engine): fbgemm's int8 GEMM on a prepacked
  per-channel weight. Activations go in as two 7-bit levels per token (the value on a
  per-token grid, then its rounding residual), ~14 bits: weight-only accuracy at int8
  GEMM speed. See the comment above `_fbgemm_run`.
- "w8a16" (CPU with AVX2 or AVX512-VNNI and a C compiler): our kernel (models/kernels/w8a16.py),
  compiled for the machine on first use. Activations rounded to int16 per row, products
  summed exactly in integers; it reads the stored int8 weight as it is (no packing).
- "int8pack" (CPU): `aten._weight_int8pack_mm`, weight-only int8 with bf16 activations.
  Only valid when in_features % 16 == 0: otherwise it returns wrong rows or crashes.
- "auto" (CPU, the default): per layer, "w8a16" (else "int8pack") on layers of at most
  AUTO_SMALL_LAYER_BYTES, whose fixed cost per call is lower; on larger ones "w8a16"
  where it keeps up with fbgemm (`w8a16.keeps_up()`: AVX512-VNNI, or AVX2 on a CPU
  without AVX512), else "fbgemm". The choice is the layer's, never the call's: see below.
- "triton" (CUDA, compute capability 7.5+, Triton installed: torch's CUDA wheels bring
  it): our GPU kernels (models/kernels/cuda_int8.py), a row kernel for decode and a tiled one
  for more rows. They dequantize each int8 weight in registers, per-channel and GGUF
  blocks alike, with float32 sums: no float copy of the weight.
- "dequant" (any device): `F.linear(x, weight.to(x.dtype)) * scales`, weight-only, as
  gpt-fast's `WeightOnlyInt8Linear`: a float copy of the weight per call. The GPU's last
  resort (no Triton, an older card); on CPU a slow one.

Why, measured on 2 cores of an AVX512-VNNI EPYC (benchmarks/kernels.py): at batch 1 on
PanGu-2.6B and LLaMA-7B layers (6-45 MiB) fbgemm streams 20-24 GB/s of int8 weights
(0.65-0.78 of the measured read bandwidth; ~4x fp32 F.linear in tokens/s) and int8pack
15-22; at batch 8 and 64 fbgemm is ~2x int8pack. w8a16 streams them at the speed of a
plain read of the same bytes (1.0-1.4x fbgemm), is level with fbgemm at 4-16 rows
(0.8-1.1x) and slightly ahead at 64 (1.05-1.14x). Under ~2 MiB (SmolLM2-135M's layers)
fbgemm's ~50 us fixed cost per call dominates decode (int8pack 16-37 us a call at 1 row,
fbgemm 61-76 us); w8a16 is 1.8-3.8x fbgemm there at 1 row, and 1.0-1.2x at 256.
On SmolLM2-135M (tests/test_quant.py) every kernel matches fp32 perplexity within 0.1%
with top-1 agreement 0.966-0.971: the loss is the per-channel weights', not the kernels'.
fbgemm's plain dynamic W8A8 (one 7-bit level per token) is ~15% faster at batch 1 but
loses (agreement 0.80, perplexity +16%), so it is not offered. When a preferred kernel is
not valid for a layer, the layer falls back to the next valid one; each distinct fallback
is logged once.

Batch invariance. Every CPU kernel here gives a row the same bits whatever other rows
share its call ("int8pack", "w8a16" and "fbgemm" by construction, pinned by
tests/test_quant.py::test_a_row_gets_the_same_bits_in_any_batch): so a sequence decodes
to the same tokens alone or in a batch of 16, prefilled or replayed token by token, which
recovery (replaying a sequence's tokens into a new worker's cache) and seeded sampling
rely on. That is why "auto" picks a kernel per layer and not per call: int8pack and
fbgemm round activations differently (bf16 vs two 7-bit levels), and choosing by row
count made a decode step (1 row) and a replay (many rows) differ at near-ties.
"dequant" (F.linear) is not invariant: BLAS changes its summation order with the shape;
nor is the GPU path ("triton" changes kernel with the row count, torch's attention too).

Preparation (packing) happens in `prepare()`, which `prepare_int8` calls for a whole
model after its weights are loaded; a forward on an unprepared layer prepares it
lazily under a lock. Loading a state dict or moving the module drops the prepared
state, so packed weights never go stale; after changing buffers in place any other
way, call `prepare()` again.

Fusion. `prepare_int8(module, fuse=True)` (what Store.load does) runs each group of
layers that a module declares as reading one input (`shared_input`: LLaMA's q/k/v and
gate/up, PanGu-α's q/k/v) as one layer of their concatenated rows, with the same kernel
and the same bits per output: fewer calls per block (see `fuse_int8`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llm_shard.models.kernels import cuda_int8, w8a16

log = logging.getLogger(__name__)

_PLAN_SERIALS = itertools.count(1)  # Int8Linear.plan_serial: never reused in a process
_LAST_SERIAL = [0]  # the latest plan_serial given out: plan_epoch()


def plan_epoch() -> int:
    """Changes whenever any Int8Linear's plan changes (prepared, dropped, fused)."""
    return _LAST_SERIAL[0]

QMAX = 127  # symmetric int8: [-127, 127], -128 unused
GROUPS = (0, w8a16.BLOCK)  # inputs per scale: 0 = one scale per output row

# Kernel names tried in order, per device type; a device type not listed uses "*".
PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("auto", "fbgemm", "w8a16", "int8pack", "dequant"),
    "cuda": ("triton", "dequant"),
    "*": ("dequant",),
}

_PREPARE_LOCK = threading.Lock()


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns (q int8 (out, in), scales float32 (out,)).

    w ~= q * scales[:, None]; an all-zero row gets scale 1.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(w / scales[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scales


@dataclass(frozen=True)
class Kernel:
    """One way to run an Int8Linear forward.

    why_invalid(layer) -> None when the kernel can run this layer, else the reason.
    pack(layer) -> the prepared state the kernel needs (after weights are loaded).
    run(layer, state, x) -> y, with x (rows, in) of any float dtype, y (rows, out) in
    x.dtype, bias included.
    """

    name: str
    why_invalid: Callable[[Int8Linear], str | None]
    pack: Callable[[Int8Linear], object]
    run: Callable[[Int8Linear, object, torch.Tensor], torch.Tensor]


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y.add_(bias.to(y.dtype))


# --- fbgemm: int8 weights, two-level 7-bit activations ----------------------------
# fbgemm's u8 x s8 kernels on AVX2 (no VNNI) sum pairs of products in int16: activations
# must stay in [0, 127] or they saturate. One 7-bit level per token loses too much on
# SmolLM2-135M (top-1 agreement with fp32 0.80, perplexity +16%: activation outliers),
# so each row goes in twice: on a grid of its absmax / ACT_LEVELS, and as its rounding
# residual scaled up by 2 * ACT_LEVELS. Both rows share one pass over the weights (at
# batch 1 the GEMM is memory-bound: 2 rows cost what 1 does) and the activations keep
# ~14 bits per token. The op takes one grid for all rows, so with several rows each is
# first divided by its absmax.
ACT_LEVELS = 63  # grid points each side of zero; u8 value = level + ACT_ZERO in [1, 127]
ACT_ZERO = 64
_MIN_ABSMAX = 1e-30  # a zero row stays finite: 1 / (1e-30 / ACT_LEVELS) fits in float32


def _per_channel_only(layer: Int8Linear) -> str | None:
    if layer.group:
        return (f"its scales are per block of {layer.group} inputs, and it takes one scale "
                "per output row")
    return None


def _fbgemm_invalid(layer: Int8Linear) -> str | None:
    if layer.group:
        return _per_channel_only(layer)
    if layer.weight.device.type != "cpu":
        return f"it runs on CPU only, weights are on {layer.weight.device}"
    engine = torch.backends.quantized.engine
    if engine not in ("fbgemm", "x86"):
        return (f"torch's quantized engine is {engine!r} (supported: "
                f"{torch.backends.quantized.supported_engines}); it needs 'x86' or 'fbgemm'")
    try:
        # Deprecated (pytorch/pytorch#184982), so checked rather than assumed.
        torch._make_per_channel_quantized_tensor  # noqa: B018
        torch.ops.quantized.linear_prepack  # noqa: B018
        torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32  # noqa: B018
    except (AttributeError, RuntimeError) as e:
        return f"this torch lacks the fbgemm linear ops ({e})"
    return None


def _fbgemm_pack(layer: Int8Linear) -> object:
    zeros = torch.zeros(layer.out_features, dtype=torch.long)
    with warnings.catch_warnings():
        # "quantized tensor creation functions ... are deprecated" (pytorch#184982): this
        # is fbgemm's only entry point, and _fbgemm_invalid checks it still exists.
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
        qw = torch._make_per_channel_quantized_tensor(layer.weight, layer.scales.double(),
                                                      zeros, 0)
    return torch.ops.quantized.linear_prepack(qw, None)


def _fbgemm_run(layer: Int8Linear, packed: object, x: torch.Tensor) -> torch.Tensor:
    y = _add_bias(_fbgemm_matmul(packed, x), layer.bias)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _fbgemm_matmul(packed: object, x: torch.Tensor) -> torch.Tensor:
    """x (rows, in) @ the packed int8 weight, dequantized: float32 (rows, out), no bias."""
    # Few torch calls on purpose: at batch 1 each costs ~5 us next to a ~300 us GEMM.
    xf = x if x.dtype == torch.float32 else x.float()
    rows = xf.shape[0]
    # Each row scaled to [-1, 1] by its absmax, so one grid serves every row and a row's
    # bits do not depend on the others in the call (batch invariance, even at 1 row).
    amax = xf.abs().amax(dim=1, keepdim=True).clamp_min_(_MIN_ABSMAX)  # (rows, 1)
    v, scale = xf / amax, 1.0 / ACT_LEVELS
    # v's rounding residual on the grid, scaled up to the grid's range:
    # 2 ACT_LEVELS * (v - scale * round(v / scale)). (fake_quantize is 4x slower here.)
    lo = torch.mul(v, 1.0 / scale).round_()
    lo.mul_(-2 * ACT_LEVELS * scale).add_(v, alpha=2 * ACT_LEVELS)
    y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
        torch.cat([v, lo]), scale, ACT_ZERO, packed)  # (2 * rows, out)
    return y[:rows].add_(y[rows:], alpha=1.0 / (2 * ACT_LEVELS)).mul_(amax)


# A screened head's error bounds (ScreenedLinear): for each (row, output), a bound on
# |x @ W.T - int8(x)|, where W is the float weight the int8 weight and its per-output
# scales s were rounded from (round to nearest), is the row's factor below times s[o].

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
    """
    xf = x.float()
    l1 = xf.abs().sum(-1, keepdim=True)
    amax = xf.abs().amax(-1, keepdim=True)
    return (0.5 + 1e-4 * QMAX) * l1 + QMAX * 0.52 * xf.shape[-1] * amax / w8a16.LEVELS


# --- int8pack: weight-only, bf16 activations -------------------------------------

def _int8pack_invalid(layer: Int8Linear) -> str | None:
    if layer.group:
        return _per_channel_only(layer)
    if layer.weight.device.type != "cpu":
        return f"it runs on CPU only here, weights are on {layer.weight.device}"
    if layer.in_features % 16:
        return (f"in_features={layer.in_features} is not a multiple of 16 "
                "(_weight_int8pack_mm then returns wrong rows or crashes)")
    if layer.weight.data_ptr() % 16:
        return ("its int8 weights are not 16-byte aligned (_weight_int8pack_mm crashes "
                "on them from 4 rows up; stores written by this version are aligned)")
    return None


def _int8pack_pack(layer: Int8Linear) -> object:
    # fp32 activations run ~10x slower than bf16 in this op; scales must match x's dtype.
    return layer.scales.to(torch.bfloat16)


def _int8pack_run(layer: Int8Linear, scales: object, x: torch.Tensor) -> torch.Tensor:
    y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), layer.weight, scales)
    return _add_bias(y.to(x.dtype), layer.bias)


# --- w8a16: int8 weights, int16 activations (models/kernels/w8a16.py) -----------------------

def _w8a16_invalid(layer: Int8Linear) -> str | None:
    if layer.nibbles_now() is None:
        if layer.weight.device.type != "cpu":
            return f"it runs on CPU only, weights are on {layer.weight.device}"
        if not layer.weight.is_contiguous():
            return "its int8 weights are not contiguous"
    return w8a16.problem()


def _plain_pack(layer: Int8Linear) -> object:
    mins = None if layer.mins is None else layer.mins.contiguous()
    bias = None if layer.bias is None else layer.bias.float().contiguous()
    return layer.scales.contiguous(), mins, bias


def _w8a16_pack(layer: Int8Linear) -> object:
    """(scales, mins, bias, nibbles): the layer's packed nibbles where it has them
    (`Nibbles`), else None: the kernel reads its int8 weight."""
    return (*_plain_pack(layer), layer.nibbles_now())


def _w8a16_run(layer: Int8Linear, state: object, x: torch.Tensor) -> torch.Tensor:
    scales, mins, bias, nib = state
    if nib is not None:
        y = _add_bias(w8a16.blocks(nib.packed, scales, mins, x, lo=nib.lo), layer.bias)
    elif layer.group:
        y = _add_bias(w8a16.blocks(layer.weight, scales, mins, x), layer.bias)
    else:  # the bias added in the kernel
        y = w8a16.linear(layer.weight, scales, x, bias)
    return y if y.dtype == x.dtype else y.to(x.dtype)


# --- auto: w8a16 where it keeps up, else by layer size -------------------------------
# fbgemm's two-level activations cost ~50 us a call on top of the GEMM; w8a16 and int8pack
# have little fixed cost. Under ~2 MiB of weights w8a16 (else int8pack) is fastest at
# 1-4 rows; on larger layers w8a16 runs where it keeps up with fbgemm (`w8a16.keeps_up()`:
# AVX512-VNNI, or AVX2 on a CPU without AVX512), fbgemm elsewhere. Chosen once per layer (batch
# invariance, above).
AUTO_SMALL_LAYER_BYTES = 2 << 20


def _auto_invalid(layer: Int8Linear) -> str | None:
    return None if layer.group else _fbgemm_invalid(layer)  # blocks: w8a16, else dequant


def _w8a16_first(layer: Int8Linear) -> bool:
    """Whether "auto" tries w8a16 first for a per-channel layer of this size."""
    return layer.weight.numel() <= AUTO_SMALL_LAYER_BYTES or w8a16.keeps_up()


def _auto_choice(layer: Int8Linear) -> Kernel:
    """The kernel "auto" runs this layer with (each fallback logged once)."""
    if layer.group:
        reason = _w8a16_invalid(layer)
        if reason is None:
            return KERNELS["w8a16"]
        _log_fallback("w8a16", "dequant", f"{reason}, for auto's layers in blocks")
        return KERNELS["dequant"]
    small = layer.weight.numel() <= AUTO_SMALL_LAYER_BYTES
    if _w8a16_first(layer):
        reason = _w8a16_invalid(layer)
        if reason is None:
            return KERNELS["w8a16"]
        if not small:
            _log_fallback("w8a16", "fbgemm", f"{reason}, for auto's large layers")
            return KERNELS["fbgemm"]
        _log_fallback("w8a16", "int8pack", f"{reason}, for auto's small layers")
        reason = _int8pack_invalid(layer)
        if reason is None:
            return KERNELS["int8pack"]
        _log_fallback("int8pack", "fbgemm", f"{reason}, for auto's small layers")
    return KERNELS["fbgemm"]


def _auto_pack(layer: Int8Linear) -> object:
    kernel = _auto_choice(layer)
    return kernel, kernel.pack(layer)


def _auto_run(layer: Int8Linear, state: object, x: torch.Tensor) -> torch.Tensor:
    kernel, packed = state
    return kernel.run(layer, packed, x)


# --- triton: our CUDA kernel (models/kernels/cuda_int8.py) -----------------------------------

def _triton_invalid(layer: Int8Linear) -> str | None:
    if not layer.weight.is_contiguous():
        return "its int8 weights are not contiguous"
    return cuda_int8.problem(layer.weight.device)


def _triton_run(layer: Int8Linear, state: object, x: torch.Tensor) -> torch.Tensor:
    scales, mins, bias = state
    return cuda_int8.linear(layer.weight, scales, x, bias, mins, layer.group)


# --- dequant: weight-only, any device ----------------------------------------------

def _dequant_run(layer: Int8Linear, _: object, x: torch.Tensor) -> torch.Tensor:
    if layer.group:
        return _add_bias(F.linear(x, layer.dequantized(x.dtype)), layer.bias)
    y = F.linear(x, layer.weight.to(x.dtype)) * layer.scales.to(x.dtype)
    return _add_bias(y, layer.bias)


KERNELS: dict[str, Kernel] = {
    k.name: k for k in (
        Kernel("auto", _auto_invalid, _auto_pack, _auto_run),
        Kernel("fbgemm", _fbgemm_invalid, _fbgemm_pack, _fbgemm_run),
        Kernel("int8pack", _int8pack_invalid, _int8pack_pack, _int8pack_run),
        Kernel("w8a16", _w8a16_invalid, _w8a16_pack, _w8a16_run),
        Kernel("triton", _triton_invalid, _plain_pack, _triton_run),
        Kernel("dequant", lambda layer: None, lambda layer: None, _dequant_run),
    )
}


@functools.cache
def _log_fallback(wanted: str, chosen: str, reason: str) -> None:
    """Logs each distinct fallback once per process."""
    log.warning("int8 kernel %r is not used for some layers: %s; using %r instead",
                wanted, reason, chosen)


def choose_kernel(layer: Int8Linear, preferred: str | None = None) -> Kernel:
    """The first valid kernel for this layer: `preferred` first, then the device's list."""
    order = PREFERENCE.get(layer.device.type, PREFERENCE["*"])
    if preferred is not None:
        if preferred not in KERNELS:
            raise ValueError(f"unknown int8 kernel {preferred!r}; known: {sorted(KERNELS)}")
        order = (preferred, *(k for k in order if k != preferred))
    first_reason = None
    for name in order:
        reason = KERNELS[name].why_invalid(layer)
        if reason is None:
            if first_reason is not None:
                _log_fallback(order[0], name, first_reason)
            return KERNELS[name]
        first_reason = first_reason or reason
    raise RuntimeError(f"no int8 kernel can run {layer!r}: {first_reason}")


@dataclass(frozen=True, eq=False)
class Nibbles:
    """A blocks layer's int8 values at 4 bits each (`w8a16.pack_nibbles`), where all lie
    in [lo, lo + 15]: a GGUF's Q4_0 (lo -8) and Q4_1 (lo 0) blocks. w8a16 reads them in
    place of the int8 weight with the same bits (half the bytes a decode step streams).
    Valid while the layer's weight is still `weight`, the tensor they were packed from
    (a meta tensor for a fused layer, which reads its nibbles only)."""
    packed: torch.Tensor  # uint8 (out, in / 2)
    lo: int
    weight: torch.Tensor


class Int8Linear(nn.Module):
    """y = x @ (weight * scales[:, None]).T + bias, with int8 weight and per-row scales;
    or with `group` (32) inputs per scale, blocks as the module docstring says (`mins`:
    with a float16 min per block).

    `kernel` names the preferred kernel (None: the device's preference list).
    `nibbles` (a `Nibbles`, set by Store.load's `weights_to_huge_pages`) gives w8a16 the
    weight at 4 bits a value where it fits.
    """

    nibbles: Nibbles | None = None

    def nibbles_now(self) -> Nibbles | None:
        """`nibbles` while they still stand for the weight (a load or a move drops them)."""
        nib = self.__dict__.get("nibbles")
        return nib if nib is not None and nib.weight is self._buffers["weight"] else None

    @property
    def device(self) -> torch.device:
        """Where the layer computes: its weight's device, or its nibbles' (a fused layer's
        weight is a meta tensor)."""
        nib = self.nibbles_now()
        return nib.packed.device if nib is not None else self.weight.device

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, kernel: str | None = None,
                 group: int = 0, mins: bool = False) -> None:
        super().__init__()
        if kernel is not None and kernel not in KERNELS:
            raise ValueError(f"unknown int8 kernel {kernel!r}; known: {sorted(KERNELS)}")
        if group not in GROUPS or (group and in_features % group):
            raise ValueError(f"group={group} with in_features={in_features}: the group must be "
                             f"one of {GROUPS} and divide in_features")
        if mins and not group:
            raise ValueError("mins come with blocks: give group as well")
        self.in_features, self.out_features = in_features, out_features
        self.group = group
        self.preferred_kernel = kernel
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(
            *self._shapes()["scales"], dtype=self._dtypes()["scales"], device=device))
        self.register_buffer("mins", torch.zeros(*self._shapes()["mins"], dtype=torch.float16,
                                                 device=device) if mins else None)
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=torch.float32, device=device)
            if bias else None)
        self._plan = None

    @property
    def _plan(self) -> tuple[Kernel, object] | None:
        """The kernel and its packed state (None: not prepared). Every assignment stamps
        a new `plan_serial`, unique in the process: what was built from a plan (decode.py's
        block specs) is still valid while the serial is the same."""
        return self.__dict__["_plan_state"]

    @_plan.setter
    def _plan(self, plan: tuple[Kernel, object] | None) -> None:
        self.__dict__["_plan_state"] = plan
        self.__dict__["plan_serial"] = _LAST_SERIAL[0] = next(_PLAN_SERIALS)

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str | None = None) -> Int8Linear:
        q, scales = quantize_weight(linear.weight)
        m = cls(linear.in_features, linear.out_features, linear.bias is not None,
                device=linear.weight.device, kernel=kernel)
        m.weight.copy_(q)
        m.scales.copy_(scales)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    @property
    def kernel(self) -> str | None:
        """The kernel the layer runs with, or None before it is prepared."""
        return None if self._plan is None else self._plan[0].name

    @property
    def running(self) -> str | None:
        """The kernel that computes this layer, "auto" and "fused" resolved (None before
        it is prepared)."""
        if self._plan is None:
            return None
        kernel, state = self._plan
        if kernel is _MEMBER:
            return state.fused.running
        return state[0].name if kernel.name == "auto" else kernel.name

    def prepare(self, kernel: str | None = None) -> str:
        """Chooses this layer's kernel and packs weights for it; returns the kernel's name.

        `kernel` (if given) becomes the layer's preferred kernel, kept across reloads.
        """
        if kernel is not None:
            self.preferred_kernel = kernel
        self._check_buffers()
        with _PREPARE_LOCK:
            chosen = choose_kernel(self, self.preferred_kernel)
            with torch.no_grad():
                self._plan = (chosen, chosen.pack(self))
        return chosen.name

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        out_f, in_f, g = self.out_features, self.in_features, self.group
        return {"weight": (out_f, in_f), "scales": (out_f, in_f // g) if g else (out_f,),
                "mins": (in_f // g, out_f) if g else (), "bias": (out_f,)}

    def _dtypes(self) -> dict[str, torch.dtype]:
        return {"weight": torch.int8, "scales": torch.float16 if self.group else torch.float32,
                "mins": torch.float16, "bias": torch.float32}

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight (out, in) these int8 values stand for."""
        if not self.group:
            return self.weight.to(dtype) * self.scales.to(dtype)[:, None]
        out_f, nb = self.out_features, self.in_features // self.group
        w = self.weight.view(out_f, nb, self.group).to(dtype) * self.scales.to(dtype)[..., None]
        if self.mins is not None:
            w += self.mins.t().to(dtype)[..., None]
        return w.view(out_f, self.in_features)

    def _check_buffers(self) -> None:
        """A state dict loaded with assign=True may bring other dtypes or shapes."""
        shapes, dtypes = self._shapes(), self._dtypes()
        for name in ("weight", "scales", "mins", "bias"):
            dtype, shape = dtypes[name], shapes[name]
            t = getattr(self, name)
            if t is not None and (t.dtype != dtype or tuple(t.shape) != shape):
                raise ValueError(f"Int8Linear.{name} must be {dtype} {shape}, "
                                 f"got {t.dtype} {tuple(t.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._plan
        if plan is None:
            self.prepare()
            plan = self._plan
        kernel, state = plan
        if x.dim() == 2:
            return kernel.run(self, state, x)
        y = kernel.run(self, state, x.reshape(-1, self.in_features))
        return y.reshape(*x.shape[:-1], self.out_features)

    # Packed weights are derived from the buffers: drop them whenever the buffers change.
    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._plan = None
        super()._load_from_state_dict(*args, **kwargs)
        self._keep_dtypes()  # load_state_dict(assign=True) may bring others

    def _apply(self, fn, recurse: bool = True):
        self._plan = None
        before = {n: self._buffers[n] for n in ("scales", "mins", "bias")
                  if self._buffers[n] is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():  # module.to(torch.bfloat16) must not round them:
            new = self._buffers[name]     # a cast takes the new device only
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def _keep_dtypes(self) -> None:
        dtypes = self._dtypes()
        for name in ("scales", "mins", "bias"):
            buf = self._buffers[name]
            if buf is not None and buf.is_floating_point() and buf.dtype != dtypes[name]:
                self._buffers[name] = buf.to(dtypes[name])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_plan_state": None, "plan_serial": next(_PLAN_SERIALS),
                "nibbles": None}

    def extra_repr(self) -> str:
        blocks = (f", group={self.group}, mins={self.mins is not None}" if self.group else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}{blocks}, "
                f"kernel={self.kernel or self.preferred_kernel}")


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
    tokens gets all its logits in float.

    On SmolLM2-135M (tied head, 49152 x 576) the float32 head read 113 MB and took ~10 ms
    per token, the screened one ~1 ms, with a median of 12 tokens recomputed per row
    (max 352). An int8 head alone changes 2.4% of greedy tokens. w8a16 reads the int8 copy
    as it is; fbgemm packs it first (0.19 s of SmolLM2's load here).

    Picking and recomputing the candidates is one C pass where the kernel is built
    (`w8a16.screen`: the same candidates as torch's ops on the (rows, out) bounds, and a
    float dot in a fixed order, so a row's logits do not depend on its batch): SmolLM2's
    head 0.77 -> 0.62 ms at 1 row, 5.1 -> 4.0 ms at 16 (a Xeon, 2 cores). Elsewhere
    torch's ops run it.
    """

    # float32 bytes of the weight rounded at a time: each float temporary stays ~1 MiB.
    # Larger ones (4096 rows of SmolLM2's, 9 MiB each) stayed resident after loading as
    # up to 18 MiB of free memory at the top of the loading thread's malloc arena, which
    # glibc's malloc_trim does not return to the kernel (only the main arena's top).
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
        with _PREPARE_LOCK, torch.no_grad():
            for a in range(0, out_f, step):
                rows = self.weight[a: a + step]
                screen.weight[a: a + len(rows)], screen.scales[a: a + len(rows)] = (
                    quantize_weight(rows))
                if self._release is not None:
                    self._release(rows)
            state = screen.weight if kernel == "w8a16" else _fbgemm_pack(screen)
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
                  else _fbgemm_matmul(state, x))
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
        w8_reason = _w8a16_invalid(screen)
        use_w8 = w8_reason is None and (_w8a16_first(screen) or _fbgemm_invalid(screen))
        preferred = "w8a16" if use_w8 else "fbgemm"
    why = _w8a16_invalid if preferred == "w8a16" else _fbgemm_invalid
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
    return [name for name, _ in _swapped(
        module, lambda name, lin: lin.weight.device.type == "cpu",
        lambda name, lin: ScreenedLinear(lin, release=release and release(lin),
                                         place=place))]


Predicate = Callable[[str, nn.Module], bool]


def _swapped(module: nn.Module, predicate: Predicate | None,
             make: Callable[[str, nn.Linear], nn.Module]) -> list[tuple[str, nn.Module]]:
    chosen = [(name, mod) for name, mod in module.named_modules()
              if isinstance(mod, nn.Linear) and (predicate is None or predicate(name, mod))]
    out = []
    for name, linear in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        setattr(parent, attr, made := make(name, linear))
        out.append((name, made))
    return out


def _swap(module: nn.Module, predicate: Predicate | None,
          make: Callable[[str, nn.Linear], Int8Linear]) -> nn.Module:
    _swapped(module, predicate, make)
    return module


def quantize(module: nn.Module, predicate: Predicate | None = None,
             kernel: str | None = None) -> nn.Module:
    """Replaces, in place, every nn.Linear with predicate(name, linear) true (default: all)
    by an Int8Linear quantized from its weights; returns `module`."""
    if isinstance(module, nn.Linear):
        raise TypeError("quantize() swaps children in place; use Int8Linear.from_linear")
    return _swap(module, predicate,
                 lambda name, lin: Int8Linear.from_linear(lin, kernel=kernel))


def int8_formats(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, bool]]:
    """{layer name: (group, has mins)} of the Int8Linears whose tensors `state` holds."""
    out = {}
    for key, scales in state.items():
        if key.endswith(".scales"):
            name = key[: -len(".scales")]
            group = state[f"{name}.weight"].shape[1] // scales.shape[1] if scales.dim() == 2 else 0
            out[name] = (group, f"{name}.mins" in state)
    return out


def keeps_dtype(key: str, t: torch.Tensor) -> bool:
    """Whether a stored tensor keeps its dtype whatever the compute dtype: int8 weights and
    their scales and mins."""
    return t.dtype == torch.int8 or key.endswith((".scales", ".mins"))


def swap_int8(module: nn.Module, predicate: Predicate | None = None,
              kernel: str | None = None,
              formats: dict[str, tuple[int, bool]] | None = None) -> nn.Module:
    """Like quantize(), but the Int8Linears are empty (zero weights) and the Linears' own
    weights are never read, so they may be uninitialized or on the meta device: for
    loading an int8 state dict next. `formats` ({name: (group, mins)}, as `int8_formats`
    reads them from a state dict) gives layers in blocks; without a predicate, exactly its
    layers are swapped. Returns `module`."""
    if isinstance(module, nn.Linear):
        raise TypeError("swap_int8() swaps children in place; build an Int8Linear instead")
    formats = formats or {}
    if predicate is None and formats:
        def predicate(name, _m):
            return name in formats

    def make(name: str, lin: nn.Linear) -> Int8Linear:
        device = None if lin.weight.device.type == "meta" else lin.weight.device
        group, mins = formats.get(name, (0, False))
        return Int8Linear(lin.in_features, lin.out_features, lin.bias is not None,
                          device=device, kernel=kernel, group=group, mins=mins)

    return _swap(module, predicate, make)


def prepare_int8(module: nn.Module, kernel: str | None = None,
                 fuse: bool = False, rows: Rows | None = None) -> dict[str, str]:
    """Prepares every Int8Linear in `module` (call after load_state_dict); returns
    {layer name: kernel name}. With `fuse`, the groups of layers that read one input are
    first fused (`fuse_int8`, given `rows`); their members report "fused"."""
    members = fuse_int8(module, kernel, rows) if fuse else set()
    return {name: mod.kernel if mod in members else mod.prepare(kernel)
            for name, mod in module.named_modules() if isinstance(mod, Int8Linear)}


# --- fusion: Int8Linears that read one input, run as one -----------------------------
# A module lists, in `shared_input`, groups of its Linears that read the same input
# (LLaMA's q/k/v and gate/up). `fuse_int8` concatenates each group's int8 rows into one
# layer, prepared for the kernel each member would have run, and `layers.project(x, *ls)`
# then makes one kernel call for the group instead of one per member: at one row a call
# has a fixed cost (w8a16 ~15 us, fbgemm ~50 us) that SmolLM2's 210 small layers pay
# 210 times a token. Every CPU kernel here computes each output feature from its own
# weight row and the input alone, so a fused layer gives each member's outputs the same
# bits (tests/test_quant.py).
# Members keep their buffers (the checkpoint is unchanged) and run, when called alone,
# their slice of the fused layer; reloading or moving a member makes it a layer of its
# own again, and `project` then calls each member.
FUSED_KERNELS = ("fbgemm", "w8a16", "int8pack")  # each output feature on its own: exact


@dataclass(frozen=True)
class _Slice:
    fused: Int8Linear
    start: int
    end: int


def _slice_run(layer: Int8Linear, part: _Slice, x: torch.Tensor) -> torch.Tensor:
    return part.fused(x)[:, part.start:part.end].contiguous()


_MEMBER = Kernel("fused", lambda layer: "fuse_int8 sets it", lambda layer: None, _slice_run)


def _fusable(layers: list) -> bool:
    """Two or more Int8Linears alike in inputs, blocks, mins, bias and device."""
    if len(layers) < 2 or not all(isinstance(m, Int8Linear) for m in layers):
        return False
    return len({(m.in_features, m.group, m.mins is None, m.bias is None, m.device)
                for m in layers}) == 1


def resolve_kernel(layer: Int8Linear, preferred: str | None = None) -> Kernel:
    """The kernel this layer would run with: "auto" resolved to its choice."""
    kernel = choose_kernel(layer, preferred or layer.preferred_kernel)
    return _auto_choice(layer) if kernel.name == "auto" else kernel


# rows(members' int8 weights) -> their fused layer's weight (out, in) without a copy (a
# view), or None: the fused layer concatenates them (see `fuse_int8`)
Rows = Callable[[list[torch.Tensor]], torch.Tensor | None]


def fuse_int8(module: nn.Module, kernel: str | None = None,
              rows: Rows | None = None) -> set[Int8Linear]:
    """Fuses each `shared_input` group of `module`'s modules whose members would run one
    kernel of FUSED_KERNELS; returns the members, prepared as slices of their fused layer
    (their own int8 bytes are no longer read: a caller may release them, unless `rows`
    gave the fused layer a view of them rather than a copy: Store.load's members in 2 MiB
    pages, `store.back_to_back`)."""
    members: set[Int8Linear] = set()
    for parent in module.modules():
        for names in getattr(parent, "shared_input", ()):
            layers = [getattr(parent, n, None) for n in names]
            if not _fusable(layers):
                continue
            with torch.no_grad():
                kernels = {resolve_kernel(m, kernel).name for m in layers}
                if len(kernels) != 1 or next(iter(kernels)) not in FUSED_KERNELS:
                    continue
                fused = _fused_layer(layers, next(iter(kernels)), rows)
            if fused is None:
                continue
            start = 0
            for m in layers:
                m.preferred_kernel = kernel or m.preferred_kernel
                m._plan = (_MEMBER, _Slice(fused, start, start + m.out_features))
                start += m.out_features
            members.update(layers)
    return members


def _fused_layer(layers: list[Int8Linear], kernel: str,
                 rows: Rows | None = None) -> Int8Linear | None:
    """One layer of the members' rows, prepared for `kernel` (None if it would not run it);
    its weight is `rows(members' weights)` where that gives one."""
    first = layers[0]
    with torch.device("meta"):  # no memory: the buffers are set below
        fused = Int8Linear(first.in_features, sum(m.out_features for m in layers),
                           bias=first.bias is not None, kernel=kernel, group=first.group,
                           mins=first.mins is not None)
    nibs = [m.nibbles_now() for m in layers]
    packed = (rows([n.packed for n in nibs]) if rows is not None and kernel == "w8a16"
              and None not in nibs and len({n.lo for n in nibs}) == 1 else None)
    for name, dim in (("weight", 0), ("scales", 0), ("mins", 1), ("bias", 0)):
        if getattr(first, name) is not None:
            parts = [getattr(m, name) for m in layers]
            if name == "weight" and packed is not None:  # it reads its nibbles only
                fused._buffers[name] = torch.empty(fused.out_features, fused.in_features,
                                                   dtype=torch.int8, device="meta")
                fused.nibbles = Nibbles(packed, nibs[0].lo, fused._buffers[name])
                continue
            view = rows(parts) if name == "weight" and rows is not None else None
            fused._buffers[name] = torch.cat(parts, dim) if view is None else view
    if fused.prepare() != kernel:  # a fallback would change the members' bits
        return None
    if kernel == "fbgemm":  # it reads its packed copy only
        fused._buffers["weight"] = torch.empty_like(fused.weight, device="meta")
    return fused


def fused_of(layers) -> Int8Linear | None:
    """The layer `fuse_int8` made of exactly these layers, in this order, if it did."""
    plans = [getattr(m, "_plan", None) for m in layers]
    if not plans or not all(p is not None and p[0] is _MEMBER for p in plans):
        return None
    parts = [p[1] for p in plans]
    fused = parts[0].fused
    whole = (all(p.fused is fused for p in parts) and parts[0].start == 0
             and parts[-1].end == fused.out_features
             and all(a.end == b.start for a, b in zip(parts, parts[1:])))
    return fused if whole else None


def plan_serials(layers) -> tuple[int, ...]:
    """Serials that change whenever `w8a16_calls(layers)` may: each layer's plan serial,
    and for a member of a fused layer, the fused layer's too (0: not an Int8Linear)."""
    out = []
    for m in layers:
        serial = getattr(m, "plan_serial", 0) if isinstance(m, Int8Linear) else 0
        out.append(serial)
        plan = m._plan if serial else None
        if plan is not None and plan[0] is _MEMBER:
            out.append(plan[1].fused.plan_serial)
    return tuple(out)


def w8a16_calls(layers) -> list[tuple] | None:
    """The w8a16 kernel calls that `project(x, *layers)` makes: one (weight, scales, mins,
    bias, group, lo) per call (one for a fused group, else one per layer), or None where a
    layer would run another kernel, or is not prepared yet. With lo (not None) the weight
    is the layer's packed nibbles (`Nibbles`). models/kernels/decode.py makes them from C."""
    fused = fused_of(layers)
    calls = []
    for m in (fused,) if fused is not None else layers:
        plan = getattr(m, "_plan", None) if isinstance(m, Int8Linear) else None
        if plan is None:
            return None
        kernel, state = plan
        if kernel.name == "auto":
            kernel, state = state
        if kernel.name != "w8a16":
            return None
        scales, mins, bias, nib = state
        calls.append((m.weight, scales, mins, bias, m.group, None) if nib is None else
                     (nib.packed, scales, mins, bias, m.group, nib.lo))
    return calls


def fused_layers(module: nn.Module) -> list[Int8Linear]:
    """The layers `fuse_int8` made of `module`'s Int8Linears: called in their members'
    place, and not submodules of anything."""
    found: dict[int, Int8Linear] = {}
    for m in module.modules():
        plan = getattr(m, "_plan", None) if isinstance(m, Int8Linear) else None
        if plan is not None and plan[0] is _MEMBER:
            found.setdefault(id(plan[1].fused), plan[1].fused)
    return list(found.values())


def int8_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of every Int8Linear in `module`: `<name>.weight` (int8), `<name>.scales`,
    `<name>.mins` (blocks with mins) and `<name>.bias` (float32) where the layer has one."""
    return {k: v for name, mod in module.named_modules() if isinstance(mod, Int8Linear)
            for k, v in mod.state_dict(prefix=f"{name}." if name else "").items()}
