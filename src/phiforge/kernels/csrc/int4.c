/* ---- int4 groups ---------------------------------------------------------------------------------- */
/* x split once per call into even and odd elements, as the path wants them: bf16 for the dot-product
   instructions, fp32 for the plain path, int8 per block of 32 for AVX2 (as llama.cpp's Q8 activations for its Q4
   weights: AVX2 has no bf16 dot product, and fp32 costs a conversion and an FMA per code); and the sum of each
   group of x as those products see it (bf16-rounded, or dequantized), which carries the zero points. */
#define PF_INT4_QBLOCK 32
typedef struct {
  uint16_t *even16, *odd16;
  float *even32, *odd32, *group_sum;
  int8_t *even8, *odd8;
  float *scale8; /* per block of 32 */
} SplitX;

static void split_q8(const float *x, int M, int K, int G, SplitX *s) {
  int blocks = K / PF_INT4_QBLOCK, groups = K / G;
  s->even8 = malloc((size_t)M * K / 2);
  s->odd8 = malloc((size_t)M * K / 2);
  s->scale8 = malloc((size_t)M * blocks * 4);
  for (int m = 0; m < M; m++)
    for (int b = 0; b < blocks; b++) {
      int8_t q[PF_INT4_QBLOCK];
      int32_t total;
      float scale = q8_block(x + (size_t)m * K + (size_t)b * PF_INT4_QBLOCK, PF_INT4_QBLOCK, q, &total);
      size_t half = (size_t)m * (K / 2) + (size_t)b * (PF_INT4_QBLOCK / 2);
      for (int i = 0; i < PF_INT4_QBLOCK / 2; i++) s->even8[half + i] = q[2 * i], s->odd8[half + i] = q[2 * i + 1];
      s->scale8[(size_t)m * blocks + b] = scale;
      s->group_sum[(size_t)m * groups + (size_t)b * PF_INT4_QBLOCK / G] += scale * (float)total;
    }
}

static void split_x(const float *x, int M, int K, int G, int path, SplitX *s) {
  size_t half = (size_t)M * (K / 2), groups = (size_t)M * (K / G);
  memset(s, 0, sizeof *s);
  s->group_sum = calloc(groups, 4);
  if (path == PF_GEMV_Q8_AVX2) {
    split_q8(x, M, K, G, s);
    return;
  }
  s->even16 = malloc(half * 2);
  s->odd16 = malloc(half * 2);
  s->even32 = malloc(half * 4);
  s->odd32 = malloc(half * 4);
  for (size_t i = 0; i < half; i++) {
    s->even16[i] = f32_to_bf16(x[2 * i]);
    s->odd16[i] = f32_to_bf16(x[2 * i + 1]);
    s->even32[i] = bf16_to_f32(s->even16[i]);
    s->odd32[i] = bf16_to_f32(s->odd16[i]);
  }
  for (size_t g = 0; g < groups; g++) {
    float t = 0.f;
    for (int j = 0; j < G / 2; j++) t += s->even32[g * (G / 2) + j] + s->odd32[g * (G / 2) + j];
    s->group_sum[g] = t;
  }
}

static void free_split(SplitX *s) {
  free(s->even16); free(s->odd16); free(s->even32); free(s->odd32); free(s->group_sum);
  free(s->even8); free(s->odd8); free(s->scale8);
}

/* sum over groups of z*gx - 8*s*gx: the zero points' and the code offset's share of the dot product */
static float int4_offsets(const uint16_t *sc, const uint16_t *ze, const float *gx, int groups, float code_offset) {
  float corr = 0.f;
  int q = 0;
#ifdef PF_AVX512
  __m512 cv = _mm512_setzero_ps(), off = _mm512_set1_ps(code_offset);
  for (; q + 16 <= groups; q += 16) {
    __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(sc + q))), 16));
    __m512 z = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(ze + q))), 16));
    cv = _mm512_fmadd_ps(_mm512_loadu_ps(gx + q), _mm512_fnmadd_ps(off, s, z), cv);
  }
  corr = _mm512_reduce_add_ps(cv);
