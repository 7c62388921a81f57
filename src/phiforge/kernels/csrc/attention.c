/* ---- decode attention ----------------------------------------------------------------------------- */
/* One new token per sequence: q [B, H, D] (strides qb, qh; contiguous D); its key and value kn, vn
   [B, KV, D] (strides knb, knh and vnb, vnh) are first stored in the cache at position hi[b] - 1 (cache rows at
   k + b*sb + h*sh + t*st), then sequence b attends keys lo[b] <= t < hi[b]. Storing inside the kernel
   touches each cache row's pages once, where a separate scattered write costs a TLB miss per (b, h).
   All tensors are bf16 if bf16 else fp32. Query heads h*G .. h*G+G-1 share kv head h, so each key and
   value row is read once for all G of them. out [B, H, D] contiguous: the [B, 1, H*D] the output
   projection takes. */
static inline void load_row(const void *base, size_t off, int bf16, int D, float *dst) {
  if (bf16) {
    const uint16_t *p = (const uint16_t *)base + off;
    for (int d = 0; d < D; d++) dst[d] = bf16_to_f32(p[d]);
  } else {
    memcpy(dst, (const float *)base + off, (size_t)D * 4);
  }
}

#ifdef PF_AVX512
static inline __m512 load16(const void *base, size_t off, int bf16) {
  if (bf16)
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + off))), 16));
  return _mm512_loadu_ps((const float *)base + off);
}

/* exp for softmax: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], degree-6 polynomial (~1 ulp) */
static inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

/* lane i of the result = the sum of all 16 lanes of v[i]: a transpose folded into adds (45 ops, not 16 reductions) */
static inline __m512 sum16(const __m512 *v) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; i++) /* per 128-bit lane: [x, y, x, y] of keys 2i, 2i+1 */
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; i++) /* per 128-bit lane: keys 4i .. 4i+3 */
    b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44), _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
  __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x44), _mm512_shuffle_f32x4(b[0], b[1], 0xEE));
  __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x44), _mm512_shuffle_f32x4(b[2], b[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

#define PF_MAX_G 16
#define PF_MAX_DV 16 /* head_dim up to 256 */
/* the vector path: D % 16 == 0, G <= PF_MAX_G */
static void attend_avx512(const float *qf, const void *k, const void *v, int bf16, size_t base, int64_t lo, int n,
                          int64_t st, int G, int D, float scale, float *scores, float *of) {
  int dv = D / 16;
  for (int g = 0; g < G; g++) { /* q.k: 16 keys' partial vectors summed at once (the keys stay in L1 across g) */
    __m512 qv[PF_MAX_DV], part[16];
    for (int j = 0; j < dv; j++) qv[j] = _mm512_loadu_ps(qf + g * D + 16 * j);
    int t = 0;
    for (; t < n; t += 16) {
      int block = n - t < 16 ? n - t : 16;
      for (int i = 0; i < 16; i++) {
        size_t off = base + (size_t)(lo + t + (i < block ? i : 0)) * st;
        part[i] = _mm512_mul_ps(qv[0], load16(k, off, bf16));
        for (int j = 1; j < dv; j++) part[i] = _mm512_fmadd_ps(qv[j], load16(k, off + 16 * j, bf16), part[i]);
      }
      _mm512_mask_storeu_ps(scores + (size_t)g * n + t, (__mmask16)((1u << block) - 1),
                            _mm512_mul_ps(sum16(part), _mm512_set1_ps(scale)));
    }
  }
  for (int g = 0; g < G; g++) { /* softmax, vectorized */
    float *sg = scores + (size_t)g * n, mx = -INFINITY, sum = 0.f;
    for (int t = 0; t < n; t++) mx = sg[t] > mx ? sg[t] : mx;
    __m512 m = _mm512_set1_ps(mx), total = _mm512_setzero_ps();
    int t = 0;
    for (; t + 16 <= n; t += 16) {
      __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sg + t), m));
      _mm512_storeu_ps(sg + t, e);
      total = _mm512_add_ps(total, e);
    }
    if (t < n) {
      __mmask16 tail = (__mmask16)((1u << (n - t)) - 1);
      __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sg + t), m));
      _mm512_mask_storeu_ps(sg + t, tail, e);
      total = _mm512_add_ps(total, _mm512_maskz_mov_ps(tail, e));
    }
    sum = _mm512_reduce_add_ps(total);
    for (t = 0; t < n; t++) sg[t] /= sum;
  }
  __m512 acc[PF_MAX_G * PF_MAX_DV];
  for (int i = 0; i < G * dv; i++) acc[i] = _mm512_setzero_ps();
  for (int t = 0; t < n; t++) {
    size_t off = base + (size_t)(lo + t) * st;
    for (int j = 0; j < dv; j++) {
      __m512 vr = load16(v, off + 16 * j, bf16);
      for (int g = 0; g < G; g++) acc[g * dv + j] = _mm512_fmadd_ps(_mm512_set1_ps(scores[(size_t)g * n + t]), vr, acc[g * dv + j]);
    }
  }
  for (int g = 0; g < G; g++)
    for (int j = 0; j < dv; j++) _mm512_storeu_ps(of + g * D + 16 * j, acc[g * dv + j]);
}
#endif

