"""Tokenizer: BPE training, round trips, folder I/O and parity with transformers.AutoTokenizer."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import tokenizers
from conftest import SHARED
from tokenizers import processors
from transformers import AutoTokenizer

from phiforge.tokenizers.chat_templates import BUILTIN_TEMPLATES
from phiforge.tokenizers.tokenizer import (
    CorpusError,
    Tokenizer,
    TokenizerError,
    train_bpe,
    train_bpe_from_files,
    train_tokenizer,
)

TRICKY = "tab\there,  two  spaces,\n\n\tindented   \u00a0nbsp 😀🚀 中文分词测试 ｈｉ e\u0301 \r\n end  "
CHAT = [
    {"role": "system", "content": "You solve math problems."},
    {"role": "user", "content": "What is 12 * 7?"},
    {"role": "assistant", "content": "84"},
    {"role": "user", "content": "中文呢? 😀"},
]


def _corpus() -> dict[str, list[str]]:
    gsm8k = SHARED / "benchmarks/gsm8k/train.jsonl"
    return {
        "seeds": [p.read_text(encoding="utf-8") for p in sorted((SHARED / "seeds").glob("*.txt"))],
        "research": [p.read_text(encoding="utf-8") for p in sorted((SHARED / "research").glob("*.md"))],
        "gsm8k": [json.loads(line)["question"] for line in gsm8k.read_text(encoding="utf-8").splitlines()],
    }


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[str]]:
    return _corpus()


@pytest.fixture(scope="module")
def trained(corpus: dict[str, list[str]]) -> Tokenizer:
    texts = [t for part in corpus.values() for t in part]
    return train_bpe(texts, 3000, chat_format="phi3")


@pytest.fixture(scope="module")
def saved(trained: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("trained")
    trained.save(folder)
    return folder, AutoTokenizer.from_pretrained(folder)


def _copy(tok: Tokenizer) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_str(tok.backend.to_str())


# --- training and round trips ----------------------------------------------------------------


def test_corpora_are_real(corpus: dict[str, list[str]]) -> None:
    assert len(corpus["seeds"]) == 3 and "phi" in corpus["seeds"][0]
    assert len(corpus["gsm8k"]) > 7000 and corpus["research"]


@pytest.mark.parametrize("part", ["seeds", "research", "gsm8k"])
def test_round_trip_on_corpora(trained: Tokenizer, corpus: dict[str, list[str]], part: str) -> None:
    texts = corpus[part]
    ids = trained.encode_batch(texts)
    assert trained.decode_batch(ids) == texts
    assert [trained.encode(t) for t in texts[:20]] == ids[:20]


def test_round_trip_on_whitespace_emoji_chinese(trained: Tokenizer) -> None:
    ids = trained.encode(TRICKY)
    assert trained.decode(ids) == TRICKY
    assert trained.decode(trained.encode(" leading space")) == " leading space"
    assert len(ids) < len(TRICKY.encode("utf-8"))  # merges happened, not one id per byte


def test_special_tokens_layout(trained: Tokenizer) -> None:
    names = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    assert [trained.token_to_id(t) for t in names] == [0, 1, 2, 3, 4]
    assert trained.id_to_token(4) == "<|end|>"
    assert (trained.bos_token_id, trained.eos_token_id, trained.pad_token_id) == (0, 0, 0)
    assert trained.vocab_size == len(trained) == 3000
    assert trained.stop_token_ids == [0, 4]  # eos, then the template's <|end|>
    assert trained.chat_template == BUILTIN_TEMPLATES["phi-3"]


def test_special_strings_in_text_are_single_tokens(trained: Tokenizer) -> None:
    ids = trained.encode("<|user|>\nhi<|end|>")
    assert ids[0] == 2 and ids[-1] == 4
    assert trained.decode(ids) == "<|user|>\nhi<|end|>"
    assert trained.decode(ids, skip_special_tokens=True) == "\nhi"
    assert trained.encode("hello") == trained.encode("hello", add_special_tokens=False)  # no bos


def test_phi4_chat_format() -> None:
    tok = train_bpe(["hello world"] * 10, 300, chat_format="phi4", special_tokens=["<|extra|>"])
    names = ["<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|extra|>"]
    assert [tok.token_to_id(t) for t in names] == [0, 1, 2, 3, 4]
    assert tok.stop_token_ids == [0, 3]
    text = tok.apply_chat_template(CHAT[1:2], add_generation_prompt=True)
    assert text == "<|im_start|>user<|im_sep|>What is 12 * 7?<|im_end|><|im_start|>assistant<|im_sep|>"
    ids = tok.apply_chat_template(CHAT[1:2], tokenize=True)
    assert ids[0] == 1 and ids[-1] == 3 and ids.count(2) == 1
    assert tok.decode(ids) == "<|im_start|>user<|im_sep|>What is 12 * 7?<|im_end|>"


def test_training_is_deterministic() -> None:
    texts = _corpus()["research"]
    assert train_bpe(texts, 600).backend.to_str() == train_bpe(texts, 600).backend.to_str()


def test_training_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="chat_format 'chatml'"):
        train_bpe(["x"], 1000, chat_format="chatml")
    with pytest.raises(ValueError, match="too small"):
        train_bpe(["x"], 200)


# --- parity with transformers ------------------------------------------------------------------


def test_transformers_gives_identical_ids(
    trained: Tokenizer, saved: tuple[Path, object], corpus: dict[str, list[str]]
) -> None:
    _, hf = saved
    texts = [t for part in corpus.values() for t in part] + [TRICKY, "<|user|>x<|end|><|endoftext|>"]
    assert hf(texts)["input_ids"] == trained.encode_batch(texts)
    assert len(hf) == trained.vocab_size
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 0, 0)


def test_transformers_gives_identical_decoding(trained: Tokenizer, saved: tuple[Path, object]) -> None:
    _, hf = saved
    ids = trained.encode("<|user|>" + TRICKY + "<|end|>")
    for skip in (False, True):
        assert hf.decode(ids, skip_special_tokens=skip) == trained.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("generation", [True, False])
def test_transformers_gives_identical_chat(trained: Tokenizer, saved: tuple[Path, object], generation: bool) -> None:
    _, hf = saved
    text = trained.apply_chat_template(CHAT, add_generation_prompt=generation)
    assert text == hf.apply_chat_template(CHAT, add_generation_prompt=generation, tokenize=False)
    ids = trained.apply_chat_template(CHAT, add_generation_prompt=generation, tokenize=True)
    ref = hf.apply_chat_template(CHAT, add_generation_prompt=generation, tokenize=True, return_dict=False)
    assert ids == ref


def test_add_bos_token_matches_transformers(trained: Tokenizer, tmp_path: Path) -> None:
    # Phi-3 style: a "<s>" bos that the trained vocabulary lacks is added as a new special token.
    tok = Tokenizer(_copy(trained), bos_token="<s>", eos_token="<|endoftext|>", add_bos_token=True)
    assert tok.bos_token_id == 3000 and tok.vocab_size == 3001
    assert tok.encode("hi") == [3000, *tok.encode("hi", add_special_tokens=False)]
    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf(["hi", TRICKY])["input_ids"] == tok.encode_batch(["hi", TRICKY])
    assert hf("hi", add_special_tokens=False)["input_ids"] == tok.encode("hi", add_special_tokens=False)
    tok.add_bos_token = False  # the flag can be flipped later, as in transformers
    assert tok.encode("hi") == tok.backend.encode("hi").ids == trained.encode("hi")


# --- folders -------------------------------------------------------------------------------------


def test_save_then_from_folder(trained: Tokenizer, saved: tuple[Path, object]) -> None:
    folder, _ = saved
    loaded = Tokenizer.from_folder(folder)
    assert loaded.encode(TRICKY) == trained.encode(TRICKY)
    assert loaded.chat_template == trained.chat_template
    assert loaded.special_tokens_map == trained.special_tokens_map
    assert loaded.stop_token_ids == trained.stop_token_ids
    assert not loaded.add_bos_token


def test_from_folder_hub_style_config(trained: Tokenizer, tmp_path: Path) -> None:
    """AddedToken dicts, named templates, generation_config eos list, special_tokens_map fallback."""
    backend = _copy(trained)
    backend.add_special_tokens([tokenizers.AddedToken("<s>", special=True, normalized=False)])
    bos = backend.token_to_id("<s>")
    # The config is silent on add_bos_token, so tokenizer.json's own post-processor decides.
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    (tmp_path / "tokenizer.json").write_text(backend.to_str(), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "special": True},
        "chat_template": [
            {"name": "default", "template": BUILTIN_TEMPLATES["phi-3"]},
            {"name": "tool_use", "template": "{{ tools }}{{ messages[0]['content'] }}"},
        ],
    }  # fmt: skip
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "pad_token": {"content": "<|end|>"}}), encoding="utf-8"
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 3, 4]}), encoding="utf-8")

    tok = Tokenizer.from_folder(tmp_path)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "<|endoftext|>", "<|end|>", None)
    assert tok.add_bos_token and tok.encode("hi")[0] == bos
    assert tok.stop_token_ids == [0, 3, 4]
    assert tok.apply_chat_template(CHAT[1:2]) == "<|user|>\nWhat is 12 * 7?<|end|>\n<|endoftext|>"
    assert tok.apply_chat_template(CHAT[1:2], tools=["t"]) == "['t']What is 12 * 7?"

    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf(["hi", TRICKY])["input_ids"] == tok.encode_batch(["hi", TRICKY])
    assert hf.apply_chat_template(CHAT, tokenize=False) == tok.apply_chat_template(CHAT)


def test_chat_template_jinja_file_wins(trained: Tokenizer, tmp_path: Path) -> None:
    trained.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(BUILTIN_TEMPLATES["phi-4"], encoding="utf-8")
    tok = Tokenizer.from_folder(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.chat_template == BUILTIN_TEMPLATES["phi-4"]
    assert tok.apply_chat_template(CHAT) == hf.apply_chat_template(CHAT, tokenize=False)
    # Saving over the folder must not leave the now-stale .jinja file in charge.
    trained.save(tmp_path)
    assert Tokenizer.from_folder(tmp_path).chat_template == BUILTIN_TEMPLATES["phi-3"]


def test_from_folder_without_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer.json: file not found") as info:
        Tokenizer.from_folder(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(info.value)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('{"version": "1.0", "model": ', "invalid JSON"),
        ('{"version": "1.0", "model": {"type": "NoSuchModel"}}', "rejected by the tokenizers library"),
    ],
)
def test_from_folder_malformed_tokenizer_json(tmp_path: Path, content: str, reason: str) -> None:
    (tmp_path / "tokenizer.json").write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerError, match=reason) as info:
        Tokenizer.from_folder(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "tokenizer.json") in message and "expected" in message
    assert isinstance(info.value, ValueError)


def test_from_folder_malformed_config(trained: Tokenizer, tmp_path: Path) -> None:
    trained.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: expected a JSON object"):
        Tokenizer.from_folder(tmp_path)


# --- training from files ---------------------------------------------------------------------------


def _write_corpus(folder: Path, corpus: dict[str, list[str]]) -> list[Path]:
    jsonl = folder / "docs.jsonl"
    lines = [json.dumps({"id": i, "text": t}, ensure_ascii=False) for i, t in enumerate(corpus["gsm8k"][:2000])]
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with gzip.open(folder / "more.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": TRICKY}) + "\n")
    seeds = folder / "seeds"
    seeds.mkdir()
    for i, text in enumerate(corpus["seeds"]):
        (seeds / f"{i}.txt").write_text(text, encoding="utf-8")
    return [jsonl, folder / "more.jsonl.gz", seeds]


def test_train_tokenizer_stats(corpus: dict[str, list[str]], tmp_path: Path) -> None:
    inputs = _write_corpus(tmp_path, corpus)
    docs = corpus["gsm8k"][:2000] + [TRICKY] + corpus["seeds"]
    stats = train_tokenizer(inputs, tmp_path / "tok", 1000, "phi4")

    tok = Tokenizer.from_folder(tmp_path / "tok")
    tokens = sum(len(ids) for ids in tok.encode_batch(docs, add_special_tokens=False))
    words = sum(len(d.split()) for d in docs)
    assert stats["vocab_size"] == tok.vocab_size == 1000
    assert stats["documents"] == len(docs)
    assert stats["bytes"] == sum(len(d.encode("utf-8")) for d in docs)
    assert (stats["tokens"], stats["words"]) == (tokens, words)
    assert stats["fertility"] == pytest.approx(tokens / words)
    assert 1.0 < stats["fertility"] < 5.0 and stats["seconds"] >= 0
    assert tok.chat_template == BUILTIN_TEMPLATES["phi-4"]
    assert tok.decode_batch(tok.encode_batch(docs)) == docs


def test_train_bpe_from_files_matches_in_memory(corpus: dict[str, list[str]], tmp_path: Path) -> None:
    inputs = _write_corpus(tmp_path, corpus)
    docs = corpus["gsm8k"][:2000] + [TRICKY] + corpus["seeds"]
    from_files = train_bpe_from_files(inputs, 800)
    assert from_files.backend.to_str() == train_bpe(docs, 800).backend.to_str()


def test_bad_corpus_records_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"content": "no text field"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad.jsonl line 3: missing field 'text'"):
        train_bpe_from_files([bad], 300)
    bad.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad.jsonl line 2: malformed JSON"):
        train_bpe_from_files([bad], 300)
    with pytest.raises(CorpusError, match="unsupported corpus file"):
        train_bpe_from_files([tmp_path / "data.parquet"], 300)
