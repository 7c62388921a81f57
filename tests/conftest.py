"""Shared test helpers: random-weight reference models built with transformers itself."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from phiforge.io.gguf_read import load_gguf, resolve_model_alias

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# child processes (`python -m phiforge ...`, torchrun workers) import the source tree under test, not whatever
# checkout the venv's editable install points at
_SRC = str(Path(__file__).resolve().parents[1] / "src")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC, os.environ.get("PYTHONPATH")) if p)

# shared/ sits beside the checkout (locally and in CI): the benchmark files and research notes
SHARED = Path(__file__).resolve().parents[2] / "shared"
# llama.cpp: the sources vendored in the llama-cpp-python 0.3.36 sdist and a build of them (`make llama-cpp`), in
# $PHIFORGE_CACHE (default ~/.cache/phiforge) or beside the checkout; $PHIFORGE_LLAMA_CPP_SRC / $PHIFORGE_LLAMA_CPP
# point elsewhere
_CACHES = [Path(__file__).resolve().parents[2] / "cache",
           Path(os.environ.get("PHIFORGE_CACHE", Path.home() / ".cache" / "phiforge"))]
_CACHE = next((c for c in _CACHES if (c / "llama.cpp-build").is_dir() or (c / "llama_cpp_python-0.3.36").is_dir()),
              _CACHES[-1])
LLAMA_CPP_SRC = Path(os.environ.get("PHIFORGE_LLAMA_CPP_SRC",
                                    _CACHE / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"))
LLAMA_CPP_BIN = Path(os.environ.get("PHIFORGE_LLAMA_CPP", _CACHE / "llama.cpp-build" / "bin"))
TEACHER = "smollm2-135m-instruct"
# phiforge looks for benchmarks only in $PHIFORGE_BENCHMARKS, ./benchmarks and the Hugging Face datasets cache:
# the tests read the shared files, and never the network (an unreachable hub costs ~25 s of retries per dataset)
if (SHARED / "benchmarks").is_dir():
    os.environ.setdefault("PHIFORGE_BENCHMARKS", str(SHARED / "benchmarks"))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter non-trivial values, so that wrong wiring shows up in the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.15 * noise)
    return module


@pytest.fixture(scope="session")
def teacher_path() -> Path:
    """The embedded teacher's GGUF; `make test` installs it, so its absence is a failure, not a skip."""
    path = resolve_model_alias(TEACHER)
    assert path is not None and path.is_file()
    return path


@pytest.fixture(scope="session")
def teacher(teacher_path: Path) -> tuple[Any, Any]:
    """phiforge's (model, tokenizer) of the teacher in fp32, loaded once per test session."""
    return load_gguf(teacher_path, dtype=torch.float32)


@pytest.fixture(scope="session")
def ref_model(teacher_path: Path) -> Any:
    """transformers' own GGUF load of the teacher (about 30 s: once per session)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        teacher_path.parent, gguf_file=teacher_path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def ref_tokenizer(teacher_path: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(teacher_path.parent, gguf_file=teacher_path.name)


@pytest.fixture
def builtin_vocabs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh $PHIFORGE_CACHE holding only the vocab GGUFs the builtin tokenizers read (the committed copies of
    llama-cpp-python's ggml-vocab-gpt-2 and -llama-spm), so builtins build here exactly as on a user's machine."""
    cache = tmp_path_factory.mktemp("phiforge-cache")
    (cache / "tokenizers").mkdir()
    for name in ("gpt-2", "llama-spm"):
        shutil.copy(Path(__file__).parent / "fixtures" / "llama_cpp" / f"ggml-vocab-{name}.gguf", cache / "tokenizers")
    monkeypatch.setenv("PHIFORGE_CACHE", str(cache))
    monkeypatch.delenv("PHIFORGE_LLAMA_CPP_SRC", raising=False)
    return cache
