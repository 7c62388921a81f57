/* ---- which GEMV path a projection takes ----------------------------------------------------------- */
/* One answer for the GEMVs themselves, the tests (which reference arithmetic applies) and `phiforge info --paths`:
   PF_GEMV_* for a weight of this kind, K columns and (int4) group size G, at this build's feature level. */
int pf_gemv_path(int kind, int K, int G) {
  switch (kind) {
  case PF_KIND_INT8:
#ifdef PF_INT8_Q8
    if (K % PF_QBLOCK == 0) return PF_INT8_Q8;
#endif
#ifdef PF_AVX512
    if (K % 32 == 0) return PF_GEMV_AVX512;
#endif
    return PF_GEMV_PLAIN;
  case PF_KIND_INT4:
#ifdef __AVX512BF16__
    if (G == 32 && K % 64 == 0) return PF_GEMV_BF16_DOT;
#endif
#ifdef PF_AVX2_ONLY
    if (G >= PF_INT4_QBLOCK && (G & (G - 1)) == 0 && K % 64 == 0 && K % G == 0) return PF_GEMV_Q8_AVX2;
#endif
    (void)G;
    return PF_GEMV_PLAIN;
  case PF_KIND_BF16:
#ifdef __AVX512BF16__
    if (K % 32 == 0) return PF_GEMV_BF16_DOT;
#endif
#ifdef PF_AVX512
    if (K % 32 == 0) return PF_GEMV_AVX512;
#endif
#ifdef PF_AVX2_ONLY
    if (K % 16 == 0) return PF_GEMV_AVX2;
#endif
    return PF_GEMV_PLAIN;
  default:
    (void)K;
    return PF_GEMV_PLAIN;
  }
}
