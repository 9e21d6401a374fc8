/* Attention of one query row against a KV cache, grouped query heads. */
#include "w8a16.h"

/* Cache rows are float32 (half 0) or float16 bits (half 1), converted in registers as
   they are read (exact). dot: q . k[at, at + d) in 16 lanes, lane l summing the products
   of i = l mod 16 in order of i (multiplied, then added), then reduce16's fixed tree: the
   same float operations in each variant's code and for either cache dtype, so a float16
   cache gives the bits of its float32 copy. */
static inline float cache_at(const void* k, size_t at, int half) {
#if defined(__F16C__)
  return half ? _cvtsh_ss(((const uint16_t*)k)[at]) : ((const float*)k)[at];
#else
  return half ? h2f(((const uint16_t*)k)[at]) : ((const float*)k)[at];
#endif
}

#if VARIANT == 2
#define LOAD16(k, at, half)                                                               \
  ((half) ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)(k) + (at)))) \
          : _mm512_loadu_ps((const float*)(k) + (at)))
#elif VARIANT == 1 && defined(__F16C__)
#define LOAD8(k, at, half)                                                                \
  ((half) ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)(k) + (at)))) \
          : _mm256_loadu_ps((const float*)(k) + (at)))
#endif

static inline float dot(const float* q, const void* k, size_t at, int d, int half) {
  float acc[16];
  int i = 0;
#if VARIANT == 2
  __m512 a = _mm512_setzero_ps();
  if (half)
    for (; i + 16 <= d; i += 16)
      a = _mm512_add_ps(a, _mm512_mul_ps(_mm512_loadu_ps(q + i), LOAD16(k, at + i, 1)));
  else
    for (; i + 16 <= d; i += 16)
      a = _mm512_add_ps(a, _mm512_mul_ps(_mm512_loadu_ps(q + i), LOAD16(k, at + i, 0)));
  _mm512_storeu_ps(acc, a);
#elif VARIANT == 1 && defined(__F16C__)
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  if (half)
    for (; i + 16 <= d; i += 16) {
      lo = _mm256_add_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(q + i), LOAD8(k, at + i, 1)));
      hi = _mm256_add_ps(hi,
                         _mm256_mul_ps(_mm256_loadu_ps(q + i + 8), LOAD8(k, at + i + 8, 1)));
    }
  else
    for (; i + 16 <= d; i += 16) {
      lo = _mm256_add_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(q + i), LOAD8(k, at + i, 0)));
      hi = _mm256_add_ps(hi,
                         _mm256_mul_ps(_mm256_loadu_ps(q + i + 8), LOAD8(k, at + i + 8, 0)));
    }
  _mm256_storeu_ps(acc, lo);
  _mm256_storeu_ps(acc + 8, hi);
#else
  for (int l = 0; l < 16; l++) acc[l] = 0;
  for (; i + 16 <= d; i += 16)
    for (int l = 0; l < 16; l++) acc[l] += q[i + l] * cache_at(k, at + i + l, half);
#endif
  for (; i < d; i++) acc[i & 15] += q[i] * cache_at(k, at + i, half);
  return reduce16(acc);
}

/* o[i] += w v[at + i], i < d (each product rounded, then the sum: any order gives these
   bits). */
static inline void axpy(float* o, float w, const void* v, size_t at, int d, int half) {
  int i = 0;
  if (!half) {
    const float* vt = (const float*)v + at;
    #pragma omp simd
    for (int j = 0; j < d; j++) o[j] += w * vt[j];
    return;
  }
#if VARIANT == 2
  __m512 w16 = _mm512_set1_ps(w);
  for (; i + 16 <= d; i += 16)
    _mm512_storeu_ps(o + i, _mm512_add_ps(_mm512_loadu_ps(o + i),
                                          _mm512_mul_ps(w16, LOAD16(v, at + i, 1))));
#elif VARIANT == 1 && defined(__F16C__)
  __m256 w8 = _mm256_set1_ps(w);
  for (; i + 8 <= d; i += 8)
    _mm256_storeu_ps(o + i, _mm256_add_ps(_mm256_loadu_ps(o + i),
                                          _mm256_mul_ps(w8, LOAD8(v, at + i, 1))));
#endif
  for (; i < d; i++) o[i] += w * cache_at(v, at + i, 1);
}

