/* phiforge's CPU kernels for the decode hot path, built once per machine by phiforge/kernels/__init__.py.
 *
 * A decode step reads every weight once and does two flops per weight, so it is bound by memory
 * bandwidth; these kernels read the packed weights exactly once, convert in registers and use both
 * FMA ports. Each has an AVX-512 path (x86 with AVX512F/BW, plus AVX512-BF16 for int4) and a plain C
 * path that -O3 vectorizes for whatever -march=native offers. Threads: OpenMP, sharing the libgomp
 * torch already loaded (same soname), so the two thread pools never compete.
 *
 * Layouts (the portable ones quantize.py saves):
 *   int8  w [N, K] int8, one bf16 scale per row:             W = w * s[n]
 *   int4  w [N, K/2] bytes, low nibble = even k, high = odd k; per group of G along K a bf16 scale
 *         and zero:                                          W = (code - 8) * s + z
 *   bf16  w [N, K] bf16 (the plain weight, one-row decode of half-precision models)
 *   Activations x [M, K], bias [N] and y [M, N] share one dtype, bf16 or fp32 (act_bf16), so a layer is one
 *   call: no conversions or bias add around it.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define PF_AVX512 1
#ifndef PF_AHEAD
#define PF_AHEAD 8192
#endif
#endif

static inline float bf16_to_f32(uint16_t v) {
  union { uint32_t u; float f; } c;
  c.u = (uint32_t)v << 16;
  return c.f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
  union { uint32_t u; float f; } c;
  c.f = f;
  if ((c.u & 0x7fffffff) > 0x7f800000) return (uint16_t)((c.u >> 16) | 0x40); /* NaN stays NaN */
  return (uint16_t)((c.u + 0x7fff + ((c.u >> 16) & 1)) >> 16);
}

/* activations: x to fp32 scratch (caller frees), y[i] = v + bias[n] stored in the activation dtype */
static float *load_acts(const void *x, int act_bf16, size_t n) {
  float *out = malloc(n * 4);
  for (size_t i = 0; i < n; i++) out[i] = act_bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
  return out;
}

static inline void store_act(void *y, int act_bf16, size_t i, float v, const void *bias, int n) {
  if (bias) v += act_bf16 ? bf16_to_f32(((const uint16_t *)bias)[n]) : ((const float *)bias)[n];
  if (act_bf16) ((uint16_t *)y)[i] = f32_to_bf16(v);
  else ((float *)y)[i] = v;
}

int pf_features(void) { /* bit 0: AVX-512 paths, bit 1: AVX512-BF16 paths (bf16 and int4 g32) */
  int f = 0;
#ifdef PF_AVX512
  f |= 1;
#endif
#ifdef __AVX512BF16__
  f |= 2;
#endif
  return f;
}

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
      if ((k & 63) == 0) _mm_prefetch((const char *)(k + d < K ? wr + d : wr + 4 * K + d - K), _MM_HINT_T0);
      a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)wr))), x0, a[r]);
      a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(wr + 16)))),
                             x1, a[r]);
    }
  }
  for (int r = 0; r < 4; r++) out[r] = _mm512_reduce_add_ps(a[r]);
}
#endif

void pf_int8_gemv(const int8_t *w, const uint16_t *scale, const void *x_act, const void *bias, void *y, int act_bf16,
                  int M, int N, int K, int threads) {
  float *x = load_acts(x_act, act_bf16, (size_t)M * K);
  int quads = 0;
#ifdef PF_AVX512
  if (K % 32 == 0) quads = N / 4;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int r = 0; r < quads; r++)
    for (int m = 0; m < M; m++) {
      float d[4];
      dot4_int8(w + (size_t)4 * r * K, K, x + (size_t)m * K, d);
      for (int i = 0; i < 4; i++)
        store_act(y, act_bf16, (size_t)m * N + 4 * r + i, bf16_to_f32(scale[4 * r + i]) * d[i], bias, 4 * r + i);
    }
#endif
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int n = 4 * quads; n < N; n++) {
    const int8_t *row = w + (size_t)n * K;
    float s = bf16_to_f32(scale[n]);
    for (int m = 0; m < M; m++) store_act(y, act_bf16, (size_t)m * N + n, s * dot_int8(row, x + (size_t)m * K, K), bias, n);
  }
  free(x);
}

/* ---- bf16 rows (one-row decode of a bf16 model) ----------------------------------------------------- */
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
#endif
  for (; k < K; k++) acc += bf16_to_f32(w[k]) * x32[k];
  return acc;
}

