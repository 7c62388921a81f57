"""Tokenizer: a `tokenizers.Tokenizer` with the special tokens, chat template and
folder format of a Hugging Face fast tokenizer, plus byte-level BPE training.

`Tokenizer` gives the same ids, decodings and chat renderings as
`transformers.AutoTokenizer` on the same folder, without importing transformers.
"""

from __future__ import annotations

import gzip
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import (
    AddedToken,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

from phiforge.errors import ConfigError, DataError, FormatError
from phiforge.io.atomic import atomic_write_text
from phiforge.tokenizers.chat_templates import BUILTIN_TEMPLATES, render_chat_template

ENDOFTEXT = "<|endoftext|>"
PHI3_CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
PHI4_CHAT_TOKENS = ("<|im_start|>", "<|im_sep|>", "<|im_end|>")
CHAT_FORMATS: dict[str, tuple[tuple[str, ...], str]] = {
    "phi3": (PHI3_CHAT_TOKENS, BUILTIN_TEMPLATES["phi-3"]),
    "phi4": (PHI4_CHAT_TOKENS, BUILTIN_TEMPLATES["phi-4"]),
}
# End-of-turn tokens: when a chat template writes one, generation must stop on it.
TURN_END_TOKENS = ("<|end|>", "<|im_end|>")
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_CORPUS_SUFFIXES = (".jsonl", ".jsonl.gz", ".txt", ".txt.gz", ".md")


class TokenizerError(FormatError):
    """A tokenizer folder or file is missing or malformed; the message names the file."""


class CorpusError(DataError):
    """A training corpus file is unsupported or has a bad record; the message names file:line."""


class Tokenizer:
    """A fast tokenizer that behaves like transformers' ``PreTrainedTokenizerFast``.

    The wrapper owns ``backend``: it registers the named special tokens in it and
    sets its post-processor from ``add_bos_token``/``add_eos_token`` (as
    transformers does when those flags are given), so ``backend.encode`` and
    ``encode`` agree. Padding and truncation are switched off, as in a plain
    transformers call.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        stop_token_ids: list[int] | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.unk_token = unk_token
        self.chat_template = chat_template
        # Extra named templates from a checkpoint (e.g. "tool_use"); "default" is chat_template.
        self.chat_templates: dict[str, str] = {}
        # llama.cpp's tokenizer.ggml.pre name of the source (e.g. "smollm"), kept so a GGUF export writes it back
        self.gguf_pre: str | None = None
        self._add_bos_token = add_bos_token
        self._add_eos_token = add_eos_token
        self._extra_stop_ids = list(stop_token_ids or [])
        backend.no_padding()
        backend.no_truncation()
        self._register_special_tokens()
        self._set_post_processor()

    # --- construction helpers ------------------------------------------------------------

    def _register_special_tokens(self) -> None:
        # Named special tokens must match as whole tokens in text, as in transformers.
        added = {t.content for t in self.backend.get_added_tokens_decoder().values()}
        for token in self.special_tokens_map.values():
            if token not in added:
                self.backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
                added.add(token)

    def _set_post_processor(self) -> None:
        for flag, token in (("add_bos_token", self.bos_token), ("add_eos_token", self.eos_token)):
            if getattr(self, flag) and (token is None or self.backend.token_to_id(token) is None):
                raise ConfigError(f"{flag}=True needs the matching special token to be set and registered")
        bos = f"{self.bos_token}:0 " if self.add_bos_token else ""
        eos = f" {self.eos_token}:0" if self.add_eos_token else ""
        bos1 = f" {self.bos_token}:1" if self.add_bos_token else ""
        eos1 = f" {self.eos_token}:1" if self.add_eos_token else ""
        specials = {
            t: self.backend.token_to_id(t)
            for t, on in ((self.bos_token, self.add_bos_token), (self.eos_token, self.add_eos_token))
            if on
        }
        self.backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}$A:0{eos}",
            pair=f"{bos}$A:0{eos}{bos1} $B:1{eos1}",
            special_tokens=list(specials.items()),
        )

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos_token

    @add_bos_token.setter
    def add_bos_token(self, value: bool) -> None:
        # Rebuild the post-processor so backend.encode keeps agreeing with encode.
        self._add_bos_token = value
        self._set_post_processor()

    @property
    def add_eos_token(self) -> bool:
        return self._add_eos_token

    @add_eos_token.setter
    def add_eos_token(self, value: bool) -> None:
        self._add_eos_token = value
        self._set_post_processor()

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, {self.special_tokens_map}, "
            f"add_bos_token={self.add_bos_token}, chat_template={'set' if self.chat_template else None})"
        )

    # --- special tokens --------------------------------------------------------------------

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that are set, e.g. {"bos_token": "<s>", …}."""
        return {name: getattr(self, name) for name in _SPECIAL_NAMES if getattr(self, name) is not None}

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id_of(self.unk_token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' ``len(tokenizer)``)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def stop_token_ids(self) -> list[int]:
        """eos, then generation_config's ids, then the template's end-of-turn tokens; no repeats."""
        ids = [self.eos_token_id, *self._extra_stop_ids]
        templates = [self.chat_template or "", *self.chat_templates.values()]
        ids += [self._id_of(t) for t in TURN_END_TOKENS if any(t in tpl for tpl in templates)]
        return list(dict.fromkeys(i for i in ids if i is not None))

    # --- encode / decode -------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; bos/eos are added only if add_bos_token/add_eos_token."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Encode many texts in parallel (the tokenizers library's thread pool)."""
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Iterable[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return self.backend.decode_batch([list(ids) for ids in batch], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # --- chat --------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        **extra: Any,
    ) -> str | list[int]:
        """Render ``messages`` like transformers' ``apply_chat_template``.

        ``extra`` become template variables (and override the special tokens).
        With ``tokenize=True`` the text is encoded without adding bos/eos, as in
        transformers, since the template writes them itself.
        """
        template = self._select_template(extra.get("tools"))
        variables = {**self.special_tokens_map, **extra}
        text = render_chat_template(template, messages, add_generation_prompt=add_generation_prompt, **variables)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _select_template(self, tools: Any) -> str:
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if self.chat_template is None:
            raise ConfigError(
                "this tokenizer has no chat template; set Tokenizer.chat_template "
                f"(built-ins: {', '.join(BUILTIN_TEMPLATES)})"
            )
        return self.chat_template

    # --- folders -----------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a Hugging Face checkpoint folder (tokenizer.json required)."""
        folder = Path(path)
        backend = _load_backend(folder / "tokenizer.json")
        config = _read_json(folder / "tokenizer_config.json")
        token_map = _read_json(folder / "special_tokens_map.json")
        names = {n: _token_content(config.get(n, token_map.get(n))) for n in _SPECIAL_NAMES}
        templates = _read_chat_templates(folder, config)
        add_bos, add_eos = config.get("add_bos_token"), config.get("add_eos_token")
        if add_bos is None or add_eos is None:
            guessed = _post_processor_flags(backend, names["bos_token"], names["eos_token"])
            add_bos = guessed[0] if add_bos is None else add_bos
            add_eos = guessed[1] if add_eos is None else add_eos
        tok = cls(
            backend,
            **names,
            chat_template=templates.pop("default", None),
            add_bos_token=bool(add_bos) and names["bos_token"] is not None,
            add_eos_token=bool(add_eos) and names["eos_token"] is not None,
            stop_token_ids=_generation_eos_ids(folder / "generation_config.json"),
        )
        tok.chat_templates = templates
        tok.gguf_pre = config.get("gguf_pre_tokenizer")
        return tok

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Write tokenizer.json and tokenizer_config.json (loadable by transformers.AutoTokenizer)."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "tokenizer.json", self.backend.to_str(pretty=True))
        atomic_write_text(out / "tokenizer_config.json", json.dumps(self._config_dict(), indent=2, ensure_ascii=False))
        # transformers prefers chat_template.jinja over the config; never leave a stale one behind.
        jinja_file = out / "chat_template.jinja"
        if jinja_file.exists():
            if self.chat_template is None:
                jinja_file.unlink()
            else:
                atomic_write_text(jinja_file, self.chat_template)

    def _config_dict(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self.special_tokens_map,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": False,
        }
        if self.gguf_pre:
            config["gguf_pre_tokenizer"] = self.gguf_pre
        if self.chat_templates and self.chat_template is not None:
            named = {"default": self.chat_template, **self.chat_templates}
            config["chat_template"] = [{"name": k, "template": v} for k, v in named.items()]
        elif self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return config


# --- folder reading helpers ---------------------------------------------------------------------


def _load_backend(path: Path) -> tokenizers.Tokenizer:
    expected = "a Hugging Face fast-tokenizer file (tokenizer.json)"
    if not path.is_file():
        raise TokenizerError(f"{path}: file not found; expected {expected}")
    text = path.read_text(encoding="utf-8")
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path}: invalid JSON ({exc}); expected {expected}") from exc
    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception as exc:  # the Rust side raises a bare Exception
        raise TokenizerError(f"{path}: rejected by the tokenizers library ({exc}); expected {expected}") from exc


def _read_json(path: Path) -> dict[str, Any]:
    """An optional JSON object file: {} when absent, TokenizerError when malformed."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path}: invalid JSON ({exc}); expected a JSON object") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    # Special tokens are stored as plain strings or as serialized AddedToken dicts.
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_chat_templates(folder: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Named templates ("default" first); chat_template.jinja wins over the config, as in transformers."""
    templates: dict[str, str] = {}
    raw = config.get("chat_template")
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):
        for entry in raw:
            if not (isinstance(entry, Mapping) and isinstance(entry.get("name"), str)):
                raise TokenizerError(
                    f"{folder / 'tokenizer_config.json'}: chat_template list entries must be "
                    f'{{"name": str, "template": str}}, got {entry!r}'
                )
            templates[entry["name"]] = entry["template"]
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        templates = {"default": jinja_file.read_text(encoding="utf-8")}
        extra_dir = folder / "additional_chat_templates"
        for file in sorted(extra_dir.glob("*.jinja")) if extra_dir.is_dir() else []:
            templates[file.stem] = file.read_text(encoding="utf-8")
    return templates


def _post_processor_flags(backend: tokenizers.Tokenizer, bos: str | None, eos: str | None) -> tuple[bool, bool]:
    """Whether tokenizer.json's own post-processor adds bos / eos (used when the config is silent)."""
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            prefix, suffix = full[:start], full[start + len(plain) :]
            bos_id = backend.token_to_id(bos) if bos else None
            eos_id = backend.token_to_id(eos) if eos else None
            return prefix == [bos_id], suffix == [eos_id]
    return False, False


def _generation_eos_ids(path: Path) -> list[int]:
    eos = _read_json(path).get("eos_token_id")
    if eos is None:
        return []
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) for i in ids):
        raise TokenizerError(f"{path}: eos_token_id must be an int or a list of ints, got {eos!r}")
    return ids