/* Sixteen (AVX512) or eight (AVX2) cache rows' dots at once, each with `dot`'s float
   operations: lane l of row t's accumulator sums q[i] k[t, i] over i = l mod 16 in order
   of i (multiplied, then added), and reduce16's tree then runs for all the rows side by
   side, each addition the tree's own pair brought together by shuffles (so a row's score
   has `dot`'s bits, with or without company). A single row's dot is a chain of dependent
   adds and a tree through memory; side by side, the rows keep the vector units busy. d %
   16 == 0; scores[t] = dot * scale for the rows from `at` (stride d). */
#if VARIANT == 2
#define ROWS 16
static inline void dots(const float* q, const void* k, size_t at, int d, int half,
                        float scale, float* scores) {
  __m512 a[16], b[8], c[4], e[2];
  for (int j = 0; j < 16; j++) {  /* row by row, front to back: the rows stream in */
    a[j] = _mm512_setzero_ps();
    if (half)
      for (int i = 0; i < d; i += 16)
        a[j] = _mm512_add_ps(a[j], _mm512_mul_ps(_mm512_loadu_ps(q + i),
                                                 LOAD16(k, at + (size_t)j * d + i, 1)));
    else
      for (int i = 0; i < d; i += 16)
        a[j] = _mm512_add_ps(a[j], _mm512_mul_ps(_mm512_loadu_ps(q + i),
                                                 LOAD16(k, at + (size_t)j * d + i, 0)));
  }
  for (int j = 0; j < 8; j++)  /* v[l] + v[l + 8]: rows 2j and 2j + 1 */
    b[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0xEE));
  for (int m = 0; m < 4; m++)  /* v[l] + v[l + 4]: a row a 128-bit lane */
    c[m] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * m], b[2 * m + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * m], b[2 * m + 1], 0xDD));
  for (int n = 0; n < 2; n++)  /* v[l] + v[l + 2] */
    e[n] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * n], c[2 * n + 1], 0x44),
                         _mm512_shuffle_ps(c[2 * n], c[2 * n + 1], 0xEE));
  /* v[0] + v[1]: lane 4k + j holds row 4j + k */
  __m512 f = _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], 0x88),
                           _mm512_shuffle_ps(e[0], e[1], 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  _mm512_storeu_ps(scores, _mm512_mul_ps(_mm512_permutexvar_ps(order, f),
                                         _mm512_set1_ps(scale)));
}
#elif VARIANT == 1 && defined(__F16C__)
#define ROWS 8
static inline void dots(const float* q, const void* k, size_t at, int d, int half,
                        float scale, float* scores) {
  __m256 lo[8], hi[8], p[8], r[4], u[2];
  for (int j = 0; j < 8; j++) {  /* row by row, front to back: the rows stream in */
    lo[j] = hi[j] = _mm256_setzero_ps();
    for (int i = 0; i < d; i += 16) {
      size_t t = at + (size_t)j * d + i;
      __m256 q0 = _mm256_loadu_ps(q + i), q1 = _mm256_loadu_ps(q + i + 8);
      lo[j] = _mm256_add_ps(lo[j], _mm256_mul_ps(q0, half ? LOAD8(k, t, 1) : LOAD8(k, t, 0)));
      hi[j] = _mm256_add_ps(hi[j],
                            _mm256_mul_ps(q1, half ? LOAD8(k, t + 8, 1) : LOAD8(k, t + 8, 0)));
    }
  }
  for (int j = 0; j < 8; j++) p[j] = _mm256_add_ps(lo[j], hi[j]);  /* v[l] + v[l + 8] */
  for (int m = 0; m < 4; m++)  /* v[l] + v[l + 4]: a row a 128-bit lane */
    r[m] = _mm256_add_ps(_mm256_permute2f128_ps(p[2 * m], p[2 * m + 1], 0x20),
                         _mm256_permute2f128_ps(p[2 * m], p[2 * m + 1], 0x31));
  for (int n = 0; n < 2; n++)  /* v[l] + v[l + 2] */
    u[n] = _mm256_add_ps(_mm256_shuffle_ps(r[2 * n], r[2 * n + 1], 0x44),
                         _mm256_shuffle_ps(r[2 * n], r[2 * n + 1], 0xEE));
  /* v[0] + v[1]: lanes hold rows 0, 2, 4, 6, 1, 3, 5, 7 */
  __m256 f = _mm256_add_ps(_mm256_shuffle_ps(u[0], u[1], 0x88),
                           _mm256_shuffle_ps(u[0], u[1], 0xDD));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  _mm256_storeu_ps(scores, _mm256_mul_ps(_mm256_permutevar8x32_ps(f, order),
                                         _mm256_set1_ps(scale)));
}
#else
#define ROWS 0
#endif

