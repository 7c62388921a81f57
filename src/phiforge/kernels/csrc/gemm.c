/* ---- bf16 GEMM of a decode batch on AMX ------------------------------------------------------------- */
/* A decode step of B rows reads each weight once for 2B flops. At B = 32 with the weights coming from DRAM,
   oneDNN's GEMM here runs at ~8 GB/s (its tile loads wait on misses of a strided weight). This one takes the
   weight pre-packed as the B tiles want it, each block of 16 output columns one contiguous [K/2][16][2]
   stream, so the hardware prefetcher runs ahead; x rows are the A tiles as they are. Per pair of column
   blocks the packed weight (K * 64 bytes) stays in L2 while every 32-row chunk of x passes over it. */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define PF_AMX 1

typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} TileConfig;

/* 32 outputs from fp32 c: + bias, rounded to the activation dtype (vcvtneps2bf16 rounds to nearest even) */
static inline void store_row32(void *y, int bf, size_t at, const float *c, const void *bias, int n) {
  for (int h = 0; h < 32; h += 16) {
    __m512 v = _mm512_loadu_ps(c + h);
    if (bias) v = _mm512_add_ps(v, load16(bias, (size_t)n + h, bf));
    if (bf) _mm256_storeu_si256((__m256i *)((uint16_t *)y + at + h), (__m256i)_mm512_cvtneps_pbh(v));
    else _mm512_storeu_ps((float *)y + at + h, v);
  }
}

/* C[m0 .. m0+31][32 columns of the pair] into c (32 x 32 fp32) */
static void amx_pair(const uint16_t *x16, const uint16_t *b0, const uint16_t *b1, size_t K, int two, float *c) {
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (size_t k = 0; k < K; k += 32) {
    _tile_loadd(4, x16 + k, K * 2);
    _tile_loadd(6, b0 + k * 16, 64);
    _tile_loadd(7, b1 + k * 16, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (two) {
      _tile_loadd(5, x16 + 16 * K + k, K * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
  if (two) {
    _tile_stored(2, c + 16 * 32, 128);
    _tile_stored(3, c + 16 * 32 + 16, 128);
  }
}
#endif

int pf_amx_available(void) { /* built with AMX and the kernel grants this process the tile state */
#ifdef PF_AMX
  static int state = 0;
  if (state == 0) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0 ? 1 : -1;
  return state == 1;
#else
  return 0;
#endif
}

/* w [N, K] bf16 -> [N/16][K/2][16][2]: element (n, k) at ((n/16 * K/2 + k/2) * 16 + n%16) * 2 + k%2; N % 16 == 0,
   K even. Each block of 16 output columns is one contiguous stream, 64 bytes per pair of k: one AMX B-tile row,
   one vdpbf16ps operand. */
void pf_bf16_pack(const uint16_t *w, uint16_t *out, int N, int K, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int n = 0; n < N; n++)
    for (int k = 0; k < K; k++)
      out[(((size_t)(n / 16) * (K / 2) + k / 2) * 16 + n % 16) * 2 + (k & 1)] = w[(size_t)n * K + k];
}

#ifdef PF_AMX
/* y = x W^T on AMX; N % 32 == K % 32 == 0 */
static void gemm_amx(const uint16_t *packed, const uint16_t *x16, const void *bias, void *y, int act_bf16, int M,
                     int padded, int N, int K, int threads) {
#pragma omp parallel num_threads(threads)
  {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);
    float c[32 * 32];
#pragma omp for schedule(dynamic, 1)
    for (int p = 0; p < N / 32; p++) {
      const uint16_t *b0 = packed + (size_t)2 * p * K * 16, *b1 = b0 + (size_t)K * 16;
      for (int m0 = 0; m0 < padded; m0 += 32) {
        amx_pair(x16 + (size_t)m0 * K, b0, b1, K, m0 + 16 < padded, c);
        for (int m = 0; m < 32 && m0 + m < M; m++) store_row32(y, act_bf16, (size_t)(m0 + m) * N + 32 * p, c + m * 32, bias, 32 * p);
      }
    }
    _tile_release();
  }
}
#endif

#if defined(PF_AVX512) && defined(__AVX512BF16__)
/* The same GEMM without AMX: a register tile of MR rows x NB blocks of 16 columns (8 x 3: 24 fp32 accumulators,
   3 weight vectors, a broadcast), one vdpbf16ps per (row, block, pair of k). Per k pair it loads NB weight
   vectors and MR broadcast pairs of x for MR * NB dot products, so the weight streams once from DRAM per group
   of 48 columns while every 8-row tile of x passes over it from L2. */
#define PF_MR 8
#define PF_NB 3
static inline __attribute__((always_inline)) void tile_bf16(const uint32_t *x2, size_t K2, const uint16_t *wb,
                                                            size_t bstride, const void *bias, void *y, int bf,
                                                            size_t N, int n0, const int mr, const int nb) {
  __m512 c[PF_MR * PF_NB];
#pragma GCC unroll 24
  for (int i = 0; i < mr * nb; i++) c[i] = _mm512_setzero_ps();
  for (size_t p = 0; p < K2; p++) {
    __m512bh w[PF_NB];
#pragma GCC unroll 3
    for (int b = 0; b < nb; b++) {
      const uint16_t *at = wb + b * bstride + p * 32;
      _mm_prefetch((const char *)(at + 1024), _MM_HINT_T0); /* 2 KB ahead in each block's stream */
      w[b] = (__m512bh)_mm512_loadu_si512(at);
    }
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++) {
      __m512bh xb = (__m512bh)_mm512_set1_epi32((int)x2[i * K2 + p]);
#pragma GCC unroll 3
      for (int b = 0; b < nb; b++) c[i * nb + b] = _mm512_dpbf16_ps(c[i * nb + b], w[b], xb);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < mr; i++)
#pragma GCC unroll 3
    for (int b = 0; b < nb; b++) {
      __m512 v = c[i * nb + b];
      int n = n0 + 16 * b;
      if (bias) v = _mm512_add_ps(v, load16(bias, (size_t)n, bf));
      if (bf) _mm256_storeu_si256((__m256i *)((uint16_t *)y + i * N + n), (__m256i)_mm512_cvtneps_pbh(v));
      else _mm512_storeu_ps((float *)y + i * N + n, v);
    }
}

#define PF_TILE(MR, NB) \
  case MR * 4 + NB: tile_bf16(x2, K2, wb, bstride, bias, yr, bf, N, n0, MR, NB); break;
#define PF_TILES(MR) PF_TILE(MR, 1) PF_TILE(MR, 2) PF_TILE(MR, 3)

static void gemm_avx512bf16(const uint16_t *packed, const uint16_t *x16, const void *bias, void *y, int bf, int M,
                            int N, int K, int threads) {
  size_t K2 = (size_t)K / 2, bstride = (size_t)K * 16;
  int blocks = N / 16, groups = (blocks + PF_NB - 1) / PF_NB;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int g = 0; g < groups; g++) {
    int nb = blocks - g * PF_NB < PF_NB ? blocks - g * PF_NB : PF_NB, n0 = g * PF_NB * 16;
    const uint16_t *wb = packed + (size_t)g * PF_NB * bstride;
    for (int m0 = 0; m0 < M; m0 += PF_MR) {
      int mr = M - m0 < PF_MR ? M - m0 : PF_MR;
      const uint32_t *x2 = (const uint32_t *)(x16 + (size_t)m0 * K);
      void *yr = (char *)y + (size_t)m0 * N * (bf ? 2 : 4);
      switch (mr * 4 + nb) {
        PF_TILES(1) PF_TILES(2) PF_TILES(3) PF_TILES(4) PF_TILES(5) PF_TILES(6) PF_TILES(7) PF_TILES(8)
      }
    }
  }
}
#endif

/* the plain path over the packed layout (builds without AVX512-BF16; Python packs only where a vector GEMM is) */
static void gemm_plain(const uint16_t *packed, const uint16_t *x16, const void *bias, void *y, int bf, int M, int N,
                       int K, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int n = 0; n < N; n++) {
    const uint16_t *blk = packed + (size_t)(n / 16) * K * 16 + (n % 16) * 2;
    for (int m = 0; m < M; m++) {
      float acc = 0.f;
      for (int k = 0; k < K; k++) acc += bf16_to_f32(blk[(size_t)(k / 2) * 32 + (k & 1)]) * bf16_to_f32(x16[(size_t)m * K + k]);
      store_act(y, bf, (size_t)m * N + n, acc, bias, n);
    }
  }
}

