"""The C kernels' ABI as ctypes sees it: structs, enums and every entry point's signature.

native.c describes its own structs (sizes, field offsets) and enums through ``pf_abi()``; ``check`` compares
that with the declarations here when a build is loaded, so a field added on one side only fails at load
with both descriptions in the message, never as a silently misread struct.
"""

from __future__ import annotations

import ctypes
import enum
import re

from phiforge.errors import ExternalError

_P = ctypes.c_void_p
_I = ctypes.c_int
_I64 = ctypes.c_int64
_F = ctypes.c_float


class Kind(enum.IntEnum):
    """PfLinear.kind: how a projection's weight is stored."""

    BF16 = 0
    F32 = 1
    INT8 = 2
    INT4 = 3


class Act(enum.IntEnum):
    """PfModel.act: the MLP's activation."""

    GELU_TANH = 0
    SILU = 1
    GELU_ERF = 2


class Feat(enum.IntFlag):
    """pf_features(): the vector paths a build has."""

    AVX512 = 1
    AVX512_BF16 = 2
    AVX512_VNNI = 4
    AMX = 8
    AVX2 = 16


class Read(enum.IntEnum):
    """pf_read_bandwidth's methods."""

    PLAIN = 0
    PREFETCH = 1
    STREAM = 2


class Gemm(enum.IntEnum):
    """pf_bf16_gemm_path(): which GEMM pf_bf16_gemm takes for a shape."""

    PLAIN = 0
    AVX512_BF16 = 1
    AMX = 2


class Gemv(enum.IntEnum):
    """pf_gemv_path(): which arithmetic a GEMV takes for a weight kind and shape."""

    PLAIN = 0  # fp32 products in plain C (int4: x rounded to bf16)
    AVX512 = 1  # fp32 products, AVX-512
    BF16_DOT = 2  # vdpbf16ps on bf16 x (AVX512-BF16)
    Q8_VNNI = 3  # x quantized to int8 per block of 64, vpdpbusd
    Q8_AVX2 = 4  # x quantized to int8 per block (int8 weights: 64, int4: 32), vpmaddubsw
    AVX2 = 5  # fp32 products, AVX2 register tiles (bf16: rows of x against rows of w, any number of rows)


class Tile(enum.IntEnum):
    """The tiled int8 layout (pf_int8_tile): bytes of one row per column block."""

    BLOCK = 64


ENUMS = {"TILE": Tile, "KIND": Kind, "ACT": Act, "FEAT": Feat, "READ": Read, "GEMM": Gemm, "GEMV": Gemv}


class Linear(ctypes.Structure):
    _fields_ = [("kind", _I), ("n", _I), ("k", _I), ("group", _I), ("tile", _I), ("w", _P), ("scale", _P), ("zero", _P),
                ("bias", _P), ("packed", _P)]


class Layer(ctypes.Structure):
    _fields_ = [("norm1_w", _P), ("norm1_b", _P), ("norm2_w", _P), ("norm2_b", _P), ("qkv", Linear),
                ("proj", Linear), ("fc", Linear), ("down", Linear), ("k_cache", _P), ("v_cache", _P)]


class Model(ctypes.Structure):
    _fields_ = ([(name, _I) for name in ("num_layers", "hidden", "heads", "kv_heads", "head_dim", "rotary_dim",
                                         "inter", "rms", "act", "parallel", "gated", "act_bf16")]
                + [("eps", _F), ("attn_scale", _F)]
                + [(name, _I64) for name in ("cache_sb", "cache_sh", "cache_st")])


STRUCTS = {"PfLinear": Linear, "PfLayer": Layer, "PfModel": Model}

