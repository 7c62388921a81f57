"""Write a phiforge model and its tokenizer as a GGUF file that llama.cpp (and Ollama) run.

The inverse of ``gguf_read``: Hugging Face tensors are renamed to llama.cpp's tensor names (taken from the
``gguf`` package's own tables), laid out the way llama.cpp's converter lays them out, optionally quantized
(F16, Q8_0, Q4_0 with gguf-py's reference quantizer), and the tokenizer plus its chat template go into
the metadata. ``gguf_read.load_gguf`` reads every file this module writes; the tests round-trip through it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import MODEL_TENSOR as T
from gguf import GGMLQuantizationType as QType

from phiforge.config.model import ModelConfig
from phiforge.errors import FormatError
from phiforge.io.atomic import atomic_write
from phiforge.io.checkpoint import hf_state_dict
from phiforge.io.gguf_read import CANONICAL_PRES, IGNORE_MERGES_PRES, pre_tokenizer_kind
from phiforge.model.transformer import PhiForgeModel
from phiforge.tokenizers.tokenizer import TURN_END_TOKENS, Tokenizer

QUANTS: dict[str, tuple[QType, gguf.LlamaFileType]] = {
    "f32": (QType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (QType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (QType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
_ARCH = {"llama": "llama", "phi": "phi2", "phi3": "phi3"}  # HF model_type -> llama.cpp architecture

# HF module inside model.layers.N -> llama.cpp tensor, per family (llama.cpp's convert_hf_to_gguf layout)
_BLOCK: dict[str, dict[str, T]] = {
    "llama": {"input_layernorm": T.ATTN_NORM, "self_attn.q_proj": T.ATTN_Q, "self_attn.k_proj": T.ATTN_K,
              "self_attn.v_proj": T.ATTN_V, "self_attn.o_proj": T.ATTN_OUT, "post_attention_layernorm": T.FFN_NORM,
              "mlp.gate_proj": T.FFN_GATE, "mlp.up_proj": T.FFN_UP, "mlp.down_proj": T.FFN_DOWN},
    "phi3": {"input_layernorm": T.ATTN_NORM, "self_attn.qkv_proj": T.ATTN_QKV, "self_attn.o_proj": T.ATTN_OUT,
             "post_attention_layernorm": T.FFN_NORM, "mlp.gate_up_proj": T.FFN_UP, "mlp.down_proj": T.FFN_DOWN},
    "phi": {"input_layernorm": T.ATTN_NORM, "self_attn.q_proj": T.ATTN_Q, "self_attn.k_proj": T.ATTN_K,
            "self_attn.v_proj": T.ATTN_V, "self_attn.dense": T.ATTN_OUT, "mlp.fc1": T.FFN_UP, "mlp.fc2": T.FFN_DOWN},
}
_TOP = {"model.embed_tokens": T.TOKEN_EMBD, "model.norm": T.OUTPUT_NORM, "model.final_layernorm": T.OUTPUT_NORM,
        "lm_head": T.OUTPUT}


class GGUFExportError(FormatError):
    """A model or tokenizer that this exporter cannot write; the message says what is unsupported."""


def export_gguf(model: PhiForgeModel, tokenizer: Tokenizer, path: str | Path, *, quant: str = "f16",
                name: str | None = None) -> dict[str, Any]:
    """Write ``model`` + ``tokenizer`` to ``path`` (atomically); returns a summary (tensors, types, bytes)."""
    if quant not in QUANTS:
        raise GGUFExportError(f"quant {quant!r} is not supported (choose one of {', '.join(QUANTS)})")
    if getattr(model, "quantization", None):
        raise GGUFExportError("the model holds phiforge int8/int4 weights; export the float checkpoint instead")
    config = model.config
    _check_supported(config)
    arch = _ARCH[config.model_type]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    qtype, file_type = QUANTS[quant]
    counts: dict[str, int] = {}

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(_llama_cpp_name(name or config.name or path.stem, tokenizer))
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hparams(writer, config, arch)
        _add_tokenizer(writer, tokenizer, config)
        for gguf_name, tensor in _tensors(model):
            stored = _add_tensor(writer, gguf_name, tensor, qtype)
            counts[stored] = counts.get(stored, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(path, write)
    summary = {"output": str(path), "architecture": arch, "quant": quant, "tensor_types": counts,
               "bytes": path.stat().st_size}
    if arch == "phi3" and config.sliding_window and config.sliding_window < config.max_position_embeddings:
        summary["note"] = (f"llama.cpp runs phi3 without its {config.sliding_window}-token sliding window: "
                           f"its outputs differ from phiforge's beyond {config.sliding_window} tokens")
    return summary


def _llama_cpp_name(name: str, tok: Tokenizer) -> str:
    """general.name, unless llama.cpp would take it for Phi-3's own vocabulary: for a name containing "phi-3" or
    "phi3" it right-strips the text after every special token and looks up "</s>" (a vocabulary without it fails
    to load). Other vocabularies get the name with a space instead ("tiny phi 3")."""
    lowered = name.lower()
    if "phi-3" not in lowered and "phi3" not in lowered:
        return name
    added = tok.backend.get_added_tokens_decoder().values()
    phi3_vocab = tok.token_to_id("</s>") is not None and all(
        t.rstrip for t in added if t.special and t.content not in ("<unk>", "<s>", "<|endoftext|>", "</s>"))
    return name if phi3_vocab else re.sub(r"(?i)phi-?3", lambda m: m.group(0)[:3] + " 3", name)


def _check_supported(c: ModelConfig) -> None:
    if c.model_type not in _ARCH:
        raise GGUFExportError(f"model_type {c.model_type!r} has no GGUF export (supported: {', '.join(_ARCH)})")
    if c.qk_layernorm:
        raise GGUFExportError("phi with qk_layernorm has no llama.cpp phi2 layout")
    if c.model_type == "llama" and c.rope_scaling:
        raise GGUFExportError(f"llama rope_scaling {c.rope_scaling} is not supported by the GGUF export")
    if c.model_type == "phi3" and c.rope_scaling and not c.longrope:
        raise GGUFExportError(f"phi3 rope_scaling {c.rope_scaling} is not supported (only longrope)")


# ---- metadata -------------------------------------------------------------------------------------------------


def _add_hparams(w: gguf.GGUFWriter, c: ModelConfig, arch: str) -> None:
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_layers)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_vocab_size(c.vocab_size)
    if c.head_dim != c.hidden_size // c.num_heads:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.rotary_dim)
    w.add_rope_freq_base(c.rope_theta)
    if c.norm == "layernorm":
        w.add_layer_norm_eps(c.norm_eps)
    else:
        w.add_layer_norm_rms_eps(c.norm_eps)
    if arch == "phi3":
        w.add_sliding_window(c.sliding_window or 0)  # llama.cpp's converter writes 0 for "none"
        w.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings or c.max_position_embeddings)
        if c.longrope:
            w.add_rope_scaling_attn_factors(c.rope_attention_factor)


def _add_tokenizer(w: gguf.GGUFWriter, tok: Tokenizer, c: ModelConfig) -> None:
    spec = json.loads(tok.backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFExportError(f"tokenizer model {model.get('type')!r} has no GGUF export (expected BPE)")
    size = tok.vocab_size
    if size > c.vocab_size:
        raise GGUFExportError(f"the tokenizer has {size} tokens but the model's embedding only {c.vocab_size} rows")
    tokens = [tok.id_to_token(i) for i in range(size)]
    if any(t is None for t in tokens):
        raise GGUFExportError("the tokenizer's ids are not contiguous; GGUF needs one token per id")
    added = {i: a.special for i, a in tok.backend.get_added_tokens_decoder().items()}
    byte_fallback = bool(model.get("byte_fallback"))
    types = []
    for i, t in enumerate(tokens):
        if i == tok.unk_token_id:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i] else gguf.TokenType.USER_DEFINED)
        elif byte_fallback and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    # llama.cpp wants one token per embedding row: pad as its converter does
    tokens += [f"[PAD{i}]" for i in range(size, c.vocab_size)]
    types += [gguf.TokenType.UNUSED] * (c.vocab_size - size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if byte_fallback:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_scores([-float(i) for i in range(len(tokens))])
        w.add_add_space_prefix(_sentencepiece_prefix(spec))
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(byte_level_pre(spec, tok.gguf_pre))
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges(merges)
    for key, token_id in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("unk", tok.unk_token_id),
                          ("pad", tok.pad_token_id), ("eot", _end_of_turn_id(tok))):
        if token_id is not None:
            getattr(w, f"add_{key}_token_id")(token_id)
    w.add_add_bos_token(tok.add_bos_token)
    w.add_add_eos_token(tok.add_eos_token)
    if tok.chat_template:
        w.add_chat_template([{"name": "default", "template": tok.chat_template},
                             *({"name": n, "template": t} for n, t in tok.chat_templates.items())])


def _end_of_turn_id(tok: Tokenizer) -> int | None:
    """The token the chat template ends a turn with (llama.cpp stops on tokenizer.ggml.eot_token_id)."""
    for token in TURN_END_TOKENS:
        if token in (tok.chat_template or "") and tok.token_to_id(token) is not None:
            return tok.token_to_id(token)
    return None


def byte_level_pre(spec: dict[str, Any], source: str | None = None) -> str:
    """llama.cpp's tokenizer.ggml.pre name for a byte-level tokenizer.json's split: ``source`` (the name the
    tokenizer was read with) when it stands for the same split, else the usual name of that split."""
    key = (_byte_level_kind(spec), bool(spec.get("model", {}).get("ignore_merges")))
    if source is not None and (pre_tokenizer_kind(source), source in IGNORE_MERGES_PRES) == key:
        return source
    if key not in CANONICAL_PRES:
        raise GGUFExportError(f"llama.cpp has no pre-tokenizer for this split with ignore_merges={key[1]}")
    return CANONICAL_PRES[key]


def _byte_level_kind(spec: dict[str, Any]) -> str:
    pre = spec.get("pre_tokenizer") or {}
    if spec.get("normalizer"):
        raise GGUFExportError("a byte-level tokenizer with a normalizer has no llama.cpp equivalent")

    def gpt2(step: dict[str, Any]) -> bool:
        return step.get("type") == "ByteLevel" and step.get("use_regex", True) and not step.get("add_prefix_space")

    if gpt2(pre):
        return "gpt2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") and gpt2(steps[1]):
        return "digits"
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
        regex = steps[0].get("pattern", {}).get("Regex")
        if regex in {kind for kind, _ in CANONICAL_PRES}:
            return regex
    raise GGUFExportError(f"byte-level pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp pre-tokenizer name")


def _sentencepiece_prefix(spec: dict[str, Any]) -> bool:
    pre, norm = spec.get("pre_tokenizer") or {}, spec.get("normalizer") or {}
    if pre.get("type") == "Metaspace":
        return pre.get("prepend_scheme", "always") != "never"
    return "Prepend" in json.dumps(norm)


# ---- tensors --------------------------------------------------------------------------------------------------


def _tensors(model: PhiForgeModel) -> list[tuple[str, torch.Tensor]]:
    """(llama.cpp name, float32 tensor in HF orientation) for every weight, plus phi3's rope factor tensors."""
    c = model.config
    out = []
    for key, tensor in hf_state_dict(model).items():
        stem, _, leaf = key.rpartition(".")
        if stem.startswith("model.layers."):
            _, _, layer, module = stem.split(".", 3)
            kind = _BLOCK[c.model_type].get(module)
            name = gguf.TENSOR_NAMES[kind].format(bid=int(layer)) if kind is not None else None
        else:
            module, name = "", gguf.TENSOR_NAMES[_TOP[stem]] if stem in _TOP else None
        if name is None:
            raise GGUFExportError(f"tensor {key!r} has no llama.cpp name for {c.model_type}")
        tensor = tensor.detach().to("cpu", torch.float32)
        if c.model_type == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = c.num_heads if module.endswith("q_proj") else c.num_kv_heads
            tensor = _permute(tensor, heads)
        out.append((f"{name}.{leaf}", tensor))
    if c.longrope:
        for kind, key in ((T.ROPE_FACTORS_SHORT, "short_factor"), (T.ROPE_FACTORS_LONG, "long_factor")):
            out.append((f"{gguf.TENSOR_NAMES[kind]}.weight", torch.tensor(c.rope_scaling[key], dtype=torch.float32)))
    return out


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp interleaves each head's rotary halves: rows go from (2, pair) to (pair, 2) order."""
    per_head = w.shape[0] // heads
    return w.reshape(heads, 2, per_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _add_tensor(w: gguf.GGUFWriter, name: str, tensor: torch.Tensor, qtype: QType) -> str:
    """Store one tensor; vectors stay F32 (as llama.cpp keeps them) and rows that are not whole blocks F16."""
    data = tensor.numpy()
    if data.ndim == 1 or qtype == QType.F32:
        w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
        return "F32"
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if qtype == QType.F16 or data.shape[-1] % block:
        w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float16))
        return "F16"
    w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(data), qtype), raw_dtype=qtype)
    return qtype.name

