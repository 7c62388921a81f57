/* ---- int8 rows ------------------------------------------------------------------------------------ */
static float dot_int8(const int8_t *w, const float *x, int K) {
  int k = 0;
  float acc = 0.f;
#ifdef PF_AVX512
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; k + 64 <= K; k += 64) {
    _mm_prefetch((const char *)(w + k + PF_AHEAD), _MM_HINT_T0);
    a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k)))),
                         _mm512_loadu_ps(x + k), a0);
    a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k + 16)))),
                         _mm512_loadu_ps(x + k + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k + 32)))),
                         _mm512_loadu_ps(x + k + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k + 48)))),
                         _mm512_loadu_ps(x + k + 48), a3);
  }
  acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
  for (; k < K; k++) acc += (float)w[k] * x[k];
  return acc;
}

/* where row r of a tile of R rows prefetches, d bytes ahead: past its end, the same row of the next tile (the tile
   is R streams; a flat d ahead would land in a row this tile is reading anyway) */
#define PF_WRAP_ROWS(wr, k, d, K, R) ((k) + (d) < (K) ? (wr) + (d) : (wr) + ((R) - 1) * (K) + (d))
#define PF_WRAP(wr, k, d, K) PF_WRAP_ROWS(wr, k, d, K, 4)

#ifdef PF_AVX512
/* four rows at once (as dot4_bf16): four streams in flight, each x vector loaded once for all four */
static void dot4_int8(const int8_t *w, size_t K, const float *x, float *out) {
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  /* each row 4 KB ahead, in the next quad once past its end: the quad 16 KB ahead (best of 8/16/32 KB here) */
  const size_t d = PF_AHEAD / 2;
  for (size_t k = 0; k < K; k += 32) {
    __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
    for (int r = 0; r < 4; r++) {
      const int8_t *wr = w + r * K + k;
      if ((k & 63) == 0) _mm_prefetch((const char *)PF_WRAP(wr, k, d, K), _MM_HINT_T0);
      a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)wr))), x0, a[r]);
      a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(wr + 16)))),
                             x1, a[r]);
    }
  }
  for (int r = 0; r < 4; r++) out[r] = _mm512_reduce_add_ps(a[r]);
}
#endif

#if defined(PF_AVX512) && defined(__AVX512VNNI__)
#define PF_INT8_VNNI 1
#define PF_INT8_Q8 PF_GEMV_Q8_VNNI
#elif defined(PF_AVX2_ONLY)
#define PF_INT8_AVX2 1
#define PF_INT8_Q8 PF_GEMV_Q8_AVX2
#endif
#ifdef PF_INT8_Q8
/* Integer products: x quantized to int8 per block of 64 (symmetric, scale max|x| / 127, round half to even, as
   llama.cpp's Q8 activations), where the fp32 path needs a conversion and an FMA per weight.
   VNNI: one vpdpbusd per 64 weight bytes. It multiplies unsigned by signed bytes, so the weight goes in as
   w ^ 0x80 = w + 128 and 128 * sum(xq * scale), the same for every row (QuantX.offset), is taken off at the end.
   AVX2: vpmaddubsw on |w| and xq with w's sign (|w| <= 128 and |xq| <= 127, so a pair's sum fits in int16),
   then vpmaddwd to int32; no offset. */
#define PF_QBLOCK 64
#ifndef PF_INT8_AHEAD
#define PF_INT8_AHEAD 2048 /* best of 0.5-8 KB on Zen 5, 2 threads (1-2 KB tie) */
#endif
#ifndef PF_INT8_AVX2_AHEAD
#define PF_INT8_AVX2_AHEAD 512 /* AVX2 EPYC, 2 threads: SmolLM2's short rows (576 B) 15.3 GB/s vs 13.4-14.0 without,
                                  phi-1.5's 26.9-27.5 vs 25.4-26.2; 1-2 KB no better */
#endif
typedef struct {
  int8_t *q;
  float *scale, *offset; /* per block; per row of x: 128 * sum over blocks of scale * sum(q) */
} QuantX;

static void quantize_x(const float *x, int M, int K, QuantX *s) {
  int blocks = K / PF_QBLOCK;
  s->q = aligned_alloc(64, ((size_t)M * K + 63) / 64 * 64);
  s->scale = malloc((size_t)M * blocks * 4);
  s->offset = malloc((size_t)M * 4);
  for (int m = 0; m < M; m++) {
    double off = 0.;
    for (int b = 0; b < blocks; b++) {
      int32_t total;
      float scale = q8_block(x + (size_t)m * K + (size_t)b * PF_QBLOCK, PF_QBLOCK,
                             s->q + (size_t)m * K + (size_t)b * PF_QBLOCK, &total);
      s->scale[(size_t)m * blocks + b] = scale;
      off += 128. * scale * total;
    }
    s->offset[m] = (float)off;
  }
}

