"""Python entry points of the C kernels (csrc/, built and bound by build.py): the shapes,
checks and errors around each call.

- int8 weights, float32 activations: `linear` (a scale per output channel) and `blocks` (a
  GGUF's blocks of 32 inputs, or Q4 weights packed at 4 bits a value, `pack_nibbles`).
  Each activation row is rounded to int16 on a grid of its absmax / 32767 and its products
  with the int8 weights summed exactly, then rounded to float32 once: a row's result
  depends on that row alone, not on the call's other rows, the thread count or the SIMD
  variant (AVX512-VNNI, AVX2 with FMA, plain C).
- the float32 steps of a decode step where torch's ops cost more than their work:
  `attend` and `append_attend` (over a float32 or a float16 KV cache), `rotate`,
  `rms_norm`, `layer_norm`, `silu_mul`, `gelu`, and a screened LM head's candidate pass,
  `screen`. models/layers.py calls each where its `can_*` says it runs, torch's ops
  otherwise.
- `problem()`: why the kernels cannot run here (no compiler, no AVX2, no torch libgomp);
  the int8 layers then take the next kernel of their preference list, and log it.
"""

from __future__ import annotations

import functools

import torch

from llm_shard.models.kernels.build import Library, address, cpu_info, ffi, load

VARIANTS = {0: "plain C", 1: "AVX2", 2: "AVX512-VNNI"}
LEVELS = 32767  # activation grid points each side of zero (the C code's int16 range)


@functools.cache
def problem() -> str | None:
    """Why the kernel cannot run on this machine, or None when it can."""
    try:
        variant = load().w8a16_variant()
    except (RuntimeError, OSError) as e:
        return str(e)
    if variant == 0:
        return ("this CPU has neither AVX2 with FMA nor AVX512-VNNI (the plain C path is "
                "slower than int8pack)")
    return None


def variant() -> str:
    return VARIANTS[load().w8a16_variant()]


@functools.cache
def keeps_up() -> bool:
    """Whether the kernel keeps up with fbgemm at the row counts that matter on this CPU,
    so that "auto" runs it on large layers too (`llm-shard bench kernels`): its AVX512-VNNI
    path, or its AVX2 path on a CPU without AVX512, where fbgemm runs its AVX2 kernels too
    (and its two-level activations run each row twice). Not its AVX2 path on an AVX512
    CPU, where fbgemm's AVX512 kernels are faster."""
    if problem() is not None:
        return False
    variant = load().w8a16_variant()
    return variant == 2 or (variant == 1 and "avx512f" not in _cpu_flags().split())


def _cpu_flags() -> str:
    return cpu_info().get("flags", "")


def linear(weight: torch.Tensor, scales: torch.Tensor, x: torch.Tensor,
           bias: torch.Tensor | None = None, lib: Library | None = None) -> torch.Tensor:
    """x (rows, in) float32 @ (weight * scales[:, None]).T (+ bias): float32 (rows, out).

    weight int8 (out, in), scales and bias float32 (out,), all contiguous, on the CPU.
    The bias is added in the kernel: the bits of torch's add after it, one op less.
    """
    lib = lib or load()
    x = x.float().contiguous()
    rows, out = x.shape[0], weight.shape[0]
    y = torch.empty(rows, out, dtype=torch.float32)
    b = 0 if bias is None else bias.data_ptr()
    if rows and lib.w8a16_linear(weight.data_ptr(), scales.data_ptr(), b, x.data_ptr(),
                                 y.data_ptr(), rows, out, weight.shape[1],
                                 torch.get_num_threads()):
        raise MemoryError(f"w8a16: no memory for {rows} x {weight.shape[1]} activations")
    return y


BLOCK = 32  # inputs per scale in `blocks`