/* out = sum over t of w[t] v[at + t d + i] (each product rounded, then added in order of
   t, from 0): `axpy`'s bits, with out kept in NC vector registers across the rows rather
   than loaded and stored at every one (rows read front to back, as axpy reads them). */
#if VARIANT == 2
#define WIDTH 16
#define MAXNC 8
#define VEC __m512
#define VZERO _mm512_setzero_ps
#define VSTORE _mm512_storeu_ps
#define VADD _mm512_add_ps
#define VMUL _mm512_mul_ps
#define VSET1 _mm512_set1_ps
#define VROW(at, half) LOAD16(v, at, half)
#elif VARIANT == 1 && defined(__F16C__)
#define WIDTH 8
#define MAXNC 8
#define VEC __m256
#define VZERO _mm256_setzero_ps
#define VSTORE _mm256_storeu_ps
#define VADD _mm256_add_ps
#define VMUL _mm256_mul_ps
#define VSET1 _mm256_set1_ps
#define VROW(at, half) LOAD8(v, at, half)
#endif
#ifdef WIDTH
static inline __attribute__((always_inline)) void held_rows(
    float* out, const float* w, const void* v, size_t at, int total, int half, const int NC) {
  VEC o[MAXNC];
  size_t d = (size_t)NC * WIDTH;
  for (int c = 0; c < NC; c++) o[c] = VZERO();
  if (half)
    for (int t = 0; t < total; t++) {
      VEC wt = VSET1(w[t]);
      for (int c = 0; c < NC; c++)
        o[c] = VADD(o[c], VMUL(wt, VROW(at + (size_t)t * d + (size_t)c * WIDTH, 1)));
    }
  else
    for (int t = 0; t < total; t++) {
      VEC wt = VSET1(w[t]);
      for (int c = 0; c < NC; c++)
        o[c] = VADD(o[c], VMUL(wt, VROW(at + (size_t)t * d + (size_t)c * WIDTH, 0)));
    }
  for (int c = 0; c < NC; c++) VSTORE(out + c * WIDTH, o[c]);
}
#endif

static void weighted_rows(float* out, const float* w, const void* v, size_t at, int total,
                          int d, int half) {
#ifdef WIDTH
  if (d % WIDTH == 0)
    switch (d / WIDTH) {  /* constant counts: the registers unrolled */
      case 1: held_rows(out, w, v, at, total, half, 1); return;
      case 2: held_rows(out, w, v, at, total, half, 2); return;
      case 3: held_rows(out, w, v, at, total, half, 3); return;
      case 4: held_rows(out, w, v, at, total, half, 4); return;
      case 5: held_rows(out, w, v, at, total, half, 5); return;
      case 6: held_rows(out, w, v, at, total, half, 6); return;
      case 7: held_rows(out, w, v, at, total, half, 7); return;
      case 8: held_rows(out, w, v, at, total, half, 8); return;
      default: break;
    }
#endif
  for (int i = 0; i < d; i++) out[i] = 0;
  for (int t = 0; t < total; t++) axpy(out, w[t], v, at + (size_t)t * d, d, half);
}