#elif defined(PF_AVX2_ONLY) /* per row a term per group: scalar, it cost about as much as the row's codes (g32) */
  __m256 cv = _mm256_setzero_ps(), off = _mm256_set1_ps(code_offset);
  for (; q + 8 <= groups; q += 8)
    cv = _mm256_fmadd_ps(_mm256_loadu_ps(gx + q), _mm256_fnmadd_ps(off, bf16x8(sc + q), bf16x8(ze + q)), cv);
  corr = hsum8(cv);
#endif
  for (; q < groups; q++) corr += gx[q] * (bf16_to_f32(ze[q]) - code_offset * bf16_to_f32(sc[q]));
  return corr;
}

#ifdef __AVX512BF16__
/* One row, groups of 32 (16 bytes each), two groups per 32-byte step. A nibble c OR-ed into 0x4300 is the
   bf16 number 128 + c, so the codes become bf16 with two integer ops and vdpbf16ps multiplies them by x
   in pairs; the extra 128 * sum(x) is folded into the offsets (code_offset 136 = 128 + 8). */
static inline __m512 chunk_int4_g32(const uint8_t *row, const uint16_t *sc, const uint16_t *e, const uint16_t *o,
                                     int j, int q, __m512 acc) {
  const __m512i nibble = _mm512_set1_epi16(0x0f), bias = _mm512_set1_epi16(0x4300);
  __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(row + j)));
  __m512i lo = _mm512_or_si512(_mm512_and_si512(b, nibble), bias);
  __m512i hi = _mm512_or_si512(_mm512_srli_epi16(b, 4), bias);
  __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)lo, (__m512bh)_mm512_loadu_si512(e + j));
  d = _mm512_dpbf16_ps(d, (__m512bh)hi, (__m512bh)_mm512_loadu_si512(o + j));
  /* lanes 0-7 hold group q, lanes 8-15 group q+1: their scales, as fp32, from one 32-bit load */
  __m512i pair = _mm512_set1_epi32(*(const int32_t *)(sc + q));
  __m512 s = _mm512_castsi512_ps(_mm512_mask_blend_epi32(0xff00, _mm512_slli_epi32(pair, 16),
                                                         _mm512_and_si512(pair, _mm512_set1_epi32((int)0xffff0000))));
  return _mm512_fmadd_ps(s, d, acc);
}

/* 16 groups (8 chunks, 256 bytes) at a time: their scales become one fp32 vector and each chunk's pair
   of scales is a single permute, instead of a broadcast, a shift, a mask and a blend */
static float row_int4_g32(const uint8_t *row, const uint16_t *sc, const uint16_t *e, const uint16_t *o, int K) {
  const __m512i nibble = _mm512_set1_epi16(0x0f), bias = _mm512_set1_epi16(0x4300);
  const __m512i pair_step = _mm512_set1_epi32(2);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
  int j = 0, q = 0;
  for (; j + 256 <= K / 2; j += 256, q += 16) {
    _mm_prefetch((const char *)(row + j + PF_AHEAD), _MM_HINT_T0);
    _mm_prefetch((const char *)(row + j + PF_AHEAD + 64), _MM_HINT_T0);
    _mm_prefetch((const char *)(row + j + PF_AHEAD + 128), _MM_HINT_T0);
    _mm_prefetch((const char *)(row + j + PF_AHEAD + 192), _MM_HINT_T0);
    __m512 scales = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(sc + q))), 16));
    __m512i idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    for (int c = 0; c < 8; c++, idx = _mm512_add_epi32(idx, pair_step)) {
      int jj = j + 32 * c;
      __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(row + jj)));
      __m512i lo = _mm512_ternarylogic_epi32(b, nibble, bias, 0xEA); /* (b & nibble) | bias */
      __m512i hi = _mm512_or_si512(_mm512_srli_epi16(b, 4), bias);
      __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)lo, (__m512bh)_mm512_loadu_si512(e + jj));
      d = _mm512_dpbf16_ps(d, (__m512bh)hi, (__m512bh)_mm512_loadu_si512(o + jj));
      if (c & 1) acc1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(idx, scales), d, acc1);
      else acc0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(idx, scales), d, acc0);
    }
  }
  for (; j < K / 2; j += 32, q += 2) acc0 = chunk_int4_g32(row, sc, e, o, j, q, acc0);
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
#endif

