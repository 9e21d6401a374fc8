"""The int8 kernel backends: how an `Int8Linear` (models/quant/linear.py) computes.

Each backend is a `Kernel` (name, invalid, pack, run). `choose_kernel` walks a layer's
preferred kernel, then its device's `PREFERENCE` list, to the first valid one, logging
each distinct fallback once; "auto" resolves per layer (`resolve_kernel`).

- "fbgemm" (CPU, torch's x86/fbgemm engine): int8 GEMM on a prepacked per-channel weight;
  activations go in as two 7-bit levels per token (~14 bits), see `fbgemm_matmul`.
- "w8a16" (CPU with AVX2 or AVX512-VNNI and a C compiler: models/kernels/w8a16.py):
  activations rounded to int16 per row, integer sums exact; reads the stored weight as it
  is, or its 4-bit `Nibbles`.
- "int8pack" (CPU): `aten._weight_int8pack_mm`, bf16 activations; in_features % 16 == 0.
- "auto" (CPU default): w8a16 (else int8pack) on layers of at most AUTO_SMALL_LAYER_BYTES,
  whose fixed cost per call is lower; on larger ones w8a16 where `w8a16.keeps_up()`, else
  fbgemm. Layers in blocks: w8a16, else dequant.
- "triton" (CUDA 7.5+ with Triton: models/kernels/cuda_int8.py): dequantizes in registers.
- "dequant" (any device): `F.linear(x, weight.to(x.dtype)) * scales`, a float copy per call.

Batch invariance: every CPU kernel gives a row the same bits whatever rows share its call,
so a sequence decodes to the same tokens alone or batched, prefilled or replayed (recovery
and seeded sampling rely on it). That is why "auto" picks per layer, never per call: its
kernels round activations differently. "dequant" and the GPU path are not invariant.
fbgemm's one-level dynamic W8A8 is not offered: it is faster at one row but fails the int8
quality bar (top-1 agreement 0.80, perplexity +16% on SmolLM2-135M).
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from llm_shard.models.kernels import cuda_int8, w8a16

log = logging.getLogger(__name__)


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


class Layer(Protocol):
    """What a kernel reads of an int8 layer (`Int8Linear`)."""

    in_features: int
    out_features: int
    group: int  # inputs per scale: 0 = one scale per output row
    weight: torch.Tensor  # int8 (out, in)
    scales: torch.Tensor  # float32 (out,), or float16 (out, in / group)
    mins: torch.Tensor | None  # float16 (in / group, out)
    bias: torch.Tensor | None  # float32 (out,)
    preferred_kernel: str | None

    @property
    def device(self) -> torch.device: ...

    def nibbles_now(self) -> Nibbles | None: ...

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...


@dataclass(frozen=True)
class Kernel:
    """One way to run an int8 layer's forward.

    invalid(layer) -> None when the kernel can run this layer, else the reason.
    pack(layer) -> the prepared state the kernel needs (after weights are loaded).
    run(layer, state, x) -> y, with x (rows, in) of any float dtype, y (rows, out) in
    x.dtype, bias included.
    """

    name: str
    invalid: Callable[[Layer], str | None]
    pack: Callable[[Layer], object]
    run: Callable[[Layer, object, torch.Tensor], torch.Tensor]


# Kernel names tried in order, per device type; a device type not listed uses "*".
PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("auto", "fbgemm", "w8a16", "int8pack", "dequant"),
    "cuda": ("triton", "dequant"),
    "*": ("dequant",),
}


def add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y.add_(bias.to(y.dtype))


# --- fbgemm: int8 weights, two-level 7-bit activations ----------------------------
# fbgemm's u8 x s8 kernels on AVX2 (no VNNI) sum pairs of products in int16: activations
# must stay in [0, 127] or they saturate. One 7-bit level per token loses too much
# (activation outliers), so each row goes in twice: on a grid of its absmax / ACT_LEVELS,
# and as its rounding residual scaled up by 2 * ACT_LEVELS. Both rows share one pass over
# the weights (at batch 1 the GEMM is memory-bound: 2 rows cost what 1 does) and the
# activations keep ~14 bits per token. The op takes one grid for all rows, so with several
# rows each is first divided by its absmax.
ACT_LEVELS = 63  # grid points each side of zero; u8 value = level + ACT_ZERO in [1, 127]
ACT_ZERO = 64
_MIN_ABSMAX = 1e-30  # a zero row stays finite: 1 / (1e-30 / ACT_LEVELS) fits in float32


def _per_channel_only(layer: Layer) -> str | None:
    if layer.group:
        return (f"its scales are per block of {layer.group} inputs, and it takes one scale "
                "per output row")
    return None


def fbgemm_invalid(layer: Layer) -> str | None:
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


def fbgemm_pack(layer: Layer) -> object:
    zeros = torch.zeros(layer.out_features, dtype=torch.long)
    with warnings.catch_warnings():
        # "quantized tensor creation functions ... are deprecated" (pytorch#184982): this
        # is fbgemm's only entry point, and fbgemm_invalid checks it still exists.
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
        qw = torch._make_per_channel_quantized_tensor(layer.weight, layer.scales.double(),
                                                      zeros, 0)
    return torch.ops.quantized.linear_prepack(qw, None)


def _fbgemm_run(layer: Layer, packed: object, x: torch.Tensor) -> torch.Tensor:
    y = add_bias(fbgemm_matmul(packed, x), layer.bias)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def fbgemm_matmul(packed: object, x: torch.Tensor) -> torch.Tensor:
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


# --- int8pack: weight-only, bf16 activations -------------------------------------

def int8pack_invalid(layer: Layer) -> str | None:
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


def _int8pack_pack(layer: Layer) -> object:
    # fp32 activations run ~10x slower than bf16 in this op; scales must match x's dtype.
    return layer.scales.to(torch.bfloat16)


def _int8pack_run(layer: Layer, scales: object, x: torch.Tensor) -> torch.Tensor:
    y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), layer.weight, scales)
    return add_bias(y.to(x.dtype), layer.bias)


# --- w8a16: int8 weights, int16 activations (models/kernels/w8a16.py) -----------------

def w8a16_invalid(layer: Layer) -> str | None:
    if layer.nibbles_now() is None:
        if layer.weight.device.type != "cpu":
            return f"it runs on CPU only, weights are on {layer.weight.device}"
        if not layer.weight.is_contiguous():
            return "its int8 weights are not contiguous"
    return w8a16.problem()


def _plain_pack(layer: Layer) -> object:
    mins = None if layer.mins is None else layer.mins.contiguous()
    bias = None if layer.bias is None else layer.bias.float().contiguous()
    return layer.scales.contiguous(), mins, bias


def _w8a16_pack(layer: Layer) -> object:
    """(scales, mins, bias, nibbles): the layer's packed nibbles where it has them
    (`Nibbles`), else None: the kernel reads its int8 weight."""
    return (*_plain_pack(layer), layer.nibbles_now())


def _w8a16_run(layer: Layer, state: object, x: torch.Tensor) -> torch.Tensor:
    scales, mins, bias, nib = state
    if nib is not None:
        y = add_bias(w8a16.blocks(nib.packed, scales, mins, x, lo=nib.lo), layer.bias)
    elif layer.group:
        y = add_bias(w8a16.blocks(layer.weight, scales, mins, x), layer.bias)
    else:  # the bias added in the kernel
        y = w8a16.linear(layer.weight, scales, x, bias)
    return y if y.dtype == x.dtype else y.to(x.dtype)


# --- auto: w8a16 where it keeps up, else by layer size -------------------------------
# fbgemm's two-level activations add a fixed cost per call on top of the GEMM; w8a16 and
# int8pack have little. On small layers w8a16 (else int8pack) is fastest at 1-4 rows; on
# larger ones w8a16 runs where it keeps up with fbgemm (`w8a16.keeps_up()`: AVX512-VNNI,
# or AVX2 on a CPU without AVX512), fbgemm elsewhere. Chosen once per layer (batch
# invariance, above).
AUTO_SMALL_LAYER_BYTES = 2 << 20


def _auto_invalid(layer: Layer) -> str | None:
    return None if layer.group else fbgemm_invalid(layer)  # blocks: w8a16, else dequant


def w8a16_first(layer: Layer) -> bool:
    """Whether "auto" tries w8a16 first for a per-channel layer of this size."""
    return layer.weight.numel() <= AUTO_SMALL_LAYER_BYTES or w8a16.keeps_up()


def auto_choice(layer: Layer) -> Kernel:
    """The kernel "auto" runs this layer with (each fallback logged once)."""
    if layer.group:
        reason = w8a16_invalid(layer)
        if reason is None:
            return KERNELS["w8a16"]
        log_fallback("w8a16", "dequant", f"{reason}, for auto's layers in blocks")
        return KERNELS["dequant"]
    small = layer.weight.numel() <= AUTO_SMALL_LAYER_BYTES
    if w8a16_first(layer):
        reason = w8a16_invalid(layer)
        if reason is None:
            return KERNELS["w8a16"]
        if not small:
            log_fallback("w8a16", "fbgemm", f"{reason}, for auto's large layers")
            return KERNELS["fbgemm"]
        log_fallback("w8a16", "int8pack", f"{reason}, for auto's small layers")
        reason = int8pack_invalid(layer)
        if reason is None:
            return KERNELS["int8pack"]
        log_fallback("int8pack", "fbgemm", f"{reason}, for auto's small layers")
    return KERNELS["fbgemm"]


def _auto_pack(layer: Layer) -> object:
    kernel = auto_choice(layer)
    return kernel, kernel.pack(layer)


def _auto_run(layer: Layer, state: object, x: torch.Tensor) -> torch.Tensor:
    kernel, packed = state
    return kernel.run(layer, packed, x)


# --- triton: our CUDA kernel (models/kernels/cuda_int8.py) ---------------------------

def _triton_invalid(layer: Layer) -> str | None:
    if not layer.weight.is_contiguous():
        return "its int8 weights are not contiguous"
    return cuda_int8.problem(layer.weight.device)


def _triton_run(layer: Layer, state: object, x: torch.Tensor) -> torch.Tensor:
    scales, mins, bias = state
    return cuda_int8.linear(layer.weight, scales, x, bias, mins, layer.group)


# --- dequant: weight-only, any device ----------------------------------------------

def _dequant_run(layer: Layer, _: object, x: torch.Tensor) -> torch.Tensor:
    if layer.group:
        return add_bias(F.linear(x, layer.dequantized(x.dtype)), layer.bias)
    y = F.linear(x, layer.weight.to(x.dtype)) * layer.scales.to(x.dtype)
    return add_bias(y, layer.bias)


KERNELS: dict[str, Kernel] = {
    k.name: k for k in (
        Kernel("auto", _auto_invalid, _auto_pack, _auto_run),
        Kernel("fbgemm", fbgemm_invalid, fbgemm_pack, _fbgemm_run),
        Kernel("int8pack", int8pack_invalid, _int8pack_pack, _int8pack_run),
        Kernel("w8a16", w8a16_invalid, _w8a16_pack, _w8a16_run),
        Kernel("triton", _triton_invalid, _plain_pack, _triton_run),
        Kernel("dequant", lambda layer: None, lambda layer: None, _dequant_run),
    )
}


def check_name(kernel: str | None) -> None:
    """ValueError unless `kernel` is None or a name in KERNELS."""
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"unknown int8 kernel {kernel!r}; known: {sorted(KERNELS)}")


@functools.cache
def log_fallback(wanted: str, chosen: str, reason: str) -> None:
    """Logs each distinct fallback once per process."""
    log.warning("int8 kernel %r is not used for some layers: %s; using %r instead",
                wanted, reason, chosen)


def choose_kernel(layer: Layer, preferred: str | None = None) -> Kernel:
    """The first valid kernel for this layer: `preferred` first, then the device's list."""
    order = PREFERENCE.get(layer.device.type, PREFERENCE["*"])
    if preferred is not None:
        check_name(preferred)
        order = (preferred, *(k for k in order if k != preferred))
    first_reason = None
    for name in order:
        reason = KERNELS[name].invalid(layer)
        if reason is None:
            if first_reason is not None:
                log_fallback(order[0], name, first_reason)
            return KERNELS[name]
        first_reason = first_reason or reason
    raise RuntimeError(f"no int8 kernel can run {layer!r}: {first_reason}")


def resolve_kernel(layer: Layer, preferred: str | None = None) -> Kernel:
    """The kernel this layer would run with: "auto" resolved to its choice. `preferred`
    defaults to the layer's own `preferred_kernel`."""
    kernel = choose_kernel(layer, preferred or layer.preferred_kernel)
    return auto_choice(layer) if kernel.name == "auto" else kernel