/* Decode's attention of one query row: out[h] = softmax(scale q[h] . k[g, t]) @ v[g, t]
   over t < total, for each query head h and its kv head g = h / (heads / kv). q (heads,
   d) and out contiguous; k and v (kv, total, d) float32 (half 0) or float16 bits (half
   1), rows of d, head strides ks and vs in values. Scores are float32 dot products, the
   softmax float32 (expf); a float16 cache gives the bits of its float32 copy, and every
   variant the plain C code's bits. One call in place of torch's seven ops, each of which
   costs more than this work at decode's sizes. */
int w8a16_attend(const float* q, const void* k, const void* v, float* out, int heads, int kv,
                 int total, int d, long ks, long vs, int half, float scale, int threads) {
  int per = heads / kv;
  float* p = (float*)malloc(sizeof(float) * (size_t)heads * total + 64);
  if (!p) return -1;
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (int h = 0; h < heads; h++) {
    const float* qh = q + (size_t)h * d;
    size_t kg = (size_t)(h / per) * ks, vg = (size_t)(h / per) * vs;
    float* ph = p + (size_t)h * total;
    int t = 0;
#if ROWS
    if (d % 16 == 0)
      for (; t + ROWS <= total; t += ROWS) dots(qh, k, kg + (size_t)t * d, d, half, scale, ph + t);
#endif
    for (; t < total; t++) ph[t] = dot(qh, k, kg + (size_t)t * d, d, half) * scale;
    float mx = -INFINITY;
    for (t = 0; t < total; t++) mx = ph[t] > mx ? ph[t] : mx;
    float sum = 0;
    for (t = 0; t < total; t++) { ph[t] = expf(ph[t] - mx); sum += ph[t]; }
    float inv = 1.0f / sum;
    for (t = 0; t < total; t++) ph[t] *= inv;
    weighted_rows(out + (size_t)h * d, ph, v, vg, total, d, half);
  }
  free(p);
  return 0;
}

/* The new key and value rows k1, v1 (kv, d, contiguous, float32) written at row `row` of
   the caches k and v (head strides ks, vs in values): float32 as they are (half 0), or
   float16 rounded to nearest even (half 1, torch's .half()). */
HIDDEN void cache_write(const float* k1, const float* v1, void* k, void* v, int kv, int row,
                        int d, long ks, long vs, int half) {
  for (int g = 0; g < kv; g++) {
    size_t kt = (size_t)g * ks + (size_t)row * d, vt = (size_t)g * vs + (size_t)row * d;
    if (half) {
      to_halves(k1 + (size_t)g * d, (uint16_t*)k + kt, d);
      to_halves(v1 + (size_t)g * d, (uint16_t*)v + vt, d);
    } else {
      memcpy((float*)k + kt, k1 + (size_t)g * d, sizeof(float) * d);
      memcpy((float*)v + vt, v1 + (size_t)g * d, sizeof(float) * d);
    }
  }
}

/* Decode's step of one sequence in one call: the new key and value rows k1, v1 (kv, d,
   contiguous) written at row total - 1 of the caches k and v (cache_write), then
   w8a16_attend over all total rows: the cache update without its torch ops. */
int w8a16_append_attend(const float* q, const float* k1, const float* v1, void* k, void* v,
                        float* out, int heads, int kv, int total, int d, long ks, long vs,
                        int half, float scale, int threads) {
  cache_write(k1, v1, k, v, kv, total - 1, d, ks, vs, half);
  return w8a16_attend(q, k, v, out, heads, kv, total, d, ks, vs, half, scale, threads);
}
