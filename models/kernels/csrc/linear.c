/* Per-channel int8 weights: y = (x rounded to int16) . w, the integer sums exact. */
#include "w8a16.h"

int w8a16_variant(void) { return VARIANT; }

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
   of L1, each activation vector loaded serves R rows, and R rows stream at once (below
   WIDE, row_dot alone is faster). R = 16 keeps 16 accumulators and two operands in the 32
   zmm registers; AVX2's 16 ymm registers take R = 8. */
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
void round_rows(const float* x, int M, int I, int16_t* q, float* xs) {
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