#ifdef __AVX512BF16__
/* four rows at once: four independent streams keep more cache-line misses in flight than one */
static void dot4_bf16(const uint16_t *w, size_t K, const uint16_t *x16, float *out) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t k = 0; k < K; k += 32) {
    __m512bh x = (__m512bh)_mm512_loadu_si512(x16 + k);
    _mm_prefetch((const char *)(w + k + PF_AHEAD / 2), _MM_HINT_T0);
    _mm_prefetch((const char *)(w + K + k + PF_AHEAD / 2), _MM_HINT_T0);
    _mm_prefetch((const char *)(w + 2 * K + k + PF_AHEAD / 2), _MM_HINT_T0);
    _mm_prefetch((const char *)(w + 3 * K + k + PF_AHEAD / 2), _MM_HINT_T0);
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + k), x);
    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + K + k), x);
    a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w + 2 * K + k), x);
    a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w + 3 * K + k), x);
  }
  out[0] = _mm512_reduce_add_ps(a0); out[1] = _mm512_reduce_add_ps(a1);
  out[2] = _mm512_reduce_add_ps(a2); out[3] = _mm512_reduce_add_ps(a3);
}
#endif

void pf_bf16_gemv(const uint16_t *w, const void *x_act, const void *bias, void *y, int act_bf16, int M, int N, int K,
                  int threads) {
  float *x = load_acts(x_act, act_bf16, (size_t)M * K);
  uint16_t *x16 = malloc((size_t)M * K * 2);
  for (size_t i = 0; i < (size_t)M * K; i++) x16[i] = f32_to_bf16(x[i]);
  int quads = 0;
#ifdef __AVX512BF16__
  if (K % 32 == 0) quads = N / 4;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int r = 0; r < quads; r++)
    for (int m = 0; m < M; m++) {
      float d[4];
      dot4_bf16(w + (size_t)4 * r * K, K, x16 + (size_t)m * K, d);
      for (int i = 0; i < 4; i++) store_act(y, act_bf16, (size_t)m * N + 4 * r + i, d[i], bias, 4 * r + i);
    }
#endif
#pragma omp parallel for num_threads(threads) schedule(static)
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

/* ---- int4 groups ---------------------------------------------------------------------------------- */
/* x split once per call: even and odd elements (bf16 for the dot-product instructions, fp32 for the plain
   path) and the sum of each group of the bf16-rounded x, which carries the zero points. */
typedef struct {
  uint16_t *even16, *odd16;
  float *even32, *odd32, *group_sum;
} SplitX;

static void split_x(const float *x, int M, int K, int G, SplitX *s) {
  size_t half = (size_t)M * (K / 2), groups = (size_t)M * (K / G);
  s->even16 = malloc(half * 2);
  s->odd16 = malloc(half * 2);
  s->even32 = malloc(half * 4);
  s->odd32 = malloc(half * 4);
  s->group_sum = malloc(groups * 4);
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
  SplitX s;
  float *x = load_acts(x_act, act_bf16, (size_t)M * K);
  split_x(x, M, K, G, &s);
  free(x);
  int groups = K / G, fast = 0;
#ifdef __AVX512BF16__
  fast = G == 32 && K % 64 == 0;
#endif
  float offset = fast ? 136.f : 8.f;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int n = 0; n < N; n++) {
    const uint8_t *row = w + (size_t)n * (K / 2);
    const uint16_t *sc = scale + (size_t)n * groups, *ze = zero + (size_t)n * groups;
    for (int m = 0; m < M; m++) {
      size_t xo = (size_t)m * (K / 2);
      float d;
#ifdef __AVX512BF16__
      if (fast) d = row_int4_g32(row, sc, s.even16 + xo, s.odd16 + xo, K);
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
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int n = 0; n < N; n++)
    for (int m = 0; m < M; m++) store_act(y, act_bf16, (size_t)m * N + n, dot_f32(w + (size_t)n * K, x + (size_t)m * K, K), bias, n);
  free(x);
}

/* ---- a whole decode step --------------------------------------------------------------------------- */
/* Every layer of a Phi/Phi-3/Llama block for one new token of each of B rows, in one call: at ~40 small
   tensor ops per layer the Python path spends more time dispatching than reading weights when the model
   is small or quantized. Activations stay in the model's dtype and are rounded where PyTorch's ops round
   them, so this follows model.py's decode path step for step (GEMV/GEMM sums in another order, as the
   native kernels' already are). */
typedef struct {
  int kind; /* 0 bf16, 1 fp32, 2 int8, 3 int4 */
  int n, k, group;
  const void *w;
  const uint16_t *scale, *zero;
  const void *bias;      /* activation dtype, or NULL */
  const uint16_t *amx;   /* bf16 only: pf_amx_pack's copy for B > 1, or NULL */
} PfLinear;

typedef struct {
  const void *norm1_w, *norm1_b, *norm2_w, *norm2_b; /* activation dtype; the b's NULL for RMSNorm */
  PfLinear qkv, proj, fc, down;
  void *k_cache, *v_cache; /* this layer's [B, KV, capacity, D] cache */
} PfLayer;

