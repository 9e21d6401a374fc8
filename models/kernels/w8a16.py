"""A CPU kernel of our own for int8 weights: `w8a16`, compiled for this machine on first use.

    y = w8a16.linear(weight int8 (out, in), scales float32 (out,), x float32 (rows, in),
                     bias float32 (out,) or None)
    y = w8a16.blocks(weight int8 (out, in), scales float16 (out, in / 32),
                     mins float16 (in / 32, out) or None, x float32 (rows, in))

`blocks` runs a GGUF's Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 weights kept as they are (models/quant.py):
each block's exact int32 pair sums are scaled by its float16 scale in float32 lanes, the
mins times the activations' exact block sums added apart. ~1.3x the per-channel kernel's
time on SmolLM2's layers (more float work per 32 inputs, 1/8 more bytes); the same
invariance, pinned in its C comments. `blocks(..., lo=)` reads Q4 weights packed at 4 bits
a value (`pack_nibbles`) with the same bits: at one row, on SmolLM2's layers streamed from
memory, 1.26-1.46x the int8 weights' speed (a Xeon, AVX512-VNNI; compute-bound on the
unpacking, not at half the time); from 5 rows up each weight row is unpacked once and runs
as int8 (0.91-0.96x).

Why (measured on 2 cores of an AVX512 EPYC, one row; `llm-shard bench kernels`): torch's
`_weight_int8pack_mm` is compute-bound at ~10 GB/s of weights (5.9 GB/s on one core),
fbgemm costs ~50 us of activation quantization per call, and fp32 `F.linear` reads 4x the
bytes. This kernel rounds each activation row to int16 on a grid of its absmax / 32767
and sums int16 x int16 products exactly (AVX512-VNNI `vpdpwssd`, or AVX2 `vpmaddwd`): at
one row it streams weights as fast as a plain read of them (~21 GB/s on SmolLM2's small
layers, 22-29 on PanGu-2.6B's), with ~5-9 us of fixed cost per call. From 2 rows up it
runs tiles of 8 weight rows x 2 activation rows (AVX2: 4 x 2) of accumulators: level
with fbgemm's int8 GEMM at 4-64 rows on AVX512-VNNI, 1.1-1.4x of it on an AVX2 CPU (Zen 3;
fbgemm runs each row twice there, see models/quant.py), 0.6-0.7x of fbgemm's AVX512
kernels for an AVX2 build on an AVX512 CPU (`keeps_up`).

Accuracy: 16-bit activations, and each output is the exact integer dot product of the
rounded activations and the int8 weights, rounded to float32 once, then scaled:
~50x closer to the float product than int8pack's bf16 (a relative error of ~5e-5 against
its ~3e-3).

Batch invariance: integer sums are exact, so the sum is the same however the lanes,
tiles, rows or threads split the work (int32 lanes are widened to int64 before they could
overflow). A row's result depends on that row alone: not on the other rows of the call,
the thread count, or whether the AVX512, AVX2 or plain C path ran.

The same library carries the float32 steps of a decode step, where torch's ops cost more
than their work: `attend` (one query row against a KV cache, grouped query heads),
`rotate` (rotate_half rotary, torch's bits), `rms_norm`, `layer_norm`, `silu_mul` and
`gelu`; and a screened LM head's candidate pass (`screen`). models/layers.py calls them
where `can_*` say they run, and torch's ops otherwise; `w8a16_block` runs a whole
pre-norm block of them and the int8 layers in one call (models/kernels/decode.py).

Build: the C source below, `cc -O3 -march=native -fopenmp`, linked to the libgomp that
torch ships so that torch and the kernel share one OpenMP runtime and thread pool. The
library is cached under ~/.cache/llm-shard/kernels (LLM_SHARD_KERNEL_CACHE) by a hash of
the source, compiler, flags and this CPU's feature flags (~0.2 s to build). `problem()`
says why the kernel cannot run here (no compiler, no AVX2, no torch libgomp); the int8
layer then takes the next kernel of its preference list, and says so in the log.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = r"""
#define _GNU_SOURCE
#include <sched.h>
#include <omp.h>
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <immintrin.h>

#define MB 4  /* activation rows per pass over a weight row in `blocks` */

/* Per-channel tiles: TW weight rows x TX activation rows of accumulators a pass. STEP
   inputs a step; each int32 lane takes 2 products a step, and is flushed to int64 every
   CHUNK = 256 steps: |lane| <= 512 * 128 * 32767 < 2^31. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define VARIANT 2
#define TW 8
#define TX 2
#define STEP 32
typedef __m512i acc_t;
#define ZERO() _mm512_setzero_si512()
#define LOADW(p) _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(p)))
#define LOADX(p) _mm512_loadu_si512((const void*)(p))
#define DOT(a, w, x) _mm512_dpwssd_epi32(a, w, x)
static inline int64_t hsum(acc_t v) {  /* exact: the lanes widened to int64 */
  return _mm512_reduce_add_epi64(_mm512_add_epi64(
      _mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)),
      _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1))));
}
#elif defined(__AVX2__) && defined(__FMA__)  /* `blocks` fuses its multiply-adds */
#define VARIANT 1
#define TW 4
#define TX 2
#define STEP 16
typedef __m256i acc_t;
#define ZERO() _mm256_setzero_si256()
#define LOADW(p) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(p)))
#define LOADX(p) _mm256_loadu_si256((const __m256i*)(p))
#define DOT(a, w, x) _mm256_add_epi32(a, _mm256_madd_epi16(w, x))
static inline int64_t hsum(acc_t v) {
  __m256i s = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                               _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
  __m128i t = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  return _mm_cvtsi128_si64(t) + _mm_extract_epi64(t, 1);
}
#else
#define VARIANT 0
#define TW 1
#define TX 1
#define STEP 0
#endif
#define CHUNK (256 * STEP)
/* One-row paths prefetch the weights PFD bytes ahead: the hardware prefetcher stops at
   each 4 KiB page, and a decode step's weights come from DRAM. Measured on a Zen 3 EPYC
   (AVX2, 2 cores, interleaved runs, layers that do not fit the caches): per-channel
   row_dot 15.8 -> 17.0 GB/s on PanGu-2.6B's layers and 11.8 -> 14.2 on SmolLM2's, blocks
   10.5 -> 12.3 on SmolLM2's; 1024 and 2048 bytes ahead gave less. Not in rows_dot: R rows
   already stream at once there, and prefetching them lost 13%. */
#ifndef PFD
#define PFD 4096
#endif
#if PFD
#define PREFETCH(p) _mm_prefetch((const char*)(p), _MM_HINT_T0)
#else
#define PREFETCH(p) ((void)0)
#endif

int w8a16_variant(void) { return VARIANT; }

/* Binds the calling thread's OpenMP team of n threads: thread i to cpus[i]. libgomp keeps
   a team's threads for the next parallel regions of the same thread, torch's included.
   Returns how many threads could not be bound. */
int w8a16_pin(const int* cpus, int n) {
  int failed = 0;
  #pragma omp parallel num_threads(n) reduction(+:failed)
  {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpus[omp_get_thread_num()], &set);
    failed += sched_setaffinity(0, sizeof set, &set) != 0;
  }
  return failed;
}

/* out[j][k] = the exact sum over all I inputs of w[j, i] * q[k, i], for nw <= TW weight
   rows (stride I) and nq <= TX activation rows. */
static void tile(const int8_t* w, const int16_t* q, int I, int nw, int nq,
                 int64_t out[TW][TX]) {
  int i = 0;
  for (int j = 0; j < TW; j++) for (int k = 0; k < TX; k++) out[j][k] = 0;
#if VARIANT > 0
  if (nw == TW && nq == TX) {  /* the full tile, unrolled by the compiler */
    for (int b = 0; b + STEP <= I; b += CHUNK) {
      int e = b + CHUNK < I ? b + CHUNK : I;
      acc_t acc[TW][TX];
      for (int j = 0; j < TW; j++) for (int k = 0; k < TX; k++) acc[j][k] = ZERO();
      for (i = b; i + STEP <= e; i += STEP) {
        acc_t wv[TW];
        for (int j = 0; j < TW; j++) wv[j] = LOADW(w + (size_t)j * I + i);
        for (int k = 0; k < TX; k++) {
          acc_t xv = LOADX(q + (size_t)k * I + i);
          for (int j = 0; j < TW; j++) acc[j][k] = DOT(acc[j][k], wv[j], xv);
        }
      }
      for (int j = 0; j < TW; j++) for (int k = 0; k < TX; k++) out[j][k] += hsum(acc[j][k]);
    }
  } else {  /* an edge tile: a weight row at a time */
    for (int j = 0; j < nw; j++)
      for (int b = 0; b + STEP <= I; b += CHUNK) {
        int e = b + CHUNK < I ? b + CHUNK : I;
        acc_t acc[TX];
        for (int k = 0; k < TX; k++) acc[k] = ZERO();
        for (i = b; i + STEP <= e; i += STEP) {
          acc_t wv = LOADW(w + (size_t)j * I + i);
          for (int k = 0; k < nq; k++) acc[k] = DOT(acc[k], wv, LOADX(q + (size_t)k * I + i));
        }
        for (int k = 0; k < nq; k++) out[j][k] += hsum(acc[k]);
      }
  }
#endif
  for (; i < I; i++)  /* the tail past the last whole step */
    for (int j = 0; j < nw; j++)
      for (int k = 0; k < nq; k++)
        out[j][k] += (int32_t)w[(size_t)j * I + i] * q[(size_t)k * I + i];
}

