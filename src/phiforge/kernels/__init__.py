"""Native CPU kernels for decoding: bf16/int8/int4 GEMV, int8/int4 dequantization, single-query attention.

native.c is compiled once per machine with the system C compiler (``-march=native``) into
``$PHIFORGE_CACHE`` (default ~/.cache/phiforge/kernels), keyed by a hash of the source and flags, and
loaded with ctypes. Where it cannot be built (no compiler, not x86/ARM Linux, ``PHIFORGE_NATIVE=0``)
``available()`` is False and callers keep PyTorch's own kernels: these are a speed-up, never a requirement.
Every wrapper takes and returns torch tensors on the CPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math",
         "-fno-signed-zeros", "-fassociative-math"]  # not -ffast-math: its crtfastmath would set FTZ process-wide
_lib: ctypes.CDLL | None = None
_tried = False
_P = ctypes.c_void_p


def _cache_dir() -> Path:
    return Path(os.environ.get("PHIFORGE_CACHE", Path.home() / ".cache" / "phiforge")) / "kernels"


def _build() -> Path | None:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS, sys.platform]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"phiforge-native-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # build aside, rename: atomic under races
        built = Path(tmp) / target.name
        proc = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            warnings.warn(f"phiforge: native kernels not built ({compiler}): {proc.stderr.strip()[:500]}",
                          stacklevel=3)
            return None
        os.replace(built, target)
    return target


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("PHIFORGE_NATIVE", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    try:
        path = _build()
        _lib = ctypes.CDLL(str(path)) if path is not None else None
    except OSError as error:  # an unwritable cache, a noexec mount: run on PyTorch's kernels instead
        warnings.warn(f"phiforge: native kernels unavailable ({error})", stacklevel=2)
    if _lib is not None:
        _lib.pf_features.restype = ctypes.c_int
        strided = [_P, ctypes.c_int64, ctypes.c_int64]  # a [B, heads, D] tensor: pointer, row and head strides
        _lib.pf_decode_attention.argtypes = (strided * 3 + [_P, _P, ctypes.c_int, _P, _P, _P]
                                             + [ctypes.c_int] * 4 + [ctypes.c_int64] * 3
                                             + [ctypes.c_float, _P, _P, ctypes.c_int, ctypes.c_int])
    return _lib


def available() -> bool:
    return _load() is not None


def features() -> dict[str, bool]:
    """Which vector paths the build has (the plain C paths are always there)."""
    bits = _load().pf_features() if available() else 0
    return {"avx512": bool(bits & 1), "avx512_bf16": bool(bits & 2)}


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return _P(t.data_ptr())


def _threads() -> int:
    return torch.get_num_threads()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A bf16 tensor's raw 16-bit words (what the C side reads)."""
    return t.contiguous().view(torch.int16)


def _acts(x: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """x as contiguous rows [M, K] in bf16 or fp32 (the kernels' activation dtypes), bias in the same dtype."""
    dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float32) else torch.float32
    x2 = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
    if bias is not None:
        bias = bias.to(dtype).contiguous()
    return x2, bias, int(dtype == torch.bfloat16)


def _call_gemv(name: str, x: torch.Tensor, n: int, bias: torch.Tensor | None, *weights: object) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W^T (+ bias) in x's dtype, W given by ``weights`` (pointers and sizes)."""
    x2, bias, act_bf16 = _acts(x, bias)
    y = torch.empty(x2.shape[0], n, dtype=x2.dtype)
    bias_ptr = _ptr(bias) if bias is not None else None
    getattr(_load(), name)(*weights[:-1], _ptr(x2), bias_ptr, _ptr(y), act_bf16, x2.shape[0], n, *weights[-1],
                           _threads())
    return y.to(x.dtype)


def bf16_gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w^T (+ bias) for a bf16 weight w [N, K], accumulated in fp32; x's dtype out."""
    return _call_gemv("pf_bf16_gemv", x, w.shape[0], bias, _ptr(_bits(w)), (w.shape[1],))


def int8_gemv(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
              ) -> torch.Tensor:
    """x [M, K] @ (w [N, K] int8 * scales [N] bf16)^T (+ bias), in x's dtype."""
    return _call_gemv("pf_int8_gemv", x, w.shape[0], bias, _ptr(w), _ptr(_bits(scales)), (w.shape[1],))


