/* ---- RMSNorm (bf16) -------------------------------------------------------------------------------- */
/* transformers' order: normalise in fp32, round to bf16, then multiply by the bf16 weight (rounded again) */
void pf_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int rows, int dim, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows > 8)
  for (int r = 0; r < rows; r++) {
    const uint16_t *xr = x + (size_t)r * dim;
    float ss = 0.f;
    for (int d = 0; d < dim; d++) { float v = bf16_to_f32(xr[d]); ss += v * v; }
    float inv = 1.f / sqrtf(ss / dim + eps);
    for (int d = 0; d < dim; d++)
      y[(size_t)r * dim + d] = f32_to_bf16(bf16_to_f32(f32_to_bf16(bf16_to_f32(xr[d]) * inv)) * bf16_to_f32(w[d]));
  }
}
