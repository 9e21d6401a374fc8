"""A GPU kernel of our own for int8 weights: weight-only int8 matmul in Triton.

    y = cuda_int8.linear(weight int8 (out, in), scales, x (rows, in) float32/float16/bfloat16,
                         bias or None, mins=None, group=0)

`scales` float32 (out,) per output row (group=0), or a GGUF's blocks kept as they are
(group=32): scales float16 (out, in / 32) and mins float16 (in / 32, out) or None, as
models/quant stores them. y has x's dtype. Each int8 weight is read into registers and
dequantized there, with float32 sums: no float copy of the weight ("dequant"'s
`F.linear(x, weight.to(x.dtype))` writes one and reads it back, and it must fit beside the
model).

Two kernels (cuda_int8_kernels.py), chosen by the call's row count: "row" (up to
ROW_KERNEL_MAX_ROWS rows: decode), one program a row's BLOCK_N outputs, rows the grid's
fastest axis so that the programs of one weight tile share it through L2, a row's bits its
own; "tile" (more rows), `tl.dot` over (BLOCK_M, 64) output tiles, float32 and bfloat16
activations as "tf32x3" (three TF32 products that keep float32's accuracy), float16 ones
with the weight in float16. Not batch-invariant as the CPU kernels are: the kernel changes
with the row count, and so does torch's attention on the GPU. tests/test_cuda.py bounds
float32 results at 1e-6 of the sum of |products| against float64.

`problem(device)` says why the kernel cannot run there (no Triton, a GPU Triton does not
support); the int8 layer then takes "dequant" and says so in the log.
"""

from __future__ import annotations

import functools

import torch

# Triton's NVIDIA backend supports compute capability 7.5 (Turing) and newer.
MIN_CAPABILITY = (7, 5)
# Up to this many rows a call runs the row kernel (each row reads the weights: from L2 when
# they fit there); from more, the tile kernel (weights read once per BLOCK_M rows).
ROW_KERNEL_MAX_ROWS = 4


@functools.cache
def _triton():
    """The triton module and our jitted kernels, or the reason they are not there."""
    try:
        from llm_shard.models.kernels import cuda_int8_kernels as k
    except ImportError as e:  # torch's CUDA wheels depend on triton; CPU builds do not
        return None, f"Triton is not installed ({e})"
    return (k.row_kernel, k.tile_kernel), None


def problem(device: torch.device | str) -> str | None:
    """Why the kernel cannot run on `device` (None: it can)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"it runs on CUDA GPUs only, weights are on {device}"
    found, why = _triton()
    if found is None:
        return why
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        return (f"Triton needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+, "
                f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}")
    return None


def linear(weight: torch.Tensor, scales: torch.Tensor, x: torch.Tensor,
           bias: torch.Tensor | None = None, mins: torch.Tensor | None = None,
           group: int = 0, kernel: str | None = None,
           precision: str = "tf32x3") -> torch.Tensor:
    """x (..., in) @ dequantized(weight).T + bias, in x's dtype. `kernel` ("row" or
    "tile") overrides the choice by row count, `precision` the tile kernel's float32
    products (benchmarks, tests)."""
    found, why = _triton()
    if found is None:
        raise RuntimeError(f"the CUDA int8 kernel cannot run: {why}")
    row_kernel, tile_kernel = found
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} inputs, the weight {in_features}")
    if not weight.is_contiguous():
        raise ValueError("the int8 weight must be contiguous")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    if rows == 0:
        return y.reshape(*lead, out_features)
    if group:
        scales = scales.contiguous()
        mins = None if mins is None else mins.contiguous()
    else:
        scales = scales.float().contiguous()
    if bias is not None:
        bias = bias.contiguous()
    args = (x2, weight, scales, mins if mins is not None else scales,
            bias if bias is not None else scales, y, rows, out_features, in_features,
            x2.stride(0), y.stride(0))
    flags = {"GROUP": group, "MINS": mins is not None, "BIAS": bias is not None}
    kernel = kernel or ("row" if rows <= ROW_KERNEL_MAX_ROWS else "tile")
    if kernel == "row":
        block_k = 256 if in_features >= 256 else 128
        row_kernel[(rows, -(-out_features // 16))](*args, **flags, BLOCK_N=16,
                                                   BLOCK_K=block_k, num_warps=4)
    elif kernel == "tile":
        block_m = 16 if rows <= 16 else 64
        tile_kernel[(-(-out_features // 64), -(-rows // block_m))](
            *args, **flags, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=32, PRECISION=precision,
            num_warps=4)
    else:
        raise ValueError(f"kernel is 'row' or 'tile', not {kernel!r}")
    return y.reshape(*lead, out_features)
