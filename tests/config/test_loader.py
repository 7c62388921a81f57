"""The one config loader and the one sampling-settings type, as every stage reads them."""

from __future__ import annotations

from pathlib import Path

import pytest

from phiforge.config.loader import load_config
from phiforge.data.synth.pipeline import SynthConfig
from phiforge.data.synth.topics import TopicsConfig
from phiforge.errors import ConfigError
from phiforge.inference import engine
from phiforge.inference.sampling import TEACHER_KEYS, SamplingParams
from phiforge.train.config import TrainConfig, TrainConfigError
from phiforge.train.pts import PTSConfig


def test_unknown_keys_are_all_listed_with_the_file(tmp_path: Path) -> None:
    file = tmp_path / "synth.toml"
    file.write_text("[run]\nnum_documents = 4\nnum_docs = 3\nseeed = 1\n[sampling]\nmin_p = 0.1\n"
                    "[teachr]\nkind = 'x'\n")
    with pytest.raises(ConfigError) as err:
        SynthConfig.from_toml(file)
    message = str(err.value)
    assert message.startswith(f"{file}: ")
    for key in ("'run.num_docs', 'run.seeed' in [run]", "'sampling.min_p' in [sampling]", "'teachr' in [config]"):
        assert key in message, message
    assert "valid keys: max_new_tokens, temperature, top_p, top_k, repetition_penalty" in message  # this stage's
    with pytest.raises(TrainConfigError, match=r"train\.toml: unknown key 'optim\.lrr' in \[optim\]"):
        (tmp_path / "train.toml").write_text("[optim]\nlrr = 1\n")
        load_config(TrainConfig, tmp_path / "train.toml", error=TrainConfigError)


def test_every_stage_reads_sampling_into_the_one_type(tmp_path: Path) -> None:
    assert engine.SamplingParams is SamplingParams  # the engine's API name is the same type
    synth = SynthConfig.from_dict({"sampling": {"temperature": 0.3}})
    assert isinstance(synth.sampling, SamplingParams)
    # a section keeps the stage's defaults for what it leaves out
    assert (synth.sampling.temperature, synth.sampling.top_p, synth.sampling.top_k) == (0.3, 0.95, 50)
    # what a resumed run compares: only the keys the stage accepts, as before the fold
    assert SynthConfig().to_dict()["sampling"] == {"max_new_tokens": 256, "temperature": 0.7, "top_p": 0.95,
                                                   "top_k": 50, "repetition_penalty": 1.0}
    assert set(TopicsConfig().to_dict()["sampling"]) == set(TEACHER_KEYS)
    assert TopicsConfig().sampling.replace(seed=3).repetition_penalty == 1.1
    pts = load_config(PTSConfig, _pts_recipe(tmp_path), ['sampling.stop_strings=["\\n\\n"]', "sampling.top_k=5"])
    assert isinstance(pts.sampling, SamplingParams)
    assert pts.sampling.stop_strings == ("\n\n",) and pts.sampling.top_k == 5 and pts.sampling.temperature == 0.6
    # the type's own range checks, named by section
    with pytest.raises(ConfigError, match=r"sampling\.top_p must be in \(0, 1\], got 2"):
        SynthConfig.from_dict({}, ["sampling.top_p=2"])


def _pts_recipe(tmp_path: Path) -> Path:
    file = tmp_path / "pts.toml"
    file.write_text(f"[model]\npath = '{tmp_path}'\n[data]\npath = '{tmp_path}/q.jsonl'\n"
                    f"[run]\nout_dir = '{tmp_path}/o'\n")
    return file