/* The exact sum over I inputs of row[i] * q[i]: decode's one activation row, two chains
   of dot products so that the weights stream at memory speed. */
static int64_t row_dot(const int8_t* row, const int16_t* q, int I) {
  int64_t total = 0;
  int i = 0;
#if VARIANT > 0
  for (int b = 0; b + STEP <= I; b += CHUNK) {
    int e = b + CHUNK < I ? b + CHUNK : I;
    acc_t a0 = ZERO(), a1 = ZERO();
    for (i = b; i + 2 * STEP <= e; i += 2 * STEP) {
      PREFETCH(row + i + PFD);
      a0 = DOT(a0, LOADW(row + i), LOADX(q + i));
      a1 = DOT(a1, LOADW(row + i + STEP), LOADX(q + i + STEP));
    }
    if (i + STEP <= e) { a0 = DOT(a0, LOADW(row + i), LOADX(q + i)); i += STEP; }
    total += hsum(a0) + hsum(a1);
  }
#endif
  for (; i < I; i++) total += (int32_t)row[i] * q[i];
  return total;
}

/* out[j] = the exact sum over I inputs of w[j, i] * q[i] for nw <= R weight rows (stride
   I), one activation row: for rows over WIDE inputs, whose int16 activations outgrow half
   of L1, each activation vector loaded serves R rows, and R rows stream at once. Measured
   here (one row, memory-bound, GB/s of weights, interleaved runs on 2 cores; the plain
   read of memory gave 28-38 GB/s in those minutes):
   - 10240 inputs (PanGu-2.6B's fc2): R = 16 32-33, 8 32-40, 32 24, 2 21-27, row_dot 27-28;
   - 20480 inputs: R = 16 31, 8 34-44, 2 25-28, row_dot 21;
   - 2560 inputs: row_dot beats R = 8 or 16 on every row (~0.85x of it): WIDE stays.
   R = 16 and 8 are level alone; over the whole of PanGu-2.6B at batch 1, R = 16 took 72
   and 82 ms a token, R = 8 78 and 88, R = 2 86 and 93. R = 16 keeps 16 accumulators and
   two operands in the 32 zmm registers; AVX2's 16 ymm registers take R = 8 (an AVX2 build
   here, 11008 and 10240 inputs: R = 8 32-35, 16 30, 4 28-30, 2 23-25). */
#define WIDE 8192
#if VARIANT == 2
#define R 16
#else
#define R 8
#endif
static void rows_dot(const int8_t* w, const int16_t* q, int I, int nw, int64_t out[R]) {
  if (nw < R || VARIANT == 0) {
    for (int j = 0; j < nw; j++) out[j] = row_dot(w + (size_t)j * I, q, I);
    return;
  }
  int i = 0;
  for (int j = 0; j < R; j++) out[j] = 0;
#if VARIANT > 0
  for (int b = 0; b + STEP <= I; b += CHUNK) {
    int e = b + CHUNK < I ? b + CHUNK : I;
    acc_t acc[R];
    for (int j = 0; j < R; j++) acc[j] = ZERO();
    for (i = b; i + STEP <= e; i += STEP) {
      acc_t xv = LOADX(q + i);
      for (int j = 0; j < R; j++) acc[j] = DOT(acc[j], LOADW(w + (size_t)j * I + i), xv);
    }
    for (int j = 0; j < R; j++) out[j] += hsum(acc[j]);
  }
#endif
  for (; i < I; i++)
    for (int j = 0; j < R; j++) out[j] += (int32_t)w[(size_t)j * I + i] * q[i];
}

/* Each row of x (M, I) rounded to int16 on a grid of its absmax / 32767: q, and the
   grid step per row in xs. The vector paths give lrintf's bits: the products round to
   nearest even, in range by construction. */
static void round_rows(const float* x, int M, int I, int16_t* q, float* xs) {
  for (int m = 0; m < M; m++) {
    const float* xm = x + (size_t)m * I;
    int16_t* qm = q + (size_t)m * I;
    float amax = 0;
    int i = 0;
#if VARIANT == 2
    __m512 vmax = _mm512_setzero_ps();
    for (; i + 16 <= I; i += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xm + i)));
    amax = _mm512_reduce_max_ps(vmax);
#elif VARIANT == 1
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 vmax = _mm256_setzero_ps();
    for (; i + 8 <= I; i += 8)
      vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xm + i)));
    float lanes[8];
    _mm256_storeu_ps(lanes, vmax);
    for (int l = 0; l < 8; l++) amax = lanes[l] > amax ? lanes[l] : amax;
#endif
    for (; i < I; i++) { float a = fabsf(xm[i]); amax = a > amax ? a : amax; }
    float sc = amax > 0 ? amax / 32767.0f : 1.0f, inv = 1.0f / sc;
    i = 0;
#if VARIANT == 2
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i hi = _mm512_set1_epi32(32767), lo = _mm512_set1_epi32(-32767);
    for (; i + 16 <= I; i += 16) {
      __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xm + i), vinv));
      v = _mm512_max_epi32(_mm512_min_epi32(v, hi), lo);
      _mm256_storeu_si256((__m256i*)(qm + i), _mm512_cvtepi32_epi16(v));
    }
#elif VARIANT == 1
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256i hi = _mm256_set1_epi32(32767), lo = _mm256_set1_epi32(-32767);
    for (; i + 16 <= I; i += 16) {
      __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xm + i), vinv));
      __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xm + i + 8), vinv));
      a = _mm256_max_epi32(_mm256_min_epi32(a, hi), lo);
      b = _mm256_max_epi32(_mm256_min_epi32(b, hi), lo);
      _mm256_storeu_si256((__m256i*)(qm + i),  /* packs interleaves 128-bit halves */
                          _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8));
    }
#endif
    for (; i < I; i++) {
      long v = lrintf(xm[i] * inv);
      qm[i] = (int16_t)(v > 32767 ? 32767 : v < -32767 ? -32767 : v);
    }
    xs[m] = sc;
  }
}

/* One output: the exact sum rounded to float32 once, scaled by the row's grid step xs and
   the channel's scale s[o], then b[o] added in float32 (as torch's add after it would). */
static inline float output(int64_t sum, float xs, const float* s, const float* b, int o) {
  float v = (float)sum * xs * s[o];
  return b ? v + b[o] : v;
}

/* y[m, o] = s[o] * sum_i w[o, i] * x[m, i] (+ b[o], if b) for x (M, I) float32, w (O, I)
   int8.
   Each row of x is rounded to int16 on a grid of its absmax / 32767; the products are
   summed exactly in integers (int32 lanes, widened to int64 before they could overflow),
   and that exact sum is rounded to float32 once: y = float(sum) * xs[m] * s[o] (+ b[o]
   in float32, as torch's add after it would). A row's
   result depends on that row alone (not on M, the tiles, the thread count or the
   variant), and is the exact product of the rounded activations, rounded once. */
int w8a16_linear(const int8_t* w, const float* s, const float* b, const float* x, float* y,
                 int M, int O, int I, int threads) {
  int16_t* q = (int16_t*)malloc((size_t)M * I * sizeof(int16_t) + 64);
  float* xs = (float*)malloc((size_t)M * sizeof(float));
  if (!q || !xs) { free(q); free(xs); return -1; }
  round_rows(x, M, I, q, xs);
  if (M == 1) {  /* decode: each weight row read once, front to back; wide rows in R's */
    int r = I > WIDE ? R : 1, groups = (O + r - 1) / r;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int g = 0; g < groups; g++) {
      int o = g * r, nw = O - o < r ? O - o : r;
      int64_t dots[R];
      rows_dot(w + (size_t)o * I, q, I, nw, dots);
      for (int j = 0; j < nw; j++) y[o + j] = output(dots[j], xs[0], s, b, o + j);
    }
    free(q); free(xs);
    return 0;
  }
  int tiles = (O + TW - 1) / TW;
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (int t = 0; t < tiles; t++) {
    int o = t * TW, nw = O - o < TW ? O - o : TW;
    for (int m = 0; m < M; m += TX) {
      int nq = M - m < TX ? M - m : TX;
      int64_t part[TW][TX];
      tile(w + (size_t)o * I, q + (size_t)m * I, I, nw, nq, part);
      for (int j = 0; j < nw; j++)
        for (int k = 0; k < nq; k++)
          y[(size_t)(m + k) * O + o + j] = output(part[j][k], xs[m + k], s, b, o + j);
    }
  }
  free(q); free(xs);
  return 0;
}

