"""Fixtures for the synth tests: a misbehaving OpenAI-compatible server and a config builder."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from openai_server import FaultyOpenAIServer

from phiforge.data.synth import SynthConfig


@pytest.fixture
def server() -> Iterator[FaultyOpenAIServer]:
    with FaultyOpenAIServer(hang=1.0) as srv:
        yield srv


def http_overrides(base_url: str, out: Path, n: int, *extra: str) -> list[str]:
    """A fast OpenAI-teacher run: short timeout and backoff so injected faults cost little."""
    return [f"run.out_dir={out}", f"run.num_documents={n}", "run.shard_size=8", "run.progress=false",
            "teacher.kind=openai", f"teacher.base_url={base_url}", "teacher.model=test-model",
            "teacher.timeout=0.4", "teacher.backoff=0.01", "teacher.backoff_max=0.05", *extra]


@pytest.fixture
def http_config(tmp_path: Path) -> Callable[..., SynthConfig]:
    def make(base_url: str, n: int, *extra: str, out: Path | None = None) -> SynthConfig:
        return SynthConfig.from_dict({}, http_overrides(base_url, out or tmp_path / "out", n, *extra))

    return make
