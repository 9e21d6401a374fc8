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

/* Decode's attention of one query row: out[h] = softmax(scale q[h] . k[g, t]) @ v[g, t]
   over t < total, for each query head h and its kv head g = h / (heads / kv). q (heads,
   d) and out contiguous; k and v (kv, total, d) float32 (half 0) or float16 bits (half
   1), rows of d, head strides ks and vs in values. Scores are float32 dot products, the
   softmax float32 (expf); a float16 cache gives the bits of its float32 copy. One call
   in place of torch's seven ops, each of which costs more than this work at decode's
   sizes. */
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
    float mx = -INFINITY;
    for (int t = 0; t < total; t++) {
      float s = dot(qh, k, kg + (size_t)t * d, d, half) * scale;
      ph[t] = s;
      mx = s > mx ? s : mx;
    }
    float sum = 0;
    for (int t = 0; t < total; t++) { ph[t] = expf(ph[t] - mx); sum += ph[t]; }
    float inv = 1.0f / sum, *o = out + (size_t)h * d;
    for (int i = 0; i < d; i++) o[i] = 0;
    for (int t = 0; t < total; t++) axpy(o, ph[t] * inv, v, vg + (size_t)t * d, d, half);
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
