"""Native CPU kernels for decoding: bf16/int8/int4 GEMV, bf16 GEMM of decode batches, int8/int4 dequantization,
single-query attention, a whole decode step, and the memory-bandwidth probe.

native.c is compiled with the system C compiler once per feature level (LEVELS: generic x86-64, AVX2, AVX-512,
AVX-512 VNNI, AVX512-BF16, AMX) into ``$PHIFORGE_CACHE`` (default ~/.cache/phiforge/kernels), keyed by the
source, flags and the CPU's model and flags, and loaded with ctypes, its ABI checked (abi.py). The wrappers run on
the best level this CPU has, as ggml's CPU backend picks its variant at run time; ``PHIFORGE_NATIVE_LEVEL=avx2``
(say) caps it. Where nothing builds (no compiler, not Linux, ``PHIFORGE_NATIVE=0``) ``available()`` is False
and callers keep PyTorch's own kernels: these are a speed-up, never a requirement.
Every wrapper takes and returns torch tensors on the CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from phiforge.errors import ConfigError, ModelError
from phiforge.kernels import abi
from phiforge.kernels.abi import Feat

SOURCE = Path(__file__).with_name("native.c")  # the unity build: it includes csrc/*, split by concern
FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math",
         "-fno-signed-zeros", "-fassociative-math"]  # not -ffast-math: its crtfastmath would set FTZ process-wide
# x86 feature levels, best last: (name, /proc/cpuinfo flags the CPU needs, compiler flags). A level's build runs
# only on a CPU with all its flags; -mtune=native tunes scheduling without using any instruction beyond them.
X86_V4 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}
LEVELS: list[tuple[str, frozenset[str], list[str]]] = [
    ("generic", frozenset(), ["-march=x86-64"]),
    ("avx2", frozenset({"avx2", "fma", "f16c", "bmi2"}), ["-march=x86-64-v3"]),
    ("avx512", frozenset(X86_V4), ["-march=x86-64-v4"]),
    ("avx512_vnni", frozenset(X86_V4 | {"avx512_vnni"}), ["-march=x86-64-v4", "-mavx512vnni"]),
    ("avx512_bf16", frozenset(X86_V4 | {"avx512_vnni", "avx512_bf16"}),
     ["-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16"]),
    ("amx", frozenset(X86_V4 | {"avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16"}),
     ["-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16", "-mamx-tile", "-mamx-bf16"]),
]
_libs: dict[str, ctypes.CDLL | None] = {}  # level -> its loaded build (None: it failed to build or load)
_active: str | None = None  # the level the wrappers call; None until the first _load


def _cache_dir() -> Path:
    return Path(os.environ.get("PHIFORGE_CACHE", Path.home() / ".cache" / "phiforge")) / "kernels"


def cpu() -> tuple[str, frozenset[str]]:
    """This CPU's model name and feature flags, as /proc/cpuinfo lists them (empty off Linux)."""
    model, flags = platform.processor() or platform.machine(), frozenset()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model") and model in ("", platform.machine()):
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = frozenset(value.split())
    return model, flags


