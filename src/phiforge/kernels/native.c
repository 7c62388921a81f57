/* phiforge's CPU kernels for the decode hot path, built by phiforge/kernels/__init__.py once per machine and
 * feature level (generic, AVX2, AVX-512, AVX-512 VNNI, AVX512-BF16, AMX: see LEVELS there), each build loaded
 * only on a CPU that has its features, so one source serves every x86 server CPU and the best path is chosen
 * at run time, as ggml's CPU backend does.
 *
 * A decode step reads every weight once and does two flops per weight, so it is bound by memory
 * bandwidth; these kernels read the packed weights exactly once, convert in registers and keep several
 * rows' streams in flight. Each has a vector path for the levels that have one and a plain C path that
 * -O3 vectorizes for the level's ISA. Threads: OpenMP, sharing the libgomp torch already loaded (same
 * soname), so the two thread pools never compete; the GEMVs hand out rows in small dynamic chunks, so a
 * thread that loses its core to a neighbour (2 cores shared by many processes) does not stall the other.
 *
 * Layouts (the portable ones quantize.py saves):
 *   int8  w [N, K] int8, one bf16 scale per row:             W = w * s[n]
 *   int4  w [N, K/2] bytes, low nibble = even k, high = odd k; per group of G along K a bf16 scale
 *         and zero:                                          W = (code - 8) * s + z
 *   bf16  w [N, K] bf16 (the plain weight, one-row decode of half-precision models); for batches also a
 *         blocked copy [N/16][K/2][16][2] (pf_bf16_pack) that the AMX and AVX512-BF16 GEMMs stream
 *   Activations x [M, K], bias [N] and y [M, N] share one dtype, bf16 or fp32 (act_bf16), so a layer is one
 *   call: no conversions or bias add around it.
 *
 * The ctypes side checks this file's structs, enums and entry points at load (pf_abi, kernels/abi.py).
 */
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define PF_AVX512 1
#ifndef PF_AHEAD
#define PF_AHEAD 8192
#endif
#endif

/* shared with kernels/abi.py (checked at load through pf_abi) */
enum { PF_KIND_BF16 = 0, PF_KIND_F32 = 1, PF_KIND_INT8 = 2, PF_KIND_INT4 = 3 };
enum { PF_ACT_GELU_TANH = 0, PF_ACT_SILU = 1, PF_ACT_GELU_ERF = 2 };
enum { PF_FEAT_AVX512 = 1, PF_FEAT_AVX512_BF16 = 2, PF_FEAT_AVX512_VNNI = 4, PF_FEAT_AMX = 8, PF_FEAT_AVX2 = 16 };
enum { PF_READ_PLAIN = 0, PF_READ_PREFETCH = 1, PF_READ_STREAM = 2, PF_READ_METHODS = 3 };
enum { PF_GEMM_PLAIN = 0, PF_GEMM_AVX512_BF16 = 1, PF_GEMM_AMX = 2 }; /* pf_bf16_gemm_path */

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

/* rows handed out in chunks of this many quads: ~8 chunks per thread, so a preempted thread's share moves */
static inline int chunk_of(int quads, int threads) {
  int c = quads / (8 * (threads > 0 ? threads : 1));
  return c > 0 ? c : 1;
}

int pf_features(void) { /* the vector paths this build has (PF_FEAT_*) */
  int f = 0;
#ifdef __AVX2__
  f |= PF_FEAT_AVX2;
#endif
#ifdef PF_AVX512
  f |= PF_FEAT_AVX512;
#endif
#if defined(PF_AVX512) && defined(__AVX512VNNI__)
  f |= PF_FEAT_AVX512_VNNI;
#endif
#if defined(PF_AVX512) && defined(__AVX512BF16__)
  f |= PF_FEAT_AVX512_BF16;
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  f |= PF_FEAT_AMX;
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

/* where row r of a quad prefetches, d bytes ahead: past its end, the same row of the next quad (the quad is four
   streams; a flat d ahead would land in a row this quad is reading anyway) */
#define PF_WRAP(wr, k, d, K) ((k) + (d) < (K) ? (wr) + (d) : (wr) + 3 * (K) + (d))

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
      if ((k & 63) == 0) _mm_prefetch((const char *)PF_WRAP(wr, k, d, K), _MM_HINT_T0);
      a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)wr))), x0, a[r]);
      a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(wr + 16)))),
                             x1, a[r]);
    }
  }
  for (int r = 0; r < 4; r++) out[r] = _mm512_reduce_add_ps(a[r]);
}
#endif

