"""What a model is and what it costs: architecture, parameters, memory per dtype, KV cache per token; and which
inference route each of its layers takes once the engine has installed its fast paths (``--paths``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from phiforge.config.model import PRESETS, ModelConfig
from phiforge.errors import ConfigError
from phiforge.model.transformer import build_model

GB = 1e9


def resolve_config(ref: str | Path) -> tuple[ModelConfig, str]:
    """The config behind a preset name, a model folder, a .gguf file or an embedded alias, and its kind."""
    text = str(ref)
    if text in PRESETS:
        return PRESETS[text].replace(), "preset"
    path = Path(text)
    if path.is_dir():
        return ModelConfig.from_file(path / "config.json"), f"folder {path}"
    from phiforge.io.gguf_read import read_gguf_config, resolve_model_alias

    gguf = path if text.endswith(".gguf") else resolve_model_alias(text)
    if gguf is None:
        raise ConfigError(f"{text!r} is not a preset ({', '.join(PRESETS)}), a model folder, a .gguf file "
                         "or an embedded alias")
    return ModelConfig.from_hf_config(read_gguf_config(gguf), name=text), f"GGUF {gguf}"


def _linear_weight_count(model: torch.nn.Module) -> int:
    """Elements in the transformer blocks' matrices: what weight-only quantization shrinks."""
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith("blocks.") and p.dim() == 2)


def describe(config: ModelConfig) -> dict[str, Any]:
    """Every figure ``phiforge info`` prints, computed on the meta device (nothing allocated)."""
    model = build_model(config, device="meta")
    params = model.num_parameters()
    linear = _linear_weight_count(model)
    rest = params - linear
    memory = {name: params * torch.finfo(dt).bits // 8 for name, dt in
              (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16))}
    # weight-only quantization keeps embeddings/norms in bf16; int8 adds a bf16 scale per row,
    # int4 a bf16 scale and zero per group of 128 (the packing quantize writes)
    rows = sum(p.shape[0] for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2)
    memory["int8 (block weights)"] = linear + 2 * rows + 2 * rest
    memory["int4 (block weights, group 128)"] = linear // 2 + 4 * (linear // 128) + 2 * rest
    kv = {name: config.kv_cache_bytes_per_token(dt) for name, dt in (("bfloat16", torch.bfloat16),
                                                                      ("float32", torch.float32))}
    attended = min(config.max_position_embeddings, config.sliding_window or config.max_position_embeddings)
    return {
        "name": config.name, "model_type": config.model_type, "parameters": params,
        "layers": config.num_layers, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "heads": config.num_heads, "kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "rotary_dim": config.rotary_dim, "rope_theta": config.rope_theta,
        "rope_scaling": (config.rope_scaling or {}).get("type"), "vocab_size": config.vocab_size,
        "tied_embeddings": config.tie_word_embeddings, "context": config.max_position_embeddings,
        "original_context": config.original_max_position_embeddings, "sliding_window": config.sliding_window,
        "block": "parallel attention+MLP" if config.parallel_residual else "sequential pre-norm",
        "norm": config.norm, "mlp": ("gated " if config.gated_mlp else "") + config.hidden_act,
        "memory_bytes": memory, "kv_cache_bytes_per_token": kv,
        # the cache phiforge allocates (Phi-3-small's sparse layers keep fewer keys than kv_cache_bytes_per_token)
        "kv_cache_bytes_full_context_bf16": model.new_cache(1, attended, torch.bfloat16).nbytes(),
    }


def _size(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def format_info(info: dict[str, Any], source: str) -> str:
    opt = lambda v: "-" if v in (None, False) else v  # noqa: E731
    lines = [
        ("model", f"{info['name']} ({source})"),
        ("family", f"{info['model_type']}: {info['block']}, {info['norm']}, MLP {info['mlp']}"),
        ("shape", f"{info['layers']} layers x hidden {info['hidden_size']}, MLP {info['intermediate_size']}"),
        ("attention", f"{info['heads']} heads x {info['head_dim']}, {info['kv_heads']} KV heads, "
                      f"rotary {info['rotary_dim']}/{info['head_dim']}, theta {info['rope_theta']:g}"),
        ("context", f"{info['context']} (original {opt(info['original_context'])}, rope scaling "
                    f"{opt(info['rope_scaling'])}, sliding window {opt(info['sliding_window'])})"),
        ("vocab", f"{info['vocab_size']} (tied embeddings: {'yes' if info['tied_embeddings'] else 'no'})"),
        ("parameters", f"{info['parameters']:,} ({info['parameters'] / 1e9:.3f} B)"),
    ]
    lines += [(f"memory {k}", _size(v)) for k, v in info["memory_bytes"].items()]
    lines += [(f"KV cache/token {k}", f"{v:,} B") for k, v in info["kv_cache_bytes_per_token"].items()]
    lines.append(("KV cache full ctx", f"{_size(info['kv_cache_bytes_full_context_bf16'])} (bf16)"))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def engine_paths(ref: str, dtype: str | None = None, quantize: int | None = None,
                 group_size: int = 32) -> dict[str, Any]:
    """fast_paths.paths of the model behind ``ref`` on the CPU, as an Engine would run it: a preset gets random
    weights (bf16 unless ``dtype``), a folder or GGUF its own; ``quantize`` (4 or 8) as ``--quantize`` does."""
    from phiforge.inference import fast_paths
    from phiforge.io.load import load_pretrained
    from phiforge.quant.quantize import quantize_model

    if ref in PRESETS:
        model = build_model(PRESETS[ref].replace(), dtype=getattr(torch, dtype or "bfloat16"))
    else:
        resolve_config(ref)  # a clear error for what is neither preset, folder, GGUF nor alias
        model = load_pretrained(ref, dtype=dtype, device="cpu", with_tokenizer=False)[0]
    if quantize:
        quantize_model(model, bits=quantize, group_size=group_size, keep_stored=False)
    fast_paths.install(model.eval())
    return fast_paths.paths(model)