# --- BPE training -------------------------------------------------------------------------------


def _special_tokens_for(chat_format: str | None, extra: Sequence[str]) -> tuple[list[str], str | None]:
    if chat_format is not None and chat_format not in CHAT_FORMATS:
        raise ConfigError(f"unknown chat_format {chat_format!r}; expected None, 'phi3' or 'phi4'")
    chat_tokens, template = CHAT_FORMATS[chat_format] if chat_format else ((), None)
    specials = list(dict.fromkeys([ENDOFTEXT, *chat_tokens, *extra]))
    return specials, template


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    special_tokens: list[str] | None = None,
    chat_format: str | None = None,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 pre-tokenizer and decoder).

    Every string round-trips: decode(encode(x)) == x. ``<|endoftext|>`` is bos,
    eos and pad; ``chat_format`` ("phi3" or "phi4") adds that format's chat tokens
    and built-in template. Special tokens take the first ids, then the 256 bytes.
    """
    specials, template = _special_tokens_for(chat_format, special_tokens or [])
    floor = 256 + len(specials)
    if vocab_size < floor:
        raise ConfigError(f"vocab_size {vocab_size} is too small: 256 bytes + {len(specials)} special tokens")
    backend = tokenizers.Tokenizer(models.BPE())
    # No prefix space: a leading space would break the exact round trip.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT, chat_template=template)


def _corpus_files(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(_CORPUS_SUFFIXES))
        elif p.name.endswith(_CORPUS_SUFFIXES):
            yield p
        else:
            expected = ", ".join(_CORPUS_SUFFIXES)
            raise CorpusError(f"{p}: unsupported corpus file; expected one of {expected} or a folder")


def _open_text(path: Path) -> Any:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _jsonl_texts(path: Path) -> Iterator[str]:
    from phiforge.data.jsonl import iter_jsonl, text_error

    for line in iter_jsonl(path):
        problem = line.error or text_error(line.record, "text")
        if problem:  # a tokenizer trained on a silently shortened corpus is worse than a stop
            raise CorpusError(f"{line.where}: {problem}")
        yield line.record["text"]


def iter_corpus(paths: Iterable[str | os.PathLike[str]]) -> Iterator[str]:
    """Stream documents: one per JSONL line (field "text"), one per .txt file; folders are searched."""
    for path in _corpus_files(paths):
        if ".jsonl" in path.name:
            yield from _jsonl_texts(path)
        else:
            with _open_text(path) as fh:
                yield fh.read()


def train_bpe_from_files(
    paths: Iterable[str | os.PathLike[str]],
    vocab_size: int,
    *,
    special_tokens: list[str] | None = None,
    chat_format: str | None = None,
    min_frequency: int = 2,
) -> Tokenizer:
    """train_bpe over JSONL (field "text") and .txt files, streamed (see iter_corpus)."""
    return train_bpe(
        iter_corpus(paths),
        vocab_size,
        special_tokens=special_tokens,
        chat_format=chat_format,
        min_frequency=min_frequency,
    )


class _CountingDocs:
    """Pass documents through while counting them and their UTF-8 bytes."""

    def __init__(self, docs: Iterable[str]) -> None:
        self.docs, self.documents, self.bytes = docs, 0, 0

    def __iter__(self) -> Iterator[str]:
        for doc in self.docs:
            self.documents += 1
            self.bytes += len(doc.encode("utf-8"))
            yield doc


def corpus_fertility(tok: Tokenizer, texts: Iterable[str], batch_size: int = 256) -> tuple[int, int]:
    """(tokens, words) over ``texts``; words are whitespace-separated, so unspaced scripts count high."""
    tokens = words = 0
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        words += len(text.split())
        if len(batch) == batch_size:
            tokens += sum(map(len, tok.encode_batch(batch, add_special_tokens=False)))
            batch = []
    tokens += sum(map(len, tok.encode_batch(batch, add_special_tokens=False)))
    return tokens, words


def train_tokenizer(
    inputs: list[Path], output: Path, vocab_size: int, chat_format: str | None, *, min_frequency: int = 2
) -> dict[str, Any]:
    """Train on ``inputs``, save to the ``output`` folder and return stats for the CLI.

    Stats: vocab_size, documents, bytes, tokens, words, fertility (tokens per
    whitespace word), bytes_per_token, seconds (training), output.
    """
    counted = _CountingDocs(iter_corpus(inputs))
    start = time.perf_counter()
    tok = train_bpe(counted, vocab_size, chat_format=chat_format, min_frequency=min_frequency)
    seconds = time.perf_counter() - start
    return save_with_stats(tok, inputs, output, seconds=seconds)


def save_with_stats(tok: Tokenizer, inputs: list[Path], output: Path, *, seconds: float = 0.0) -> dict[str, Any]:
    """Save ``tok`` to ``output`` and measure it on the corpus: the stats of train_tokenizer."""
    tok.save(output)
    counted = _CountingDocs(iter_corpus(inputs))
    tokens, words = corpus_fertility(tok, counted)
    return {
        "vocab_size": tok.vocab_size,
        "documents": counted.documents,
        "bytes": counted.bytes,
        "tokens": tokens,
        "words": words,
        "fertility": tokens / words if words else 0.0,
        "bytes_per_token": counted.bytes / tokens if tokens else 0.0,
        "seconds": round(seconds, 3),
        "output": str(output),
    }