#if defined(PF_AVX512) && defined(__AVX512VNNI__)
/* VNNI: x quantized to int8 per block of 64 (symmetric, scale max|x| / 127, as llama.cpp's Q8 activations), then
   one vpdpbusd per 64 weight bytes, where the fp32 path needs 12 conversions and FMAs. vpdpbusd multiplies
   unsigned by signed bytes, so the weight goes in as w ^ 0x80 = w + 128 and 128 * sum(xq * scale), the same
   for every row, is taken off at the end. */
#define PF_QBLOCK 64
typedef struct {
  int8_t *q;
  float *scale, *offset; /* per block; per row of x: 128 * sum over blocks of scale * sum(q) */
} QuantX;

static void quantize_x(const float *x, int M, int K, QuantX *s) {
  int blocks = K / PF_QBLOCK;
  s->q = aligned_alloc(64, (size_t)M * K);
  s->scale = malloc((size_t)M * blocks * 4);
  s->offset = malloc((size_t)M * 4);
  for (int m = 0; m < M; m++) {
    double off = 0.;
    for (int b = 0; b < blocks; b++) {
      const float *xb = x + (size_t)m * K + (size_t)b * PF_QBLOCK;
      __m512 mx = _mm512_setzero_ps();
      for (int i = 0; i < PF_QBLOCK; i += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(xb + i)));
      float amax = _mm512_reduce_max_ps(mx), scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      int8_t *qb = s->q + (size_t)m * K + (size_t)b * PF_QBLOCK;
      int32_t total = 0;
      for (int i = 0; i < PF_QBLOCK; i += 16) {
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + i), _mm512_set1_ps(inv))); /* nearest even */
        total += _mm512_reduce_add_epi32(v);
        _mm_storeu_si128((__m128i *)(qb + i), _mm512_cvtsepi32_epi8(v));
      }
      s->scale[(size_t)m * blocks + b] = scale;
      off += 128. * scale * total;
    }
    s->offset[m] = (float)off;
  }
}

static void free_quant(QuantX *s) { free(s->q); free(s->scale); free(s->offset); }

#ifndef PF_INT8_AHEAD
#define PF_INT8_AHEAD 2048 /* best of 0.5-8 KB on Zen 5, 2 threads (1-2 KB tie) */
#endif
static void dot4_int8_vnni(const int8_t *w, size_t K, const int8_t *xq, const float *xs, float *out) {
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  const size_t d = PF_INT8_AHEAD;
  for (size_t k = 0; k < K; k += PF_QBLOCK) {
    __m512i xv = _mm512_load_si512(xq + k);
    __m512 s = _mm512_set1_ps(xs[k / PF_QBLOCK]);
    for (int r = 0; r < 4; r++) {
      const int8_t *wr = w + r * K + k;
      _mm_prefetch((const char *)PF_WRAP(wr, k, d, K), _MM_HINT_T0);
      __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_xor_si512(_mm512_loadu_si512(wr), flip), xv);
      a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), s, a[r]);
    }
  }
  for (int r = 0; r < 4; r++) out[r] = _mm512_reduce_add_ps(a[r]);
}
#endif

