/* w8a16: int8-weight matrix products and the float32 steps of a decode step, on the CPU.

   One shared library is built from every .c file beside this header (models/kernels/
   build.py). Between the two "bindings" markers: every struct and entry point, the text
   that Python's bindings (cffi) read, so it holds declarations and integer #defines only.
   Below them: what the .c files share (the SIMD variant's macros, inline helpers). */
#ifndef W8A16_H
#define W8A16_H

#include <stdint.h>

/* bindings: begin */

#define PARTS 3  /* layers one projection may have */

/* An int8 layer as w8a16_linear (group 0: scales float32 per row, the bias added in the
   kernel) or w8a16_blocks (group 32: scales float16 (O, I / 32), mins float16 (I / 32, O)
   or NULL, the bias added after it in float32) runs it. */
typedef struct {
  const int8_t* w;              /* int8 (O, I), or with nib packed nibbles (O, I / 2) */
  const void* s;
  const uint16_t* mins;
  const float* b;
  int O, I, group;
  int nib, lo;                  /* nib: w holds nibbles, offset lo (blocks only) */
} lin_t;

/* Up to PARTS layers that read one input (layers.project): one call where Store.load fused
   them, else one each, their outputs side by side in each row. */
typedef struct {
  lin_t part[PARTS];
  int n;
} proj_t;

/* A pre-norm decoder block, as w8a16_block runs it. */
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

/* A last stage's head as w8a16_head runs it: a norm, then a screened LM head
   (models/quant/screened.py ScreenedLinear, its int8 copy on w8a16_linear). */
typedef struct {
  int d, O;                     /* hidden size, vocabulary */
  int layer_norm;               /* 1: LayerNorm (nw, nb); 0: RMSNorm (nw) */
  int max_exact, threads;
  float eps, bound_l1, bound_max;  /* a row's bound factor: bound_l1 |x|_1 + bound_max absmax */
  const float *nw, *nb;
  const int8_t* w;              /* the int8 copy (O, d), its scales s (O) */
  const float* s;
  const void* W;                /* the float weight (O, d): float32, or float16 bits */
  const float* b;               /* the bias (O) or NULL */
  int w_half;                   /* 1: W is float16 (a tied head's table kept in fp16) */
} head_t;

/* linear.c: per-channel int8 weights. 0: plain C, 1: AVX2 with FMA, 2: AVX512-VNNI. */
int w8a16_variant(void);
int w8a16_linear(const int8_t* w, const float* s, const float* b, const float* x, float* y,
                 int M, int O, int I, int threads);

/* blocks.c: a GGUF's blocks of 32 inputs, and Q4 weights packed at 4 bits a value. */
int w8a16_blocks(const int8_t* w, const uint16_t* d, const uint16_t* mt, const float* x,
                 float* y, int M, int O, int I, int threads);
int w8a16_blocks4(const uint8_t* w4, int lo, const uint16_t* d, const uint16_t* mt,
                  const float* x, float* y, int M, int O, int I, int threads);
void w8a16_pack_nibbles(const int8_t* w, uint8_t* out, long rows, int I, int lo,
                        int threads);

/* attend.c: one query row against a KV cache, its rows float32 (half 0) or float16 bits
   (half 1). */
int w8a16_attend(const float* q, const void* k, const void* v, float* out, int heads, int kv,
                 int total, int d, long ks, long vs, int half, float scale, int threads);
int w8a16_append_attend(const float* q, const float* k1, const float* v1, void* k, void* v,
                        float* out, int heads, int kv, int total, int d, long ks, long vs,
                        int half, float scale, int threads);

/* elementwise.c: norms, rotary, activations. */
void w8a16_rms_norm(const float* x, const float* w, float* y, int rows, int d, float eps);
void w8a16_layer_norm(const float* x, const float* w, const float* b, float* y, int rows,
                      int d, float eps);
void w8a16_rotate(const float* x, const float* c, const float* s, float* out, int rows,
                  int heads, int d);
void w8a16_silu_mul(const float* g, const float* u, float* y, int rows, int n, long gs,
                    long us, int threads);
void w8a16_gelu(const float* x, float* y, long n, int threads);

/* screen.c: a screened LM head's candidates, its rows' error bounds, and a whole head
   with its greedy picks. */
