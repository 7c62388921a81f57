/* ---- a whole decode step --------------------------------------------------------------------------- */
/* Every layer of a Phi/Phi-3/Llama block for one new token of each of B rows, in one call: at ~40 small
   tensor ops per layer the Python path spends more time dispatching than reading weights when the model
   is small or quantized. Activations stay in the model's dtype and are rounded where PyTorch's ops round
   them, so this follows model/transformer.py's decode path step for step (GEMV/GEMM sums in another order, as the
   native kernels' already are). */
typedef struct {
  int kind; /* PF_KIND_* */
  int n, k, group;
  int tile; /* int8: the weight's layout, pf_int8_tile(k) or 0 */
  const void *w;
  const uint16_t *scale, *zero;
  const void *bias;      /* activation dtype, or NULL */
  const uint16_t *packed; /* bf16 only: pf_bf16_pack's copy for B > 1 (the AMX or AVX512-BF16 GEMM), or NULL */
} PfLinear;

typedef struct {
  const void *norm1_w, *norm1_b, *norm2_w, *norm2_b; /* activation dtype; the b's NULL for RMSNorm */
  PfLinear qkv, proj, fc, down;
  void *k_cache, *v_cache; /* this layer's [B, KV, capacity, D] cache */
} PfLayer;

typedef struct {
  int num_layers, hidden, heads, kv_heads, head_dim, rotary_dim, inter;
  int rms, act, parallel, gated, act_bf16; /* act: PF_ACT_* */
  float eps, attn_scale;
  int64_t cache_sb, cache_sh, cache_st;
} PfModel;

static inline float ld(const void *p, int bf, size_t i) {
  return bf ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline void st(void *p, int bf, size_t i, float v) { /* stores round to the activation dtype */
  if (bf) ((uint16_t *)p)[i] = f32_to_bf16(v);
  else ((float *)p)[i] = v;
}

void pf_bf16_gemm(const uint16_t *packed, const void *x_act, const void *bias, void *y, int act_bf16, int M, int N,
                  int K, int threads);

static void linear(const PfLinear *l, const void *x, void *y, int rows, int bf, int threads) {
  switch (l->kind) {
  case PF_KIND_BF16:
    if (rows > 1 && l->packed) pf_bf16_gemm(l->packed, x, l->bias, y, bf, rows, l->n, l->k, threads);
    else pf_bf16_gemv(l->w, x, l->bias, y, bf, rows, l->n, l->k, threads);
    break;
  case PF_KIND_F32: pf_f32_gemv(l->w, x, l->bias, y, bf, rows, l->n, l->k, threads); break;
  case PF_KIND_INT8: pf_int8_gemv(l->w, l->scale, x, l->bias, y, bf, rows, l->n, l->k, l->tile, threads); break;
  default: pf_int4_gemv(l->w, l->scale, l->zero, x, l->bias, y, bf, rows, l->n, l->k, l->group, threads);
  }
}

/* LayerNorm (one rounding, as torch's CPU kernel) or RMSNorm (transformers' order, see pf_rms_norm_bf16) */
static void norm(const PfModel *m, const void *w, const void *b, const void *x, void *y, int rows, int threads) {
  int bf = m->act_bf16, n = m->hidden;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows > 1)
  for (int r = 0; r < rows; r++) {
    size_t o = (size_t)r * n;
    float mean = 0.f, ss = 0.f;
    if (!m->rms) {
      for (int i = 0; i < n; i++) mean += ld(x, bf, o + i);
      mean /= n;
    }
    for (int i = 0; i < n; i++) { float d = ld(x, bf, o + i) - mean; ss += d * d; }
    float inv = 1.f / sqrtf(ss / n + m->eps);
    for (int i = 0; i < n; i++) {
      float v = (ld(x, bf, o + i) - mean) * inv;
      st(y, bf, o + i, m->rms ? round_act(bf, v) * ld(w, bf, i) : v * ld(w, bf, i) + ld(b, bf, i));
    }
  }
}

static inline float activate(int act, float v) {
  if (act == PF_ACT_SILU) return v / (1.f + expf(-v));
  if (act == PF_ACT_GELU_ERF) return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
  return 0.5f * v * (1.f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
}

#ifdef PF_AVX512
static inline __m512 round16(int bf, __m512 v) { /* to the activation dtype and back: bf16 round to nearest even */
  if (!bf) return v;
  __m512i u = _mm512_castps_si512(v);
  u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                                                        _mm512_set1_epi32(1))));
  return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000)));
}

static inline void store16(void *p, int bf, size_t i, __m512 v) { /* v already rounded by round16 */
  if (bf) _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
  else _mm512_storeu_ps((float *)p + i, v);
}

static inline __m512 activate16(int act, __m512 v) { /* SiLU and tanh-GELU through exp16 (~1 ulp) */
  const __m512 one = _mm512_set1_ps(1.f);
  if (act == PF_ACT_SILU) return _mm512_div_ps(v, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), v))));
  __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.79788456080286536f),
                           _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), v), _mm512_mul_ps(v, v), v));
  __m512 t = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(one, exp16(_mm512_add_ps(u, u)))));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), _mm512_add_ps(one, t));
}
#endif