/* ---- blocks of G = 32 inputs: w[o, i] = d[o, b] q[o, i] + mn[o, b], i in block b, with
   d and mn float16 (a GGUF's Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 blocks, kept as they are).
   For an activation row rounded to xs * xq:
     y = xs * (sum_b d[b] D[b] + sum_b mn[b] T[b]),
   D[b] = sum over block b of q xq, T[b] = sum over block b of xq (exact integers).
   Each block's D is 16 exact pair sums ("lanes": inputs 2l and 2l+1), converted to float
   and added to lane l times d[b] in one fused multiply-add (rounded once), in block order
   (row_dots says the order); the lanes then added in a fixed tree; the min terms are
   added up in block order, separately, multiplied then added (their table is transposed,
   (I / 32, O), so that this runs across 16 rows at a time). Every variant does exactly
   these float operations (fmaf in plain C; no other contraction: -ffp-contract=off), so a
   row's bits depend on that row alone. The fused multiply-add left the multiply and add
   at several rows a step ~1.2x faster (SmolLM2's layers at 16 rows, AVX512-VNNI: the
   float work per block and row bounds it, not the weights); at one row it is level. */
#define G 32
#define MAXNB 1024  /* blocks per row converted on the stack: I <= 32768 */

static inline float h2f(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, f;
  if (e == 0) {
    float v = ldexpf((float)m, -24);  /* zero or subnormal: exact */
    return sign ? -v : v;
  }
  f = e == 31 ? (sign | 0x7f800000u | (m << 13)) : (sign | ((e + 112) << 23) | (m << 13));
  float r;
  memcpy(&r, &f, sizeof r);
  return r;
}

/* n float16 -> float32 (exact in every variant). */
static inline void halves(const uint16_t* h, float* f, int n) {
  int i = 0;
#if VARIANT == 2
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(f + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(h + i))));
#elif VARIANT == 1 && defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + i))));
#endif
#if defined(__F16C__)
  for (; i < n; i++) f[i] = _cvtsh_ss(h[i]);
#else
  for (; i < n; i++) f[i] = h2f(h[i]);
#endif
}

/* The lanes' fixed tree: v[l] += v[l + h] for h = 8, 4, 2, 1. */
static inline float reduce16(float v[16]) {
  for (int h = 8; h >= 1; h /= 2)
    for (int l = 0; l < h; l++) v[l] = v[l] + v[l + h];
  return v[0];
}

#if VARIANT > 0
static inline float reduce8(__m256 a) {  /* reduce16 from h = 4 */
  __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  b = _mm_add_ps(b, _mm_movehl_ps(b, b));
  b = _mm_add_ss(b, _mm_shuffle_ps(b, b, 1));
  return _mm_cvtss_f32(b);
}
#endif

/* Packed nibbles (`w8a16.nibbles`): a layer whose int8 values all lie in [lo, lo + 15]
   (a GGUF's Q4_0 with lo = -8, Q4_1 with lo = 0) may keep them as 4 bits each, half the
   bytes a step streams: per block of 32, byte j holds value j - lo in its low nibble and
   value j + 16 - lo in its high one (llama.cpp's Q4 order). They unpack to the same int8
   values, so every sum below, and each output's bits, are the int8 path's. */
static inline int8_t wval(const int8_t* w, const uint8_t* w4, int lo, size_t i) {
  if (!w4) return w[i];
  size_t b = i / G, j = i % G;
  uint8_t byte = w4[b * G / 2 + j % (G / 2)];
  return (int8_t)((j < G / 2 ? byte & 15 : byte >> 4) + lo);
}

#if VARIANT > 0
/* A block's 16 bytes -> its 32 values, low nibbles first, as int8 (lo added). */
static inline __m256i nibbles8(const uint8_t* p, __m128i lo8) {
  const __m128i m = _mm_set1_epi8(15);
  __m128i v = _mm_loadu_si128((const __m128i*)p);
  __m128i a = _mm_add_epi8(_mm_and_si128(v, m), lo8);
  __m128i b = _mm_add_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), m), lo8);
  return _mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1);
}
#endif
#if VARIANT == 2
static inline __m512i nibbles512(const uint8_t* p, __m128i lo8) {
  return _mm512_cvtepi8_epi16(nibbles8(p, lo8));
}
#elif VARIANT == 1
static inline void nibbles256(const uint8_t* p, __m128i lo8, __m256i* w0, __m256i* w1) {
  __m256i v = nibbles8(p, lo8);
  *w0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v));
  *w1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v, 1));
}
#endif

/* A packed row of nb blocks back to int8 values (rows of many activation rows unpack
   once, then read as int8). */
static void unpack_row(const uint8_t* w4, int lo, int nb, int8_t* out) {
  int b = 0;
#if VARIANT > 0
  const __m128i lo8 = _mm_set1_epi8((char)lo);
  for (; b < nb; b++)
    _mm256_storeu_si256((__m256i*)(out + (size_t)b * G), nibbles8(w4 + (size_t)b * G / 2, lo8));
#endif
  for (; b < nb; b++)
    for (int j = 0; j < G; j++) out[(size_t)b * G + j] = wval(NULL, w4, lo, (size_t)b * G + j);
}

/* w (rows, I) int8, every value in [lo, lo + 15], I % 32 == 0 -> out (rows, I / 2) packed
   as above. */
void w8a16_pack_nibbles(const int8_t* w, uint8_t* out, long rows, int I, int lo,
                        int threads) {
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (long r = 0; r < rows; r++) {
    const int8_t* src = w + (size_t)r * I;
    uint8_t* dst = out + (size_t)r * (I / 2);
    for (int b = 0; b < I / G; b++)
      for (int j = 0; j < G / 2; j++)
        dst[b * G / 2 + j] = (uint8_t)((src[b * G + j] - lo)
                                       | ((src[b * G + j + G / 2] - lo) << 4));
  }
}

/* One weight row (nb blocks, scales df as float32) against NQ activation rows q:
   out[k] = sum_b df[b] D_k[b]. Two sets of lanes, for even and odd blocks (two
   independent chains of adds), added lane by lane at the end. */
static inline __attribute__((always_inline)) void row_dots(
    const int8_t* w, const uint8_t* w4, int wlo, const float* df, const int16_t* q, size_t I,
    int nb, int NQ, float out[MB]) {
#if VARIANT == 2
  __m512 acc[2][MB];
  for (int k = 0; k < NQ; k++) acc[0][k] = acc[1][k] = _mm512_setzero_ps();
#define BLOCKW(s, b, wv) do { \
    __m512 dv = _mm512_set1_ps(df[b]); \
    for (int k = 0; k < NQ; k++) { \
      __m512i p = _mm512_madd_epi16(wv, LOADX(q + k * I + (b) * G)); \
      acc[s][k] = _mm512_fmadd_ps(dv, _mm512_cvtepi32_ps(p), acc[s][k]); \
    } } while (0)
  int b = 0;
  if (w4) {  /* two blocks' 32 bytes widened at once, then their halves regrouped */
    const __m512i m15 = _mm512_set1_epi16(15), lo16 = _mm512_set1_epi16((short)wlo);
    for (; b + 2 <= nb; b += 2) {
      PREFETCH(w4 + b * G / 2 + PFD);
      __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(w4 + b * G / 2)));
      __m512i L = _mm512_and_si512(v, m15), H = _mm512_srli_epi16(v, 4);
      if (wlo) { L = _mm512_add_epi16(L, lo16); H = _mm512_add_epi16(H, lo16); }
      __m512i w0 = _mm512_shuffle_i64x2(L, H, 0x44), w1 = _mm512_shuffle_i64x2(L, H, 0xEE);
      BLOCKW(0, b, w0); BLOCKW(1, b + 1, w1);
    }
    if (b < nb) {
      __m512i w0 = nibbles512(w4 + b * G / 2, _mm_set1_epi8((char)wlo));
      BLOCKW(0, b, w0);
    }
  } else {
    for (; b + 2 <= nb; b += 2) {
      PREFETCH(w + b * G + PFD);
      __m512i w0 = LOADW(w + b * G), w1 = LOADW(w + (b + 1) * G);
      BLOCKW(0, b, w0); BLOCKW(1, b + 1, w1);
    }
    if (b < nb) { __m512i w0 = LOADW(w + b * G); BLOCKW(0, b, w0); }
  }
  for (int k = 0; k < NQ; k++) acc[0][k] = _mm512_add_ps(acc[0][k], acc[1][k]);
  for (int k = 0; k < NQ; k++)
    out[k] = reduce8(_mm256_add_ps(_mm512_castps512_ps256(acc[0][k]), _mm256_castpd_ps(
        _mm512_extractf64x4_pd(_mm512_castps_pd(acc[0][k]), 1))));
#elif VARIANT == 1
  __m256 lo[2][MB], hi[2][MB];
  for (int k = 0; k < NQ; k++) lo[0][k] = hi[0][k] = lo[1][k] = hi[1][k] = _mm256_setzero_ps();
