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
 * The ctypes side checks the structs, enums and entry points at load (pf_abi, kernels/abi.py).
 */
/* One translation unit, split by concern into csrc/ (as ggml-cpu splits its kernels): the parts share static
 * inline helpers and the decode step inlines the GEMVs, and each feature level is one compiler run. */
#include "csrc/common.h"
#include "csrc/int8.c"
#include "csrc/bf16.c"
#include "csrc/int4.c"
#include "csrc/gemv_path.c"
#include "csrc/attention.c"
#include "csrc/rmsnorm.c"
#include "csrc/fp32.c"
#include "csrc/decode_step.c"
#include "csrc/gemm.c"
#include "csrc/bandwidth.c"
#include "csrc/abi.c"