def blocks(weight: torch.Tensor, scales: torch.Tensor, mins_t: torch.Tensor | None,
           x: torch.Tensor, lib: Library | None = None,
           lo: int | None = None) -> torch.Tensor:
    """x (rows, in) float32 @ W.T with W[o, i] = scales[o, i // 32] weight[o, i]
    (+ mins_t[i // 32, o]): float32 (rows, out).

    weight int8 (out, in), or with `lo` its packed nibbles (`pack_nibbles`: uint8
    (out, in / 2), the same bits), scales float16 (out, in / 32) and the mins transposed,
    float16 (in / 32, out), all contiguous, on the CPU.
    """
    lib = lib or load()
    x = x.float().contiguous()
    rows, out = x.shape[0], weight.shape[0]
    in_f = weight.shape[1] * (1 if lo is None else 2)
    y = torch.empty(rows, out, dtype=torch.float32)
    if rows:
        mins = 0 if mins_t is None else mins_t.data_ptr()
        threads = torch.get_num_threads()
        if lo is None:
            err = lib.w8a16_blocks(weight.data_ptr(), scales.data_ptr(), mins, x.data_ptr(),
                                   y.data_ptr(), rows, out, in_f, threads)
        else:
            err = lib.w8a16_blocks4(weight.data_ptr(), lo, scales.data_ptr(), mins,
                                    x.data_ptr(), y.data_ptr(), rows, out, in_f, threads)
        if err == -2:
            raise ValueError(f"w8a16 blocks: in_features={in_f} is not a multiple "
                             f"of {BLOCK} up to {BLOCK * 1024}")
        if err:
            raise MemoryError(f"w8a16: no memory for {rows} x {weight.shape[1]} activations")
    return y


def nibble_offset(weight: torch.Tensor) -> int | None:
    """The offset lo (0: Q4_1's 0..15, -8: Q4_0's -8..7) with every value of an int8
    weight (out, in), in % 32 == 0, in [lo, lo + 15], so that `pack_nibbles` can keep it
    at 4 bits a value; None where none of the two holds."""
    if weight.dtype != torch.int8 or weight.dim() != 2 or weight.shape[1] % BLOCK:
        return None
    if not weight.numel():
        return 0
    low, high = (int(v) for v in torch.aminmax(weight))
    return next((lo for lo in (0, -8) if lo <= low and high <= lo + 15), None)


