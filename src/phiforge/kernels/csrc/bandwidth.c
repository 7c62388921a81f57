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
