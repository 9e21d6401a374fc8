/* One decoder block, in one call, for rows that are each one sequence's decode step (or a
   short prompt's rows in order: one cache, each row seeing the rows up to it). The same C
   functions, in the same order, as the block's modules call one by one (models/layers.py):
   the same bits, without ~20 torch ops and Python calls a block. */
#include "w8a16.h"

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

static void norm(const block_t* B, const float* w, const float* b, const float* x, float* y,
                 int M) {
  if (B->layer_norm) w8a16_layer_norm(x, w, b, y, M, B->d, B->eps);
  else w8a16_rms_norm(x, w, y, M, B->d, B->eps);
}

/* x (M, d) += attn(norm1(x)); x += mlp(norm2(x)), pre-norm, for M rows that are each a
   decode step of its own sequence: row m's new key and value are written at row total[m]
   - 1 of its caches kc[m], vc[m] ((kv, capacity, hd), head strides ks[m], vs[m] in
   values; float32 where half is 0, float16 bits where it is 1: every cache of the call),
   and its query attends to their first total[m] rows. Returns 0, -1 (no memory) or -2 (its
   shapes do not add up, or a layer's inputs are not whole blocks). */
int w8a16_block(const block_t* B, float* x, int M, void* const* kc, void* const* vc,
                const long* ks, const long* vs, const int* total, int half) {
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
    cache_write(k + (size_t)m * kw, v + (size_t)m * kw, kc[m], vc[m], B->kv, total[m] - 1,
                B->hd, ks[m], vs[m], half);
  if (M == 1) {
    long work = (long)B->heads * total[0] * B->hd;
    int threads = work >= B->attend_threaded ? B->threads : 1;
    if ((err = w8a16_attend(q, kc[0], vc[0], att, B->heads, B->kv, total[0], B->hd, ks[0],
                            vs[0], half, B->scale, threads)))
      goto done;
  } else {
    int failed = 0;
    #pragma omp parallel for schedule(dynamic) num_threads(B->threads) reduction(|:failed)
    for (int m = 0; m < M; m++)
      failed |= w8a16_attend(q + (size_t)m * qw, kc[m], vc[m], att + (size_t)m * qw,
                             B->heads, B->kv, total[m], B->hd, ks[m], vs[m], half, B->scale,
                             1);
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
int w8a16_blocks_run(const block_t* const* B, int n, float* x, int M, void* const* kc,
                     void* const* vc, const long* ks, const long* vs, const int* total,
                     int half, int* done) {
  *done = 0;
  for (int l = 0; l < n; l++) {
    size_t at = (size_t)l * M;
    int err = w8a16_block(B[l], x, M, kc + at, vc + at, ks + at, vs + at, total + at,
                          half);
    if (err) return err;
    *done = l + 1;
  }
  return 0;
}