static void free_quant(QuantX *s) { free(s->q); free(s->scale); free(s->offset); }

/* one row on the blocks of x, in plain C: the rows past the last whole tile get the same int8 products */
static float dot_int8_q8_row(const int8_t *w, int K, const int8_t *xq, const float *xs) {
  float acc = 0.f;
  for (int b = 0; b < K / PF_QBLOCK; b++) {
    int32_t d = 0;
    for (int i = b * PF_QBLOCK; i < (b + 1) * PF_QBLOCK; i++) d += (int32_t)w[i] * xq[i];
    acc += (float)d * xs[b];
  }
  return acc;
}
_Static_assert(PF_QBLOCK == PF_TILE_BLOCK, "a tile's column block is one block of x");
#endif

/* The tiled int8 layout (pf_int8_tile): rows in tiles of R, each tile's PF_TILE_BLOCK-byte column blocks
   row-interleaved (block b of rows 0..R-1, then block b + 1), so the R rows a GEMV reads together are one linear
   stream instead of R streams K bytes apart; rows past the last whole tile stay where [N, K] has them. AVX2 EPYC,
   2 threads, 512 MB of weight: 26 GB/s over 8 plain rows, 37 over tiles. PF_TILE_AT: byte offset of (row r, column
   k) from the start of the tile holding row r (tiled) or from row 0 (plain). */
#define PF_TILE_AT(r, k, K, R, tiled) \
  ((tiled) ? ((size_t)(k) / PF_TILE_BLOCK) * (R) * PF_TILE_BLOCK + (size_t)(r) * PF_TILE_BLOCK + (k) % PF_TILE_BLOCK \
           : (size_t)(r) * (K) + (k))

void pf_int8_dequant(const int8_t *w, const uint16_t *scale, uint16_t *out, int N, int K, int tile, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int n = 0; n < N; n++) {
    float s = bf16_to_f32(scale[n]);
    int tiled = tile && n < N / tile * tile;
    /* a row is contiguous runs of PF_TILE_BLOCK bytes (tiled), or one run of K */
    const int8_t *row = w + (tiled ? (size_t)(n - n % tile) * K + PF_TILE_AT(n % tile, 0, K, tile, 1) : (size_t)n * K);
    const size_t run = tiled ? PF_TILE_BLOCK : (size_t)K, step = tiled ? (size_t)tile * PF_TILE_BLOCK : 0;
    for (size_t k0 = 0; k0 < (size_t)K; k0 += run, row += step)
      for (size_t i = 0; i < run; i++) out[(size_t)n * K + k0 + i] = f32_to_bf16((float)row[i] * s);
  }
}

#ifdef PF_INT8_VNNI
#define PF_INT8_ROWS 4 /* weight rows per call */
static void dotn_int8_q8(const int8_t *w, size_t K, int tiled, const int8_t *xq, const float *xs, float *out) {
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  const size_t d = PF_INT8_AHEAD;
  for (size_t k = 0; k < K; k += PF_QBLOCK) {
    __m512i xv = _mm512_load_si512(xq + k);
    __m512 s = _mm512_set1_ps(xs[k / PF_QBLOCK]);
    for (int r = 0; r < 4; r++) {
      const int8_t *wr = w + PF_TILE_AT(r, k, K, 4, tiled);
      _mm_prefetch((const char *)(tiled ? wr + d : PF_WRAP(wr, k, d, K)), _MM_HINT_T0);
      __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_xor_si512(_mm512_loadu_si512(wr), flip), xv);
      a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), s, a[r]);
    }
  }
  for (int r = 0; r < 4; r++) out[r] = _mm512_reduce_add_ps(a[r]);
}
#define PF_INT8_OFFSET(q, m) ((q).offset[m])
#endif

#ifdef PF_INT8_AVX2
static inline __m256i dot32_int8(const int8_t *w, __m256i xq) { /* 8 int32 lanes, each the dot of 4 bytes */
  __m256i wv = _mm256_loadu_si256((const __m256i *)w);
  __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xq, wv));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