#define BLOCK256(s, b) do { \
    __m256i w0, w1; \
    if (w4) nibbles256(w4 + (b) * G / 2, lo8, &w0, &w1); \
    else { w0 = LOADW(w + (b) * G); w1 = LOADW(w + (b) * G + 16); } \
    __m256 dv = _mm256_set1_ps(df[b]); \
    for (int k = 0; k < NQ; k++) { \
      const int16_t* xk = q + k * I + (b) * G; \
      __m256i p0 = _mm256_madd_epi16(w0, LOADX(xk)), p1 = _mm256_madd_epi16(w1, LOADX(xk + 16)); \
      lo[s][k] = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(p0), lo[s][k]); \
      hi[s][k] = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(p1), hi[s][k]); \
    } } while (0)
  const __m128i lo8 = _mm_set1_epi8((char)wlo);
  int b = 0;
  for (; b + 2 <= nb; b += 2) {
    if (w4) PREFETCH(w4 + b * G / 2 + PFD); else PREFETCH(w + b * G + PFD);
    BLOCK256(0, b); BLOCK256(1, b + 1);
  }
  if (b < nb) BLOCK256(0, b);
  for (int k = 0; k < NQ; k++) {
    __m256 l0 = _mm256_add_ps(lo[0][k], lo[1][k]), h0 = _mm256_add_ps(hi[0][k], hi[1][k]);
    out[k] = reduce8(_mm256_add_ps(l0, h0));
  }
#else
  float sets[2][MB][16];
  for (int k = 0; k < NQ; k++) for (int l = 0; l < 16; l++) sets[0][k][l] = sets[1][k][l] = 0;
  for (int b = 0; b < nb; b++)
    for (int k = 0; k < NQ; k++)
      for (int l = 0; l < 16; l++) {
        int i = b * G + 2 * l;
        int32_t p = (int32_t)wval(w, w4, wlo, i) * q[k * I + i]
                    + (int32_t)wval(w, w4, wlo, i + 1) * q[k * I + i + 1];
        sets[b % 2][k][l] = fmaf(df[b], (float)p, sets[b % 2][k][l]);
      }
  for (int k = 0; k < NQ; k++) {
    float lanes[16];
    for (int l = 0; l < 16; l++) lanes[l] = sets[0][k][l] + sets[1][k][l];
    out[k] = reduce16(lanes);
  }
#endif
}

/* ms[o] = sum_b mt[b, o] t[b] in block order, for o in [o0, o1): mt (nb, O) float16. */
static void min_terms(const uint16_t* mt, const float* t, float* ms, int nb, int O,
                      int o0, int o1) {
  int o = o0;
#if VARIANT == 2
  for (; o + 16 <= o1; o += 16) {
    __m512 acc = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++)
      acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256(
          (const __m256i*)(mt + (size_t)b * O + o))), _mm512_set1_ps(t[b])));
    _mm512_storeu_ps(ms + o, acc);
  }
#elif VARIANT == 1 && defined(__F16C__)
  for (; o + 8 <= o1; o += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++)
      acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(
          (const __m128i*)(mt + (size_t)b * O + o))), _mm256_set1_ps(t[b])));
    _mm256_storeu_ps(ms + o, acc);
  }
#endif
  for (; o < o1; o++) {
    float acc = 0;
    for (int b = 0; b < nb; b++) acc = acc + h2f(mt[(size_t)b * O + o]) * t[b];
    ms[o] = acc;
  }
}

/* y[m, o] = sum_i (d[o, i / 32] w[o, i] + mt[i / 32, o]) x[m, i] for x (M, I) float32,
   w (O, I) int8, d (O, I / 32) and mt (I / 32, O) float16 (mt may be NULL: no min term);
   I % 32 == 0 and I <= 32 * MAXNB. */
static int blocks_impl(const int8_t* w, const uint8_t* w4, int lo, const uint16_t* d,
                       const uint16_t* mt, const float* x, float* y, int M, int O, int I,
                       int threads) {
  int nb = I / G;
  if (I % G || nb > MAXNB) return -2;
  int16_t* q = (int16_t*)malloc((size_t)M * I * sizeof(int16_t) + 64);
  float* xs = (float*)malloc((size_t)M * sizeof(float));
  float* T = (float*)malloc((size_t)M * nb * sizeof(float) + 64);
  if (!q || !xs || !T) { free(q); free(xs); free(T); return -1; }
  round_rows(x, M, I, q, xs);
  for (int m = 0; m < M; m++)
    for (int b = 0; b < nb; b++) {
      int32_t t = 0;
      for (int i = 0; i < G; i++) t += q[(size_t)m * I + b * G + i];
      T[(size_t)m * nb + b] = (float)t;  /* |t| <= 32 * 32767: exact */
    }
  int chunks = (O + 63) / 64;
  #pragma omp parallel num_threads(threads)
  {
    if (mt) {  /* the min terms into y first */
      #pragma omp for schedule(static)
      for (int c = 0; c < chunks; c++)
        for (int m = 0; m < M; m++)
          min_terms(mt, T + (size_t)m * nb, y + (size_t)m * O, nb, O, c * 64,
                    (c + 1) * 64 < O ? (c + 1) * 64 : O);
    }
    int8_t unpacked[w4 && M > MB ? I : 1];  /* a packed row read by several passes */
    #pragma omp for schedule(static)
    for (int o = 0; o < O; o++) {
      float df[MAXNB];
      halves(d + (size_t)o * nb, df, nb);
      const int8_t* row = w4 ? unpacked : w + (size_t)o * I;
      const uint8_t* row4 = w4 ? w4 + (size_t)o * (I / 2) : NULL;
      if (row4 && M > MB) { unpack_row(row4, lo, nb, unpacked); row4 = NULL; }
      for (int m = 0; m < M; m += MB) {
        int nq = M - m < MB ? M - m : MB;
        const int16_t* qm = q + (size_t)m * I;
        float dots[MB];
        if (nq == 1) row_dots(row, row4, lo, df, qm, (size_t)I, nb, 1, dots);
        else if (nq == MB) row_dots(row, row4, lo, df, qm, (size_t)I, nb, MB, dots);
        else row_dots(row, row4, lo, df, qm, (size_t)I, nb, nq, dots);
        for (int k = 0; k < nq; k++) {
          float* out = y + (size_t)(m + k) * O + o;
          *out = (mt ? dots[k] + *out : dots[k]) * xs[m + k];
        }
      }
    }
  }
  free(q); free(xs); free(T);
  return 0;
}

int w8a16_blocks(const int8_t* w, const uint16_t* d, const uint16_t* mt, const float* x,
                 float* y, int M, int O, int I, int threads) {
  return blocks_impl(w, NULL, 0, d, mt, x, y, M, O, I, threads);
}

/* w8a16_blocks on packed nibbles w4 (O, I / 2) with offset lo: the same bits. */
int w8a16_blocks4(const uint8_t* w4, int lo, const uint16_t* d, const uint16_t* mt,
                  const float* x, float* y, int M, int O, int I, int threads) {
  return blocks_impl(NULL, w4, lo, d, mt, x, y, M, O, I, threads);
}

/* Decode's attention of one query row: out[h] = softmax(scale q[h] . k[g, t]) @ v[g, t]
   over t < total, for each query head h and its kv head g = h / (heads / kv). q (heads,
   d) and out contiguous; k and v (kv, total, d) float32, rows of d, head strides ks and
   vs. Scores are float32 dot products, the softmax float32 (expf). One call in place of
   torch's seven ops, each of which costs more than this work at decode's sizes. */
int w8a16_attend(const float* q, const float* k, const float* v, float* out, int heads, int kv,
                 int total, int d, long ks, long vs, float scale, int threads) {
  int per = heads / kv;
  float* p = (float*)malloc(sizeof(float) * (size_t)heads * total + 64);
  if (!p) return -1;
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (int h = 0; h < heads; h++) {
    const float* qh = q + (size_t)h * d;
    const float* kg = k + (size_t)(h / per) * ks;
    const float* vg = v + (size_t)(h / per) * vs;
    float* ph = p + (size_t)h * total;
    float mx = -INFINITY;
    for (int t = 0; t < total; t++) {
      const float* kt = kg + (size_t)t * d;
      float s = 0;
      #pragma omp simd reduction(+:s)
      for (int i = 0; i < d; i++) s += qh[i] * kt[i];
      s *= scale;
      ph[t] = s;
      mx = s > mx ? s : mx;
    }
    float sum = 0;
    for (int t = 0; t < total; t++) { ph[t] = expf(ph[t] - mx); sum += ph[t]; }
    float inv = 1.0f / sum, *o = out + (size_t)h * d;
    for (int i = 0; i < d; i++) o[i] = 0;
    for (int t = 0; t < total; t++) {
      const float* vt = vg + (size_t)t * d;
      float w = ph[t] * inv;
      #pragma omp simd
      for (int i = 0; i < d; i++) o[i] += w * vt[i];
    }
  }
  free(p);
  return 0;
}