void pf_int8_gemv(const int8_t *w, const uint16_t *scale, const void *x_act, const void *bias, void *y, int act_bf16,
                  int M, int N, int K, int threads) {
  float *x = load_acts(x_act, act_bf16, (size_t)M * K);
  int quads = 0;
#if defined(PF_AVX512) && defined(__AVX512VNNI__)
  if (K % PF_QBLOCK == 0) {
    QuantX q;
    quantize_x(x, M, K, &q);
    quads = N / 4;
#pragma omp parallel for num_threads(threads) schedule(dynamic, chunk_of(quads, threads))
    for (int r = 0; r < quads; r++)
      for (int m = 0; m < M; m++) {
        float d[4];
        dot4_int8_vnni(w + (size_t)4 * r * K, K, q.q + (size_t)m * K, q.scale + (size_t)m * (K / PF_QBLOCK), d);
        for (int i = 0; i < 4; i++)
          store_act(y, act_bf16, (size_t)m * N + 4 * r + i, bf16_to_f32(scale[4 * r + i]) * (d[i] - q.offset[m]), bias,
                    4 * r + i);
      }
    free_quant(&q);
  }
#endif
#ifdef PF_AVX512
  if (K % 32 == 0 && quads == 0) {
    quads = N / 4;
#pragma omp parallel for num_threads(threads) schedule(dynamic, chunk_of(quads, threads))
    for (int r = 0; r < quads; r++)
      for (int m = 0; m < M; m++) {
        float d[4];
        dot4_int8(w + (size_t)4 * r * K, K, x + (size_t)m * K, d);
        for (int i = 0; i < 4; i++)
          store_act(y, act_bf16, (size_t)m * N + 4 * r + i, bf16_to_f32(scale[4 * r + i]) * d[i], bias, 4 * r + i);
      }
  }
#endif
#pragma omp parallel for num_threads(threads) schedule(static) if (N - 4 * quads > 64)
  for (int n = 4 * quads; n < N; n++) {
    const int8_t *row = w + (size_t)n * K;
    float s = bf16_to_f32(scale[n]);
    for (int m = 0; m < M; m++) store_act(y, act_bf16, (size_t)m * N + n, s * dot_int8(row, x + (size_t)m * K, K), bias, n);
  }
  free(x);
}

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
  if (K % 32 == 0) quads = N / 4;
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
#pragma omp parallel for num_threads(threads) schedule(dynamic, chunk_of(N, threads))
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
#pragma omp parallel for num_threads(threads) schedule(dynamic, chunk_of(N, threads))
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
  int kind; /* PF_KIND_* */
  int n, k, group;
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
  case PF_KIND_INT8: pf_int8_gemv(l->w, l->scale, x, l->bias, y, bf, rows, l->n, l->k, threads); break;
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

/* w [N, K] bf16 -> [N/16][K/2][16][2]: element (n, k) at ((n/16 * K/2 + k/2) * 16 + n%16) * 2 + k%2; N % 16 == 0,
   K even. Each block of 16 output columns is one contiguous stream, 64 bytes per pair of k: one AMX B-tile row,
   one vdpbf16ps operand. */
void pf_bf16_pack(const uint16_t *w, uint16_t *out, int N, int K, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int n = 0; n < N; n++)
    for (int k = 0; k < K; k++)
      out[(((size_t)(n / 16) * (K / 2) + k / 2) * 16 + n % 16) * 2 + (k & 1)] = w[(size_t)n * K + k];
}

#ifdef PF_AMX
/* y = x W^T on AMX; N % 32 == K % 32 == 0 */
static void gemm_amx(const uint16_t *packed, const uint16_t *x16, const void *bias, void *y, int act_bf16, int M,
                     int padded, int N, int K, int threads) {
#pragma omp parallel num_threads(threads)
  {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);
    float c[32 * 32];
#pragma omp for schedule(dynamic, 1)
    for (int p = 0; p < N / 32; p++) {
      const uint16_t *b0 = packed + (size_t)2 * p * K * 16, *b1 = b0 + (size_t)K * 16;
      for (int m0 = 0; m0 < padded; m0 += 32) {
        amx_pair(x16 + (size_t)m0 * K, b0, b1, K, m0 + 16 < padded, c);
        for (int m = 0; m < 32 && m0 + m < M; m++) store_row32(y, act_bf16, (size_t)(m0 + m) * N + 32 * p, c + m * 32, bias, 32 * p);
      }
    }
    _tile_release();
  }
}
#endif

#if defined(PF_AVX512) && defined(__AVX512BF16__)
/* The same GEMM without AMX: a register tile of MR rows x NB blocks of 16 columns (8 x 3: 24 fp32 accumulators,
   3 weight vectors, a broadcast), one vdpbf16ps per (row, block, pair of k). Per k pair it loads NB weight
   vectors and MR broadcast pairs of x for MR * NB dot products, so the weight streams once from DRAM per group
   of 48 columns while every 8-row tile of x passes over it from L2. */