typedef struct {
  int num_layers, hidden, heads, kv_heads, head_dim, rotary_dim, inter;
  int rms, act, parallel, gated, act_bf16; /* act: 0 tanh-GELU, 1 SiLU, 2 erf-GELU */
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

void pf_bf16_gemm_amx(const uint16_t *packed, const void *x_act, const void *bias, void *y, int act_bf16, int M, int N,
                      int K, int threads);

static void linear(const PfLinear *l, const void *x, void *y, int rows, int bf, int threads) {
  switch (l->kind) {
  case 0:
    if (rows > 1 && l->amx) pf_bf16_gemm_amx(l->amx, x, l->bias, y, bf, rows, l->n, l->k, threads);
    else pf_bf16_gemv(l->w, x, l->bias, y, bf, rows, l->n, l->k, threads);
    break;
  case 1: pf_f32_gemv(l->w, x, l->bias, y, bf, rows, l->n, l->k, threads); break;
  case 2: pf_int8_gemv(l->w, l->scale, x, l->bias, y, bf, rows, l->n, l->k, threads); break;
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
  if (act == 1) return v / (1.f + expf(-v));
  if (act == 2) return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
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
  if (act == 1) return _mm512_div_ps(v, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), v))));
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
  if (act != 2)
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

/* ---- bf16 GEMM of a decode batch on AMX ------------------------------------------------------------- */
/* A decode step of B rows reads each weight once for 2B flops. At B = 32 with the weights coming from DRAM,
   oneDNN's GEMM here runs at ~8 GB/s (its tile loads wait on misses of a strided weight). This one takes the
   weight pre-packed as the B tiles want it, each block of 16 output columns one contiguous [K/2][16][2]
   stream, so the hardware prefetcher runs ahead; x rows are the A tiles as they are. Per pair of column
   blocks the packed weight (K * 64 bytes) stays in L2 while every 32-row chunk of x passes over it. */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define PF_AMX 1

typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} TileConfig;

/* 32 outputs from fp32 c: + bias, rounded to the activation dtype (vcvtneps2bf16 rounds to nearest even) */
static inline void store_row32(void *y, int bf, size_t at, const float *c, const void *bias, int n) {
  for (int h = 0; h < 32; h += 16) {
    __m512 v = _mm512_loadu_ps(c + h);
    if (bias) v = _mm512_add_ps(v, load16(bias, (size_t)n + h, bf));
    if (bf) _mm256_storeu_si256((__m256i *)((uint16_t *)y + at + h), (__m256i)_mm512_cvtneps_pbh(v));
    else _mm512_storeu_ps((float *)y + at + h, v);
  }
}

/* C[m0 .. m0+31][32 columns of the pair] into c (32 x 32 fp32) */
static void amx_pair(const uint16_t *x16, const uint16_t *b0, const uint16_t *b1, size_t K, int two, float *c) {
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (size_t k = 0; k < K; k += 32) {
    _tile_loadd(4, x16 + k, K * 2);
    _tile_loadd(6, b0 + k * 16, 64);
    _tile_loadd(7, b1 + k * 16, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (two) {
      _tile_loadd(5, x16 + 16 * K + k, K * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
  if (two) {
    _tile_stored(2, c + 16 * 32, 128);
    _tile_stored(3, c + 16 * 32 + 16, 128);
  }
}
#endif

int pf_amx_available(void) { /* built with AMX and the kernel grants this process the tile state */
#ifdef PF_AMX
  static int state = 0;
  if (state == 0) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0 ? 1 : -1;
  return state == 1;
#else
  return 0;
#endif
}

/* w [N, K] bf16 -> [N/16][K/2][16][2]: element (n, k) at ((n/16 * K/2 + k/2) * 16 + n%16) * 2 + k%2 */
void pf_amx_pack(const uint16_t *w, uint16_t *out, int N, int K, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int n = 0; n < N; n++)
    for (int k = 0; k < K; k++)
      out[(((size_t)(n / 16) * (K / 2) + k / 2) * 16 + n % 16) * 2 + (k & 1)] = w[(size_t)n * K + k];
}

/* y [M, N] = x [M, K] W^T (+ bias) for W packed by pf_amx_pack; N % 32 == K % 32 == 0; callers check
   pf_amx_available() first */
void pf_bf16_gemm_amx(const uint16_t *packed, const void *x_act, const void *bias, void *y, int act_bf16, int M, int N,
                      int K, int threads) {
#ifdef PF_AMX
  int padded = (M + 15) / 16 * 16;
  uint16_t *x16 = calloc((size_t)padded * K, 2);
  for (size_t i = 0; i < (size_t)M * K; i++)
    x16[i] = act_bf16 ? ((const uint16_t *)x_act)[i] : f32_to_bf16(((const float *)x_act)[i]);
#pragma omp parallel num_threads(threads)
  {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);
    float c[32 * 32];
#pragma omp for schedule(static)
    for (int p = 0; p < N / 32; p++) {
      const uint16_t *b0 = packed + (size_t)2 * p * K * 16, *b1 = b0 + (size_t)K * 16;
      for (int m0 = 0; m0 < padded; m0 += 32) {
        amx_pair(x16 + (size_t)m0 * K, b0, b1, K, m0 + 16 < padded, c);
        for (int m = 0; m < 32 && m0 + m < M; m++) store_row32(y, act_bf16, (size_t)(m0 + m) * N + 32 * p, c + m * 32, bias, 32 * p);
      }
    }
    _tile_release();
  }
  free(x16);
#else
  (void)packed; (void)x_act; (void)bias; (void)y; (void)act_bf16; (void)M; (void)N; (void)K; (void)threads;
  abort();
#endif
}
