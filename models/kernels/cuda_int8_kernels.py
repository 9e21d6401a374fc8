"""The Triton kernels of models/kernels/cuda_int8.py (which says what they compute, and why).
Imported only where Triton is installed."""

import triton
import triton.language as tl


@triton.jit
def dequantized(w_ptr, s_ptr, m_ptr, rn, k, ok, N, K, GROUP: tl.constexpr,
                MINS: tl.constexpr):
    """The float32 weights [rn, k] (per-channel: the int8 values, scaled later)."""
    w = tl.load(w_ptr + rn.to(tl.int64) * K + k, mask=ok, other=0).to(tl.float32)
    if GROUP:
        g = k // GROUP
        s = tl.load(s_ptr + rn.to(tl.int64) * (K // GROUP) + g, mask=ok, other=0.0)
        w = w * s.to(tl.float32)
        if MINS:
            w = w + tl.load(m_ptr + g * N + rn, mask=ok, other=0.0).to(tl.float32)
    return w

@triton.jit
def finish(acc, s_ptr, b_ptr, y_ptr, rows, rn, rows_ok, n_ok, stride_y,
           GROUP: tl.constexpr, BIAS: tl.constexpr):
    """acc (rows, n) scaled (per-channel), biased, stored in y's dtype."""
    if not GROUP:
        acc = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0)[None, :]
    if BIAS:
        acc = acc + tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y + rn[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=rows_ok[:, None] & n_ok[None, :])

@triton.jit
def row_kernel(x_ptr, w_ptr, s_ptr, m_ptr, b_ptr, y_ptr, M, N, K, stride_x, stride_y,
               GROUP: tl.constexpr, MINS: tl.constexpr, BIAS: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """BLOCK_N outputs of one row: float32 products summed in a (BLOCK_N, BLOCK_K)
    tile, reduced once at the end. Rows are the grid's fastest axis: the programs
    of one weight tile run side by side and share it through L2."""
    row = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        x = tl.load(x_ptr + row * stride_x + k, mask=k_ok, other=0.0).to(tl.float32)
        w = dequantized(w_ptr, s_ptr, m_ptr, rn[:, None], k[None, :],
                        n_ok[:, None] & k_ok[None, :], N, K, GROUP, MINS)
        acc += w * x[None, :]
    y = tl.sum(acc, axis=1)[None, :]
    finish(y, s_ptr, b_ptr, y_ptr, tl.full((1,), row, tl.int32), rn,
           tl.full((1,), 1, tl.int1), n_ok, stride_y, GROUP, BIAS)

@triton.jit
def tile_kernel(x_ptr, w_ptr, s_ptr, m_ptr, b_ptr, y_ptr, M, N, K, stride_x, stride_y,
                GROUP: tl.constexpr, MINS: tl.constexpr, BIAS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PRECISION: tl.constexpr):
    """A (BLOCK_M, BLOCK_N) tile of outputs: tl.dot of x's rows and the dequantized
    weight tile, float32 sums (float32 and bfloat16 x: float32 products, PRECISION
    "tf32x3" on tensor cores or "ieee" on the float units; float16 x: the weight in
    float16, on tensor cores)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_ok, rows_ok = rn < N, rows < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + k[None, :],
                    mask=rows_ok[:, None] & k_ok[None, :], other=0.0)
        w = dequantized(w_ptr, s_ptr, m_ptr, rn[None, :], k[:, None],
                        n_ok[None, :] & k_ok[:, None], N, K, GROUP, MINS)
        if x.dtype == tl.float16:  # tensor cores, on every card Triton runs on
            acc += tl.dot(x, w.to(tl.float16))
        else:  # float32, and bfloat16 (exact in float32; Turing has no bf16 dot)
            acc += tl.dot(x.to(tl.float32), w, input_precision=PRECISION)
    finish(acc, s_ptr, b_ptr, y_ptr, rows, rn, rows_ok, n_ok, stride_y, GROUP, BIAS)
