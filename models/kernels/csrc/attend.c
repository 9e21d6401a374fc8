/* Attention of one query row against a KV cache, grouped query heads. */
#include "w8a16.h"

/* Row t of a cache head at base: float32 in place, or float16 converted into tmp. */
static inline const float* cache_row(const void* base, size_t at, int half, float* tmp,
                                     int d) {
  if (!half) return (const float*)base + at;
  halves((const uint16_t*)base + at, tmp, d);
  return tmp;
}

/* Decode's attention of one query row: out[h] = softmax(scale q[h] . k[g, t]) @ v[g, t]
   over t < total, for each query head h and its kv head g = h / (heads / kv). q (heads,
   d) and out contiguous; k and v (kv, total, d) float32 (half 0) or float16 bits (half
   1), rows of d, head strides ks and vs in values. Scores are float32 dot products, the
   softmax float32 (expf); a float16 row is converted (exactly) first, so a float16 cache
   gives the bits of its float32 copy. One call in place of torch's seven ops, each of
   which costs more than this work at decode's sizes. */
int w8a16_attend(const float* q, const void* k, const void* v, float* out, int heads, int kv,
                 int total, int d, long ks, long vs, int half, float scale, int threads) {
  int per = heads / kv;
  /* each head's scores, then (float16) a row of d converted */
  float* p = (float*)malloc(sizeof(float) * (size_t)heads * (total + (half ? d : 0)) + 64);
  if (!p) return -1;
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (int h = 0; h < heads; h++) {
    const float* qh = q + (size_t)h * d;
    size_t kg = (size_t)(h / per) * ks, vg = (size_t)(h / per) * vs;
    float* ph = p + (size_t)h * total;
    float* tmp = half ? p + (size_t)heads * total + (size_t)h * d : NULL;
    float mx = -INFINITY;
    for (int t = 0; t < total; t++) {
      const float* kt = cache_row(k, kg + (size_t)t * d, half, tmp, d);
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
      const float* vt = cache_row(v, vg + (size_t)t * d, half, tmp, d);
      float w = ph[t] * inv;
      #pragma omp simd
      for (int i = 0; i < d; i++) o[i] += w * vt[i];
    }
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
