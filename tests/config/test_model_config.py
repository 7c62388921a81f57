"""Presets and config.json round trips, checked against transformers building the same configs."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from phiforge.config.model import PRESETS, ConfigError, ModelConfig, preset
from phiforge.model.transformer import build_model

# Published totals (the figures) pin two presets independently of transformers.
PUBLISHED = {"phi-1.5": 1_418_270_720, "phi-4": 14_659_507_200}
# Phi-3-small exists only as remote code, not in transformers: tests/model/test_phi3_small.py covers it
IN_TRANSFORMERS = [name for name, config in PRESETS.items() if config.model_type != "phi3small"]


def _hf_config(config: ModelConfig) -> transformers.PretrainedConfig:
    hf = config.to_hf_config()
    return transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)


@pytest.mark.parametrize("name", IN_TRANSFORMERS)
def test_parameter_count_equals_transformers_on_meta(name: str) -> None:
    config = preset(name)
    ours = build_model(config, device="meta").num_parameters()
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(_hf_config(config))
    assert ours == sum(p.numel() for p in reference.parameters())
    if name in PUBLISHED:
        assert ours == PUBLISHED[name]


@pytest.mark.parametrize("name", IN_TRANSFORMERS)
def test_hf_config_round_trip_through_transformers(name: str) -> None:
    config = preset(name)
    # transformers 5 rewrites rope fields into rope_parameters: reading that back covers both formats
    back = ModelConfig.from_hf_config(_hf_config(config).to_dict(), name=name)
    assert back == config
    assert ModelConfig.from_hf_config(json.loads(json.dumps(config.to_hf_config())), name=name) == config


def test_legacy_su_rope_scaling_reads_as_longrope() -> None:
    hf = preset("phi-3-mini-128k").to_hf_config()
    hf["rope_scaling"] = {**hf["rope_scaling"], "type": "su"}
    assert ModelConfig.from_hf_config(hf).longrope


def test_longrope_attention_factor_matches_the_formula() -> None:
    # sqrt(1 + ln(32)/ln(4096)) = sqrt(17/12)
    assert preset("phi-3.5-mini").rope_attention_factor == pytest.approx((17 / 12) ** 0.5)
    assert preset("phi-4").rope_attention_factor == 1.0


@pytest.mark.parametrize(("change", "message"), [
    ({"model_type": "gpt_neox"}, "model_type 'gpt_neox' is not supported"),
    ({"num_key_value_heads": 5}, "not a multiple of num_kv_heads"),
    ({"rope_scaling": {"type": "dynamic", "factor": 4.0}}, "rope_scaling type 'dynamic' is not supported"),
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}}, "rotary_dim/2 = 48"),
])
def test_bad_config_names_the_field(change: dict, message: str) -> None:
    hf = {**preset("phi-3-mini-4k").to_hf_config(), **change}
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_config(hf)


def test_missing_key_and_unknown_preset() -> None:
    hf = preset("phi-2").to_hf_config()
    del hf["hidden_size"]
    with pytest.raises(ConfigError, match="lacks the required key 'hidden_size'"):
        ModelConfig.from_hf_config(hf)
    with pytest.raises(ConfigError, match="unknown preset 'phi-9'; known presets: phi-1, "):
        preset("phi-9")
