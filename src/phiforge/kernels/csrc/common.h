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
