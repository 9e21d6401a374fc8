/* Norms, rotary embedding and activations of a decode step, float32, torch's formulas. */
#include "w8a16.h"

/* RMSNorm of each row of x (rows, d), float32: y = x r w with r = 1 / sqrtf(mean(x^2) +
   eps). The sum of squares runs in double, in a fixed order per row (a row's result
   depends on that row alone); the products are rounded in torch's order. One call in
   place of the seven ops that torch's CPU rms_norm runs, which cost far more than a
   decode row's work. */
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

/* ---- elementwise steps (expf, erff) */

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
   same bits either way (libm's erff and expf, a call per element, are far slower). */
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