int pf_bf16_gemm_path(int N, int K) { /* which GEMM pf_bf16_gemm takes for this shape (PF_GEMM_*) */
#ifdef PF_AMX
  if (pf_amx_available() && N % 32 == 0 && K % 32 == 0) return PF_GEMM_AMX;
#endif
#if defined(PF_AVX512) && defined(__AVX512BF16__)
  return PF_GEMM_AVX512_BF16;
#endif
  (void)N; (void)K;
  return PF_GEMM_PLAIN;
}

/* y [M, N] = x [M, K] W^T (+ bias) for W packed by pf_bf16_pack (N % 16 == 0, K even), x rounded to bf16,
   accumulated in fp32 (sums in another order than F.linear's: not bitwise its result) */
void pf_bf16_gemm(const uint16_t *packed, const void *x_act, const void *bias, void *y, int act_bf16, int M, int N,
                  int K, int threads) {
  int path = pf_bf16_gemm_path(N, K), padded = path == PF_GEMM_AMX ? (M + 15) / 16 * 16 : M;
  uint16_t *x16 = calloc((size_t)padded * K, 2);
  for (size_t i = 0; i < (size_t)M * K; i++)
    x16[i] = act_bf16 ? ((const uint16_t *)x_act)[i] : f32_to_bf16(((const float *)x_act)[i]);
#ifdef PF_AMX
  if (path == PF_GEMM_AMX) gemm_amx(packed, x16, bias, y, act_bf16, M, padded, N, K, threads);
#endif
#if defined(PF_AVX512) && defined(__AVX512BF16__)
  if (path == PF_GEMM_AVX512_BF16) gemm_avx512bf16(packed, x16, bias, y, act_bf16, M, N, K, threads);
#endif
  if (path == PF_GEMM_PLAIN) gemm_plain(packed, x16, bias, y, act_bf16, M, N, K, threads);
  free(x16);
}