#ifdef PF_AVX2_ONLY
/* one 32-byte step: 64 codes (two blocks of x) times their int8 x, summed per 4 bytes: lanes 0-3 block b, 4-7 b+1 */
static inline __m256 step_int4_q8(const uint8_t *codes_at, const int8_t *e, const int8_t *o) {
  const __m256i nibble = _mm256_set1_epi8(0x0f);
  __m256i codes = _mm256_loadu_si256((const __m256i *)codes_at);
  __m256i lo = _mm256_and_si256(codes, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(codes, 4), nibble);
  __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)e)),
                               _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)o)));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

/* one row, each block's sums scaled by its group's scale times the block's x scale. G a power of two >= 32,
   K % 64 == 0. G = 32: eight blocks' scales become one vector and each step's pair is one permute. */
static float row_int4_q8(const uint8_t *row, const uint16_t *sc, const int8_t *e, const int8_t *o, const float *xs,
                         int K, int G) {
  const int shift = __builtin_ctz(G / PF_INT4_QBLOCK); /* block -> group */
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
  int j = 0, b = 0;
  if (shift == 0)
    for (; j + 128 <= K / 2; j += 128, b += 8) {
      _mm_prefetch((const char *)(row + j + PF_AVX2_AHEAD), _MM_HINT_T0);
      _mm_prefetch((const char *)(row + j + PF_AVX2_AHEAD + 64), _MM_HINT_T0);
      __m256 scales = _mm256_mul_ps(bf16x8(sc + b), _mm256_loadu_ps(xs + b));
      for (int c = 0; c < 4; c++) {
        __m256i pair = _mm256_setr_epi32(2 * c, 2 * c, 2 * c, 2 * c, 2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1);
        __m256 d = step_int4_q8(row + j + 32 * c, e + j + 32 * c, o + j + 32 * c);
        if (c & 1) acc1 = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(scales, pair), d, acc1);
        else acc0 = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(scales, pair), d, acc0);
      }
    }
  for (; j < K / 2; j += 32, b += 2) {
    _mm_prefetch((const char *)(row + j + PF_AVX2_AHEAD), _MM_HINT_T0);
    __m256 s = _mm256_setr_m128(_mm_set1_ps(bf16_to_f32(sc[b >> shift]) * xs[b]),
                                _mm_set1_ps(bf16_to_f32(sc[(b + 1) >> shift]) * xs[b + 1]));
    acc0 = _mm256_fmadd_ps(s, step_int4_q8(row + j, e + j, o + j), acc0);
  }
  return hsum8(_mm256_add_ps(acc0, acc1));
}
#endif

/* the plain path, any G: codes times fp32 x, scaled per group (code_offset 8) */
static float row_int4_plain(const uint8_t *row, const uint16_t *sc, const float *e, const float *o, int K, int G) {
  float acc = 0.f;
  for (int q = 0; q < K / G; q++) {
    const uint8_t *b = row + q * (G / 2);
    const float *eq = e + q * (G / 2), *oq = o + q * (G / 2);
    float d = 0.f;
    for (int j = 0; j < G / 2; j++) d += (float)(b[j] & 15) * eq[j] + (float)(b[j] >> 4) * oq[j];
    acc += bf16_to_f32(sc[q]) * d;
  }
  return acc;
}