/* Decode's step of one sequence in one call: the new key and value rows k1, v1 (kv, d,
   contiguous) written at row total - 1 of the caches k and v (head strides ks, vs), then
   w8a16_attend over all total rows. Saves the cache update's torch ops (~56 us a layer
   on PanGu-2.6B, cold). */
int w8a16_append_attend(const float* q, const float* k1, const float* v1, float* k, float* v,
                        float* out, int heads, int kv, int total, int d, long ks, long vs,
                        float scale, int threads) {
  for (int g = 0; g < kv; g++) {
    memcpy(k + g * ks + (size_t)(total - 1) * d, k1 + (size_t)g * d, sizeof(float) * d);
    memcpy(v + g * vs + (size_t)(total - 1) * d, v1 + (size_t)g * d, sizeof(float) * d);
  }
  return w8a16_attend(q, k, v, out, heads, kv, total, d, ks, vs, scale, threads);
}

/* RMSNorm of each row of x (rows, d), float32: y = x r w with r = 1 / sqrtf(mean(x^2) +
   eps). The sum of squares runs in double, in a fixed order per row (a row's result
   depends on that row alone); the products are rounded in torch's order. One call in
   place of the seven ops that torch's CPU rms_norm runs (~15 us a call warm, 25-30 in a
   decode step, for a row of SmolLM2's 576 whose work takes under a microsecond). */
void w8a16_rms_norm(const float* x, const float* w, float* y, int rows, int d, float eps) {
  for (int r = 0; r < rows; r++) {
    const float* xr = x + (size_t)r * d;
    float* yr = y + (size_t)r * d;
    double sq = 0;
    #pragma omp simd reduction(+:sq)
    for (int i = 0; i < d; i++) sq += (double)xr[i] * xr[i];
    float rstd = 1.0f / sqrtf((float)(sq / d) + eps);
    #pragma omp simd
    for (int i = 0; i < d; i++) yr[i] = xr[i] * rstd * w[i];
  }
}

/* Rotary embedding, half-split (rotate_half): out[r, h, i] = x[r, h, i] c[r, i] +
   x[r, h, (i + d/2) % d] s[r, i] for x (rows, heads, d) and the tables c, s (rows, d),
   s signed for rotate_half; float32, each product and the sum rounded as torch's four
   ops round them (no contraction: -ffp-contract=off). */
void w8a16_rotate(const float* x, const float* c, const float* s, float* out, int rows,
                  int heads, int d) {
  int half = d / 2;
  for (int r = 0; r < rows; r++)
    for (int h = 0; h < heads; h++) {
      const float* xh = x + ((size_t)r * heads + h) * d;
      const float* cr = c + (size_t)r * d;
      const float* sr = s + (size_t)r * d;
      float* oh = out + ((size_t)r * heads + h) * d;
      #pragma omp simd
      for (int i = 0; i < half; i++) oh[i] = xh[i] * cr[i] + xh[i + half] * sr[i];
      #pragma omp simd
      for (int i = half; i < d; i++) oh[i] = xh[i] * cr[i] + xh[i - half] * sr[i];
    }
}

/* ---- elementwise steps of a decode step, float32, torch's formulas (expf, erff) ------ */

#define ELEMENTWISE_THREADED 8192  /* elements from which they use every thread */

/* y[r, i] = silu(g[r, i]) u[r, i] = g / (1 + exp(-g)) u, for rows of n (strides gs, us; y
   contiguous): SwiGLU's gate. */
void w8a16_silu_mul(const float* g, const float* u, float* y, int rows, int n, long gs,
                    long us, int threads) {
  #pragma omp parallel for schedule(static) num_threads( \
      (long)rows * n >= ELEMENTWISE_THREADED ? threads : 1)
  for (long e = 0; e < (long)rows * n; e++) {
    long r = e / n, i = e % n;
    float a = g[r * gs + i];
    y[e] = a / (1.0f + expf(-a)) * u[r * us + i];
  }
}

/* GELU's erf, as torch's AVX2 CPU kernel computes it (Abramowitz-Stegun 7.1.26,
   |error| <= 1.5e-7), with e^(-z^2) from Cephes' expf (a degree-6 polynomial on
   [-ln 2 / 2, ln 2 / 2] times 2^n, ~1 ulp; below -87, e^-87). Eight lanes at a time
   (AVX2), the rest one at a time: the same float operations in the same order, so the
   same bits either way. libm's erff and expf are a call per element: 2.6x torch's time. */
#define GELU_CONSTANTS(C) \
  C(sqrt_half, 0.70710678118654752f) C(lo, -87.0f) C(log2e, 1.44269504088896341f) \
  C(half, 0.5f) C(ln2_hi, 0.693359375f) C(ln2_lo, -2.12194440e-4f) \
  C(e6, 1.9875691500e-4f) C(e5, 1.3981999507e-3f) C(e4, 8.3334519073e-3f) \
  C(e3, 4.1665795894e-2f) C(e2, 1.6666665459e-1f) C(e1, 5.0000001201e-1f) C(one, 1.0f) \
  C(p, 0.3275911f) C(a5, 1.061405429f) C(a4, -1.453152027f) C(a3, 1.421413741f) \
  C(a2, -0.284496736f) C(a1, 0.254829592f)
#define SCALAR(name, v) const float name = v;
static inline float gelu1(float x) {
  GELU_CONSTANTS(SCALAR)
  float z = x * sqrt_half, a = fabsf(z);
  float t = one / (p * a + one);
  float r = (((a5 * t + a4) * t + a3) * t + a2) * t + a1;
  float m = fmaxf(-(a * a), lo);
  float n = floorf(m * log2e + half);
  float f = m - n * ln2_hi - n * ln2_lo;
  float e = (((((e6 * f + e5) * f + e4) * f + e3) * f + e2) * f + e1) * f * f + f + one;
  union { int32_t i; float f; } two_n = {.i = ((int32_t)n + 127) << 23};
  float erf = one - r * t * (e * two_n.f);
  return x * half * (one + copysignf(erf, z));
}

static void gelu_span(const float* x, float* y, long n) {
  long i = 0;
#if VARIANT > 0
#define VECTOR(name, v) const __m256 name = _mm256_set1_ps(v);
  GELU_CONSTANTS(VECTOR)
  const __m256 sign = _mm256_set1_ps(-0.0f);
#define ADD _mm256_add_ps
#define MUL _mm256_mul_ps
#define SUB _mm256_sub_ps
  for (; i + 8 <= n; i += 8) {
    __m256 xv = _mm256_loadu_ps(x + i), z = MUL(xv, sqrt_half);
    __m256 a = _mm256_andnot_ps(sign, z);
    __m256 t = _mm256_div_ps(one, ADD(MUL(p, a), one));
    __m256 r = ADD(MUL(ADD(MUL(ADD(MUL(ADD(MUL(a5, t), a4), t), a3), t), a2), t), a1);
    __m256 m = _mm256_max_ps(_mm256_xor_ps(sign, MUL(a, a)), lo);
    __m256 nv = _mm256_floor_ps(ADD(MUL(m, log2e), half));
    __m256 f = SUB(SUB(m, MUL(nv, ln2_hi)), MUL(nv, ln2_lo));
    __m256 e = ADD(MUL(e6, f), e5);
    e = ADD(MUL(e, f), e4);
    e = ADD(MUL(e, f), e3);
    e = ADD(MUL(e, f), e2);
    e = ADD(MUL(e, f), e1);
    e = ADD(ADD(MUL(MUL(e, f), f), f), one);
    __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(nv), _mm256_set1_epi32(127)), 23));
    __m256 erf = SUB(one, MUL(MUL(r, t), MUL(e, two_n)));
    erf = _mm256_or_ps(_mm256_andnot_ps(sign, erf), _mm256_and_ps(sign, z));  /* copysign */
    _mm256_storeu_ps(y + i, MUL(MUL(xv, half), ADD(one, erf)));
  }
#undef ADD
#undef MUL
#undef SUB
#endif
  for (; i < n; i++) y[i] = gelu1(x[i]);
}

/* y = x 0.5 (1 + erf(x / sqrt 2)) for n contiguous floats: GPT-2's exact GELU, with the
   erf of torch's AVX2 CPU kernel (Abramowitz-Stegun 7.1.26, |error| <= 1.5e-7; torch's
   AVX512 kernel differs from it by up to ~1.7e-6). */
void w8a16_gelu(const float* x, float* y, long n, int threads) {
  #pragma omp parallel num_threads(n >= ELEMENTWISE_THREADED ? threads : 1)
  {
    long k = omp_get_thread_num(), nt = omp_get_num_threads();
    gelu_span(x + n * k / nt, y + n * k / nt, n * (k + 1) / nt - n * k / nt);
  }
}

/* LayerNorm of each row of x (rows, d), float32: y = (x - mean) r w + b, r = 1 /
   sqrtf(var + eps), the biased variance. Mean and variance run in double, in a fixed
   order per row (a row's result depends on that row alone). */