def pack_nibbles(weight: torch.Tensor, lo: int, out: torch.Tensor | None = None,
                 lib: Library | None = None) -> torch.Tensor:
    """weight int8 (out, in), every value in [lo, lo + 15] (`nibble_offset`), as packed
    nibbles uint8 (out, in / 2), written to `out` (uint8, that many bytes) if given:
    per block of 32 inputs, byte j holds value j - lo in its low 4 bits and value j + 16
    - lo in its high 4. `blocks(..., lo=lo)` reads them with the int8 weight's bits."""
    rows, in_f = weight.shape
    if lo is None or in_f % BLOCK or not weight.is_contiguous():
        raise ValueError(f"pack_nibbles: a contiguous int8 weight with in % {BLOCK} == 0 and "
                         f"an offset, got {tuple(weight.shape)} and lo={lo}")
    out = (torch.empty(rows, in_f // 2, dtype=torch.uint8) if out is None
           else out.view(torch.uint8).view(rows, in_f // 2))
    (lib or load()).w8a16_pack_nibbles(weight.data_ptr(), out.data_ptr(), rows, in_f, lo,
                                       torch.get_num_threads())
    return out


ATTEND_THREADED = 1 << 17  # heads x tokens x head_dim from which attend uses every thread


def _cpu_float32(*tensors: torch.Tensor) -> bool:
    """All float32 on the CPU, and the kernel built here: what `attend` and `rotate` need
    besides their shapes."""
    return (all(t.dtype == torch.float32 and t.is_cpu for t in tensors)
            and problem() is None)


CACHE_DTYPES = {torch.float32: 0, torch.float16: 1}  # what `attend` reads: its `half` flag
SCREEN_WEIGHTS = (torch.float32, torch.float16)  # a screened head's float rows (`screen`)


def can_attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether `attend` runs these: q (heads, d) float32 contiguous, keys and values
    (kv_heads, total, d) of one dtype, float32 or float16 (CACHE_DTYPES), with rows of d,
    kv_heads dividing heads, all on the CPU, and the kernel built here."""
    if not (_cpu_float32(q) and keys.dtype in CACHE_DTYPES and values.dtype == keys.dtype
            and keys.is_cpu and values.is_cpu):
        return False
    g, total, d = keys.shape
    return (q.is_contiguous() and q.dim() == 2 and q.shape[1] == d and q.shape[0] % g == 0
            and keys.stride()[1:] == values.stride()[1:] == (d, 1)
            and values.shape == keys.shape and total > 0)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
           lib: Library | None = None) -> torch.Tensor:
    """Attention of one query row q (heads, d) against keys/values (kv_heads, total, d),
    query head h reading kv head h // (heads // kv_heads): (heads, d) float32, float16
    keys and values read as their (exact) float32 values. Needs `can_attend`."""
    lib = lib or load()
    heads, d = q.shape
    g, total, _ = keys.shape
    out = torch.empty_like(q)
    if lib.w8a16_attend(q.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(),
                        heads, g, total, d, keys.stride(0), values.stride(0),
                        CACHE_DTYPES[keys.dtype], scale, _attend_threads(heads, total, d)):
        raise MemoryError(f"w8a16 attend: no memory for {heads} x {total} scores")
    return out


def _attend_threads(heads: int, total: int, d: int) -> int:
    return torch.get_num_threads() if heads * total * d >= ATTEND_THREADED else 1


def can_append_attend(q: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor,
                      keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether `append_attend` runs these: `can_attend(q, keys, values)` for the cache
    buffers keys and values (kv_heads, capacity, d), and new rows k1, v1 (kv_heads, d)
    float32 on the CPU, contiguous."""
    return (can_attend(q, keys, values) and _cpu_float32(k1, v1) and k1.is_contiguous()
            and v1.is_contiguous() and k1.shape == v1.shape == (keys.shape[0], keys.shape[2]))


def append_attend(q: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor, keys: torch.Tensor,
                  values: torch.Tensor, total: int, scale: float,
                  out: torch.Tensor | None = None, lib: Library | None = None
                  ) -> torch.Tensor:
    """k1, v1 written at row total - 1 of the cache buffers keys and values (a float16
    cache: rounded to nearest even, torch's `.half()` bits), then `attend` of q against
    their first `total` rows, into `out` ((heads, d) float32, contiguous; a new tensor if
    None). Needs `can_append_attend`."""
    heads, d = q.shape
    g, capacity, _ = keys.shape
    if not 0 < total <= capacity:
        raise ValueError(f"row {total - 1} is outside a cache of {capacity} rows")
    if out is None:
        out = torch.empty_like(q)
    elif not (out.shape == q.shape and out.dtype == q.dtype and out.is_cpu
              and out.is_contiguous()):
        raise ValueError(f"out must be a contiguous float32 CPU tensor of {tuple(q.shape)}")
    if (lib or load()).w8a16_append_attend(
            q.data_ptr(), k1.data_ptr(), v1.data_ptr(), keys.data_ptr(), values.data_ptr(),
            out.data_ptr(), heads, g, total, d, keys.stride(0), values.stride(0),
            CACHE_DTYPES[keys.dtype], scale, _attend_threads(heads, total, d)):
        raise MemoryError(f"w8a16 attend: no memory for {heads} x {total} scores")
    return out


def can_rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> bool:
    """Whether `rotate` runs these: float32 on the CPU, x (rows, heads, d) and the tables
    (rows, 1, d) contiguous, d even, and the kernel built here."""
    return (_cpu_float32(x, cos, signed_sin)
            and x.dim() == 3 and x.shape[-1] % 2 == 0 and x.is_contiguous()
            and cos.shape == signed_sin.shape == (x.shape[0], 1, x.shape[2])
            and cos.is_contiguous() and signed_sin.is_contiguous())


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
           lib: Library | None = None) -> torch.Tensor:
    """x cos + roll(x, d/2) signed_sin, as layers.rotate: the same bits, one call. Needs
    `can_rotate`."""
    lib = lib or load()
    out = torch.empty_like(x)
    rows, heads, d = x.shape
    lib.w8a16_rotate(x.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(), out.data_ptr(),
                     rows, heads, d)
    return out


def can_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `rms_norm` runs these: float32 on the CPU, both contiguous, weight of x's
    last dimension, and the kernel built here."""
    return (_cpu_float32(x, weight) and x.is_contiguous() and weight.is_contiguous()
            and x.dim() > 0 and weight.shape == x.shape[-1:] and x.shape[-1] > 0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             lib: Library | None = None) -> torch.Tensor:
    """RMSNorm of x's rows: x r weight, r = 1 / sqrt(mean(x^2) + eps), float32, the sum
    of squares in double. Needs `can_rms_norm`."""
    lib = lib or load()
    out = torch.empty_like(x)
    d = x.shape[-1]
    lib.w8a16_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // d, d,
                       eps)
    return out


def can_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `layer_norm` runs these: `can_rms_norm`, and a bias like the weight."""
    return (bias is not None and can_rms_norm(x, weight) and _cpu_float32(bias)
            and bias.is_contiguous() and bias.shape == weight.shape)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               lib: Library | None = None) -> torch.Tensor:
    """LayerNorm of x's rows, float32, mean and variance in double. Needs
    `can_layer_norm`."""
    lib = lib or load()
    out = torch.empty_like(x)
    d = x.shape[-1]
    lib.w8a16_layer_norm(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(),
                         x.numel() // d, d, eps)
    return out


def can_screen(logits: torch.Tensor, row_bound: torch.Tensor, scales: torch.Tensor,
               weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> bool:
    """Whether `screen` runs these: float32 on the CPU (the weight float32 or float16: a
    tied head's fp16 table), contiguous, of matching shapes, and the kernel built here."""
    rows, out = logits.shape
    tensors = (logits, row_bound, scales, x) + (() if bias is None else (bias,))
    return (_cpu_float32(*tensors) and all(t.is_contiguous() for t in (*tensors, weight))
            and weight.dtype in SCREEN_WEIGHTS and weight.is_cpu
            and row_bound.numel() == rows and scales.shape == (out,)
            and weight.shape == (out, x.shape[1]) and x.shape[0] == rows
            and (bias is None or bias.shape == (out,)))


def screen(logits: torch.Tensor, row_bound: torch.Tensor, scales: torch.Tensor,
           weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor,
           max_exact: int, lib: Library | None = None) -> torch.Tensor:
    """A screened head's candidates, in place: in each row of `logits` (rows, out), every
    output whose bound row_bound[r] * scales[o] lets it be the largest gets the float
    logit x[r] . weight[o] (+ bias[o]); see w8a16_screen. Returns each row's candidate
    count (int32); a row with more than `max_exact` is left as it was. Needs
    `can_screen`."""
    lib = lib or load()
    rows, out = logits.shape
    counts = torch.empty(rows, dtype=torch.int32)
    if rows:
        lib.w8a16_screen(logits.data_ptr(), row_bound.data_ptr(), scales.data_ptr(),
                         weight.data_ptr(), int(weight.dtype == torch.float16),
                         0 if bias is None else bias.data_ptr(),
                         x.data_ptr(), rows, out, x.shape[1],
                         max_exact, counts.data_ptr(), torch.get_num_threads())
    return counts


def row_bound(x: torch.Tensor, l1: float, mx: float, lib: Library | None = None
              ) -> torch.Tensor:
    """Each row's l1 |x|_1 + mx absmax (rows, 1), float32, the sum in double: a screened
    head's bound factor, as w8a16_head computes it. x float32 (rows, in), contiguous,
    on the CPU (`can_elementwise`)."""
    lib = lib or load()
    out = torch.empty(x.shape[0], 1)
    lib.w8a16_row_bound(x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], l1, mx)
    return out


def can_elementwise(*tensors: torch.Tensor) -> bool:
    """Whether `silu_mul` and `gelu` run these: float32 on the CPU, contiguous, one shape,
    and the kernel built here."""
    return (_cpu_float32(*tensors) and all(t.is_contiguous() for t in tensors)
            and len({t.shape for t in tensors}) == 1 and tensors[0].dim() > 0)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, lib: Library | None = None
             ) -> torch.Tensor:
    """silu(gate) * up (SwiGLU), float32, g / (1 + exp(-g)) rounded, then the product.
    Needs `can_elementwise(gate, up)`."""
    lib = lib or load()
    out = torch.empty_like(gate)
    n = gate.shape[-1]
    lib.w8a16_silu_mul(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel() // n, n,
                       n, n, torch.get_num_threads())
    return out


def gelu(x: torch.Tensor, lib: Library | None = None) -> torch.Tensor:
    """x 0.5 (1 + erf(x / sqrt 2)), float32 (F.gelu's formula, libm's erff). Needs
    `can_elementwise(x)`."""
    lib = lib or load()
    out = torch.empty_like(x)
    lib.w8a16_gelu(x.data_ptr(), out.data_ptr(), x.numel(), torch.get_num_threads())
    return out


def pin_threads(cpus: list[int]) -> None:
    """Bind the calling thread (thread 0) and the OpenMP threads of its parallel regions
    (thread i) to cpus[i]; the team keeps len(cpus) threads (torch.set_num_threads).

    Why: unbound, a helper woken after an idle gap can land on its master's CPU, and the
    two then take turns on one CPU until the scheduler moves one (a pipeline stage is idle
    while the others compute). Raises RuntimeError (no kernel library) or OSError."""
    lib = load()
    arr = ffi().new("int[]", cpus)
    torch.set_num_threads(len(cpus))
    failed = lib.w8a16_pin(address(arr), len(cpus))
    if failed:
        raise OSError(f"{failed} of {len(cpus)} threads could not be bound to CPUs {cpus}")
