"""One public load: a model (and its tokenizer) from any reference phiforge reads.

A Hugging Face folder (safetensors, sharded or not; a quantized folder), a ``.gguf`` file, or an embedded alias
(e.g. ``smollm2-135m-instruct``). The format readers (``checkpoint``, ``gguf_read``, ``quant.quantize``) sit below this
module and never import it, so the format layer has no import cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from phiforge.io.checkpoint import CheckpointError, is_quantized_folder, load_hf_folder, resolve_dtype
from phiforge.io.gguf_read import load_gguf, resolve_model_alias
from phiforge.model.transformer import PhiForgeModel
from phiforge.quant.quantize import load_quantized


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(ref: str | Path, *, dtype: torch.dtype | str | None = None,
               device: str | torch.device | None = None, check_finite_values: bool = False) -> PhiForgeModel:
    """A model from a Hugging Face folder, a .gguf file, or an embedded alias (e.g. smollm2-135m-instruct)."""
    return load_pretrained(ref, dtype=dtype, device=device, with_tokenizer=False,
                           check_finite_values=check_finite_values)[0]


def load_pretrained(ref: str | Path, *, dtype: torch.dtype | str | None = None,
                    device: str | torch.device | None = None, with_tokenizer: bool = True,
                    check_finite_values: bool = False) -> tuple[PhiForgeModel, Any]:
    """(model, tokenizer or None) from a folder, a .gguf file or an alias; the tokenizer when the source has one."""
    device = device or default_device()
    gguf_path = _gguf_path(ref)
    if gguf_path is not None:
        if dtype is None:
            dtype = torch.float32
        model, tokenizer = load_gguf(gguf_path, dtype=resolve_dtype(dtype, None), device=device)
        return model, tokenizer if with_tokenizer else None
    folder = Path(ref)
    if folder.is_dir() and (folder / "config.json").is_file() and is_quantized_folder(folder):
        model = load_quantized(folder, dtype=dtype, device=device)
    else:
        model = load_hf_folder(ref, dtype=dtype, device=device, check_finite_values=check_finite_values)
    tokenizer = None
    if with_tokenizer and (Path(ref) / "tokenizer.json").exists():
        from phiforge.tokenizers.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_folder(ref)
    elif with_tokenizer and (Path(ref) / "cl100k_base.tiktoken").exists():  # Phi-3-small
        from phiforge.tokenizers.cl100k import TiktokenTokenizer

        tokenizer = TiktokenTokenizer.from_folder(ref)
    return model, tokenizer


def _gguf_path(ref: str | Path) -> Path | None:
    if str(ref).endswith(".gguf"):
        return Path(ref)
    if Path(ref).exists():
        return None
    found = resolve_model_alias(str(ref))
    if found is None:
        raise CheckpointError(f"{ref}: no such model folder, .gguf file or embedded alias")
    return found
