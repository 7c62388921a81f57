/* ---- bf16 rows (one-row decode of a bf16 model) ----------------------------------------------------- */
#ifdef PF_AVX512
static inline __m512 bf16x16(const uint16_t *p) { /* 16 bf16 to fp32: a widening and a shift */
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#endif

static float dot_bf16(const uint16_t *w, const float *x32, const uint16_t *x16, int K) {
  int k = 0;
  float acc = 0.f;
#ifdef __AVX512BF16__
  __m512 a0 = _mm512_setzero_ps(), a1 = a0;
  for (; k + 64 <= K; k += 64) {
    _mm_prefetch((const char *)(w + k + PF_AHEAD / 2), _MM_HINT_T0);
    _mm_prefetch((const char *)(w + k + PF_AHEAD / 2 + 32), _MM_HINT_T0);
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(x16 + k));
    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + k + 32), (__m512bh)_mm512_loadu_si512(x16 + k + 32));
  }
  acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(PF_AVX512)
  __m512 a0 = _mm512_setzero_ps(), a1 = a0;
  for (; k + 32 <= K; k += 32) {
    a0 = _mm512_fmadd_ps(bf16x16(w + k), _mm512_loadu_ps(x32 + k), a0);
    a1 = _mm512_fmadd_ps(bf16x16(w + k + 16), _mm512_loadu_ps(x32 + k + 16), a1);
  }
  acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
  (void)x16;
  for (; k < K; k++) acc += bf16_to_f32(w[k]) * x32[k];
  return acc;
}

#ifndef PF_BF16_AHEAD
#define PF_BF16_AHEAD 1024 /* bytes ahead of each of the quad's four rows: best of 0.5-4 KB on Zen 5, 2 threads */
#endif
#ifdef PF_AVX512
/* four rows at once: four independent streams keep more cache-line misses in flight than one; with AVX512-BF16
   one vdpbf16ps per 64 bytes (x rounded to bf16), else widened to fp32 (x as it is) */
static void dot4_bf16(const uint16_t *w, size_t K, const float *x32, const uint16_t *x16, float *out) {
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  const size_t d = PF_BF16_AHEAD / 2;
  for (size_t k = 0; k < K; k += 32) {
#ifdef __AVX512BF16__
    __m512bh x = (__m512bh)_mm512_loadu_si512(x16 + k);
#else
    __m512 x0 = _mm512_loadu_ps(x32 + k), x1 = _mm512_loadu_ps(x32 + k + 16);
#endif
    for (int r = 0; r < 4; r++) {
      const uint16_t *wr = w + r * K + k;
      _mm_prefetch((const char *)PF_WRAP(wr, k, d, K), _MM_HINT_T0);
#ifdef __AVX512BF16__
      a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_loadu_si512(wr), x);
#else
      a[r] = _mm512_fmadd_ps(bf16x16(wr + 16), x1, _mm512_fmadd_ps(bf16x16(wr), x0, a[r]));
#endif
    }
  }
  (void)x32; (void)x16;
  for (int r = 0; r < 4; r++) out[r] = _mm512_reduce_add_ps(a[r]);
}
#endif

#ifdef PF_AVX2_ONLY
/* AVX2 (no AVX-512: no oneDNN bf16 either, and PyTorch's bf16 matmul is slow), over the plain [N, K] weight.
   16 bf16 of a weight row are one load: as 8 32-bit lanes, a shift gives the even k's as fp32 and a mask the odd
   ones. A few rows of x (bound by reading the weight) go in dot form, as llamafile's tinyBLAS: MR rows of x by NR
   rows of w, MR * NR fp32 accumulators over k, one horizontal sum each at the end, x laid out with each 16-wide
   block's even k's before its odd ones (deal16). One row of x (a decode step) takes eight weight rows at once:
   eight independent streams keep more cache-line misses in flight (measured: 2 rows 20 GB/s, 4 rows 32, 8 rows
   38; software prefetch added nothing). More rows (bound by FMAs) go as a blocked GEMM (bf16_gemm_avx2). */
#ifndef PF_AVX2_MR
#define PF_AVX2_MR 4
#endif
#ifndef PF_AVX2_NR
#define PF_AVX2_NR 3 /* 12 accumulators + 3 weight vectors + x: the 16 ymm registers */
#endif
#ifndef PF_AVX2_ROW_NR
#define PF_AVX2_ROW_NR 8 /* weight rows per tile for one row of x */
#endif
_Static_assert(PF_AVX2_MR <= 4 && PF_AVX2_NR <= 3 && PF_AVX2_ROW_NR <= 8, "tile_any has no case for these tiles");

