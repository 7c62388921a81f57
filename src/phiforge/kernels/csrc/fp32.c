/* ---- fp32 rows (one-row decode of an fp32 model) ----------------------------------------------------- */
static float dot_f32(const float *w, const float *x, int K) {
  int k = 0;
  float acc = 0.f;
#ifdef PF_AVX512
  __m512 a0 = _mm512_setzero_ps(), a1 = a0;
  for (; k + 32 <= K; k += 32) {
    _mm_prefetch((const char *)(w + k + PF_AHEAD / 4), _MM_HINT_T0);
    _mm_prefetch((const char *)(w + k + PF_AHEAD / 4 + 16), _MM_HINT_T0);
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
  }
  acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
  for (; k < K; k++) acc += w[k] * x[k];
  return acc;
}

void pf_f32_gemv(const float *w, const void *x_act, const void *bias, void *y, int act_bf16, int M, int N, int K,
                 int threads) {
  float *x = load_acts(x_act, act_bf16, (size_t)M * K);
#pragma omp parallel for num_threads(threads) schedule(dynamic, chunk_of(N, threads))
  for (int n = 0; n < N; n++)
    for (int m = 0; m < M; m++) store_act(y, act_bf16, (size_t)m * N + n, dot_f32(w + (size_t)n * K, x + (size_t)m * K, K), bias, n);
  free(x);
}
