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
  PF_F(PfLinear, tile);
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
  PF_E(PF_TILE_BLOCK);
  PF_E(PF_GEMM_PLAIN); PF_E(PF_GEMM_AVX512_BF16); PF_E(PF_GEMM_AMX);
  PF_E(PF_GEMV_PLAIN); PF_E(PF_GEMV_AVX512); PF_E(PF_GEMV_BF16_DOT); PF_E(PF_GEMV_Q8_VNNI); PF_E(PF_GEMV_Q8_AVX2);
  PF_E(PF_GEMV_AVX2);
#undef PF_S
#undef PF_F
#undef PF_E
  return buf;
}
