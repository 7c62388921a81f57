/* Included first by native.c: headers, the enums shared with kernels/abi.py, bf16 <-> fp32, activation
 * loads and stores, the work split, and pf_features. */
#pragma once
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
enum { PF_TILE_BLOCK = 64 }; /* bytes of one row per column block of a tiled int8 weight (int8.c) */
enum { PF_GEMM_PLAIN = 0, PF_GEMM_AVX512_BF16 = 1, PF_GEMM_AMX = 2 }; /* pf_bf16_gemm_path */
/* pf_gemv_path: fp32 products in plain C or AVX-512 (x as it is, or rounded to bf16 for int4), the dot-product
   instructions on bf16 (AVX512-BF16), x quantized to int8 per block (VNNI; AVX2's vpmaddubsw), or fp32 products in
   AVX2 register tiles (bf16: rows of x against rows of w) */
enum { PF_GEMV_PLAIN = 0, PF_GEMV_AVX512 = 1, PF_GEMV_BF16_DOT = 2, PF_GEMV_Q8_VNNI = 3, PF_GEMV_Q8_AVX2 = 4,
       PF_GEMV_AVX2 = 5 };
#if defined(__AVX2__) && !defined(PF_AVX512)
#define PF_AVX2_ONLY 1 /* the AVX2 level: 256-bit integer paths where AVX-512 builds have their own */
#ifndef PF_AVX2_AHEAD
#define PF_AVX2_AHEAD 1024 /* bytes ahead of the int4 row being read */
#endif
#endif
int pf_gemv_path(int kind, int K, int G); /* csrc/gemv_path.c */

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

/* one block of x to int8 for the q8 GEMV paths: symmetric, scale max|x| / 127, lrintf (the current rounding mode:
   nearest even); returns the scale and sets *total to the sum of the codes */
static inline float q8_block(const float *xb, int n, int8_t *q, int32_t *total) {
  float amax = 0.f;
  for (int i = 0; i < n; i++) amax = fmaxf(amax, fabsf(xb[i]));
  float inv = amax > 0.f ? 127.f / amax : 0.f;
  int32_t t = 0;
  for (int i = 0; i < n; i++) {
    long v = lrintf(xb[i] * inv);
    v = v > 127 ? 127 : v < -127 ? -127 : v;
    q[i] = (int8_t)v;
    t += (int32_t)v;
  }
  *total = t;
  return amax / 127.f;
}

/* rows handed out in chunks of this many quads: ~8 chunks per thread, so a preempted thread's share moves */
static inline int chunk_of(int quads, int threads) {
  int c = quads / (8 * (threads > 0 ? threads : 1));
  return c > 0 ? c : 1;
}

#ifdef __AVX2__
static inline __m256 bf16x8(const uint16_t *p) { /* 8 bf16 to fp32: a widening and a shift */
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

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
