"""A random 2-layer Llama with the teacher's tokenizer, saved by transformers as a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from phiforge.io.gguf_read import read_gguf_tokenizer


def save_tiny_llama(folder: Path, teacher_gguf: Path) -> Path:
    tokenizer = read_gguf_tokenizer(teacher_gguf)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1,
                                      eos_token_id=2, rms_norm_eps=1e-5, initializer_range=0.1)
    torch.manual_seed(0)  # wide init: confident, varied predictions (a 0.02 init is nearly uniform)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save(folder)
    return folder