#define PF_MR 8
#define PF_NB 3
static inline __attribute__((always_inline)) void tile_bf16(const uint32_t *x2, size_t K2, const uint16_t *wb,
                                                            size_t bstride, const void *bias, void *y, int bf,
                                                            size_t N, int n0, const int mr, const int nb) {
  __m512 c[PF_MR * PF_NB];
#pragma GCC unroll 24
  for (int i = 0; i < mr * nb; i++) c[i] = _mm512_setzero_ps();
  for (size_t p = 0; p < K2; p++) {
    __m512bh w[PF_NB];
#pragma GCC unroll 3
    for (int b = 0; b < nb; b++) {
      const uint16_t *at = wb + b * bstride + p * 32;
      _mm_prefetch((const char *)(at + 1024), _MM_HINT_T0); /* 2 KB ahead in each block's stream */
      w[b] = (__m512bh)_mm512_loadu_si512(at);
    }
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++) {
      __m512bh xb = (__m512bh)_mm512_set1_epi32((int)x2[i * K2 + p]);
#pragma GCC unroll 3
      for (int b = 0; b < nb; b++) c[i * nb + b] = _mm512_dpbf16_ps(c[i * nb + b], w[b], xb);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < mr; i++)
#pragma GCC unroll 3
    for (int b = 0; b < nb; b++) {
      __m512 v = c[i * nb + b];
      int n = n0 + 16 * b;
      if (bias) v = _mm512_add_ps(v, load16(bias, (size_t)n, bf));
      if (bf) _mm256_storeu_si256((__m256i *)((uint16_t *)y + i * N + n), (__m256i)_mm512_cvtneps_pbh(v));
      else _mm512_storeu_ps((float *)y + i * N + n, v);
    }
}

#define PF_TILE(MR, NB) \
  case MR * 4 + NB: tile_bf16(x2, K2, wb, bstride, bias, yr, bf, N, n0, MR, NB); break;
#define PF_TILES(MR) PF_TILE(MR, 1) PF_TILE(MR, 2) PF_TILE(MR, 3)

static void gemm_avx512bf16(const uint16_t *packed, const uint16_t *x16, const void *bias, void *y, int bf, int M,
                            int N, int K, int threads) {
  size_t K2 = (size_t)K / 2, bstride = (size_t)K * 16;
  int blocks = N / 16, groups = (blocks + PF_NB - 1) / PF_NB;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int g = 0; g < groups; g++) {
    int nb = blocks - g * PF_NB < PF_NB ? blocks - g * PF_NB : PF_NB, n0 = g * PF_NB * 16;
    const uint16_t *wb = packed + (size_t)g * PF_NB * bstride;
    for (int m0 = 0; m0 < M; m0 += PF_MR) {
      int mr = M - m0 < PF_MR ? M - m0 : PF_MR;
      const uint32_t *x2 = (const uint32_t *)(x16 + (size_t)m0 * K);
      void *yr = (char *)y + (size_t)m0 * N * (bf ? 2 : 4);
      switch (mr * 4 + nb) {
        PF_TILES(1) PF_TILES(2) PF_TILES(3) PF_TILES(4) PF_TILES(5) PF_TILES(6) PF_TILES(7) PF_TILES(8)
      }
    }
  }
}
#endif

/* the plain path over the packed layout (builds without AVX512-BF16; Python packs only where a vector GEMM is) */
static void gemm_plain(const uint16_t *packed, const uint16_t *x16, const void *bias, void *y, int bf, int M, int N,
                       int K, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int n = 0; n < N; n++) {
    const uint16_t *blk = packed + (size_t)(n / 16) * K * 16 + (n % 16) * 2;
    for (int m = 0; m < M; m++) {
      float acc = 0.f;
      for (int k = 0; k < K; k++) acc += bf16_to_f32(blk[(size_t)(k / 2) * 32 + (k & 1)]) * bf16_to_f32(x16[(size_t)m * K + k]);
      store_act(y, bf, (size_t)m * N + n, acc, bias, n);
    }
  }
}

int pf_bf16_gemm_path(int N, int K) { /* which GEMM pf_bf16_gemm takes for this shape (PF_GEMM_*) */
#ifdef PF_AMX
  if (pf_amx_available() && N % 32 == 0 && K % 32 == 0) return PF_GEMM_AMX;
#endif
#if defined(PF_AVX512) && defined(__AVX512BF16__)
  return PF_GEMM_AVX512_BF16;
#endif
  (void)N; (void)K;
  return PF_GEMM_PLAIN;
}

/* y [M, N] = x [M, K] W^T (+ bias) for W packed by pf_bf16_pack (N % 16 == 0, K even), x rounded to bf16,
   accumulated in fp32 (sums in another order than F.linear's: not bitwise its result) */