static void deal16(float *x, size_t n) { /* in place, per 16: x[0], x[2], .. x[14], x[1], .. x[15] */
  for (size_t b = 0; b < n; b += 16) {
    float t[16];
    for (int i = 0; i < 8; i++) { t[i] = x[b + 2 * i]; t[8 + i] = x[b + 2 * i + 1]; }
    memcpy(x + b, t, sizeof t);
  }
}

/* out[i * on + j] = x_i . w_j over len k's (len % 16 == 0), x rows xs floats apart (dealt), w rows ws apart */
static inline __attribute__((always_inline)) void tile_avx2(const float *x, size_t xs, const uint16_t *w, size_t ws,
                                                            size_t len, float *out, size_t on, const int mr,
                                                            const int nr) {
  const __m256i odd = _mm256_set1_epi32((int)0xffff0000);
  __m256 c[16];
#pragma GCC unroll 16
  for (int i = 0; i < mr * nr; i++) c[i] = _mm256_setzero_ps();
  for (size_t k = 0; k < len; k += 16) {
    __m256i v[8];
#pragma GCC unroll 8
    for (int j = 0; j < nr; j++) v[j] = _mm256_loadu_si256((const __m256i *)(w + j * ws + k));
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++) {
      __m256 xe = _mm256_loadu_ps(x + i * xs + k), xo = _mm256_loadu_ps(x + i * xs + k + 8);
#pragma GCC unroll 8
      for (int j = 0; j < nr; j++) {
        c[i * nr + j] = _mm256_fmadd_ps(xe, _mm256_castsi256_ps(_mm256_slli_epi32(v[j], 16)), c[i * nr + j]);
        c[i * nr + j] = _mm256_fmadd_ps(xo, _mm256_castsi256_ps(_mm256_and_si256(v[j], odd)), c[i * nr + j]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < mr; i++)
#pragma GCC unroll 8
    for (int j = 0; j < nr; j++) out[i * on + j] = hsum8(c[i * nr + j]);
}

#define PF_AVX2_TILE(MR, NR) case MR * 16 + NR: tile_avx2(xm, xs, wn, ws, len, c, on, MR, NR); break;
static void tile_any(const float *xm, size_t xs, const uint16_t *wn, size_t ws, size_t len, float *c, size_t on,
                     int mm, int nn) {
  switch (mm * 16 + nn) {
    PF_AVX2_TILE(1, 1) PF_AVX2_TILE(1, 2) PF_AVX2_TILE(1, 3) PF_AVX2_TILE(1, 4) PF_AVX2_TILE(1, 5)
    PF_AVX2_TILE(1, 6) PF_AVX2_TILE(1, 7) PF_AVX2_TILE(1, 8)
    PF_AVX2_TILE(2, 1) PF_AVX2_TILE(2, 2) PF_AVX2_TILE(2, 3)
    PF_AVX2_TILE(3, 1) PF_AVX2_TILE(3, 2) PF_AVX2_TILE(3, 3)
    PF_AVX2_TILE(4, 1) PF_AVX2_TILE(4, 2) PF_AVX2_TILE(4, 3)
  }
}

#ifndef PF_AVX2_KC
#define PF_AVX2_KC 256 /* k's per pass: a tile's 5 rows of x (5 KB) and a panel (8 KB) stay in L1 */
#endif
#ifndef PF_AVX2_NC
#define PF_AVX2_NC 256 /* weight rows per block: its panels (128 KB) stay in L2 while every tile of x passes */
#endif
#ifndef PF_AVX2_GEMM_MR
#define PF_AVX2_GEMM_MR 5 /* 5 x 16 fp32 accumulators in 10 registers, 2 weight vectors, a broadcast (6: spills) */
#endif

static inline void transpose8_words(const uint32_t *const *rows, size_t q, uint32_t *out) { /* 8x8, out 16 apart */
  __m256i r[8], t[8];
  for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_si256((const __m256i *)(rows[i] + q));
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; i++) { /* r[i]: word i*, rows 0-3 | i+4*, ... of each 128-bit lane */
    _mm256_storeu_si256((__m256i *)(out + (size_t)i * 16), _mm256_permute2x128_si256(r[i], r[i + 4], 0x20));
    _mm256_storeu_si256((__m256i *)(out + (size_t)(i + 4) * 16), _mm256_permute2x128_si256(r[i], r[i + 4], 0x31));
  }
}

/* rows n0 .. n0+15 of w (zero past N), k's k0 .. k0+len, as a panel [len/2][16] of 32-bit words: each word the
   pair (k, k+1) of one row, as it sits in the row, so packing moves words and converts nothing */
static void pack_panel(const uint16_t *w, int N, size_t K, int n0, int k0, int len, uint32_t *panel) {
  if (n0 + 16 <= N) { /* a full panel: 8 x 8 transposes of words */
    const uint32_t *rows[16];
    for (int j = 0; j < 16; j++) rows[j] = (const uint32_t *)(w + (size_t)(n0 + j) * K + k0);
    for (int q = 0; q < len / 2; q += 8) {
      transpose8_words(rows, q, panel + (size_t)q * 16);
      transpose8_words(rows + 8, q, panel + (size_t)q * 16 + 8);
    }
    return;
  }
  for (int j = 0; j < 16; j++) { /* the last panel: rows past N are zeros */
    const uint32_t *row = n0 + j < N ? (const uint32_t *)(w + (size_t)(n0 + j) * K + k0) : NULL;
    for (int q = 0; q < len / 2; q++) panel[(size_t)q * 16 + j] = row ? row[q] : 0u;
  }
}

/* c[i][16] = x_i . panel over len k's, for mr <= GEMM_MR rows of x (xs floats apart): outer products, each pair of
   weight words widened by a shift (even k) and a mask (odd k), each x broadcast */
static inline __attribute__((always_inline)) void panel_avx2(const float *x, size_t xs, const uint32_t *panel,
                                                             int len, float *c_out, const int mr) {
  const __m256i odd = _mm256_set1_epi32((int)0xffff0000);
  __m256 c[2 * PF_AVX2_GEMM_MR];
#pragma GCC unroll 12
  for (int i = 0; i < 2 * mr; i++) c[i] = _mm256_setzero_ps();
  for (int q = 0; q < len / 2; q++) {
    __m256i v0 = _mm256_loadu_si256((const __m256i *)(panel + q * 16));
    __m256i v1 = _mm256_loadu_si256((const __m256i *)(panel + q * 16 + 8));
    __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)), w1 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
#pragma GCC unroll 6
    for (int i = 0; i < mr; i++) {
      __m256 xb = _mm256_broadcast_ss(x + i * xs + 2 * q);
      c[2 * i] = _mm256_fmadd_ps(xb, w0, c[2 * i]);
      c[2 * i + 1] = _mm256_fmadd_ps(xb, w1, c[2 * i + 1]);
    }
    w0 = _mm256_castsi256_ps(_mm256_and_si256(v0, odd));
    w1 = _mm256_castsi256_ps(_mm256_and_si256(v1, odd));
#pragma GCC unroll 6
    for (int i = 0; i < mr; i++) {
      __m256 xb = _mm256_broadcast_ss(x + i * xs + 2 * q + 1);
      c[2 * i] = _mm256_fmadd_ps(xb, w0, c[2 * i]);
      c[2 * i + 1] = _mm256_fmadd_ps(xb, w1, c[2 * i + 1]);
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < 2 * mr; i++) _mm256_storeu_ps(c_out + 8 * i, c[i]);
}