void w8a16_screen(float* logits, const float* pr, const float* s, const void* W,
                  int w_half, const float* bias, const float* x, int M, int O, int I,
                  int max_exact, int* n, int threads);

void w8a16_row_bound(const float* x, float* out, int M, int I, float l1, float mx);
int w8a16_head(const head_t* H, const float* x, float* xn, float* logits, int M, int* n,
               int* picks);

/* block.c: a whole decoder block, and a run of them, in one call. */
int w8a16_block(const block_t* B, float* x, int M, void* const* kc, void* const* vc,
                const long* ks, const long* vs, const int* total, int half);
int w8a16_blocks_run(const block_t* const* B, int n, float* x, int M, void* const* kc,
                     void* const* vc, const long* ks, const long* vs, const int* total,
                     int half, int* done);

/* pin.c: thread pinning. */
int w8a16_pin(const int* cpus, int n);

/* bindings: end */

#include <omp.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <immintrin.h>

#define HIDDEN __attribute__((visibility("hidden")))  /* shared by the .c files only */

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
   each 4 KiB page, and a decode step's weights come from DRAM (1024 and 2048 bytes ahead
   gave less). */
#ifndef PFD
#define PFD 4096
#endif
#if PFD
#define PREFETCH(p) _mm_prefetch((const char*)(p), _MM_HINT_T0)
#else
#define PREFETCH(p) ((void)0)
#endif

/* Each row of x (M, I) rounded to int16 on a grid of its absmax / 32767: q, and the grid
   step per row in xs (linear.c; blocks.c reads it too). */
HIDDEN void round_rows(const float* x, int M, int I, int16_t* q, float* xs);

/* Rows k1, v1 (kv, d) into row `row` of a float32 (half 0) or float16 (half 1) cache
   (attend.c; block.c writes its rows with it too). */
HIDDEN void cache_write(const float* k1, const float* v1, void* k, void* v, int kv, int row,
                        int d, long ks, long vs, int half);

/* The lanes' fixed tree: v[l] += v[l + h] for h = 8, 4, 2, 1. */
static inline float reduce16(float v[16]) {
  for (int h = 8; h >= 1; h /= 2)
    for (int l = 0; l < h; l++) v[l] = v[l] + v[l + h];
  return v[0];
}

/* float16, stored as its bits, and float32. h2f: exact. f2h: rounded to nearest, ties to
   even, as torch's .half() and F16C's conversion round (an overflow to inf, a NaN to a
   quiet NaN with its payload's high bits); plain C, for the x86-64 baseline. */
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

static inline uint16_t f2h(float f) {
  uint32_t x, a;
  memcpy(&x, &f, sizeof x);
  uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
  a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00 | (uint16_t)((a >> 13) & 0x3ff);  /* NaN */
  if (a >= 0x477ff000u) return sign | 0x7c00;  /* >= 65520 (or inf): inf */
  if (a < 0x38800000u) {  /* under 2^-14: a subnormal's step 2^-24 is the ulp of 0.5 */
    float s, t;
    memcpy(&s, &a, sizeof s);
    t = s + 0.5f;  /* rounded to a multiple of 2^-24, ties to even, by the addition */
    memcpy(&a, &t, sizeof a);
    return sign | (uint16_t)(a - 0x3f000000u);
  }
  /* rebias the exponent (-112), round the 13 bits dropped (a carry moves the exponent) */
  a += 0xc8000fffu + ((a >> 13) & 1);
  return sign | (uint16_t)(a >> 13);
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

/* n float32 -> float16, rounded to nearest even (the same bits in every variant). */
static inline void to_halves(const float* f, uint16_t* h, int n) {
  int i = 0;
#if VARIANT == 2
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256((__m256i*)(h + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(f + i), _MM_FROUND_TO_NEAREST_INT));
#elif VARIANT == 1 && defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128((__m128i*)(h + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(f + i), _MM_FROUND_TO_NEAREST_INT));
#endif
#if defined(__F16C__)
  for (; i < n; i++) h[i] = _cvtss_sh(f[i], _MM_FROUND_TO_NEAREST_INT);
#else
  for (; i < n; i++) h[i] = f2h(f[i]);
#endif
}

#endif