void w8a16_layer_norm(const float* x, const float* w, const float* b, float* y, int rows,
                      int d, float eps) {
  for (int r = 0; r < rows; r++) {
    const float* xr = x + (size_t)r * d;
    float* yr = y + (size_t)r * d;
    double s = 0, sq = 0;
    #pragma omp simd reduction(+:s)
    for (int i = 0; i < d; i++) s += xr[i];
    double mean = s / d;
    #pragma omp simd reduction(+:sq)
    for (int i = 0; i < d; i++) sq += (xr[i] - mean) * (xr[i] - mean);
    float m = (float)mean, rstd = 1.0f / sqrtf((float)(sq / d) + eps);
    #pragma omp simd
    for (int i = 0; i < d; i++) yr[i] = (xr[i] - m) * rstd * w[i] + b[i];
  }
}

/* ---- a screened LM head's candidates (models/quant.py ScreenedLinear), in place. Row m
   of logits (M, O) holds the int8 copy's logits, each within b = pr[m] * s[o] of the
   float head's. Every o whose upper bound logits + b reaches the largest lower bound
   (max over o of logits - b) could be the float argmax: its logit becomes the float
   dot(W[o], x[m]) (+ bias[o]), W float32 (O, I). The same float operations as torch's
   elementwise ops on those (rows, O) tensors, so the same candidates. The dot: 16 lanes,
   lane l taking inputs i = l mod 16 in order (multiply, then add), added in reduce16's
   tree: its bits depend on the row and the weight row alone. n[m]: row m's candidate
   count, or more than max_exact where there are more: such a row is left as it is (its
   caller runs the whole float product there). Rows run in parallel, one a thread. */
static float dot16(const float* w, const float* x, int I) {
  float lanes[16] = {0};
  int i = 0;
  for (; i + 16 <= I; i += 16)
    for (int l = 0; l < 16; l++) lanes[l] = lanes[l] + w[i + l] * x[i + l];
  for (int l = 0; i + l < I; l++) lanes[l] = lanes[l] + w[i + l] * x[i + l];
  return reduce16(lanes);
}

/* max over o of y[o] - p s[o] (NaN if any is NaN, as torch's amax). */
static float lower_top(const float* y, const float* s, float p, int O) {
  int o = 0;
  float top = -INFINITY;
  int nan = 0;
#if VARIANT == 2
  __m512 vp = _mm512_set1_ps(p), vt = _mm512_set1_ps(-INFINITY);
  __mmask16 bad = 0;
  for (; o + 16 <= O; o += 16) {
    __m512 lo = _mm512_sub_ps(_mm512_loadu_ps(y + o), _mm512_mul_ps(vp, _mm512_loadu_ps(s + o)));
    bad |= _mm512_cmp_ps_mask(lo, lo, _CMP_UNORD_Q);
    vt = _mm512_max_ps(vt, lo);
  }
  nan = bad != 0;
  top = _mm512_reduce_max_ps(vt);
#elif VARIANT == 1
  __m256 vp = _mm256_set1_ps(p), vt = _mm256_set1_ps(-INFINITY), bad = _mm256_setzero_ps();
  for (; o + 8 <= O; o += 8) {
    __m256 lo = _mm256_sub_ps(_mm256_loadu_ps(y + o), _mm256_mul_ps(vp, _mm256_loadu_ps(s + o)));
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(lo, lo, _CMP_UNORD_Q));
    vt = _mm256_max_ps(vt, lo);
  }
  nan = _mm256_movemask_ps(bad) != 0;
  float t8[8];
  _mm256_storeu_ps(t8, vt);
  for (int l = 0; l < 8; l++) top = t8[l] > top ? t8[l] : top;
#endif
  for (; o < O; o++) {
    float lo = y[o] - p * s[o];
    nan |= isnan(lo);
    top = lo > top ? lo : top;
  }
  return nan ? NAN : top;
}

void w8a16_screen(float* logits, const float* pr, const float* s, const float* W,
                  const float* bias, const float* x, int M, int O, int I, int max_exact,
                  int* n, int threads) {
  #pragma omp parallel for schedule(static, 1) num_threads(M < threads ? M : threads)
  for (int m = 0; m < M; m++) {
    float* y = logits + (size_t)m * O;
    const float p = pr[m], top = lower_top(y, s, p, O);
    int count = 0, o = 0;
    int* idx = (int*)malloc(sizeof(int) * ((size_t)max_exact + 1));
    if (!idx) { n[m] = INT32_MAX; continue; }  /* the caller's whole float product */
#if VARIANT == 2
    __m512 vp = _mm512_set1_ps(p), vt = _mm512_set1_ps(top);
    for (; o + 16 <= O && count <= max_exact; o += 16) {
      __m512 up = _mm512_add_ps(_mm512_loadu_ps(y + o), _mm512_mul_ps(vp, _mm512_loadu_ps(s + o)));
      for (__mmask16 k = _mm512_cmp_ps_mask(up, vt, _CMP_GE_OQ); k && count <= max_exact;
           k &= k - 1)
        idx[count++] = o + __builtin_ctz(k);
    }
#elif VARIANT == 1
    __m256 vp = _mm256_set1_ps(p), vt = _mm256_set1_ps(top);
    for (; o + 8 <= O && count <= max_exact; o += 8) {
      __m256 up = _mm256_add_ps(_mm256_loadu_ps(y + o), _mm256_mul_ps(vp, _mm256_loadu_ps(s + o)));
      for (unsigned k = _mm256_movemask_ps(_mm256_cmp_ps(up, vt, _CMP_GE_OQ));
           k && count <= max_exact; k &= k - 1)
        idx[count++] = o + __builtin_ctz(k);
    }
#endif
    for (; o < O && count <= max_exact; o++)
      if (y[o] + p * s[o] >= top) idx[count++] = o;
    n[m] = count;
    if (count <= max_exact)
      for (int k = 0; k < count; k++) {
        float v = dot16(W + (size_t)idx[k] * I, x + (size_t)m * I, I);
        y[idx[k]] = bias ? v + bias[idx[k]] : v;
      }
    free(idx);
  }
}

/* ---- one decoder block, in one call, for rows that are each one sequence's decode step
   (or a short prompt's rows in order: one cache, each row seeing the rows up to it).
   The same C functions, in the same order, as the block's modules call one by one
   (models/kernels/decode.py): the same bits, without ~20 torch ops and Python calls a block. */

/* An int8 layer as w8a16_linear (group 0: scales float32 per row, the bias added in the
   kernel) or w8a16_blocks (group 32: scales float16 (O, I / 32), mins float16 (I / 32, O)
   or NULL, the bias added after it, as quant.py's _add_bias) runs it. */
typedef struct {
  const int8_t* w;              /* int8 (O, I), or with nib packed nibbles (O, I / 2) */
  const void* s;
  const uint16_t* mins;
  const float* b;
  int O, I, group;
  int nib, lo;                  /* nib: w holds nibbles, offset lo (blocks only) */
} lin_t;

static int lin_run(const lin_t* L, const float* x, float* y, int M, int threads) {
  if (!L->group) return w8a16_linear(L->w, (const float*)L->s, L->b, x, y, M, L->O, L->I,
                                     threads);
  int err = L->nib ? w8a16_blocks4((const uint8_t*)L->w, L->lo, (const uint16_t*)L->s,
                                   L->mins, x, y, M, L->O, L->I, threads)
                   : w8a16_blocks(L->w, (const uint16_t*)L->s, L->mins, x, y, M, L->O, L->I,
                                  threads);
  if (!err && L->b)
    for (int m = 0; m < M; m++)
      for (int o = 0; o < L->O; o++) y[(size_t)m * L->O + o] += L->b[o];
  return err;
}

#define PARTS 3
/* Up to PARTS layers that read one input (layers.project): one call where Store.load fused
   them, else one each, their outputs side by side in each row. */
typedef struct {
  lin_t part[PARTS];
  int n;
} proj_t;

static int proj_width(const proj_t* P) {
  int w = 0;
  for (int p = 0; p < P->n; p++) w += P->part[p].O;
  return w;
}

/* Whether P has 1 to PARTS layers, each reading I inputs. */
static int reads(const proj_t* P, int I) {
  if (P->n < 1 || P->n > PARTS) return 0;
  for (int p = 0; p < P->n; p++)
    if (P->part[p].I != I) return 0;
  return 1;
}

static int proj_run(const proj_t* P, const float* x, float* y, float* tmp, int M,
                    int threads) {
  if (P->n == 1) return lin_run(&P->part[0], x, y, M, threads);
  int width = proj_width(P), at = 0;
  for (int p = 0; p < P->n; p++) {
    const lin_t* L = &P->part[p];
    int err = lin_run(L, x, tmp, M, threads);
    if (err) return err;
    for (int m = 0; m < M; m++)
      memcpy(y + (size_t)m * width + at, tmp + (size_t)m * L->O, sizeof(float) * L->O);
    at += L->O;
  }
  return 0;
}

