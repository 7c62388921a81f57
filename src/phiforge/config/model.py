"""ModelConfig: one dataclass for every Phi family member, plus the table of named presets.

The family (``model_type``) decides the state-dict layout on disk; the flags below decide the math.
Values of the presets come from the published ``config.json`` files (see shared/research/arch.md §1).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from phiforge import errors

FAMILIES = ("phi", "phi3", "phi3small", "llama", "qwen2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(errors.ConfigError):
    """A model configuration that phiforge cannot run, with the field that is wrong."""


# Bounds well past every real model (Phi-4: 40 layers, 5120 hidden, 100,352 vocab), checked before any allocation
INT_BOUNDS = {"vocab_size": (1, 1 << 22), "hidden_size": (1, 1 << 16), "intermediate_size": (1, 1 << 18),
              "num_layers": (1, 1024), "num_heads": (1, 1024), "num_kv_heads": (1, 1024), "head_dim": (1, 4096),
              "max_position_embeddings": (1, 1 << 24), "original_max_position_embeddings": (1, 1 << 24),
              "sliding_window": (1, 1 << 24), "blocksparse_block_size": (1, 1 << 16),
              "blocksparse_local_blocks": (1, 1 << 16), "blocksparse_vert_stride": (1, 1 << 16),
              "dense_attention_every_n_layers": (1, 1024)}
OPTIONAL_INTS = {"original_max_position_embeddings", "sliding_window", "blocksparse_block_size"}
FLOAT_BOUNDS = {"partial_rotary_factor": (0.0, 1.0), "rope_theta": (1e-6, 1e12), "norm_eps": (0.0, 1.0),
                "embd_pdrop": (0.0, 1.0), "resid_pdrop": (0.0, 1.0), "attn_pdrop": (0.0, 1.0),
                "initializer_range": (0.0, 1e3), "attn_scale": (0.0, 1e6), "embedding_multiplier": (1e-9, 1e9),
                "logits_divisor": (1e-9, 1e9), "gegelu_limit": (0.0, 1e9)}
OPTIONAL_FLOATS = {"attn_scale", "gegelu_limit"}
BOOL_FIELDS = ("parallel_residual", "gated_mlp", "attn_bias", "qkv_bias", "mlp_bias", "lm_head_bias", "qk_layernorm",
               "tie_word_embeddings", "qkv_grouped", "blocksparse_homo_head")
MAX_PARAMETERS = 10**12
HF_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads"}


@dataclass
class ModelConfig:
    name: str
    model_type: str  # "phi" | "phi3" | "phi3small" | "llama" | "qwen2": the Hugging Face family and its layout
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    partial_rotary_factor: float = 1.0
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    original_max_position_embeddings: int | None = None
    rope_scaling: dict[str, Any] | None = None  # {"type": "longrope", "short_factor", "long_factor", ...}
    sliding_window: int | None = None  # keys attended = sliding_window (HF eager/SDPA semantics)
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    norm_eps: float = 1e-5
    parallel_residual: bool = False  # phi-1/1.5/2: attention and MLP read the same LayerNorm output
    gated_mlp: bool = True  # SwiGLU (gate, up) vs plain fc1 -> act -> fc2
    hidden_act: str = "silu"
    attn_bias: bool = False
    qkv_bias: bool = False  # q/k/v projections biased, the output projection not (Qwen2)
    mlp_bias: bool = False
    lm_head_bias: bool = False
    qk_layernorm: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    initializer_range: float = 0.02
    torch_dtype: str = "float32"
    # Phi-3-small (arch.md §4): grouped qkv rows, muP multipliers, GeGELU, block-sparse attention
    qkv_grouped: bool = False  # qkv rows per kv group [q_0..q_{n-1}, k, v] instead of [all q, all k, all v]
    attn_scale: float | None = None  # softmax scale; None = 1/sqrt(head_dim) (muP uses 1/head_dim)
    embedding_multiplier: float = 1.0
    logits_divisor: float = 1.0
    masked_token_ids: list[int] | None = None  # ids whose logits are forced to the dtype minimum
    gegelu_limit: float | None = None  # hidden_act "gegelu": clamp of the interleaved gelu/linear halves
    blocksparse_block_size: int | None = None  # None: every layer dense
    blocksparse_local_blocks: int = 16
    blocksparse_vert_stride: int = 8
    blocksparse_homo_head: bool = False
    dense_attention_every_n_layers: int = 2  # layer i is dense when (i + 1) % n == 0, block-sparse otherwise
    extra: dict[str, Any] = field(default_factory=dict)  # HF keys we carry through unchanged

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def longrope(self) -> bool:
        return bool(self.rope_scaling) and self.rope_scaling.get("type") == "longrope"

    @property
    def rope_attention_factor(self) -> float:
        """LongRoPE's cos/sin multiplier: sqrt(1 + ln(s)/ln(orig)) unless the config names one."""
        if not self.longrope:
            return 1.0
        given = self.rope_scaling.get("attention_factor")
        if given is not None:
            return float(given)
        orig = self.original_max_position_embeddings or self.max_position_embeddings
        factor = self.rope_scaling.get("factor") or self.max_position_embeddings / orig
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))

    def is_sparse_layer(self, layer: int) -> bool:
        return self.blocksparse_block_size is not None and (layer + 1) % self.dense_attention_every_n_layers != 0

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        return 2 * self.num_layers * self.kv_size * torch.finfo(dtype).bits // 8

    def validate(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"model config {self.name!r}: {what}")

        self._check_fields(need)
        need(self.model_type in FAMILIES, f"model_type {self.model_type!r} is not one of {FAMILIES}")
        need(self.num_heads % self.num_kv_heads == 0,
             f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        need(self.rotary_dim % 2 == 0 and 0 < self.rotary_dim <= self.head_dim,
             f"rotary dim {self.rotary_dim} (head_dim {self.head_dim} x {self.partial_rotary_factor}) must be even "
             "and within the head")
        need(self.norm in ("rmsnorm", "layernorm"), f"norm {self.norm!r} must be rmsnorm or layernorm")
        need(self.torch_dtype in DTYPES, f"torch_dtype {self.torch_dtype!r} must be one of {list(DTYPES)}")
        if self.rope_scaling:
            kind = self.rope_scaling.get("type")
            need(kind == "longrope", f"rope_scaling type {kind!r} is not supported (supported: longrope)")
            for key in ("short_factor", "long_factor"):
                factors = self.rope_scaling.get(key)
                need(isinstance(factors, list) and len(factors) == self.rotary_dim // 2,
                     f"rope_scaling.{key} must be a list of rotary_dim/2 = {self.rotary_dim // 2} numbers")
        if self.hidden_act == "gegelu":
            need(self.gated_mlp, "hidden_act gegelu needs gated_mlp (interleaved gelu/linear halves)")
        if self.blocksparse_block_size is not None:
            need(self.blocksparse_block_size > 0 and self.blocksparse_local_blocks > 0
                 and self.blocksparse_vert_stride > 0 and self.dense_attention_every_n_layers > 0,
                 "blocksparse_block_size, local blocks, vert_stride and dense_attention_every_n_layers must be > 0")
        if self.model_type == "phi":
            need(self.head_dim * self.num_heads == self.hidden_size,
                 "phi models need head_dim * num_heads == hidden_size")

    def _check_fields(self, need: Callable[[bool, str], None]) -> None:
        """Types and ranges of every field, before any size is used (so a huge config allocates nothing)."""
        for name, (low, high) in INT_BOUNDS.items():
            value = getattr(self, name)
            if value is None and name in OPTIONAL_INTS:
                continue
            hf = f" (config.json {HF_KEYS[name]})" if name in HF_KEYS else ""
            need(type(value) is int and low <= value <= high,
                 f"{name}{hf} must be an integer in [{low}, {high}], got {value!r:.60}")
        for name, (low, high) in FLOAT_BOUNDS.items():
            value = getattr(self, name)
            if value is None and name in OPTIONAL_FLOATS:
                continue
            need(type(value) in (int, float) and math.isfinite(value) and low <= value <= high,
                 f"{name} must be a finite number in [{low}, {high}], got {value!r:.60}")
        for name in BOOL_FIELDS:
            need(type(getattr(self, name)) is bool, f"{name} must be true or false, got {getattr(self, name)!r:.60}")
        for name in ("name", "model_type", "norm", "hidden_act", "torch_dtype"):
            need(isinstance(getattr(self, name), str), f"{name} must be a string, got {getattr(self, name)!r:.60}")
        for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) else [value]
            need(value is None or all(type(i) is int and 0 <= i < 2**31 for i in ids),
                 f"{name} must be a token id or a list of them, got {value!r:.60}")
        need(self.rope_scaling is None or isinstance(self.rope_scaling, dict),
             f"rope_scaling must be an object, got {self.rope_scaling!r:.60}")
        need(self.masked_token_ids is None or (isinstance(self.masked_token_ids, list) and all(
            type(i) is int and 0 <= i < self.vocab_size for i in self.masked_token_ids)),
             "masked_token_ids must be a list of ids below vocab_size")
        h = self.hidden_size
        params = self.num_layers * (4 * h * max(self.q_size, self.kv_size) + 3 * h * self.intermediate_size)
        params += 2 * self.vocab_size * h
        need(params <= MAX_PARAMETERS, f"~{params:.3g} parameters: over {MAX_PARAMETERS:.0e}")

    # ---- Hugging Face config.json ----------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], name: str | None = None) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict (transformers 4.x or 5.x rope format)."""
        if not isinstance(hf, dict):
            raise ConfigError(f"config.json must be a JSON object, not {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type not in FAMILIES:
            raise ConfigError(f"config.json model_type {model_type!r} is not supported; phiforge runs {FAMILIES}")
        try:
            return _from_hf(hf, name or hf.get("_name_or_path") or model_type)
        except KeyError as missing:
            raise ConfigError(f"config.json ({model_type}) lacks the required key {missing}") from None
        except (TypeError, AttributeError, ValueError, ZeroDivisionError, OverflowError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"config.json ({model_type}): a field has the wrong type or value ({err})") from None

    def to_hf_config(self) -> dict[str, Any]:
        """The ``config.json`` that transformers loads into the matching *ForCausalLM class."""
        return _to_hf(self)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file (a model folder needs config.json)") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        try:
            return cls.from_hf_config(hf, name=path.parent.name)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _rope_fields(hf: dict[str, Any]) -> tuple[float, float, dict[str, Any] | None]:
    """(rope_theta, partial_rotary_factor, longrope scaling) from either rope format."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    prf = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    scaling = {**legacy, **params}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in ("su", "yarn") and hf.get("model_type") == "phi3":
        kind = "longrope"  # transformers renames the legacy Phi-3 names the same way
    if kind in (None, "default"):
        return theta, prf, None
    out = {"type": kind}
    for key in ("short_factor", "long_factor", "factor", "attention_factor"):
        if scaling.get(key) is not None:
            out[key] = scaling[key]
    return theta, prf, out


def _from_hf(hf: dict[str, Any], name: str) -> ModelConfig:
    model_type = hf["model_type"]
    if model_type == "phi3small":
        return _from_hf_phi3small(hf, name)
    heads = hf["num_attention_heads"]
    theta, prf, scaling = _rope_fields(hf)
    common = dict(
        name=name, model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=float(theta), max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rope_scaling=scaling, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"), initializer_range=hf.get("initializer_range", 0.02),
        torch_dtype=_dtype_name(hf.get("torch_dtype") or hf.get("dtype")),
    )
    if model_type == "phi":
        return ModelConfig(
            **common, partial_rotary_factor=prf if prf is not None else 0.5, norm="layernorm",
            norm_eps=hf.get("layer_norm_eps", 1e-5), parallel_residual=True, gated_mlp=False,
            hidden_act=hf.get("hidden_act", "gelu_new"), attn_bias=True, mlp_bias=True, lm_head_bias=True,
            qk_layernorm=bool(hf.get("qk_layernorm", False)), embd_pdrop=hf.get("embd_pdrop", 0.0),
            resid_pdrop=hf.get("resid_pdrop", 0.0), attn_pdrop=hf.get("attention_dropout", 0.0))
    if model_type == "phi3":
        return ModelConfig(
            **common, partial_rotary_factor=prf if prf is not None else 1.0, norm_eps=hf.get("rms_norm_eps", 1e-5),
            hidden_act=hf.get("hidden_act", "silu"),
            original_max_position_embeddings=hf.get("original_max_position_embeddings"),
            sliding_window=hf.get("sliding_window"), embd_pdrop=hf.get("embd_pdrop", 0.0),
            resid_pdrop=hf.get("resid_pdrop", 0.0), attn_pdrop=hf.get("attention_dropout", 0.0))
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ConfigError("config.json (qwen2): use_sliding_window = true is not supported")
    return ModelConfig(
        **common, partial_rotary_factor=prf if prf is not None else 1.0, norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=model_type == "qwen2",  # Qwen2's q/k/v always carry biases (no config key)
        hidden_act=hf.get("hidden_act", "silu"), attn_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)), attn_pdrop=hf.get("attention_dropout", 0.0))


# Phi-3-small's tokenizer reserves these ids (tokenization_phi3_small.py); the model masks their logits.
def phi3small_dummy_ids(vocab_size: int = 100352) -> list[int]:
    ids = [100256, 100258, 100259, 100260, 100264, 100265, *range(100267, 100352)]
    return [i for i in ids if i < vocab_size]


def _from_hf_phi3small(hf: dict[str, Any], name: str) -> ModelConfig:
    """Phi3SmallConfig (remote code): its own key names, muP and block-sparse extras (arch.md §4)."""
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hidden // heads
    sparse = hf.get("blocksparse_block_size", 64)
    masked = hf.get("dummy_token_indices", phi3small_dummy_ids(hf["vocab_size"]))
    mup = hf.get("mup_use_scaling", True)
    return ModelConfig(
        name=name, model_type="phi3small", vocab_size=hf["vocab_size"], hidden_size=hidden,
        intermediate_size=hf["ff_intermediate_size"], num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
        rope_theta=float(hf.get("rope_embedding_base", 1e6)),
        max_position_embeddings=hf.get("max_position_embeddings", 8192), norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), hidden_act="gegelu", gegelu_limit=hf.get("gegelu_limit", 20.0),
        attn_bias=True, mlp_bias=True, tie_word_embeddings=True, qkv_grouped=True,
        attn_scale=hf.get("mup_attn_multiplier", 1.0) / head_dim if mup else None,
        embedding_multiplier=hf.get("mup_embedding_multiplier", 10.0) if mup else 1.0,
        logits_divisor=hf.get("mup_width_multiplier", 8.0) if mup else 1.0, masked_token_ids=list(masked),
        blocksparse_block_size=sparse, blocksparse_local_blocks=hf.get("blocksparse_num_local_blocks", 16),
        blocksparse_vert_stride=hf.get("blocksparse_vert_stride", 8),
        blocksparse_homo_head=bool(hf.get("blocksparse_homo_head_pattern", False)),
        dense_attention_every_n_layers=hf.get("dense_attention_every_n_layers", 2),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"), initializer_range=hf.get("initializer_range", 0.02),
        embd_pdrop=hf.get("embedding_dropout_prob", 0.0), resid_pdrop=hf.get("ffn_dropout_prob", 0.0),
        attn_pdrop=hf.get("attention_dropout_prob", 0.0),
        torch_dtype=_dtype_name(hf.get("torch_dtype") or hf.get("dtype")))


def _to_hf_phi3small(c: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["Phi3SmallForCausalLM"], "model_type": "phi3small", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "ff_intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "hidden_act": "gegelu", "gegelu_limit": c.gegelu_limit,
        "gegelu_pad_to_256": True, "max_position_embeddings": c.max_position_embeddings,
        "rope_embedding_base": c.rope_theta, "rope_position_scale": 1.0, "layer_norm_epsilon": c.norm_eps,
        "mup_use_scaling": True, "mup_attn_multiplier": (c.attn_scale or c.head_dim**-0.5) * c.head_dim,
        "mup_embedding_multiplier": c.embedding_multiplier, "mup_width_multiplier": c.logits_divisor,
        "blocksparse_block_size": c.blocksparse_block_size, "blocksparse_num_local_blocks": c.blocksparse_local_blocks,
        "blocksparse_vert_stride": c.blocksparse_vert_stride, "blocksparse_homo_head_pattern": c.blocksparse_homo_head,
        "blocksparse_triton_kernel_block_size": c.blocksparse_block_size,
        "dense_attention_every_n_layers": c.dense_attention_every_n_layers, "dummy_token_indices": c.masked_token_ids,
        "pad_sequence_to_multiple_of_64": True, "initializer_range": c.initializer_range,
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
        "embedding_dropout_prob": c.embd_pdrop, "ffn_dropout_prob": c.resid_pdrop,
        "attention_dropout_prob": c.attn_pdrop, "tie_word_embeddings": True, "torch_dtype": c.torch_dtype,
        "use_cache": True,
        "auto_map": {"AutoConfig": "configuration_phi3_small.Phi3SmallConfig",
                     "AutoModelForCausalLM": "modeling_phi3_small.Phi3SmallForCausalLM",
                     "AutoTokenizer": "tokenization_phi3_small.Phi3SmallTokenizer"},
    }


def _dtype_name(value: Any) -> str:
    text = str(value or "float32").replace("torch.", "")
    return text if text in DTYPES else "float32"


def _to_hf(c: ModelConfig) -> dict[str, Any]:
    if c.model_type == "phi3small":
        return copy.deepcopy({**_to_hf_phi3small(c), **c.extra})
    arch = {"phi": "PhiForCausalLM", "phi3": "Phi3ForCausalLM", "llama": "LlamaForCausalLM",
            "qwen2": "Qwen2ForCausalLM"}[c.model_type]
    hf: dict[str, Any] = {
        "architectures": [arch], "model_type": c.model_type, "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "hidden_act": c.hidden_act,
        "max_position_embeddings": c.max_position_embeddings, "rope_theta": c.rope_theta,
        "initializer_range": c.initializer_range, "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "torch_dtype": c.torch_dtype,
        "attention_dropout": c.attn_pdrop, "use_cache": True,
    }
    if c.model_type == "phi":
        hf.update(layer_norm_eps=c.norm_eps, partial_rotary_factor=c.partial_rotary_factor,
                  qk_layernorm=c.qk_layernorm, resid_pdrop=c.resid_pdrop, embd_pdrop=c.embd_pdrop)
    else:
        hf.update(rms_norm_eps=c.norm_eps, pad_token_id=c.pad_token_id)
    if c.model_type == "phi3":
        hf.update(partial_rotary_factor=c.partial_rotary_factor, sliding_window=c.sliding_window,
                  original_max_position_embeddings=c.original_max_position_embeddings or c.max_position_embeddings,
                  resid_pdrop=c.resid_pdrop, embd_pdrop=c.embd_pdrop, rope_scaling=c.rope_scaling)
    if c.model_type == "llama":
        hf.update(head_dim=c.head_dim, attention_bias=c.attn_bias, mlp_bias=c.mlp_bias, rope_scaling=None)
    if c.model_type == "qwen2":
        hf.update(head_dim=c.head_dim, use_sliding_window=False, sliding_window=None, rope_scaling=None)
    hf.update(c.extra)
    return copy.deepcopy(hf)  # callers (transformers among them) may mutate what they get


# ---- presets ------------------------------------------------------------------------------------
def _phi(name: str, **kw: Any) -> ModelConfig:
    base = dict(model_type="phi", vocab_size=51200, num_kv_heads=kw["num_heads"], norm="layernorm",
                parallel_residual=True, gated_mlp=False, hidden_act="gelu_new", attn_bias=True, mlp_bias=True,
                lm_head_bias=True, max_position_embeddings=2048)
    return ModelConfig(name=name, **{**base, **kw})


def _phi3(name: str, **kw: Any) -> ModelConfig:
    base = dict(model_type="phi3", vocab_size=32064, bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
                original_max_position_embeddings=4096, torch_dtype="bfloat16")
    return ModelConfig(name=name, **{**base, **kw})


def _phi3small(name: str, **kw: Any) -> ModelConfig:
    vocab = kw.get("vocab_size", 100352)
    base = dict(model_type="phi3small", vocab_size=vocab, hidden_size=4096, intermediate_size=14336,
                num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6,
                max_position_embeddings=8192, norm="layernorm", norm_eps=1e-5, hidden_act="gegelu",
                gegelu_limit=20.0, attn_bias=True, mlp_bias=True, tie_word_embeddings=True, qkv_grouped=True,
                attn_scale=1.0 / kw.get("head_dim", 128), embedding_multiplier=10.0, logits_divisor=8.0,
                masked_token_ids=phi3small_dummy_ids(vocab), blocksparse_block_size=64, blocksparse_local_blocks=16,
                blocksparse_vert_stride=8, dense_attention_every_n_layers=2, bos_token_id=100257,
                eos_token_id=100257, embd_pdrop=0.1, resid_pdrop=0.1, torch_dtype="bfloat16")
    return ModelConfig(name=name, **{**base, **kw})


def _llama(name: str, **kw: Any) -> ModelConfig:
    return ModelConfig(name=name, **{**dict(model_type="llama", norm_eps=1e-5), **kw})


def _longrope(short: list[float], long: list[float]) -> dict[str, Any]:
    return {"type": "longrope", "short_factor": short, "long_factor": long}


def _presets() -> dict[str, ModelConfig]:
    from phiforge.config.rope_factors import PHI3_MINI_128K, PHI4_MINI, PHI35_MINI

    mini = dict(hidden_size=3072, intermediate_size=8192, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=96)
    medium = dict(hidden_size=5120, intermediate_size=17920, num_layers=40, num_heads=40, num_kv_heads=10,
                  head_dim=128)
    long_ctx = dict(max_position_embeddings=131072, sliding_window=262144)
    tiny = dict(hidden_size=64, intermediate_size=176, num_layers=2, head_dim=16, vocab_size=320, bos_token_id=1,
                eos_token_id=2, pad_token_id=None)
    presets = [
        _phi("phi-1", hidden_size=2048, intermediate_size=8192, num_layers=24, num_heads=32, head_dim=64,
             partial_rotary_factor=0.5),
        _phi("phi-1.5", hidden_size=2048, intermediate_size=8192, num_layers=24, num_heads=32, head_dim=64,
             partial_rotary_factor=0.5, torch_dtype="float16"),
        _phi("phi-2", hidden_size=2560, intermediate_size=10240, num_layers=32, num_heads=32, head_dim=80,
             partial_rotary_factor=0.4, resid_pdrop=0.1, bos_token_id=50256, eos_token_id=50256,
             torch_dtype="float16"),
        _phi3("phi-3-mini-4k", **mini, max_position_embeddings=4096, sliding_window=2047),
        _phi3("phi-3-mini-128k", **mini, **long_ctx, rope_scaling=_longrope(*PHI3_MINI_128K)),
        _phi3("phi-3-medium-4k", **medium, max_position_embeddings=4096, sliding_window=2047),
        _phi3("phi-3.5-mini", **mini, **long_ctx, rope_scaling=_longrope(*PHI35_MINI)),
        # phi-4: eos <|im_end|> and pad <|dummy_85|> as in the current tokenizer_config (first release: 100257)
        _phi3("phi-4", **medium, vocab_size=100352, rope_theta=250000.0, max_position_embeddings=16384,
              original_max_position_embeddings=16384, bos_token_id=100257, eos_token_id=100265,
              pad_token_id=100349),
        _phi3("phi-4-mini", hidden_size=3072, intermediate_size=8192, num_layers=32, num_heads=24, num_kv_heads=8,
              head_dim=128, partial_rotary_factor=0.75, vocab_size=200064, tie_word_embeddings=True, **long_ctx,
              rope_scaling=_longrope(*PHI4_MINI), bos_token_id=199999, eos_token_id=199999,
              pad_token_id=199999),
        _phi3small("phi-3-small-8k"),
        _llama("smollm2-135m", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
               num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, max_position_embeddings=8192,
               tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, torch_dtype="bfloat16",
               initializer_range=0.041666666666666664),
        # tiny-*: the same layouts at test size (random weights; parity tests build these in transformers too)
        _phi("tiny-phi", **{**tiny, "num_heads": 4, "head_dim": 16}, partial_rotary_factor=0.5),
        _phi3("tiny-phi3", **tiny, num_heads=4, num_kv_heads=4, max_position_embeddings=256,
              original_max_position_embeddings=256, sliding_window=47),
        _phi3("tiny-phi3-longrope", **tiny, num_heads=4, num_kv_heads=2, max_position_embeddings=512,
              original_max_position_embeddings=64,
              rope_scaling=_longrope([1.0 + 0.05 * i for i in range(8)], [1.5 + 0.9 * i for i in range(8)])),
        _phi3("tiny-phi4-mini", **tiny, num_heads=4, num_kv_heads=2, partial_rotary_factor=0.75,
              tie_word_embeddings=True, max_position_embeddings=512, original_max_position_embeddings=64,
              rope_scaling=_longrope([1.0] * 6, [1.0 + 2.0 * i for i in range(6)])),
        # block size 4, 2 local blocks, stride 8: many block boundaries and stripes within 100 tokens
        _phi3small("tiny-phi3small", hidden_size=64, intermediate_size=96, num_layers=4, num_heads=8,
                   num_kv_heads=2, head_dim=8, vocab_size=320, masked_token_ids=[3, 7, 300],
                   max_position_embeddings=256, blocksparse_block_size=4, blocksparse_local_blocks=2,
                   blocksparse_vert_stride=8, bos_token_id=1, eos_token_id=2, embd_pdrop=0.0, resid_pdrop=0.0,
                   torch_dtype="float32"),
        _llama("tiny-llama", **tiny, num_heads=4, num_kv_heads=2, tie_word_embeddings=True,
               max_position_embeddings=512),
        _llama("tiny-qwen2", **tiny, model_type="qwen2", num_heads=4, num_kv_heads=2, qkv_bias=True,
               tie_word_embeddings=True, max_position_embeddings=512, norm_eps=1e-6, rope_theta=1000000.0),
    ]
    return {p.name: p for p in presets}


PRESETS: dict[str, ModelConfig] = _presets()


def preset(name: str) -> ModelConfig:
    """A copy of a named preset; unknown names list the known ones."""
    try:
        return dataclasses.replace(PRESETS[name])
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