/* the plain path, any D and G */
static void attend_plain(const float *qf, const void *k, const void *v, int bf16, size_t base, int64_t lo, int n,
                         int64_t st, int G, int D, float scale, float *scores, float *row, float *of) {
  for (int t = 0; t < n; t++) {
    load_row(k, base + (size_t)(lo + t) * st, bf16, D, row);
    for (int g = 0; g < G; g++) {
      float acc = 0.f;
      for (int d = 0; d < D; d++) acc += qf[(size_t)g * D + d] * row[d];
      scores[(size_t)g * n + t] = acc * scale;
    }
  }
  for (int g = 0; g < G; g++) {
    float *sg = scores + (size_t)g * n, mx = -INFINITY, sum = 0.f;
    for (int t = 0; t < n; t++) mx = sg[t] > mx ? sg[t] : mx;
    for (int t = 0; t < n; t++) { sg[t] = expf(sg[t] - mx); sum += sg[t]; }
    for (int t = 0; t < n; t++) sg[t] /= sum;
  }
  memset(of, 0, (size_t)G * D * 4);
  for (int t = 0; t < n; t++) {
    load_row(v, base + (size_t)(lo + t) * st, bf16, D, row);
    for (int g = 0; g < G; g++) {
      float p = scores[(size_t)g * n + t], *og = of + (size_t)g * D;
      for (int d = 0; d < D; d++) og[d] += p * row[d];
    }
  }
}

void pf_decode_attention(const void *q, int64_t qb, int64_t qh, const void *kn, int64_t knb, int64_t knh,
                         const void *vn, int64_t vnb, int64_t vnh, void *k, void *v, int bf16, void *out, const int64_t *lo, const int64_t *hi, int B, int H,
                         int KV, int D, int64_t sb, int64_t sh, int64_t st, float scale, const void *cos, const void *sin,
                         int rot, int threads) {
  int G = H / KV, vector = 0;
#ifdef PF_AVX512
  vector = D % 16 == 0 && D / 16 <= PF_MAX_DV && G <= PF_MAX_G;
#endif
  (void)vector; /* read only by the AVX-512 path */
#pragma omp parallel num_threads(threads)
  {
    int cap = 0;
    float *scores = NULL, *row = malloc((size_t)D * 4), *qf = malloc((size_t)G * D * 4), *of = malloc((size_t)G * D * 4);
#pragma omp for schedule(dynamic, 1)
    for (int task = 0; task < B * KV; task++) {
      int b = task / KV, h = task % KV, n = (int)(hi[b] - lo[b]);
      if (n > cap) { free(scores); cap = n; scores = malloc((size_t)G * n * 4); }
      size_t base = (size_t)b * sb + (size_t)h * sh, elem = bf16 ? 2 : 4, cs = (size_t)b * rot * elem;
      for (int g = 0; g < G; g++) {
        load_row(q, (size_t)b * qb + (size_t)(h * G + g) * qh, bf16, D, qf + (size_t)g * D);
        if (cos) rope_head(qf + (size_t)g * D, (const char *)cos + cs, (const char *)sin + cs, bf16, rot);
      }
      size_t at = base + (size_t)(hi[b] - 1) * st;
      if (cos) { /* the key is rotated on its way into the cache */
        load_row(kn, (size_t)b * knb + (size_t)h * knh, bf16, D, row);
        rope_head(row, (const char *)cos + cs, (const char *)sin + cs, bf16, rot);
        for (int d = 0; d < D; d++) store_act(k, bf16, at + d, row[d], NULL, 0);
      } else {
        memcpy((char *)k + at * elem, (const char *)kn + ((size_t)b * knb + (size_t)h * knh) * elem, (size_t)D * elem);
      }
      memcpy((char *)v + (base + (size_t)(hi[b] - 1) * st) * elem, (const char *)vn + ((size_t)b * vnb + (size_t)h * vnh) * elem,
             (size_t)D * elem);
#ifdef PF_AVX512
      if (vector) attend_avx512(qf, k, v, bf16, base, lo[b], n, st, G, D, scale, scores, of);
      else
#endif
        attend_plain(qf, k, v, bf16, base, lo[b], n, st, G, D, scale, scores, row, of);
      size_t first = ((size_t)b * H + (size_t)h * G) * D;
      for (size_t i = 0; i < (size_t)G * D; i++) store_act(out, bf16, first + i, of[i], NULL, 0);
    }
    free(scores);
    free(row);
    free(qf);
    free(of);
  }
}