typedef struct {
  int d, heads, kv, hd, inter;  /* hidden size, query heads, kv heads, head dim, MLP width */
  int layer_norm;               /* 1: LayerNorm (w, b); 0: RMSNorm (w) */
  int gelu;                     /* 1: fc, GELU, proj; 0: gate|up, silu(gate) up, down */
  float eps, scale;
  const float *n1w, *n1b, *n2w, *n2b;
  proj_t qkv, o, up, down;
  const float *cos, *sin;       /* (M, hd) each, sin signed (layers.rope_tables); NULL: none */
  int threads;                  /* OpenMP threads of the linears */
  long attend_threaded;         /* heads x total x hd from which attention uses them too */
  /* PanGu-alpha's query layer: x = normf(x) first (nfw, nfb; the residual is the normed
     x), and the queries are qp(qin) over qin (M, d) rows, qkv then k|v of norm1(x).
     qin NULL: an ordinary block (nfw NULL: no first norm). */
  const float *nfw, *nfb, *qin;
  proj_t qp;
} block_t;

static void norm(const block_t* B, const float* w, const float* b, const float* x, float* y,
                 int M) {
  if (B->layer_norm) w8a16_layer_norm(x, w, b, y, M, B->d, B->eps);
  else w8a16_rms_norm(x, w, y, M, B->d, B->eps);
}

/* x (M, d) += attn(norm1(x)); x += mlp(norm2(x)), pre-norm, for M rows that are each a
   decode step of its own sequence: row m's new key and value are written at row total[m]
   - 1 of its caches kc[m], vc[m] ((kv, capacity, hd), head strides ks[m], vs[m]), and
   its query attends to their first total[m] rows. Returns 0, -1 (no memory) or -2 (its
   shapes do not add up, or a layer's inputs are not whole blocks). */
int w8a16_block(const block_t* B, float* x, int M, float* const* kc, float* const* vc,
                const long* ks, const long* vs, const int* total) {
  int d = B->d, qw = B->heads * B->hd, kw = B->kv * B->hd, qs = B->qin ? 0 : qw;
  int wqkv = proj_width(&B->qkv), wup = proj_width(&B->up), wmax = wqkv > wup ? wqkv : wup;
  if (wqkv != qs + 2 * kw || wup != (B->gelu ? 1 : 2) * B->inter || !reads(&B->qkv, d)
      || !reads(&B->o, qw) || proj_width(&B->o) != d || !reads(&B->up, d)
      || !reads(&B->down, B->inter) || proj_width(&B->down) != d
      || (B->qin && (!reads(&B->qp, d) || proj_width(&B->qp) != qw)))
    return -2;
  if (wmax < qw) wmax = qw;  /* the query layer's q projection goes through big too */
  size_t row = (size_t)d + wmax + wmax + qw + kw + kw + qw + B->inter;
  float* buf = (float*)malloc(sizeof(float) * row * M + 64);
  if (!buf) return -1;
  float *a = buf, *big = a + (size_t)M * d, *tmp = big + (size_t)M * wmax;
  float *q = tmp + (size_t)M * wmax, *k = q + (size_t)M * qw, *v = k + (size_t)M * kw;
  float *att = v + (size_t)M * kw, *act = att + (size_t)M * qw;
  int err = 0;
  if (B->nfw) {
    norm(B, B->nfw, B->nfb, x, a, M);
    memcpy(x, a, sizeof(float) * M * d);
  }
  if (B->qin) {
    if ((err = proj_run(&B->qp, B->qin, big, tmp, M, B->threads))) goto done;
    memcpy(q, big, sizeof(float) * M * qw);
  }
  norm(B, B->n1w, B->n1b, x, a, M);
  if ((err = proj_run(&B->qkv, a, big, tmp, M, B->threads))) goto done;
  for (int m = 0; m < M; m++) {  /* the split, each part contiguous */
    const float* r = big + (size_t)m * wqkv;
    if (qs) memcpy(q + (size_t)m * qw, r, sizeof(float) * qw);
    memcpy(k + (size_t)m * kw, r + qs, sizeof(float) * kw);
    memcpy(v + (size_t)m * kw, r + qs + kw, sizeof(float) * kw);
  }
  if (B->cos) {
    w8a16_rotate(q, B->cos, B->sin, tmp, M, B->heads, B->hd);
    memcpy(q, tmp, sizeof(float) * M * qw);
    w8a16_rotate(k, B->cos, B->sin, tmp, M, B->kv, B->hd);
    memcpy(k, tmp, sizeof(float) * M * kw);
  }
  /* every row's new key and value into its cache at row total[m] - 1 first, then each
     row's attention over its first total[m] rows: what w8a16_append_attend does row by
     row, and the same bits (a row reads no row past its own); the rows' attentions run
     on the threads side by side (a prompt's rows, or a batch's sequences), one row's
     over its heads */
  for (int m = 0; m < M; m++)
    for (int g = 0; g < B->kv; g++) {
      memcpy(kc[m] + g * ks[m] + (size_t)(total[m] - 1) * B->hd,
             k + (size_t)m * kw + (size_t)g * B->hd, sizeof(float) * B->hd);
      memcpy(vc[m] + g * vs[m] + (size_t)(total[m] - 1) * B->hd,
             v + (size_t)m * kw + (size_t)g * B->hd, sizeof(float) * B->hd);
    }
  if (M == 1) {
    long work = (long)B->heads * total[0] * B->hd;
    if ((err = w8a16_attend(q, kc[0], vc[0], att, B->heads, B->kv, total[0], B->hd, ks[0],
                            vs[0], B->scale, work >= B->attend_threaded ? B->threads : 1)))
      goto done;
  } else {
    int failed = 0;
    #pragma omp parallel for schedule(dynamic) num_threads(B->threads) reduction(|:failed)
    for (int m = 0; m < M; m++)
      failed |= w8a16_attend(q + (size_t)m * qw, kc[m], vc[m], att + (size_t)m * qw,
                             B->heads, B->kv, total[m], B->hd, ks[m], vs[m], B->scale, 1);
    if (failed) { err = -1; goto done; }
  }
  if ((err = proj_run(&B->o, att, big, tmp, M, B->threads))) goto done;
  for (size_t i = 0; i < (size_t)M * d; i++) x[i] = x[i] + big[i];
  norm(B, B->n2w, B->n2b, x, a, M);
  if ((err = proj_run(&B->up, a, big, tmp, M, B->threads))) goto done;
  if (B->gelu) w8a16_gelu(big, act, (long)M * B->inter, B->threads);
  else w8a16_silu_mul(big, big + B->inter, act, M, B->inter, wup, wup, B->threads);
  if ((err = proj_run(&B->down, act, big, tmp, M, B->threads))) goto done;
  for (size_t i = 0; i < (size_t)M * d; i++) x[i] = x[i] + big[i];
done:
  free(buf);
  return err;
}

/* Blocks B[0], ..., B[n - 1] in order over the same M rows, x in place: block l as
   w8a16_block with its caches kc[l * M + m], vc, ks, vs and total likewise. *done: the
   blocks that ran (their cache rows written). Returns 0, or w8a16_block's error for
   block *done: -1 (no memory), -2 (its shapes do not add up: it wrote nothing). */
int w8a16_blocks_run(const block_t* const* B, int n, float* x, int M, float* const* kc,
                     float* const* vc, const long* ks, const long* vs, const int* total,
                     int* done) {
  *done = 0;
  for (int l = 0; l < n; l++) {
    size_t at = (size_t)l * M;
    int err = w8a16_block(B[l], x, M, kc + at, vc + at, ks + at, vs + at, total + at);
    if (err) return err;
    *done = l + 1;
  }
  return 0;
}
"""

VARIANTS = {0: "plain C", 1: "AVX2", 2: "AVX512-VNNI"}
LEVELS = 32767  # activation grid points each side of zero (the C code's int16 range)


def cache_dir() -> Path:
    env = os.environ.get("LLM_SHARD_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llm-shard" / "kernels"


@functools.cache
def cpu_info() -> dict[str, str]:
    """/proc/cpuinfo's fields, each as its first CPU gives it ({} where there is none)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def _cpu_flags() -> str:
    return cpu_info().get("flags", "")


def _torch_libgomp() -> Path | None:
    found = sorted(Path(torch.__file__).parent.joinpath("lib").glob("libgomp*.so*"))
    return found[0] if found else None