/* one row: out[i] = act(in[i]) * in[n + i] (gated, as Phi-3's gate_up_proj) or act(in[i]); the activation is
   rounded before the product, as the separate PyTorch ops round it; out may be in (element i reads i, n + i) */
static void act_row(int act, int gated, int bf, const void *in, void *out, int n) {
  int i = 0;
#ifdef PF_AVX512
  if (act != PF_ACT_GELU_ERF)
    for (; i + 16 <= n; i += 16) {
      __m512 a = round16(bf, activate16(act, load16(in, i, bf)));
      store16(out, bf, i, round16(bf, gated ? _mm512_mul_ps(a, load16(in, (size_t)n + i, bf)) : a));
    }
#endif
  for (; i < n; i++) {
    float a = round_act(bf, activate(act, ld(in, bf, i)));
    st(out, bf, i, gated ? a * ld(in, bf, (size_t)n + i) : a);
  }
}

/* the MLP's activation over rows of h in place, rows compacted to n wide */

static void mlp_act(const PfModel *m, void *h, int rows, int threads) {
  int bf = m->act_bf16, n = m->inter;
  size_t width = m->gated ? 2 * (size_t)n : (size_t)n;
  if (rows > 1 && m->gated) { /* rows in parallel: compact row r's output apart from the inputs first */
    char *out = malloc((size_t)rows * n * (bf ? 2 : 4));
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int r = 0; r < rows; r++) act_row(m->act, 1, bf, (const char *)h + r * width * (bf ? 2 : 4),
                                           out + (size_t)r * n * (bf ? 2 : 4), n);
    memcpy(h, out, (size_t)rows * n * (bf ? 2 : 4));
    free(out);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static) if (rows > 1)
  for (int r = 0; r < rows; r++) act_row(m->act, m->gated, bf, (const char *)h + r * width * (bf ? 2 : 4),
                                         (char *)h + (size_t)r * n * (bf ? 2 : 4), n);
}

static void mlp(const PfModel *m, const PfLayer *l, const void *h, void *fc, void *out, int rows, int threads) {
  linear(&l->fc, h, fc, rows, m->act_bf16, threads);
  mlp_act(m, fc, rows, threads);
  linear(&l->down, fc, out, rows, m->act_bf16, threads);
}

static void add_rounded(const void *a, const void *b, void *out, size_t n, int bf) { /* out = a + b, one rounding */
  size_t i = 0;
#ifdef PF_AVX512
  for (; i + 16 <= n; i += 16) store16(out, bf, i, round16(bf, _mm512_add_ps(load16(a, i, bf), load16(b, i, bf))));
#endif
  for (; i < n; i++) st(out, bf, i, ld(a, bf, i) + ld(b, bf, i));
}

/* x [rows, hidden] in place; rows are cache rows row0 .. row0+rows-1, each with its own cos/sin [rows, r] and
   keys lo[b] <= t < hi[b] (its new key and value go to hi[b] - 1) */
void pf_decode_step(const PfModel *m, const PfLayer *layers, void *x, int rows, const void *cos, const void *sin,
                    int64_t row0, const int64_t *lo, const int64_t *hi, int threads) {
  int bf = m->act_bf16, H = m->heads, KV = m->kv_heads, D = m->head_dim;
  size_t e = bf ? 2 : 4, qkv_n = (size_t)(H + 2 * KV) * D, n = (size_t)rows * m->hidden;
  char *h = malloc(n * e), *qkv = malloc(rows * qkv_n * e), *att = malloc((size_t)rows * H * D * e);
  char *a = malloc(n * e), *o = malloc(n * e), *fc = malloc((size_t)rows * m->inter * (m->gated ? 2 : 1) * e);
  size_t at = (size_t)row0 * m->cache_sb * e; /* the first row's cache */
  for (int i = 0; i < m->num_layers; i++) {
    const PfLayer *l = layers + i;
    norm(m, l->norm1_w, l->norm1_b, x, h, rows, threads);
    linear(&l->qkv, h, qkv, rows, bf, threads);
    pf_decode_attention(qkv, qkv_n, D, qkv + (size_t)H * D * e, qkv_n, D, qkv + (size_t)(H + KV) * D * e, qkv_n, D,
                        (char *)l->k_cache + at, (char *)l->v_cache + at, bf, att, lo, hi, rows, H, KV, D,
                        m->cache_sb, m->cache_sh, m->cache_st, m->attn_scale, cos, sin, m->rotary_dim, threads);
    linear(&l->proj, att, a, rows, bf, threads);
    if (m->parallel) { /* phi: (attn + mlp) + x, from one norm */
      mlp(m, l, h, fc, o, rows, threads);
      add_rounded(a, o, a, n, bf);
      add_rounded(x, a, x, n, bf);
    } else {
      add_rounded(x, a, x, n, bf);
      norm(m, l->norm2_w, l->norm2_b, x, h, rows, threads);
      mlp(m, l, h, fc, o, rows, threads);
      add_rounded(x, o, x, n, bf);
    }
  }
  free(h); free(qkv); free(att); free(a); free(fc); free(o);
}