def levels() -> list[str]:
    """The feature levels this CPU can run, best last (one level, "native", off x86)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["native"]
    flags = cpu()[1]
    return [name for name, needs, _ in LEVELS if needs <= flags]


def _flags(level: str) -> list[str]:
    if level == "native":
        return [*FLAGS, "-march=native"]
    return [*FLAGS, *next(f for name, _, f in LEVELS if name == level), "-mtune=native"]


def source_text() -> str:
    """native.c with every part it includes, in include order (what the build key hashes and abi checks)."""
    text = SOURCE.read_text()
    parts = re.findall(r'^#include "(csrc/[\w.]+)"$', text, re.M)
    return "\n".join([text, *((SOURCE.parent / part).read_text() for part in parts)])


def _target(level: str, compiler: str) -> Path:
    """Where the level's build is cached: keyed by the source, compiler, flags and the CPU's model and flags
    (-mtune=native and the compiler's own view of the CPU differ between machines)."""
    model, cpu_flags = cpu()
    ident = " ".join([compiler, *_flags(level), sys.platform, model, *sorted(cpu_flags)])
    key = hashlib.sha256((source_text() + ident).encode()).hexdigest()[:16]
    return _cache_dir() / f"phiforge-native-{level}-{key}.so"


def _build(level: str) -> Path | None:
    """The level's shared object in the cache, built if missing (None: no compiler, or it failed)."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None
    target = _target(level, compiler)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # build aside, rename: atomic under races
        built = Path(tmp) / target.name
        proc = subprocess.run([compiler, *_flags(level), str(SOURCE), "-o", str(built), "-lm"], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            warnings.warn(f"phiforge: native kernels ({level}) not built ({compiler}): {proc.stderr.strip()[:500]}",
                          stacklevel=4)
            return None
        os.replace(built, target)
    return target


def _open(level: str) -> ctypes.CDLL | None:
    """The level's build, loaded and its ABI checked (cached per process); None where that fails."""
    if level not in _libs:
        lib = None
        try:
            path = _build(level)
            if path is not None:
                lib = ctypes.CDLL(str(path))
                abi.bind(lib, source_text())
        except (OSError, abi.AbiError) as error:  # an unwritable cache, a noexec mount: PyTorch's kernels instead
            warnings.warn(f"phiforge: native kernels ({level}) unavailable ({error})", stacklevel=3)
            lib = None
        _libs[level] = lib
    return _libs[level]


def _load() -> ctypes.CDLL | None:
    """The build the wrappers call: the best level this CPU runs (PHIFORGE_NATIVE_LEVEL caps it), falling back
    a level where one does not build."""
    global _active
    if _active is None:
        _active = ""
        if os.environ.get("PHIFORGE_NATIVE", "1") != "0" and sys.platform.startswith("linux"):
            runnable = levels()
            cap = os.environ.get("PHIFORGE_NATIVE_LEVEL")
            if cap in runnable:
                runnable = runnable[: runnable.index(cap) + 1]
            for level in reversed(runnable):
                if _open(level) is not None:
                    _active = level
                    break
    return _libs.get(_active) if _active else None


def level() -> str | None:
    """The feature level the kernels run at (None: not built, PyTorch's kernels)."""
    return _active if _load() is not None else None


@contextlib.contextmanager
def use_level(name: str) -> Iterator[None]:
    """Run the wrappers on another level's build for a while (tests take every path the CPU has this way)."""
    global _active
    _load()
    if name not in levels() or _open(name) is None:
        raise ConfigError(f"native kernels: level {name!r} does not run here (levels: {levels()})")
    previous, _active = _active, name
    try:
        yield
    finally:
        _active = previous


def available() -> bool:
    return _load() is not None


def onednn_bf16() -> bool:
    """Whether oneDNN's bf16 linear (``mkldnn._linear_pointwise``) runs on this CPU: it needs AVX-512 BW/VL/DQ
    or AVX-NE-CONVERT, and raises on an AVX2-only one (e.g. an EPYC of the Zen 3 generation)."""
    flags = cpu()[1]
    return {"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags


def features() -> dict[str, bool]:
    """Which vector paths the active build has (the plain C paths are always there) and its level."""
    bits = Feat(_load().pf_features()) if available() else Feat(0)
    return {"level": level(), **{flag.name.lower(): bool(bits & flag) for flag in Feat}}


def read_bandwidth(nbytes: int, method: abi.Read, huge: bool, threads: int, repeats: int = 3) -> float:
    """Bytes/s of a streaming read of ``nbytes`` by ``threads`` (pf_read_bandwidth); needs available()."""
    return _load().pf_read_bandwidth(nbytes, int(method), int(huge), threads, repeats)


def fma_peak(threads: int) -> float:
    """fp32 flop/s of independent FMAs at the active build's widest vectors over ``threads`` (pf_fma_peak; 0 where
    the build has no vector FMA): the compute roof of the GEMM benchmarks."""
    return _load().pf_fma_peak(threads)


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


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


def int8_tile(k: int) -> int:
    """Rows per tile of the layout this level's int8 GEMV reads a weight of k columns in fastest (int8_to_tiles);
    0: plain [N, K] rows."""
    return _int8_tile(_active, k)


@functools.cache
def _int8_tile(level: str, k: int) -> int:  # per level, as _rows_tiled: int8_gemv checks it on every call
    return _load().pf_int8_tile(k)


def int8_to_tiles(w: torch.Tensor, tile: int) -> torch.Tensor:
    """w [N, K] int8 in the tiled layout (csrc/int8.c): rows in tiles of ``tile``, each tile's abi.Tile.BLOCK-byte
    column blocks row-interleaved, the rows past the last whole tile as they were; the same shape and bytes."""
    return _retile(w, tile, to_tiles=True)


def int8_from_tiles(w: torch.Tensor, tile: int) -> torch.Tensor:
    """The plain [N, K] rows of a weight int8_to_tiles laid out."""
    return _retile(w, tile, to_tiles=False)


def _retile(w: torch.Tensor, tile: int, to_tiles: bool) -> torch.Tensor:
    n, k = w.shape
    whole, block = n // tile * tile, int(abi.Tile.BLOCK)
    if k % block:
        raise ModelError(f"int8 tiles: {k} columns are not a multiple of {block}")
    plain_shape, tiled_shape = (n // tile, tile, k // block, block), (n // tile, k // block, tile, block)
    head = w[:whole].reshape(plain_shape if to_tiles else tiled_shape).transpose(1, 2)
    return torch.cat([head.reshape(whole, k), w[whole:]])


def _check_tile(w: torch.Tensor, tile: int) -> None:
    wanted = int8_tile(w.shape[1])
    if tile not in (0, wanted):
        raise ModelError(f"an int8 weight in tiles of {tile} rows; this level's GEMV reads tiles of {wanted} "
                         "(0: plain rows)")


def int8_gemv(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
              tile: int = 0) -> torch.Tensor:
    """x [M, K] @ (w [N, K] int8 * scales [N] bf16)^T (+ bias), in x's dtype; w plain, or int8_to_tiles(w, tile)
    with tile = int8_tile(K)."""
    _check_tile(w, tile)
    return _call_gemv("pf_int8_gemv", x, w.shape[0], bias, _ptr(w), _ptr(_bits(scales)), (w.shape[1], tile))


def int8_dequant(w: torch.Tensor, scales: torch.Tensor, tile: int = 0) -> torch.Tensor:
    """The bf16 weight [N, K] = w * scales, w in either layout (tile as int8_gemv's)."""
    out = torch.empty(w.shape, dtype=torch.bfloat16)
    _load().pf_int8_dequant(_ptr(w), _ptr(_bits(scales)), _ptr(out), *w.shape, tile, _threads())
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
    """Run pf_decode_step in place on hidden states x [B, hidden] (inference.native_decode builds the structs)."""
    cos, sin = cos.contiguous(), sin.contiguous()
    lo64, hi64 = lo.to(torch.int64).contiguous(), hi.to(torch.int64).contiguous()
    _load().pf_decode_step(model, layers, _ptr(x), x.shape[0], _ptr(cos), _ptr(sin), ctypes.c_int64(first_row),
                           _ptr(lo64), _ptr(hi64), _threads())


def amx_available() -> bool:
    """Whether the active build has the AMX bf16 GEMM and the OS grants this process the tile registers."""
    return available() and bool(_load().pf_amx_available())


def gemm_available() -> bool:
    """Whether the active build has a vector bf16 GEMM over bf16_pack's layout (AMX, else AVX512-BF16)."""
    return available() and bool(Feat(_load().pf_features()) & (Feat.AVX512_BF16 | Feat.AMX))


def gemv_path(kind: abi.Kind, k: int, group_size: int = 0) -> str:
    """Which arithmetic the active build's GEMV takes for a weight of this kind with k columns (int4: and this
    group size): "plain", "avx512", "bf16_dot", "q8_vnni" or "q8_avx2" (the q8 ones quantize x per block)."""
    return abi.Gemv(_load().pf_gemv_path(int(kind), k, group_size)).name.lower()


def bf16_rows_tiled(k: int) -> bool:
    """Whether bf16_gemv takes several rows of x in register tiles and panels (the AVX2 level, k % 16 == 0: it then
    beats PyTorch's bf16 GEMM, which has no fast path without AVX-512, from 2 rows to prefills; bench/gemm.py)."""
    return available() and _rows_tiled(_active, k)


def bf16_rows_fast() -> bool:
    """Whether bf16 projections of many rows are fast on this CPU, as the engine runs them: oneDNN's bf16 linear
    (AVX-512, AMX) or the native AVX2 tiles. Where neither is, PyTorch's bf16 matmul is slower than its fp32 one."""
    return onednn_bf16() or bf16_rows_tiled(16)


@functools.cache
def _rows_tiled(level: str, k: int) -> bool:  # per level: tests switch levels with use_level
    return gemv_path(abi.Kind.BF16, k) == abi.Gemv.AVX2.name.lower()


def gemm_path(n: int, k: int) -> str:
    """Which GEMM bf16_gemm takes for an [n, k] weight: "amx", "avx512_bf16" or "plain"."""
    return abi.Gemm(_load().pf_bf16_gemm_path(n, k)).name.lower()


GEMM_MAX_ROWS = 32  # beyond, oneDNN's GEMM reuses the weight better than the native GEMM in Linear (measured, AMX)
STEP_MAX_ROWS = 128  # in the native decode step the native GEMM still wins there: no Python around it (measured)
NATIVE_GEMV_ROWS = 8  # up to this many rows the quantized GEMVs stream the codes; beyond, dequantize + GEMM


def gemm_fits(n: int, k: int) -> bool:
    return n % 16 == 0 and k % 2 == 0


def bf16_pack(w: torch.Tensor) -> torch.Tensor:
    """A bf16 weight [N, K] in the native GEMMs' layout (blocks of 16 output columns, k in pairs)."""
    out = torch.empty(w.numel(), dtype=torch.int16)
    _load().pf_bf16_pack(_ptr(_bits(w)), _ptr(out), *w.shape, _threads())
    return out


def bf16_gemm(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W^T (+ bias) for W packed by bf16_pack, x rounded to bf16, accumulated in fp32; x's dtype out."""
    return _call_gemv("pf_bf16_gemm", x, n, bias, _ptr(packed), (packed.numel() // n,))