_GEMV = [_P, _P, _P, _P, _I, _I, _I, _I, _I]  # w, x, bias, y, act_bf16, M, N, K, threads
_STRIDED = [_P, _I64, _I64]  # a [B, heads, D] tensor: pointer, row and head strides
SIGNATURES: dict[str, tuple[object, list]] = {  # name: (restype, argtypes), every symbol Python calls
    "pf_abi": (ctypes.c_char_p, []),
    "pf_features": (_I, []),
    "pf_amx_available": (_I, []),
    "pf_bf16_gemv": (None, _GEMV),
    "pf_f32_gemv": (None, _GEMV),
    "pf_int8_gemv": (None, [_P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I]),
    "pf_int8_tile": (_I, [_I]),
    "pf_int4_gemv": (None, [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I]),
    "pf_int8_dequant": (None, [_P, _P, _P, _I, _I, _I, _I]),
    "pf_int4_dequant": (None, [_P, _P, _P, _P, _I, _I, _I, _I]),
    "pf_decode_attention": (None, _STRIDED * 3 + [_P, _P, _I, _P, _P, _P] + [_I] * 4 + [_I64] * 3
                            + [_F, _P, _P, _I, _I]),
    "pf_rms_norm_bf16": (None, [_P, _P, _P, _I, _I, _F, _I]),
    "pf_decode_step": (None, [ctypes.POINTER(Model), ctypes.POINTER(Layer), _P, _I, _P, _P, _I64, _P, _P, _I]),
    "pf_bf16_pack": (None, [_P, _P, _I, _I, _I]),
    "pf_bf16_gemm": (None, _GEMV),
    "pf_bf16_gemm_path": (_I, [_I, _I]),
    "pf_gemv_path": (_I, [_I, _I, _I]),
    "pf_read_bandwidth": (ctypes.c_double, [ctypes.c_size_t, _I, _I, _I, _I]),
    "pf_fma_peak": (ctypes.c_double, [_I]),
}


# C scalar types of the entry points' prototypes and the ctypes type each must be declared with
_C_SCALARS = {"int": _I, "int64_t": _I64, "float": _F, "double": ctypes.c_double, "size_t": ctypes.c_size_t,
              "void": None}
_PROTOTYPE = re.compile(r"^(?!static)([A-Za-z_][\w ]*?\**)\s*\b(pf_\w+)\(([^)]*)\)\s*[{;]", re.MULTILINE)


def _c_type(decl: str, named: bool) -> object:
    """The ctypes type a C parameter or return type must be declared as: "ptr" for any pointer."""
    if "*" in decl:
        return "ptr"
    words = [w for w in decl.split() if w != "const"]
    return _C_SCALARS[" ".join(words[:-1] if named else words)]


def _ctypes_kind(t: object) -> object:
    """A declared ctypes type as _c_type names it."""
    if t in (_P, ctypes.c_char_p) or (isinstance(t, type) and issubclass(t, ctypes._Pointer)):
        return "ptr"
    return t


def prototypes(source: str) -> dict[str, tuple[object, list[object]]]:
    """Every exported pf_* function of native.c: name -> (return type, parameter types), as _c_type names them."""
    found = {}
    for ret, name, params in _PROTOTYPE.findall(source):
        params = [p.strip() for p in params.split(",") if p.strip() and p.strip() != "void"]
        found[name] = (_c_type(ret, named=False), [_c_type(p, named=True) for p in params])
    return found


def check_prototypes(source: str) -> None:
    """Every exported symbol of native.c has a signature here, and it matches the C prototype parameter by
    parameter (a wrong argtypes entry would pass a truncated or misplaced argument); AbiError otherwise."""
    c_side = prototypes(source)
    problems = [f"{name} has no ctypes signature" for name in sorted(set(c_side) - set(SIGNATURES))]
    for name, (restype, argtypes) in SIGNATURES.items():
        if name not in c_side:
            problems.append(f"{name} is not in native.c")
            continue
        declared = (_ctypes_kind(restype), [_ctypes_kind(t) for t in argtypes])
        if declared != c_side[name]:
            problems.append(f"{name}: C {c_side[name]} but ctypes {declared}")
    if problems:
        raise AbiError("native kernels: " + "; ".join(problems))


def describe() -> str:
    """What pf_abi() must return for these declarations."""
    parts = []
    for name, struct in STRUCTS.items():
        fields = "".join(f",{f}@{getattr(struct, f).offset}" for f, _ in struct._fields_)
        parts.append(f"{name}:{ctypes.sizeof(struct)}{fields}")
    for prefix, values in ENUMS.items():
        parts += [f"PF_{prefix}_{member.name}={int(member)}" for member in values]
    return ";".join(parts)


class AbiError(ExternalError):
    """A build whose structs, enums or symbols are not what the ctypes declarations say."""


def bind(lib: ctypes.CDLL, source: str | None = None) -> None:
    """Set every entry point's signature and check the C side's self-description (and, given the C
    ``source`` the build came from, every prototype against its signature); AbiError on a mismatch."""
    if source is not None:
        check_prototypes(source)
    for name, (restype, argtypes) in SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError as error:
            raise AbiError(f"native kernels: the build lacks {name}") from error
        fn.restype, fn.argtypes = restype, argtypes
    got = lib.pf_abi().decode()
    if sorted(got.split(";")) != sorted(describe().split(";")):
        raise AbiError(f"native kernels: C ABI {got!r} differs from the ctypes declarations {describe()!r}")
