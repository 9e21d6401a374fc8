/* Attention of one query row against a KV cache, grouped query heads. */
#include "w8a16.h"

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
   w8a16_attend over all total rows: the cache update without its torch ops. */
int w8a16_append_attend(const float* q, const float* k1, const float* v1, float* k, float* v,
                        float* out, int heads, int kv, int total, int d, long ks, long vs,
                        float scale, int threads) {
  for (int g = 0; g < kv; g++) {
    memcpy(k + g * ks + (size_t)(total - 1) * d, k1 + (size_t)g * d, sizeof(float) * d);
    memcpy(v + g * vs + (size_t)(total - 1) * d, v1 + (size_t)g * d, sizeof(float) * d);
  }
  return w8a16_attend(q, k, v, out, heads, kv, total, d, ks, vs, scale, threads);
}