#define PF_AVX2_PANEL(MR) case MR: panel_avx2(xm, K, panel, len, c, MR); break;

/* y = x W^T over the plain [N, K] weight for several rows of x, blocked as GotoBLAS blocks a GEMM: each thread
   takes blocks of NC weight rows; per KC k's it packs the block into panels of 16 rows, and every GEMM_MR-row tile
   of x meets them in turn, sums accumulating in fp32 scratch. The weight streams from DRAM once. */
static void bf16_gemm_avx2(const uint16_t *w, const float *x, const void *bias, void *y, int bf, int M, int N,
                           int K, int threads) {
  float *acc = malloc((size_t)M * N * 4);
  const int blocks = (N + PF_AVX2_NC - 1) / PF_AVX2_NC;
#pragma omp parallel num_threads(threads)
  {
    uint32_t *panels = aligned_alloc(64, (size_t)PF_AVX2_NC * PF_AVX2_KC * 2);
#pragma omp for schedule(dynamic, 1)
    for (int b = 0; b < blocks; b++) {
      int n0 = b * PF_AVX2_NC, n1 = n0 + PF_AVX2_NC < N ? n0 + PF_AVX2_NC : N;
      for (int k0 = 0; k0 < K; k0 += PF_AVX2_KC) {
        int len = K - k0 < PF_AVX2_KC ? K - k0 : PF_AVX2_KC;
        for (int n = n0; n < n1; n += 16) pack_panel(w, N, K, n, k0, len, panels + (size_t)(n - n0) * len / 2);
        for (int m = 0; m < M; m += PF_AVX2_GEMM_MR) {
          int mm = M - m < PF_AVX2_GEMM_MR ? M - m : PF_AVX2_GEMM_MR;
          const float *xm = x + (size_t)m * K + k0;
          for (int n = n0; n < n1; n += 16) {
            const uint32_t *panel = panels + (size_t)(n - n0) * len / 2;
            float c[16 * PF_AVX2_GEMM_MR];
            switch (mm) {
              PF_AVX2_PANEL(1) PF_AVX2_PANEL(2) PF_AVX2_PANEL(3) PF_AVX2_PANEL(4)
#if PF_AVX2_GEMM_MR >= 5
              PF_AVX2_PANEL(5)
#endif
#if PF_AVX2_GEMM_MR >= 6
              PF_AVX2_PANEL(6)
#endif
            }
            int nn = n1 - n < 16 ? n1 - n : 16;
            for (int i = 0; i < mm; i++) {
              float *out = acc + (size_t)(m + i) * N + n;
              for (int j = 0; j < nn; j++) out[j] = (k0 ? out[j] : 0.f) + c[16 * i + j];
            }
          }
        }
      }
      for (int m = 0; m < M; m++)
        for (int n = n0; n < n1; n++) store_act(y, bf, (size_t)m * N + n, acc[(size_t)m * N + n], bias, n);
    }
    free(panels);
  }
  free(acc);
}