void pf_bf16_gemm(const uint16_t *packed, const void *x_act, const void *bias, void *y, int act_bf16, int M, int N,
                  int K, int threads) {
  int path = pf_bf16_gemm_path(N, K), padded = path == PF_GEMM_AMX ? (M + 15) / 16 * 16 : M;
  uint16_t *x16 = calloc((size_t)padded * K, 2);
  for (size_t i = 0; i < (size_t)M * K; i++)
    x16[i] = act_bf16 ? ((const uint16_t *)x_act)[i] : f32_to_bf16(((const float *)x_act)[i]);
#ifdef PF_AMX
  if (path == PF_GEMM_AMX) gemm_amx(packed, x16, bias, y, act_bf16, M, padded, N, K, threads);
#endif
#if defined(PF_AVX512) && defined(__AVX512BF16__)
  if (path == PF_GEMM_AVX512_BF16) gemm_avx512bf16(packed, x16, bias, y, act_bf16, M, N, K, threads);
#endif
  if (path == PF_GEMM_PLAIN) gemm_plain(packed, x16, bias, y, act_bf16, M, N, K, threads);
  free(x16);
}

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

/* ---- ABI self-description ------------------------------------------------------------------------- */
/* "Struct:size,field@offset,...;ENUM=value;..." for kernels/abi.py to compare with its ctypes declarations */
const char *pf_abi(void) {
  static char buf[4096];
  if (buf[0]) return buf;
  int n = 0;
#define PF_S(T) n += snprintf(buf + n, sizeof buf - n, "%s%s:%zu", n ? ";" : "", #T, sizeof(T))
#define PF_F(T, f) n += snprintf(buf + n, sizeof buf - n, ",%s@%zu", #f, offsetof(T, f))
#define PF_E(e) n += snprintf(buf + n, sizeof buf - n, ";%s=%d", #e, (int)(e))
  PF_S(PfLinear); PF_F(PfLinear, kind); PF_F(PfLinear, n); PF_F(PfLinear, k); PF_F(PfLinear, group);
  PF_F(PfLinear, w); PF_F(PfLinear, scale); PF_F(PfLinear, zero); PF_F(PfLinear, bias); PF_F(PfLinear, packed);
  PF_S(PfLayer); PF_F(PfLayer, norm1_w); PF_F(PfLayer, norm1_b); PF_F(PfLayer, norm2_w); PF_F(PfLayer, norm2_b);
  PF_F(PfLayer, qkv); PF_F(PfLayer, proj); PF_F(PfLayer, fc); PF_F(PfLayer, down); PF_F(PfLayer, k_cache);
  PF_F(PfLayer, v_cache);
  PF_S(PfModel); PF_F(PfModel, num_layers); PF_F(PfModel, hidden); PF_F(PfModel, heads); PF_F(PfModel, kv_heads);
  PF_F(PfModel, head_dim); PF_F(PfModel, rotary_dim); PF_F(PfModel, inter); PF_F(PfModel, rms); PF_F(PfModel, act);
  PF_F(PfModel, parallel); PF_F(PfModel, gated); PF_F(PfModel, act_bf16); PF_F(PfModel, eps);
  PF_F(PfModel, attn_scale); PF_F(PfModel, cache_sb); PF_F(PfModel, cache_sh); PF_F(PfModel, cache_st);
  PF_E(PF_KIND_BF16); PF_E(PF_KIND_F32); PF_E(PF_KIND_INT8); PF_E(PF_KIND_INT4);
  PF_E(PF_ACT_GELU_TANH); PF_E(PF_ACT_SILU); PF_E(PF_ACT_GELU_ERF);
  PF_E(PF_FEAT_AVX512); PF_E(PF_FEAT_AVX512_BF16); PF_E(PF_FEAT_AVX512_VNNI); PF_E(PF_FEAT_AMX); PF_E(PF_FEAT_AVX2);
  PF_E(PF_READ_PLAIN); PF_E(PF_READ_PREFETCH); PF_E(PF_READ_STREAM);
  PF_E(PF_GEMM_PLAIN); PF_E(PF_GEMM_AVX512_BF16); PF_E(PF_GEMM_AMX);
#undef PF_S
#undef PF_F
#undef PF_E
  return buf;
}
