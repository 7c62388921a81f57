"""Logit parity with transformers for every family, in both directions (fp32, max |diff| <= 1e-4)."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import randomize_

from phiforge.config.model import preset
from phiforge.io.checkpoint import load_hf_folder, save_hf_folder
from phiforge.model.transformer import build_model

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            bos_token_id=1, eos_token_id=2, pad_token_id=None)


def _longrope(n: int) -> dict:
    return {"type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(n)],
            "long_factor": [1.5 + 0.9 * i for i in range(n)]}


# name -> (transformers class, config kwargs, sequence lengths to test)
REFERENCES = {
    "phi": ("PhiForCausalLM", "PhiConfig", dict(TINY, partial_rotary_factor=0.5, max_position_embeddings=256),
            [70]),
    "phi-qk-layernorm": ("PhiForCausalLM", "PhiConfig",
                         dict(TINY, partial_rotary_factor=0.4, qk_layernorm=True, max_position_embeddings=256), [33]),
    "phi3-sliding-window": ("Phi3ForCausalLM", "Phi3Config",
                            dict(TINY, num_key_value_heads=4, max_position_embeddings=256,
                                 original_max_position_embeddings=256, sliding_window=47), [96, 20]),
    "phi3-longrope-gqa": ("Phi3ForCausalLM", "Phi3Config",
                          dict(TINY, num_key_value_heads=2, max_position_embeddings=512,
                               original_max_position_embeddings=64, rope_scaling=_longrope(8)), [100, 40]),
    "phi4-mini-like": ("Phi3ForCausalLM", "Phi3Config",
                       dict(TINY, num_key_value_heads=2, max_position_embeddings=512, partial_rotary_factor=0.75,
                            original_max_position_embeddings=64, rope_scaling=_longrope(6),
                            tie_word_embeddings=True, sliding_window=300), [90, 30]),
    "llama-tied-gqa": ("LlamaForCausalLM", "LlamaConfig",
                       dict(TINY, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                            rope_theta=100000.0), [80]),
    # Qwen2/Qwen2.5: the Llama layout with q/k/v biases (o_proj without), GQA, tied head as in the small ones
    "qwen2-tied-gqa": ("Qwen2ForCausalLM", "Qwen2Config",
                       dict(TINY, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                            rope_theta=1000000.0, rms_norm_eps=1e-6), [80]),
}


def _hf_model(name: str) -> torch.nn.Module:
    model_cls, config_cls, kwargs, _ = REFERENCES[name]
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return randomize_(getattr(transformers, model_cls)(config), seed=1).eval()


def _tokens(length: int, batch: int = 2, vocab: int = 320, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed + length))


@pytest.mark.parametrize("name", list(REFERENCES))
def test_transformers_checkpoint_loads_with_same_logits(name: str, tmp_path) -> None:
    hf = _hf_model(name)
    hf.save_pretrained(tmp_path)
    ours = load_hf_folder(tmp_path, dtype=torch.float32)
    for length in REFERENCES[name][3]:
        ids = _tokens(length)
        with torch.no_grad():
            want = hf(ids).logits
            got = ours(ids)
        assert want.std() > 0.3, "reference logits too flat to make the comparison meaningful"
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_phiforge_checkpoint_loads_in_transformers_with_same_logits(name: str, tmp_path) -> None:
    from phiforge.config.model import ModelConfig

    config = ModelConfig.from_hf_config(_hf_model(name).config.to_dict())
    ours = randomize_(build_model(config), seed=2).eval()
    save_hf_folder(ours, tmp_path, max_shard_bytes=40_000)  # small shards: exercise the index too
    assert (tmp_path / "model.safetensors.index.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    assert type(hf).__name__ == REFERENCES[name][0]
    for length in REFERENCES[name][3]:
        ids = _tokens(length, seed=7)
        with torch.no_grad():
            torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_sliding_window_changes_logits_only_beyond_the_window() -> None:
    config = preset("tiny-phi3")  # window 47
    model = randomize_(build_model(config)).eval()
    unwindowed = randomize_(build_model(config.replace(sliding_window=None))).eval()
    ids = _tokens(80, batch=1)
    with torch.no_grad():
        a, b = model(ids), unwindowed(ids)
    torch.testing.assert_close(a[:, :47], b[:, :47])
    assert (a[:, 47:] - b[:, 47:]).abs().max() > 1e-3


def test_kv_cache_matches_full_forward() -> None:
    for name in ("tiny-phi", "tiny-phi3", "tiny-phi4-mini", "tiny-llama"):
        model = randomize_(build_model(preset(name))).eval()
        ids = _tokens(40, batch=2)
        cache = model.new_cache(batch_size=2, capacity=64)
        with torch.no_grad():
            full = model(ids)
            steps = [model(ids[:, :25], cache=cache)]
            steps += [model(ids[:, t : t + 1], torch.tensor([t]), cache=cache) for t in range(25, 40)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


def test_cache_rows_at_different_positions_match_separate_runs() -> None:
    """Continuous batching: rows decode at their own positions, and a row can be refilled alone."""
    model = randomize_(build_model(preset("tiny-phi3-longrope"))).eval()  # original context 64
    a, b = _tokens(70, batch=1, seed=1), _tokens(30, batch=1, seed=2)
    cache = model.new_cache(batch_size=2, capacity=80)
    with torch.no_grad():
        model(a[:, :69], cache=cache, cache_rows=slice(0, 1))
        model(b[:, :29], cache=cache, cache_rows=slice(1, 2))
        step = torch.cat([a[:, 69:], b[:, 29:]])
        both = model(step, torch.tensor([[69], [29]]), cache=cache)[:, -1]
        alone_a, alone_b = model(a)[:, -1], model(b)[:, -1]
    torch.testing.assert_close(both, torch.cat([alone_a, alone_b]), atol=1e-4, rtol=0)


def test_fp16_phi_attention_scores_in_fp32() -> None:
    """phi-2 overflows QK^T in fp16; phiforge upcasts, so large activations stay finite."""
    config = preset("tiny-phi")
    model = randomize_(build_model(config)).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(60.0)  # scores far beyond fp16's 65504
        want = model(_tokens(16, batch=1))
        half = model.to(torch.float16)(_tokens(16, batch=1))
    assert torch.isfinite(half).all()
    assert torch.isfinite(want).all()
