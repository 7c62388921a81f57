from __future__ import annotations

import json
from pathlib import Path

import pytest

from phiforge.data.synth.writer import OutputError, ShardWriter, read_records, summarize


def record(i: int, status: str = "kept") -> dict:
    meta = {"topic": f"t{i % 3}", "area": "science", "format": "textbook", "audience": "college students",
            "style": "academic", "passage_id": "", "tokens": {"completion": 50 * i}}
    return {"index": i, "status": status, "id": f"doc-{i}", "text": f"text {i}", "metadata": meta}


def test_journal_then_atomic_shards_and_stats(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, total=10, shard_size=4)
    for i in (5, 1, 0, 3, 2):  # shard 0 completes out of order
        writer.add(record(i, "too short" if i == 2 else "kept"))
    assert [r["id"] for r in read_records(tmp_path)] == ["doc-0", "doc-1", "doc-3"]  # sorted, shard 0 only
    assert read_records(tmp_path, rejected=True) == [{"id": "doc-2", "text": "text 2", "metadata": record(2)
                                                      ["metadata"], "reason": "too short"}]
    assert not (tmp_path / "journal" / "shard-00000.jsonl").exists()
    assert (tmp_path / "journal" / "shard-00001.jsonl").exists()
    with pytest.raises(OutputError, match="document 5 was already written"):
        writer.add(record(5))
    writer.close()
    resumed = ShardWriter(tmp_path, total=10, shard_size=4)
    assert resumed.done == {0, 1, 2, 3, 5}
    for i in (4, 6, 7, 8, 9):
        resumed.add(record(i))
    assert resumed.complete and len(read_records(tmp_path)) == 9
    stats = summarize(tmp_path)
    assert stats["documents"] == 9 and stats["rejected_by_reason"] == {"too short": 1}
    assert stats["token_histogram"] == {"0-63": 2, "128-255": 3, "256-511": 4}  # 0, 50, 150, ... 450 tokens
    assert stats["per_topic"] == {"t0": 4, "t1": 3, "t2": 2} and stats["completion_tokens"] == 2150
    assert json.loads((tmp_path / "stats.json").read_text()) == stats


def test_torn_journal_line_from_a_kill_is_cut_off(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, total=8, shard_size=8)
    for i in range(3):
        writer.add(record(i))
    writer.close()
    journal = tmp_path / "journal" / "shard-00000.jsonl"
    with open(journal, "a") as fh:
        fh.write('{"index": 3, "status": "kept", "id": "doc-3", "te')  # killed mid-line
    resumed = ShardWriter(tmp_path, total=8, shard_size=8)
    assert resumed.done == {0, 1, 2} and journal.read_text().endswith("}\n")
    for i in range(3, 8):
        resumed.add(record(i))
    assert [r["id"] for r in read_records(tmp_path)] == [f"doc-{i}" for i in range(8)]


def test_killed_between_rename_and_journal_unlink(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, total=2, shard_size=2)
    writer.add(record(0))
    journal = (tmp_path / "journal" / "shard-00000.jsonl").read_bytes()
    writer.add(record(1))
    (tmp_path / "journal" / "shard-00000.jsonl").write_bytes(journal)  # as if the unlink never happened
    resumed = ShardWriter(tmp_path, total=2, shard_size=2)
    assert resumed.complete and not (tmp_path / "journal" / "shard-00000.jsonl").exists()
    assert len(read_records(tmp_path)) == 2


def test_corrupt_journal_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "journal").mkdir(parents=True)
    (tmp_path / "journal" / "shard-00000.jsonl").write_text("not json\n")
    with pytest.raises(OutputError, match=r"journal/shard-00000.jsonl:1: corrupt journal line"):
        ShardWriter(tmp_path, total=4, shard_size=4)


def test_parquet_shards(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, total=3, shard_size=3, fmt="parquet")
    for i in range(3):
        writer.add(record(i))
    assert (tmp_path / "shard-00000.parquet").exists()
    records = read_records(tmp_path)
    assert [r["id"] for r in records] == ["doc-0", "doc-1", "doc-2"] and records[1]["metadata"]["topic"] == "t1"
