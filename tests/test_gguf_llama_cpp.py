"""GGUF export against llama.cpp itself: the metadata names llama.cpp accepts (fast), and a round trip through the
real llama.cpp tools (slow): greedy tokens of f32 exports equal phiforge's, q8_0/q4_0 perplexity close to phiforge's.

The accepted pre-tokenizer names are parsed from the vendored llama.cpp source when it is present
($PHIFORGE_LLAMA_CPP_SRC, default ../cache/llama_cpp_python-0.3.36/vendor/llama.cpp beside the checkout), else
read from tests/fixtures/llama_cpp/pre_tokenizers.txt (extracted from the same source, so CI without it still checks).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import gguf
import pytest
import tokenizers
from conftest import LLAMA_CPP_SRC, randomize_
from tokenizers import Regex, pre_tokenizers

from phiforge import gguf_io
from phiforge.config import preset
from phiforge.gguf_export import export_gguf
from phiforge.model import build_model
from phiforge.tokenizer import Tokenizer, train_bpe

FIXTURE = Path(__file__).parent / "fixtures" / "llama_cpp" / "pre_tokenizers.txt"


def accepted_pre_names() -> set[str]:
    """Every ``tokenizer.ggml.pre`` value llama.cpp's vocabulary loader accepts."""
    source = LLAMA_CPP_SRC / "src" / "llama-vocab.cpp"
    if source.is_file():
        names = set(re.findall(r'tokenizer_pre\s*==\s*"([^"]+)"', source.read_text(encoding="utf-8")))
        assert names >= fixture_names(), "the committed list names something the llama.cpp source no longer accepts"
        return names
    return fixture_names()


def fixture_names() -> set[str]:
    return {line.strip() for line in FIXTURE.read_text().splitlines() if line.strip() and not line.startswith("#")}


def metadata(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    big = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
    return {k: f.contents() for k, f in reader.fields.items() if k not in big}


def test_reader_tables_use_only_names_llama_cpp_accepts() -> None:
    known = set(gguf_io._PRE_SPLITS) | set(gguf_io.GPT2_PRES) | set(gguf_io.DIGIT_PRES)
    assert known - accepted_pre_names() == set()
    assert set(gguf_io.CANONICAL_PRES.values()) <= accepted_pre_names()


def _with_pre(tok: Tokenizer, pre: Any) -> Tokenizer:
    backend = tokenizers.Tokenizer.from_str(tok.backend.to_str())
    backend.pre_tokenizer = pre
    return Tokenizer(backend, bos_token=tok.bos_token, eos_token=tok.eos_token, pad_token=tok.pad_token,
                     chat_template=tok.chat_template)


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    lines = [line for line in Path(__file__).read_text().splitlines() if line.strip()]
    return train_bpe(lines * 5, 320, chat_format="phi3")


def _split(regex: str) -> Any:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


@pytest.mark.parametrize(("pre", "expected"), [
    (None, "gpt-2"),
    (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                              pre_tokenizers.ByteLevel(add_prefix_space=False)]), "starcoder"),
    (_split(gguf_io._LLAMA3_SPLIT), "llama-bpe"),
    (_split(gguf_io._QWEN2_SPLIT), "qwen2"),
    (_split(gguf_io._GPT4O_SPLIT), "gpt-4o"),
], ids=["byte-level", "digits", "llama3", "qwen2", "gpt4o"])
def test_export_writes_a_pre_tokenizer_llama_cpp_accepts(tmp_path: Path, trained: Tokenizer, pre: Any,
                                                         expected: str) -> None:
    tok = trained if pre is None else _with_pre(trained, pre)
    model = randomize_(build_model(preset("tiny-phi3")), seed=3).eval()
    export_gguf(model, tok, tmp_path / "m.gguf", quant="f32")
    meta = metadata(tmp_path / "m.gguf")
    assert meta["tokenizer.ggml.pre"] == expected
    assert expected in accepted_pre_names()
    # ... and reading it back gives the same split
    back = gguf_io.read_gguf_tokenizer(tmp_path / "m.gguf")
    for text in ["x = 12345  +   6\n\n  y", "It's   naïve 微软 ✓", "    def f():\n\treturn 1"]:
        assert back.encode(text) == tok.encode(text), text


def test_export_writes_the_special_tokens_and_chat_template_llama_cpp_reads(tmp_path: Path,
                                                                            trained: Tokenizer) -> None:
    model = randomize_(build_model(preset("tiny-phi3")), seed=3).eval()
    trained.chat_templates = {"tool_use": "{{ tools }}"}
    try:
        export_gguf(model, trained, tmp_path / "m.gguf", quant="f32")
    finally:
        trained.chat_templates = {}
    meta = metadata(tmp_path / "m.gguf")
    eot = trained.token_to_id("<|end|>")
    assert meta["tokenizer.ggml.eos_token_id"] == trained.eos_token_id
    assert meta["tokenizer.ggml.bos_token_id"] == trained.bos_token_id
    assert meta["tokenizer.ggml.padding_token_id"] == trained.pad_token_id
    assert meta["tokenizer.ggml.eot_token_id"] == eot
    assert meta["tokenizer.chat_template"] == trained.chat_template
    assert meta["tokenizer.chat_template.tool_use"] == "{{ tools }}"
    assert meta["tokenizer.ggml.add_bos_token"] is False
    types = gguf.GGUFReader(tmp_path / "m.gguf").fields["tokenizer.ggml.token_type"].contents()
    assert types[eot] == gguf.TokenType.CONTROL
    back = gguf_io.read_gguf_tokenizer(tmp_path / "m.gguf")
    assert back.chat_templates == {"tool_use": "{{ tools }}"}
    assert back.stop_token_ids == trained.stop_token_ids


def test_reexporting_the_teacher_keeps_smollm(tmp_path: Path, teacher_path: Path) -> None:
    """The embedded teacher's tokenizer is written back with its own name, not a generic one."""
    tok = gguf_io.read_gguf_tokenizer(teacher_path)
    assert tok.gguf_pre == "smollm"
    config = dataclasses.replace(preset("tiny-llama"), vocab_size=tok.vocab_size)
    export_gguf(randomize_(build_model(config)).eval(), tok, tmp_path / "t.gguf", quant="f32")
    meta = metadata(tmp_path / "t.gguf")
    source = metadata(teacher_path)
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.chat_template"):
        assert meta[key] == source[key], key
    # and through a folder: the name survives tokenizer_config.json
    tok.save(tmp_path / "folder")
    assert Tokenizer.from_folder(tmp_path / "folder").gguf_pre == "smollm"
