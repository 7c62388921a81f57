/* ---- memory read bandwidth ------------------------------------------------------------------------ */
/* The decode speed limit's denominator: the best bytes/s of a streaming read of `bytes` over `threads`, each
   reading its own contiguous slice with the widest loads this build has, plainly, with software prefetch, or
   with non-temporal loads; on 2 MB pages where huge (madvise, the kernel may decline). Best of `repeats`. */
double pf_read_bandwidth(size_t bytes, int method, int huge, int threads, int repeats) {
  size_t align = (size_t)1 << 21;
  bytes = (bytes + align - 1) / align * align;
  char *buf = aligned_alloc(align, bytes);
  if (!buf) return 0.;
  if (huge) madvise(buf, bytes, MADV_HUGEPAGE);
  memset(buf, 1, bytes);
  double best = 1e30;
  volatile uint64_t sink = 0;
  for (int r = 0; r < repeats; r++) {
    uint64_t total = 0;
    double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads) reduction(^ : total)
    {
      int t = omp_get_thread_num(), n = omp_get_num_threads();
      size_t slice = bytes / n / 256 * 256;
      const char *p = buf + (size_t)t * slice, *end = p + slice;
#ifdef PF_AVX512
      __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
      for (; p < end; p += 256) {
        if (method == PF_READ_PREFETCH)
          for (int l = 0; l < 256; l += 64) _mm_prefetch(p + 4096 + l, _MM_HINT_T0);
        if (method == PF_READ_STREAM) {
          a0 = _mm512_xor_si512(a0, _mm512_stream_load_si512((void *)p));
          a1 = _mm512_xor_si512(a1, _mm512_stream_load_si512((void *)(p + 64)));
          a2 = _mm512_xor_si512(a2, _mm512_stream_load_si512((void *)(p + 128)));
          a3 = _mm512_xor_si512(a3, _mm512_stream_load_si512((void *)(p + 192)));
        } else {
          a0 = _mm512_xor_si512(a0, _mm512_load_si512(p));
          a1 = _mm512_xor_si512(a1, _mm512_load_si512(p + 64));
          a2 = _mm512_xor_si512(a2, _mm512_load_si512(p + 128));
          a3 = _mm512_xor_si512(a3, _mm512_load_si512(p + 192));
        }
      }
      total ^= (uint64_t)_mm512_reduce_add_epi64(_mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3)));
#else
      uint64_t a[8] = {0};
      for (; p < end; p += 64) {
#if defined(__GNUC__)
        if (method == PF_READ_PREFETCH) __builtin_prefetch(p + 4096);
#endif
        for (int i = 0; i < 8; i++) a[i] ^= ((const uint64_t *)p)[i];
      }
      for (int i = 0; i < 8; i++) total ^= a[i];
#endif
    }
    double dt = omp_get_wtime() - t0;
    sink ^= total;
    if (dt < best) best = dt;
  }
  free(buf);
  return (double)bytes / best;
}

/* ---- FMA throughput ------------------------------------------------------------------------------- */
/* The compute roof GEMM benchmarks take fractions of: fp32 flop/s of independent FMAs (12 chains per thread,
   more than latency x pipes on any x86 core) at this build's widest vectors, over `threads`. Best of 3. */
#if defined(PF_AVX512)
#define PF_FMA_VEC __m512
#define PF_FMA_SET(v) _mm512_set1_ps(v)
#define PF_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define PF_FMA_LANES 16
#elif defined(__AVX2__) && defined(__FMA__)
#define PF_FMA_VEC __m256
#define PF_FMA_SET(v) _mm256_set1_ps(v)
#define PF_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define PF_FMA_LANES 8
#endif
double pf_fma_peak(int threads) {
#ifdef PF_FMA_VEC
  const long iters = 20000000;
  double best = 1e30;
  float sink = 0.f;
  for (int r = 0; r < 3; r++) {
    double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads)
    {
      PF_FMA_VEC c[12], a = PF_FMA_SET(0.999f), b = PF_FMA_SET(1e-4f);
      for (int i = 0; i < 12; i++) c[i] = PF_FMA_SET(i * 1e-3f);
      for (long it = 0; it < iters; it++)
#pragma GCC unroll 12
        for (int i = 0; i < 12; i++) c[i] = PF_FMA(c[i], a, b);
      for (int i = 1; i < 12; i++) c[0] = PF_FMA(c[i], a, c[0]); /* keep every chain live */
      float out[PF_FMA_LANES];
      memcpy(out, &c[0], sizeof out);
#pragma omp atomic
      sink += out[0];
    }
    double t = omp_get_wtime() - t0;
    best = t < best ? t : best;
  }
  if (sink == 12345.f) best *= 1.0000001; /* sink read: the chains cannot be dropped */
  return (double)threads * iters * 12 * PF_FMA_LANES * 2 / best;
#else
  (void)threads;
  return 0.; /* no vector FMA in this build */
#endif
}
