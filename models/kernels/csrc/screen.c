/* A screened LM head's candidate pass, and a last stage's whole head in one call. */
#include "w8a16.h"

/* A screened LM head's candidates (models/quant ScreenedLinear), in place. Row m
   of logits (M, O) holds the int8 copy's logits, each within b = pr[m] * s[o] of the
   float head's. Every o whose upper bound logits + b reaches the largest lower bound
   (max over o of logits - b) could be the float argmax: its logit becomes the float
   dot(W[o], x[m]) (+ bias[o]), W float32 (O, I), or float16 bits with w_half (each
   candidate row converted exactly to float32 first: the same dot as over its float32
   copy). The same float operations as torch's
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

void w8a16_screen(float* logits, const float* pr, const float* s, const void* W,
                  int w_half, const float* bias, const float* x, int M, int O, int I,
                  int max_exact, int* n, int threads) {
  #pragma omp parallel for schedule(static, 1) num_threads(M < threads ? M : threads)
  for (int m = 0; m < M; m++) {
    float* y = logits + (size_t)m * O;
    const float p = pr[m], top = lower_top(y, s, p, O);
    int count = 0, o = 0;
    int* idx = (int*)malloc(sizeof(int) * ((size_t)max_exact + 1));
    float* row = w_half ? (float*)malloc(sizeof(float) * (size_t)I) : NULL;
    if (!idx || (w_half && !row)) {  /* the caller's whole float product */
      free(idx);
      free(row);
      n[m] = INT32_MAX;
      continue;
    }
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
        const float* w = (const float*)W + (size_t)idx[k] * I;
        if (w_half) {
          halves((const uint16_t*)W + (size_t)idx[k] * I, row, I);
          w = row;
        }
        float v = dot16(w, x + (size_t)m * I, I);
        y[idx[k]] = bias ? v + bias[idx[k]] : v;
      }
    free(idx);
    free(row);
  }
}

/* Each row's factor of a screened head's error bound (quant/screened.py
   w8a16_row_bound): out[m] = l1 |x[m]|_1 + mx max_i |x[m, i]|, the sum in double. */
void w8a16_row_bound(const float* x, float* out, int M, int I, float l1, float mx) {
  for (int m = 0; m < M; m++) {
    const float* r = x + (size_t)m * I;
    double sum = 0;
    float top = 0;
    for (int i = 0; i < I; i++) {
      float a = fabsf(r[i]);
      sum += a;
      top = a > top ? a : top;
    }
    out[m] = l1 * (float)sum + mx * top;
  }
}

/* The first index of the largest of y[0..O) (the first NaN where there is one), as
   torch's argmax. */
static int first_max(const float* y, int O) {
  int at = 0;
  for (int o = 0; o < O; o++) {
    if (isnan(y[o])) return o;
    if (y[o] > y[at]) at = o;
  }
  return at;
}

/* A last stage's head over M rows x (M, d): xn = norm(x), logits (M, O) the screened
   head's of xn (the int8 copy's w8a16_linear with the bias, the rows' bounds, then
   w8a16_screen), and picks[m] the argmax of row m. The same C functions, in the same
   order, as the head's modules call one by one: the same bits. n[m]: row m's candidate
   count; where over max_exact, its logits and pick are left to the caller (the whole
   float product). Returns 0 or -1 (no memory). */
int w8a16_head(const head_t* H, const float* x, float* xn, float* logits, int M, int* n,
               int* picks) {
  float* pr = (float*)malloc(sizeof(float) * (size_t)M + 64);
  if (!pr) return -1;
  if (H->layer_norm) w8a16_layer_norm(x, H->nw, H->nb, xn, M, H->d, H->eps);
  else w8a16_rms_norm(x, H->nw, xn, M, H->d, H->eps);
  int err = w8a16_linear(H->w, H->s, H->b, xn, logits, M, H->O, H->d, H->threads);
  if (!err) {
    w8a16_row_bound(xn, pr, M, H->d, H->bound_l1, H->bound_max);
    w8a16_screen(logits, pr, H->s, H->W, H->w_half, H->b, xn, M, H->O, H->d, H->max_exact,
                 n, H->threads);
    for (int m = 0; m < M; m++)
      picks[m] = n[m] <= H->max_exact ? first_max(logits + (size_t)m * H->O, H->O) : -1;
  }
  free(pr);
  return err;
}