def build(march: str = "native") -> Path:
    """Compile the kernel for `march` (cached); raises RuntimeError saying why it cannot."""
    gomp = _torch_libgomp()
    if gomp is None:
        raise RuntimeError("torch ships no libgomp here: the kernel would bring a second "
                           "OpenMP runtime")
    cc = os.environ.get("CC", "cc")
    flags = [f"-march={march}", "-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
    link = [f"-L{gomp.parent}", f"-l:{gomp.name}", f"-Wl,-rpath,{gomp.parent}", "-lm"]
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"no C compiler ({cc}: {e}); set CC or install gcc") from None
    key = hashlib.sha256("\0".join([SOURCE, cc, version, *flags, *link,
                                     _cpu_flags()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"w8a16-{march}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        c, so = Path(tmp) / "w8a16.c", Path(tmp) / "w8a16.so"
        c.write_text(SOURCE)
        done = subprocess.run([cc, *flags, str(c), "-o", str(so), *link],
                              capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"{cc} failed to build the w8a16 kernel: "
                               f"{done.stderr.strip()[-500:]}")
        os.replace(so, out)  # atomic: workers building at once all get a whole file
    return out


@functools.cache
def load(march: str = "native") -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build(march)))
    lib.w8a16_linear.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 4
    lib.w8a16_linear.restype = ctypes.c_int
    lib.w8a16_blocks.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 4
    lib.w8a16_blocks.restype = ctypes.c_int
    lib.w8a16_blocks4.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 4 + [
        ctypes.c_int] * 4
    lib.w8a16_blocks4.restype = ctypes.c_int
    lib.w8a16_pack_nibbles.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long] + [
        ctypes.c_int] * 3
    lib.w8a16_pack_nibbles.restype = None
    lib.w8a16_variant.restype = ctypes.c_int
    lib.w8a16_pin.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.w8a16_pin.restype = ctypes.c_int
    lib.w8a16_attend.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4 + [
        ctypes.c_long, ctypes.c_long, ctypes.c_float, ctypes.c_int]
    lib.w8a16_attend.restype = ctypes.c_int
    lib.w8a16_append_attend.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 4 + [
        ctypes.c_long, ctypes.c_long, ctypes.c_float, ctypes.c_int]
    lib.w8a16_append_attend.restype = ctypes.c_int
    lib.w8a16_rotate.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3
    lib.w8a16_rotate.restype = None
    lib.w8a16_rms_norm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 2 + [
        ctypes.c_float]
    lib.w8a16_rms_norm.restype = None
    lib.w8a16_layer_norm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 2 + [
        ctypes.c_float]
    lib.w8a16_layer_norm.restype = None
    lib.w8a16_silu_mul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 2 + [
        ctypes.c_long] * 2 + [ctypes.c_int]
    lib.w8a16_silu_mul.restype = None
    lib.w8a16_gelu.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long, ctypes.c_int]
    lib.w8a16_gelu.restype = None
    lib.w8a16_blocks_run.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                     ctypes.c_int] + [ctypes.c_void_p] * 6
    lib.w8a16_blocks_run.restype = ctypes.c_int
    lib.w8a16_screen.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 4 + [
        ctypes.c_void_p, ctypes.c_int]
    lib.w8a16_screen.restype = None
    return lib


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
    so that "auto" runs it on large layers too (`llm-shard bench kernels`, 2 cores):
    - the AVX512-VNNI path (an AVX512-VNNI EPYC, PanGu-2.6B's layers): 1.0-1.4x fbgemm at
      1 row, 0.8-1.1x at 4-16 rows, 1.05-1.14x at 64;
    - the AVX2 path on a CPU without AVX512, where fbgemm runs its AVX2 kernels too (a
      Zen 3 EPYC, PanGu-2.6B's and LLaMA-7B's layers): 1.03-1.35x fbgemm at 1 row,
      1.1-1.3x at 8 (LLaMA's 4096->11008: 0.8x), 1.1-1.4x at 64. fbgemm's two-level
      activations (models/quant.py) run each row twice there.
    Not the AVX2 path on an AVX512 CPU without VNNI: fbgemm's AVX512 kernels there left an
    AVX2 build of this one at 0.6-0.7x at 16 rows (measured on the AVX512-VNNI EPYC)."""
    if problem() is not None:
        return False
    variant = load().w8a16_variant()
    return variant == 2 or (variant == 1 and "avx512f" not in _cpu_flags().split())


def linear(weight: torch.Tensor, scales: torch.Tensor, x: torch.Tensor,
           bias: torch.Tensor | None = None, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x (rows, in) float32 @ (weight * scales[:, None]).T (+ bias): float32 (rows, out).

    weight int8 (out, in), scales and bias float32 (out,), all contiguous, on the CPU.
    The bias is added in the kernel: the bits of torch's add after it, one op less.
    """
    lib = lib or load()
    x = x.float().contiguous()
    rows, out = x.shape[0], weight.shape[0]
    y = torch.empty(rows, out, dtype=torch.float32)
    b = None if bias is None else bias.data_ptr()
    if rows and lib.w8a16_linear(weight.data_ptr(), scales.data_ptr(), b, x.data_ptr(),
                                 y.data_ptr(), rows, out, weight.shape[1],
                                 torch.get_num_threads()):
        raise MemoryError(f"w8a16: no memory for {rows} x {weight.shape[1]} activations")
    return y


BLOCK = 32  # inputs per scale in `blocks`


def blocks(weight: torch.Tensor, scales: torch.Tensor, mins_t: torch.Tensor | None,
           x: torch.Tensor, lib: ctypes.CDLL | None = None,
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
        mins = None if mins_t is None else mins_t.data_ptr()
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
                 lib: ctypes.CDLL | None = None) -> torch.Tensor:
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


def can_attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether `attend` runs these: float32 on the CPU, q (heads, d) contiguous, keys and
    values (kv_heads, total, d) with rows of d, kv_heads dividing heads, and the
    kernel built here."""
    if not _cpu_float32(q, keys, values):
        return False
    g, total, d = keys.shape
    return (q.is_contiguous() and q.dim() == 2 and q.shape[1] == d and q.shape[0] % g == 0
            and keys.stride()[1:] == values.stride()[1:] == (d, 1)
            and values.shape == keys.shape and total > 0)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
           lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """Attention of one query row q (heads, d) against keys/values (kv_heads, total, d),
    query head h reading kv head h // (heads // kv_heads): (heads, d) float32. Needs
    `can_attend`."""
    lib = lib or load()
    heads, d = q.shape
    g, total, _ = keys.shape
    out = torch.empty_like(q)
    if lib.w8a16_attend(q.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(),
                        heads, g, total, d, keys.stride(0), values.stride(0), scale,
                        _attend_threads(heads, total, d)):
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
                  out: torch.Tensor | None = None, lib: ctypes.CDLL | None = None
                  ) -> torch.Tensor:
    """k1, v1 written at row total - 1 of the cache buffers keys and values, then `attend`
    of q against their first `total` rows, into `out` ((heads, d) float32, contiguous; a
    new tensor if None). Needs `can_append_attend`."""
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
            out.data_ptr(), heads, g, total, d, keys.stride(0), values.stride(0), scale,
            _attend_threads(heads, total, d)):
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
           lib: ctypes.CDLL | None = None) -> torch.Tensor:
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
             lib: ctypes.CDLL | None = None) -> torch.Tensor:
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
               lib: ctypes.CDLL | None = None) -> torch.Tensor:
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
    """Whether `screen` runs these: float32 on the CPU, contiguous, of matching shapes,
    and the kernel built here."""
    rows, out = logits.shape
    tensors = (logits, row_bound, scales, weight, x) + (() if bias is None else (bias,))
    return (_cpu_float32(*tensors) and all(t.is_contiguous() for t in tensors)
            and row_bound.numel() == rows and scales.shape == (out,)
            and weight.shape == (out, x.shape[1]) and x.shape[0] == rows
            and (bias is None or bias.shape == (out,)))


def screen(logits: torch.Tensor, row_bound: torch.Tensor, scales: torch.Tensor,
           weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor,
           max_exact: int, lib: ctypes.CDLL | None = None) -> torch.Tensor:
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
                         weight.data_ptr(), None if bias is None else bias.data_ptr(),
                         x.data_ptr(), rows, out, x.shape[1],
                         max_exact, counts.data_ptr(), torch.get_num_threads())
    return counts


def can_elementwise(*tensors: torch.Tensor) -> bool:
    """Whether `silu_mul` and `gelu` run these: float32 on the CPU, contiguous, one shape,
    and the kernel built here."""
    return (_cpu_float32(*tensors) and all(t.is_contiguous() for t in tensors)
            and len({t.shape for t in tensors}) == 1 and tensors[0].dim() > 0)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, lib: ctypes.CDLL | None = None
             ) -> torch.Tensor:
    """silu(gate) * up (SwiGLU), float32, g / (1 + exp(-g)) rounded, then the product.
    Needs `can_elementwise(gate, up)`."""
    lib = lib or load()
    out = torch.empty_like(gate)
    n = gate.shape[-1]
    lib.w8a16_silu_mul(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel() // n, n,
                       n, n, torch.get_num_threads())
    return out


def gelu(x: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
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
    two then take turns on one CPU until the scheduler moves one: a 1-block decode step
    after 20 ms idle took 11-15 ms instead of 1.3 (measured here; a pipeline stage is idle
    while the others compute). Raises RuntimeError (no kernel library) or OSError."""
    lib = load()
    arr = (ctypes.c_int * len(cpus))(*cpus)
    torch.set_num_threads(len(cpus))
    failed = lib.w8a16_pin(ctypes.addressof(arr), len(cpus))
    if failed:
        raise OSError(f"{failed} of {len(cpus)} threads could not be bound to CPUs {cpus}")
