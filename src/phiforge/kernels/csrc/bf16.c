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

void pf_bf16_gemv(const uint16_t *w, const void *x_act, const void *bias, void *y, int act_bf16, int M, int N, int K,
                  int threads) {
  float *x = load_acts(x_act, act_bf16, (size_t)M * K);
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

void pf_int8_dequant(const int8_t *w, const uint16_t *scale, uint16_t *out, int N, int K, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int n = 0; n < N; n++) {
    float s = bf16_to_f32(scale[n]);
    for (int k = 0; k < K; k++) out[(size_t)n * K + k] = f32_to_bf16((float)w[(size_t)n * K + k] * s);
  }
}
