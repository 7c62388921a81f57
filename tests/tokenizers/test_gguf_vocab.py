"""Tokenizers read from GGUF files of any architecture, checked against llama.cpp's own reference tokenizations.

llama.cpp ships vocabulary-only GGUFs of real tokenizers (GPT-2, Qwen2, StarCoder, Llama-2 SentencePiece, Llama-3
BPE, Phi-3) in its models/ folder, each with ``.inp`` test texts and ``.out`` ids made by the original Hugging Face
tokenizers (llama.cpp's convert_hf_to_gguf_update.py): whitespace runs, CJK, emoji, Khmer, Vietnamese, digit runs.
Llama-2's (0.7 MB) and GPT-2's (1.7 MB) are committed under tests/fixtures/llama_cpp; the others are read from the
llama.cpp sources when present ($PHIFORGE_LLAMA_CPP_SRC, see conftest.py) and skipped otherwise. The slow test adds
texts of its own (control characters, more Vietnamese and CJK, special tokens)
with llama.cpp's llama-tokenize as the reference.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import LLAMA_CPP_BIN, LLAMA_CPP_SRC

from phiforge.io.gguf_read import read_gguf_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "llama_cpp"
VOCABS = ["gpt-2", "qwen2", "starcoder", "llama-spm", "llama-bpe", "phi-3"]
SEPARATOR = "\n__ggml_vocab_test__\n"


def vocab_file(name: str) -> Path:
    for folder in (FIXTURES, LLAMA_CPP_SRC / "models"):
        if (folder / f"ggml-vocab-{name}.gguf").is_file():
            return folder / f"ggml-vocab-{name}.gguf"
    pytest.skip(f"ggml-vocab-{name}.gguf is in neither {FIXTURES} nor {LLAMA_CPP_SRC / 'models'}")


def reference_cases(path: Path) -> list[tuple[str, list[int]]]:
    """(text, ids) pairs, split as llama.cpp's tests/test-tokenizer-0.cpp splits them (no bos: add_special=false)."""
    texts = path.with_name(path.name + ".inp").read_text(encoding="utf-8").split(SEPARATOR)
    texts = texts[:-1] if texts[-1] == "" else texts
    ids = [[int(i) for i in line.split()] for line in path.with_name(path.name + ".out").read_text().splitlines()]
    return list(zip(texts, ids, strict=True))


@pytest.mark.parametrize("name", VOCABS)
def test_gguf_vocab_matches_reference_ids(name: str) -> None:
    path = vocab_file(name)
    tok = read_gguf_tokenizer(path)
    cases = reference_cases(path)
    assert len(cases) >= 40
    for text, ids in cases:
        assert tok.encode(text, add_special_tokens=False) == ids, repr(text)
        if name not in ("llama-spm", "phi-3") or text.strip(" "):  # SentencePiece drops the prefix space again
            assert tok.decode(ids) == text, repr(text)


def test_gguf_vocab_of_an_unsupported_architecture_gives_its_tokenizer() -> None:
    """StarCoder2's and Qwen2's files: phiforge cannot run the model, but the tokenizer is all that was asked for."""
    for name, arch in (("starcoder", "starcoder2"), ("gpt-2", "gpt2")):
        tok = read_gguf_tokenizer(vocab_file(name))
        assert tok.vocab_size > 49_000, arch


def test_special_flags_follow_the_file() -> None:
    spm = read_gguf_tokenizer(vocab_file("llama-spm"))
    assert (spm.bos_token, spm.eos_token, spm.unk_token, spm.add_bos_token) == ("<s>", "</s>", "<unk>", True)
    assert spm.encode("Hello world") == [1, 15043, 3186]


# texts of our own: control characters, whitespace-only, mixed scripts, Vietnamese, special tokens in text
EXTRA = ["\x00\x01\x07\x1b[31mred\x1b[0m\x7f", "\u200b\u200d\ufeff zero width", " ", "\t \n \r\n  \u3000 ",
         "Tiếng Việt có dấu: Hà Nội, Thành phố Hồ Chí Minh, nghiêng ngả, khuỷu tay",
         "混合 scripts: 日本語のテキスト、한국어 텍스트, עברית, العربية, ελληνικά", "👩🏽‍💻 🏳️‍🌈 1️⃣ 🇻🇳",
         "<|endoftext|><s></s><|im_start|>user\n  hi<|im_end|>", "x" * 3 + "    " * 5 + "1234567890" * 3]


@pytest.mark.slow
@pytest.mark.parametrize("name", VOCABS)
def test_gguf_vocab_matches_llama_tokenize(name: str, tmp_path: Path) -> None:
    exe = LLAMA_CPP_BIN / "llama-tokenize"
    if not exe.is_file():
        pytest.skip(f"{exe} not built (README, 'GGUF export')")
    path = vocab_file(name)
    tok = read_gguf_tokenizer(path)
    for i, text in enumerate(EXTRA):
        (tmp_path / f"{i}.txt").write_text(text, encoding="utf-8")
        for special in (True, False):
            args = ["-f", str(tmp_path / f"{i}.txt"), "--ids", "--log-disable", "--no-bos"]
            done = subprocess.run([str(exe), "-m", str(path), *args, *([] if special else ["--no-parse-special"])],
                                  capture_output=True, check=True, timeout=120)
            ref = json.loads(done.stdout.decode().strip().splitlines()[-1])
            # llama.cpp matches special tokens in text only when asked; phiforge always matches them (as
            # transformers does), so without parse-special only texts without special tokens compare
            if special or not any(t in text for t in ("<|", "<s>", "</s>")):
                assert tok.encode(text, add_special_tokens=False) == ref, (repr(text), special)
