"""SamplingParams: its checks, and the command-line flags generated from it."""

from __future__ import annotations

import dataclasses

import pytest

from phiforge.cli import _parser
from phiforge.errors import ConfigError
from phiforge.inference.sampling import CLI_KEYS, SamplingParams, sampling_from_args


def test_generate_and_chat_flags_are_the_dataclass_fields_with_its_defaults() -> None:
    defaults = SamplingParams()
    for command, max_new in (("generate", 128), ("chat", 512)):
        args = _parser().parse_args([command, "-m", "x", *(["-p", "hi"] if command == "generate" else [])])
        assert sampling_from_args(args) == defaults.replace(max_new_tokens=max_new)
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(CLI_KEYS) <= names


def test_flags_parse_to_typed_values_and_bad_ones_name_the_field() -> None:
    args = _parser().parse_args(["generate", "-m", "x", "-p", "hi", "--top-k", "5", "--temperature", "0.7",
                                 "--seed", "3", "--min-p", "0.05"])
    params = sampling_from_args(args, stop_strings=("\n",))
    assert (params.top_k, params.temperature, params.seed, params.min_p, params.stop_strings) == (5, 0.7, 3, 0.05,
                                                                                                 ("\n",))
    bad = _parser().parse_args(["generate", "-m", "x", "-p", "hi", "--top-p", "0"])
    with pytest.raises(ConfigError, match=r"top_p must be in \(0, 1\], got 0.0"):
        sampling_from_args(bad)
