"""The one sampling-settings type: what the engine, the synth teachers, PTS, serve and eval ask a model for.

Config sections use it too (``[sampling]`` in synth, topics and PTS configs) through :func:`sampling_section`,
which gives the stage its defaults and the keys its TOML may set, so every stage reads the same names and
gets the same range checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from phiforge.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    logprobs: int | None = None  # record each chosen token's log-probability and the top-k alternatives

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens > 0, f"max_new_tokens must be > 0, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.logprobs is None or self.logprobs >= 0, f"logprobs must be >= 0, got {self.logprobs}"),
            (self.seed is None or -(2**63) <= self.seed < 2**64, f"seed must be a 64-bit integer, got {self.seed}"),
            (all(math.isfinite(x) for x in (self.temperature, self.top_p, self.min_p, self.repetition_penalty)),
             "temperature, top_p, min_p and repetition_penalty must be finite"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def replace(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)

    def pick(self, keys: tuple[str, ...]) -> dict[str, Any]:
        """The named settings as a plain dict (what a config section or a cache key records)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(self, k)) for k in keys)}


# the settings a synth teacher honours (sent to HTTP endpoints, given to the local engine) and its defaults
TEACHER_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty")
TEACHER_SAMPLING = SamplingParams(temperature=0.7, top_p=0.95, top_k=50)


def sampling_section(keys: tuple[str, ...] = TEACHER_KEYS, **defaults: Any) -> Any:
    """A dataclass field holding a config's ``[sampling]`` section: ``keys`` are the ones its TOML may set (the
    config loader rejects others), ``defaults`` the stage's values for those it leaves out."""
    return field(default_factory=lambda: SamplingParams(**defaults), metadata={"config_keys": keys})


# the settings a command line sets (stops and logprobs come from the prompt format and the API, not flags)
CLI_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
_CLI_HELP = {"temperature": "0 = greedy", "top_k": "0 = off", "seed": "default: a fresh seed per run"}


def add_sampling_arguments(parser: argparse.ArgumentParser, keys: tuple[str, ...] = CLI_KEYS,
                           **defaults: Any) -> None:
    """``--max-new-tokens``, ``--temperature``, ... generated from SamplingParams: one name, type and default
    (``defaults`` overrides a command's own) for every command that samples."""
    base = SamplingParams(**defaults)
    kinds = {f.name: f.type for f in dataclasses.fields(SamplingParams)}
    for key in keys:
        kind = int if kinds[key].startswith("int") else float
        parser.add_argument(f"--{key.replace('_', '-')}", type=kind, default=getattr(base, key),
                            help=_CLI_HELP.get(key))


def sampling_from_args(args: argparse.Namespace, keys: tuple[str, ...] = CLI_KEYS, **extra: Any) -> SamplingParams:
    """The SamplingParams the flags of :func:`add_sampling_arguments` describe, plus ``extra`` (stops, logprobs)."""
    return SamplingParams(**{k: getattr(args, k) for k in keys}, **extra)