void pf_int4_gemv(const uint8_t *w, const uint16_t *scale, const uint16_t *zero, const void *x_act, const void *bias,
                  void *y, int act_bf16, int M, int N, int K, int G, int threads) {
  int groups = K / G, path = pf_gemv_path(PF_KIND_INT4, K, G);
  SplitX s;
  float *x = load_acts(x_act, act_bf16, (size_t)M * K);
  split_x(x, M, K, G, path, &s);
  free(x);
  float offset = path == PF_GEMV_BF16_DOT ? 136.f : 8.f;
#pragma omp parallel for num_threads(threads) schedule(dynamic, chunk_of(N, threads))
  for (int n = 0; n < N; n++) {
    const uint8_t *row = w + (size_t)n * (K / 2);
    const uint16_t *sc = scale + (size_t)n * groups, *ze = zero + (size_t)n * groups;
    for (int m = 0; m < M; m++) {
      size_t xo = (size_t)m * (K / 2);
      float d;
#ifdef __AVX512BF16__
      if (path == PF_GEMV_BF16_DOT) d = row_int4_g32(row, sc, s.even16 + xo, s.odd16 + xo, K);
      else
#endif
#ifdef PF_AVX2_ONLY
      if (path == PF_GEMV_Q8_AVX2)
        d = row_int4_q8(row, sc, s.even8 + xo, s.odd8 + xo, s.scale8 + (size_t)m * (K / PF_INT4_QBLOCK), K, G);
      else
#endif
        d = row_int4_plain(row, sc, s.even32 + xo, s.odd32 + xo, K, G);
      store_act(y, act_bf16, (size_t)m * N + n, d + int4_offsets(sc, ze, s.group_sum + (size_t)m * groups, groups, offset),
                bias, n);
    }
  }
  free_split(&s);
}

void pf_int4_dequant(const uint8_t *w, const uint16_t *scale, const uint16_t *zero, uint16_t *out, int N, int K,
                     int G, int threads) {
  int groups = K / G;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int n = 0; n < N; n++) {
    for (int k = 0; k < K; k++) {
      uint8_t b = w[(size_t)n * (K / 2) + k / 2];
      int code = (k & 1) ? b >> 4 : b & 15;
      float s = bf16_to_f32(scale[(size_t)n * groups + k / G]), z = bf16_to_f32(zero[(size_t)n * groups + k / G]);
      out[(size_t)n * K + k] = f32_to_bf16((float)(code - 8) * s + z);
    }
  }
}

/* rotate_half RoPE of one head held in fp32, r rotary channels, rounding each product and the sum to the
   activation dtype as PyTorch's (x*cos) + (rotate_half(x)*sin) does; cos/sin in the activation dtype */
static inline float round_act(int bf, float v) { return bf ? bf16_to_f32(f32_to_bf16(v)) : v; }

__attribute__((optimize("fp-contract=off"))) /* two products and a sum, not an FMA: PyTorch's three ops */
static void rope_head(float *v, const void *cos, const void *sin, int bf, int r) {
  int half = r / 2;
  for (int i = 0; i < half; i++) {
    float x1 = v[i], x2 = v[half + i];
    float c1 = bf ? bf16_to_f32(((const uint16_t *)cos)[i]) : ((const float *)cos)[i];
    float s1 = bf ? bf16_to_f32(((const uint16_t *)sin)[i]) : ((const float *)sin)[i];
    float c2 = bf ? bf16_to_f32(((const uint16_t *)cos)[half + i]) : ((const float *)cos)[half + i];
    float s2 = bf ? bf16_to_f32(((const uint16_t *)sin)[half + i]) : ((const float *)sin)[half + i];
    v[i] = round_act(bf, round_act(bf, x1 * c1) + round_act(bf, -x2 * s1));
    v[half + i] = round_act(bf, round_act(bf, x2 * c2) + round_act(bf, x1 * s2));
  }
}