#ifndef PF_AVX2_DOT_ROWS
#define PF_AVX2_DOT_ROWS 8 /* up to this many rows of x the dot form (no packing) wins (measured on the AVX2 EPYC:
                              4 rows 78 vs 58 GFLOP/s, 8 even, 16 95 vs 102, 32 98 vs 128) */
#endif
/* y = x W^T over the plain [N, K] weight (K % 16 == 0): a few rows of x (decode steps, bound by reading the
   weight) in dot form, 3 weight rows per tile (8 for a single row of x); more rows as a blocked GEMM */
static void bf16_rows_avx2(const uint16_t *w, float *x, const void *bias, void *y, int bf, int M, int N, int K,
                           int threads) { /* x: the caller's fp32 scratch, dealt here in place */
  if (M > PF_AVX2_DOT_ROWS) {
    bf16_gemm_avx2(w, x, bias, y, bf, M, N, K, threads);
    return;
  }
  deal16(x, (size_t)M * K);
  const int nr = M == 1 ? PF_AVX2_ROW_NR : PF_AVX2_NR, groups = (N + nr - 1) / nr;
#pragma omp parallel for num_threads(threads) schedule(dynamic, chunk_of(groups, threads))
  for (int g = 0; g < groups; g++) {
    int n0 = g * nr, nn = N - n0 < nr ? N - n0 : nr;
    for (int m = 0; m < M; m += PF_AVX2_MR) {
      int mm = M - m < PF_AVX2_MR ? M - m : PF_AVX2_MR;
      float c[PF_AVX2_ROW_NR * PF_AVX2_MR];
      tile_any(x + (size_t)m * K, K, w + (size_t)n0 * K, K, K, c, nn, mm, nn);
      for (int i = 0; i < mm; i++)
        for (int j = 0; j < nn; j++) store_act(y, bf, (size_t)(m + i) * N + n0 + j, c[i * nn + j], bias, n0 + j);
    }
  }
}
#endif

void pf_bf16_gemv(const uint16_t *w, const void *x_act, const void *bias, void *y, int act_bf16, int M, int N, int K,
                  int threads) {
  float *x = load_acts(x_act, act_bf16, (size_t)M * K);
#ifdef PF_AVX2_ONLY
  if (pf_gemv_path(PF_KIND_BF16, K, 0) == PF_GEMV_AVX2) {
    bf16_rows_avx2(w, x, bias, y, act_bf16, M, N, K, threads);
    free(x);
    return;
  }
#endif
  uint16_t *x16 = malloc((size_t)M * K * 2);
  for (size_t i = 0; i < (size_t)M * K; i++) x16[i] = f32_to_bf16(x[i]);
  int quads = 0;
#ifdef PF_AVX512
  if (pf_gemv_path(PF_KIND_BF16, K, 0) != PF_GEMV_PLAIN) quads = N / 4;
#pragma omp parallel for num_threads(threads) schedule(dynamic, chunk_of(quads, threads))
  for (int r = 0; r < quads; r++)
    for (int m = 0; m < M; m++) {
      float d[4];
      dot4_bf16(w + (size_t)4 * r * K, K, x + (size_t)m * K, x16 + (size_t)m * K, d);
      for (int i = 0; i < 4; i++) store_act(y, act_bf16, (size_t)m * N + 4 * r + i, d[i], bias, 4 * r + i);
    }
#endif
#pragma omp parallel for num_threads(threads) schedule(static) if (N - 4 * quads > 64)
  for (int n = 4 * quads; n < N; n++)
    for (int m = 0; m < M; m++)
      store_act(y, act_bf16, (size_t)m * N + n,
                dot_bf16(w + (size_t)n * K, x + (size_t)m * K, x16 + (size_t)m * K, K), bias, n);
  free(x);
  free(x16);
}
