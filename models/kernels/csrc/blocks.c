/* A GGUF's Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 weights kept as they are, and Q4 weights packed at 4
   bits a value. */
#include "w8a16.h"

#define MB 4  /* activation rows per pass over a weight row */

/* Blocks of G = 32 inputs: w[o, i] = d[o, b] q[o, i] + mn[o, b], i in block b, with
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
   row's bits depend on that row alone. At several rows a step the float work per block
   and row bounds the speed, not the weights: hence the fused multiply-add. */
#define G 32
#define MAXNB 1024  /* blocks per row converted on the stack: I <= 32768 */

#if VARIANT > 0
static inline float reduce8(__m256 a) {  /* reduce16 from h = 4 */
  __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  b = _mm_add_ps(b, _mm_movehl_ps(b, b));
  b = _mm_add_ss(b, _mm_shuffle_ps(b, b, 1));
  return _mm_cvtss_f32(b);
}
#endif

/* Packed nibbles (`w8a16.pack_nibbles`): a layer whose int8 values all lie in [lo, lo + 15]
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