def int8_dequant(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    out = torch.empty(w.shape, dtype=torch.bfloat16)
    _load().pf_int8_dequant(_ptr(w), _ptr(_bits(scales)), _ptr(out), *w.shape, _threads())
    return out


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) for W stored as int4 groups (quantize.py's portable layout), in x's dtype; x is
    rounded to bf16 first, as PyTorch's int4 kernels do."""
    return _call_gemv("pf_int4_gemv", x, packed.shape[0], bias, _ptr(packed), _ptr(_bits(scales)),
                      _ptr(_bits(zeros)), (packed.shape[1] * 2, group_size))


def int4_dequant(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    N, K = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(N, K, dtype=torch.bfloat16)
    _load().pf_int4_dequant(_ptr(packed), _ptr(_bits(scales)), _ptr(_bits(zeros)), _ptr(out), N, K, group_size,
                            _threads())
    return out


def decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scale: float,
                     cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one new token per row, storing its key and value first.

    With ``cos``/``sin`` [B, 1, r] (model.RotaryEmbedding's, q's dtype) q and k_new are not yet rotated: the
    kernel applies RoPE to the first r channels, rounding as apply_rotary does, and caches the rotated key.

    q [B, H, 1, D]; k_new, v_new [B, KV, 1, D] go into the caches [B, KV, capacity, D] at position hi[b] - 1;
    then row b attends keys lo[b] <= t < hi[b]. One dtype throughout (bf16 or fp32); any strides with
    contiguous D (views of the KV cache, heads split from one projection). Returns [B, 1, H * D], what the
    output projection takes. The H / KV query heads of a kv head share each key read.
    """
    B, H, _, D = q.shape
    KV = k_cache.shape[1]
    tensors = (q, k_new, v_new, k_cache, v_cache)
    if (k_cache.stride() != v_cache.stride()
            or any(t.stride(-1) != 1 or t.dtype != q.dtype for t in tensors)
            or q.dtype not in (torch.bfloat16, torch.float32)):
        raise ValueError("decode_attention: one dtype (bf16 or fp32), contiguous rows, caches of matching strides")
    out = torch.empty(B, 1, H * D, dtype=q.dtype)
    lo64, hi64 = lo.to(torch.int64).contiguous(), hi.to(torch.int64).contiguous()

    def heads(t: torch.Tensor) -> tuple[ctypes.c_void_p, int, int]:  # pointer, row and head strides
        return _ptr(t), t.stride(0), t.stride(1)

    rotary = [None, None, 0]
    if cos is not None:
        cos, sin = cos.to(q.dtype).contiguous(), sin.to(q.dtype).contiguous()
        rotary = [_ptr(cos), _ptr(sin), cos.shape[-1]]
    _load().pf_decode_attention(*heads(q), *heads(k_new), *heads(v_new), _ptr(k_cache), _ptr(v_cache),
                                int(q.dtype == torch.bfloat16), _ptr(out), _ptr(lo64), _ptr(hi64), B, H, KV, D,
                                *k_cache.stride()[:3], scale, *rotary, _threads())
    return out


def rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of bf16 rows in transformers' order (normalise in fp32, round, scale by the bf16 weight)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty_like(x2)
    _load().pf_rms_norm_bf16(_ptr(x2), _ptr(weight.contiguous()), _ptr(y), x2.shape[0], x2.shape[1],
                             ctypes.c_float(eps), _threads())
    return y.view(x.shape)


def decode_step(model: object, layers: object, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, first_row: int,
                lo: torch.Tensor, hi: torch.Tensor) -> None:
    """Run pf_decode_step in place on hidden states x [B, hidden] (phiforge.native_decode builds the structs)."""
    cos, sin = cos.contiguous(), sin.contiguous()
    lo64, hi64 = lo.to(torch.int64).contiguous(), hi.to(torch.int64).contiguous()
    _load().pf_decode_step(model, layers, _ptr(x), x.shape[0], _ptr(cos), _ptr(sin), ctypes.c_int64(first_row),
                           _ptr(lo64), _ptr(hi64), _threads())


def amx_available() -> bool:
    """Whether the build has the AMX bf16 GEMM and the OS grants this process the tile registers."""
    return available() and bool(_load().pf_amx_available())


AMX_MAX_ROWS = 32  # beyond, oneDNN's GEMM reuses the weight better than the AMX kernel (measured)
AMX_STEP_MAX_ROWS = 128  # in the native decode step AMX still wins there: no Python around the GEMMs (measured)
NATIVE_GEMV_ROWS = 8  # up to this many rows the quantized GEMVs stream the codes; beyond, dequantize + GEMM


def amx_fits(n: int, k: int) -> bool:
    return n % 32 == 0 and k % 32 == 0


def amx_pack(w: torch.Tensor) -> torch.Tensor:
    """A bf16 weight [N, K] in the AMX GEMM's layout (blocks of 16 output columns, k in pairs)."""
    out = torch.empty(w.numel(), dtype=torch.int16)
    _load().pf_amx_pack(_ptr(_bits(w)), _ptr(out), *w.shape, _threads())
    return out


def bf16_gemm_amx(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W^T (+ bias) for W packed by amx_pack, accumulated in fp32; x's dtype out."""
    return _call_gemv("pf_bf16_gemm_amx", x, n, bias, _ptr(packed), (packed.numel() // n,))
