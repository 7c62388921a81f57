"""Token shards from real documents (GSM8K): layout, bad records, parallel = serial, resume, Parquet."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from phiforge.data.packing import (
    PackingError,
    TokenizeConfig,
    load_shards,
    shard_name,
    tokenize_corpus,
)
from phiforge.tokenizers.tokenizer import Tokenizer, train_bpe

GSM8K = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks" / "gsm8k" / "train.jsonl"


def texts(n: int, start: int = 0) -> list[str]:
    lines = GSM8K.read_text().splitlines()[start : start + n]
    return [json.loads(line)["question"] for line in lines]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    train_bpe(texts(2000), 512).save(folder)
    return folder


def write_jsonl(path: Path, records: list[object], raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in records]
    for index, line in sorted((raw_lines or {}).items()):
        lines.insert(index, line)
    data = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts(300))])
    write_jsonl(folder / "b.jsonl.gz", [{"text": t} for t in texts(200, 300)])
    # line 2 is not JSON, line 4 has no text, line 5 has a non-string text
    write_jsonl(folder / "c.jsonl", [{"text": "first"}, {"text": "second"}, {"body": "x"}, {"text": 7}],
                raw_lines={1: '{"text": "broken'})
    return folder


def tokenize(inputs: Path, tokenizer: Path, out: Path, workers: int = 1) -> dict:
    return tokenize_corpus(TokenizeConfig(inputs=[str(inputs)], output=str(out), tokenizer=str(tokenizer),
                                          workers=workers, progress=False))


def test_shards_hold_every_document_followed_by_eos(inputs: Path, tokenizer: Path, tmp_path: Path) -> None:
    summary = tokenize(inputs, tokenizer, tmp_path / "out")
    tok = Tokenizer.from_folder(tokenizer)
    assert summary["num_docs"] == 300 + 200 + 2 and summary["num_shards"] == 3 and summary["dtype"] == "uint16"
    index = json.loads((tmp_path / "out" / f"{shard_name(inputs / 'a.jsonl')}.json").read_text())
    tokens = np.memmap(tmp_path / "out" / index["bin"], dtype=np.uint16, mode="r")
    offsets = [*index["doc_offsets"], len(tokens)]
    for i, text in enumerate(texts(300)[:25]):
        doc = tokens[offsets[i] : offsets[i + 1]]
        assert doc[-1] == tok.eos_token_id
        assert tok.decode(doc[:-1].tolist()) == text
    shards = load_shards(tmp_path / "out")
    assert sum(s.num_tokens for s in shards) == summary["num_tokens"]
    assert all(s.tokens().dtype == np.uint16 for s in shards)


def test_bad_records_are_counted_with_file_and_line(inputs: Path, tokenizer: Path, tmp_path: Path) -> None:
    summary = tokenize(inputs, tokenizer, tmp_path / "out")
    assert summary["num_bad"] == 3
    bad = {(Path(r["file"]).name, r["line"]): r["error"] for r in summary["bad_records"]}
    assert bad.keys() == {("c.jsonl", 2), ("c.jsonl", 4), ("c.jsonl", 5)}
    assert bad[("c.jsonl", 2)].startswith("malformed JSON")
    assert bad[("c.jsonl", 4)] == "field 'text' is missing"
    assert bad[("c.jsonl", 5)] == "field 'text' is a int, not a string"


def test_parallel_workers_write_the_same_bytes(inputs: Path, tokenizer: Path, tmp_path: Path) -> None:
    tokenize(inputs, tokenizer, tmp_path / "serial", workers=1)
    tokenize(inputs, tokenizer, tmp_path / "parallel", workers=2)
    for path in sorted((tmp_path / "serial").glob("*.bin")):
        assert path.read_bytes() == (tmp_path / "parallel" / path.name).read_bytes()
    serial, parallel = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("serial", "parallel"))
    assert serial == parallel


def test_rerun_skips_finished_files_and_redoes_interrupted_ones(inputs: Path, tokenizer: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = tokenize(inputs, tokenizer, out)
    a = out / f"{shard_name(inputs / 'a.jsonl')}"
    want = a.with_suffix(".bin").read_bytes()
    # a run killed while writing a.jsonl's shard: half a temp file, no completion marker
    a.with_suffix(".json").unlink()
    (out / f".{a.name}.bin.tmp").write_bytes(want[:100])
    a.with_suffix(".bin").unlink()
    # and a completed shard whose input has since changed must be redone too
    b_marker = out / f"{shard_name(inputs / 'b.jsonl.gz')}.json"
    stale = json.loads(b_marker.read_text())
    b_marker.write_text(json.dumps({**stale, "source_bytes": 1}))
    second = tokenize(inputs, tokenizer, out)
    assert second["skipped_complete"] == 1  # only c.jsonl
    assert a.with_suffix(".bin").read_bytes() == want
    assert {k: v for k, v in second.items() if k not in ("seconds", "tokens_per_s", "skipped_complete")} == \
        {k: v for k, v in first.items() if k not in ("seconds", "tokens_per_s", "skipped_complete")}


def test_parquet_input(tokenizer: Path, tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = texts(50)
    pq.write_table(pa.table({"text": [*docs[:10], None, *docs[10:]]}), tmp_path / "docs.parquet")
    write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in docs])
    from_parquet = tokenize(tmp_path / "docs.parquet", tokenizer, tmp_path / "pq")
    from_jsonl = tokenize(tmp_path / "docs.jsonl", tokenizer, tmp_path / "js")
    assert from_parquet["num_tokens"] == from_jsonl["num_tokens"] and from_parquet["num_docs"] == 50
    assert from_parquet["bad_records"] == [{"file": str((tmp_path / "docs.parquet").resolve()), "line": 11,
                                            "error": "column 'text' is null"}]
    assert load_shards(tmp_path / "pq")[0].tokens().tolist() == load_shards(tmp_path / "js")[0].tokens().tolist()


def test_empty_input_is_reported_and_never_listed(tokenizer: Path, tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "empty.jsonl").write_text("")
    write_jsonl(tmp_path / "docs" / "full.jsonl", [{"text": "some text"}])
    summary = tokenize(tmp_path / "docs", tokenizer, tmp_path / "out")
    assert summary["num_shards"] == 1 and summary["empty_inputs"] == [str(tmp_path / "docs" / "empty.jsonl")]
    empty_bin = tmp_path / "out" / f"{shard_name(tmp_path / 'docs' / 'empty.jsonl')}.bin"
    with pytest.raises(PackingError, match=r"empty shard \(0 tokens\)"):
        load_shards(empty_bin)


def test_bad_paths_name_the_file(tokenizer: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(PackingError, match=r"notes.csv: unsupported input"):
        tokenize(tmp_path / "notes.csv", tokenizer, tmp_path / "out")
    with pytest.raises(PackingError, match=r"missing.jsonl: no such file"):
        tokenize(tmp_path / "missing.jsonl", tokenizer, tmp_path / "out")
    with pytest.raises(PackingError, match=r"no index.json; is this a token folder"):
        load_shards(tmp_path)
    truncated = tmp_path / "t"
    write_jsonl(tmp_path / "one.jsonl", [{"text": "hello there"}])
    tokenize(tmp_path / "one.jsonl", tokenizer, truncated)
    shard = next(truncated.glob("*.bin"))
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(PackingError, match=r"truncated or stale"):
        load_shards(truncated)