#ifndef PF_INT8_ROWS
#define PF_INT8_ROWS 8 /* weight rows per call: eight streams keep more misses in flight than four (as bf16's) */
#endif
static void dotn_int8_q8(const int8_t *w, size_t K, int tiled, const int8_t *xq, const float *xs, float *out) {
  __m256 a[PF_INT8_ROWS];
  for (int r = 0; r < PF_INT8_ROWS; r++) a[r] = _mm256_setzero_ps();
  for (size_t k = 0; k < K; k += PF_QBLOCK) {
    __m256i x0 = _mm256_load_si256((const __m256i *)(xq + k)), x1 = _mm256_load_si256((const __m256i *)(xq + k + 32));
    __m256 s = _mm256_set1_ps(xs[k / PF_QBLOCK]);
#pragma GCC unroll 8
    for (int r = 0; r < PF_INT8_ROWS; r++) {
      const int8_t *wr = w + PF_TILE_AT(r, k, K, PF_INT8_ROWS, tiled);
#if PF_INT8_AVX2_AHEAD > 0
      if (!tiled) _mm_prefetch((const char *)PF_WRAP_ROWS(wr, k, PF_INT8_AVX2_AHEAD, K, PF_INT8_ROWS), _MM_HINT_T0);
#endif /* tiled: no software prefetch (the hardware follows the one stream; 2-16 KB ahead cost 1-4%) */
      __m256i p = _mm256_add_epi32(dot32_int8(wr, x0), dot32_int8(wr + 32, x1));
      a[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, a[r]);
    }
  }
  for (int r = 0; r < PF_INT8_ROWS; r++) out[r] = hsum8(a[r]);
}
#define PF_INT8_OFFSET(q, m) 0.f
#endif

int pf_int8_tile(int K) { /* rows per tile the int8 GEMV reads a weight of K columns in; 0: plain [N, K] */
#ifdef PF_INT8_AVX2
  if (pf_gemv_path(PF_KIND_INT8, K, 0) == PF_INT8_Q8) return PF_INT8_ROWS;
#endif
  (void)K;
  return 0;
}

/* tile: the weight's layout, pf_int8_tile(K) or 0 (plain rows; the caller keeps to one of the two) */
void pf_int8_gemv(const int8_t *w, const uint16_t *scale, const void *x_act, const void *bias, void *y, int act_bf16,
                  int M, int N, int K, int tile, int threads) {
  float *x = load_acts(x_act, act_bf16, (size_t)M * K);
  int done = 0, path = pf_gemv_path(PF_KIND_INT8, K, 0); /* rows done by a vector path; the rest below */
  (void)path;
#ifdef PF_INT8_Q8
  if (path == PF_INT8_Q8) {
    QuantX q;
    quantize_x(x, M, K, &q);
    const int R = PF_INT8_ROWS, tiles = N / R;
    done = R * tiles;
#pragma omp parallel for num_threads(threads) schedule(dynamic, chunk_of(tiles, threads))
    for (int t = 0; t < tiles; t++)
      for (int m = 0; m < M; m++) {
        float d[PF_INT8_ROWS];
        dotn_int8_q8(w + (size_t)R * t * K, K, tile != 0, q.q + (size_t)m * K, q.scale + (size_t)m * (K / PF_QBLOCK), d);
        for (int i = 0; i < R; i++)
          store_act(y, act_bf16, (size_t)m * N + R * t + i,
                    bf16_to_f32(scale[R * t + i]) * (d[i] - PF_INT8_OFFSET(q, m)), bias, R * t + i);
      }
    for (; done < N; done++)
      for (int m = 0; m < M; m++)
        store_act(y, act_bf16, (size_t)m * N + done,
                  bf16_to_f32(scale[done]) * dot_int8_q8_row(w + (size_t)done * K, K, q.q + (size_t)m * K,
                                                             q.scale + (size_t)m * (K / PF_QBLOCK)), bias, done);
    free_quant(&q);
  }
#endif
#ifdef PF_AVX512
  if (path == PF_GEMV_AVX512) {
    int quads = N / 4;
    done = 4 * quads;
#pragma omp parallel for num_threads(threads) schedule(dynamic, chunk_of(quads, threads))
    for (int r = 0; r < quads; r++)
      for (int m = 0; m < M; m++) {
        float d[4];
        dot4_int8(w + (size_t)4 * r * K, K, x + (size_t)m * K, d);
        for (int i = 0; i < 4; i++)
          store_act(y, act_bf16, (size_t)m * N + 4 * r + i, bf16_to_f32(scale[4 * r + i]) * d[i], bias, 4 * r + i);
      }
  }
#endif
#pragma omp parallel for num_threads(threads) schedule(static) if (N - done > 64)
  for (int n = done; n < N; n++) {
    const int8_t *row = w + (size_t)n * K;
    float s = bf16_to_f32(scale[n]);
    for (int m = 0; m < M; m++) store_act(y, act_bf16, (size_t)m * N + n, s * dot_int8(row, x + (size_t)m * K, K), bias, n);
  }
  free(x);
}
