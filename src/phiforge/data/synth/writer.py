"""Sharded output that survives SIGKILL: journals while running, atomic shards when complete.

Document ``i`` belongs to shard ``i // shard_size``. While a shard is open, each finished record
(kept or rejected) is appended as one line to ``journal/shard-NNNNN.jsonl``; a rerun reads the
journals back (a torn last line from a kill is cut off) and skips what they hold. When every index of
a shard is in, its kept records are written, sorted by index, to ``shard-NNNNN.jsonl`` (or ``.parquet``)
and its rejects to ``rejected/shard-NNNNN.jsonl`` (temp + fsync + rename), then the journal is
deleted. So a document is never written twice and never skipped, however often the run is killed.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from phiforge.data.packing import atomic_write_bytes, atomic_write_json


class OutputError(ValueError):
    """An output folder that cannot be resumed; the message names the file."""


class ShardWriter:
    def __init__(self, out_dir: str | Path, total: int, shard_size: int, fmt: str = "jsonl",
                 fsync_every: float = 1.0) -> None:
        if fmt not in ("jsonl", "parquet"):
            raise OutputError(f"output format {fmt!r}; expected 'jsonl' or 'parquet'")
        self.out = Path(out_dir)
        self.total, self.shard_size, self.fmt = total, shard_size, fmt
        self.fsync_every = fsync_every
        for folder in (self.out, self.out / "journal", self.out / "rejected"):
            folder.mkdir(parents=True, exist_ok=True)
        self.pending: dict[int, dict[int, dict[str, Any]]] = {}  # shard -> index -> record
        self.handles: dict[int, Any] = {}
        self.last_sync = time.monotonic()
        self.done = self._recover()

    # ---- names ---------------------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return -(-self.total // self.shard_size)

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_size, min(self.total, (shard + 1) * self.shard_size))

    def shard_path(self, shard: int) -> Path:
        return self.out / f"shard-{shard:05d}.{self.fmt}"

    def rejected_path(self, shard: int) -> Path:
        return self.out / "rejected" / f"shard-{shard:05d}.jsonl"

    def journal_path(self, shard: int) -> Path:
        return self.out / "journal" / f"shard-{shard:05d}.jsonl"

    # ---- resume ----------------------------------------------------------------------------------------
    def _recover(self) -> set[int]:
        """Indices already finished: whole completed shards, plus the records in each journal."""
        done: set[int] = set()
        for shard in range(self.num_shards):
            journal = self.journal_path(shard)
            if self.shard_path(shard).exists():
                done.update(self.shard_range(shard))
                journal.unlink(missing_ok=True)  # killed between the final rename and the unlink
                continue
            if journal.exists():
                records = _read_journal(journal)
                self.pending[shard] = {r["index"]: r for r in records if r["index"] in self.shard_range(shard)}
                done.update(self.pending[shard])
                if len(self.pending[shard]) == len(self.shard_range(shard)):
                    self._finalize(shard)
        return done

    # ---- writing -----------------------------------------------------------------------------------------
    def add(self, record: dict[str, Any]) -> None:
        """Persist one finished record: ``{"index", "status": "kept"|"rejected", ...}``."""
        index = record["index"]
        if index in self.done:
            raise OutputError(f"document {index} was already written (id {record.get('id')})")
        shard = index // self.shard_size
        handle = self.handles.get(shard)
        if handle is None:
            handle = self.handles[shard] = open(self.journal_path(shard), "a", encoding="utf-8")
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()  # in the kernel now: a SIGKILL cannot lose it
        self.done.add(index)
        self.pending.setdefault(shard, {})[index] = record
        if time.monotonic() - self.last_sync > self.fsync_every:
            self.sync()
        if len(self.pending[shard]) == len(self.shard_range(shard)):
            self._finalize(shard)

    def sync(self) -> None:
        for handle in self.handles.values():
            os.fsync(handle.fileno())
        self.last_sync = time.monotonic()

    def _finalize(self, shard: int) -> None:
        pending = self.pending.pop(shard)
        records = [pending[i] for i in sorted(pending)]
        kept = [public_record(r) for r in records if r["status"] == "kept"]
        rejected = [public_record(r) for r in records if r["status"] != "kept"]
        atomic_write_bytes(self.rejected_path(shard), _jsonl(rejected))
        if self.fmt == "parquet":
            _write_parquet(self.shard_path(shard), kept)
        else:
            atomic_write_bytes(self.shard_path(shard), _jsonl(kept))
        handle = self.handles.pop(shard, None)
        if handle:
            handle.close()
        self.journal_path(shard).unlink(missing_ok=True)

    def close(self) -> None:
        self.sync()
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()

    @property
    def complete(self) -> bool:
        return len(self.done) == self.total


def public_record(record: dict[str, Any]) -> dict[str, Any]:
    """What the shards hold: id, text, metadata (rejects also say why)."""
    out = {"id": record["id"], "text": record["text"], "metadata": record["metadata"]}
    if record["status"] != "kept":
        out["reason"] = record["status"]
    return out


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def _write_parquet(path: Path, records: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": [r["id"] for r in records], "text": [r["text"] for r in records],
                      "metadata": [json.dumps(r["metadata"], ensure_ascii=False) for r in records]})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _read_journal(path: Path) -> list[dict[str, Any]]:
    """Records of a journal; a torn last line (killed mid-write) is cut off the file."""
    data = path.read_bytes()
    good = data[: data.rfind(b"\n") + 1]
    records = []
    for n, line in enumerate(good.splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise OutputError(f"{path}:{n}: corrupt journal line ({err}); delete the file to redo its shard") \
                from None
    if len(good) != len(data):
        with open(path, "r+b") as fh:
            fh.truncate(len(good))
    return records


def read_records(out_dir: str | Path, rejected: bool = False) -> list[dict[str, Any]]:
    """Every finished record of a synth output folder (kept, or with ``rejected`` the rejects)."""
    out = Path(out_dir)
    files = sorted((out / "rejected").glob("shard-*.jsonl")) if rejected else sorted(out.glob("shard-*.*"))
    records: list[dict[str, Any]] = []
    for file in files:
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            for row in pq.read_table(file).to_pylist():
                records.append({**row, "metadata": json.loads(row["metadata"])})
        else:
            records += [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line]
    return records


def summarize(out_dir: str | Path, bins: tuple[int, ...] = (0, 64, 128, 256, 512, 1024, 2048, 4096)) -> dict[str, Any]:
    """Counts per topic/format/audience/style, rejects per reason, a token histogram; written to stats.json."""
    kept, rejected = read_records(out_dir), read_records(out_dir, rejected=True)
    tokens = [r["metadata"]["tokens"]["completion"] for r in kept]
    histogram = Counter()
    for t in tokens:
        low = max(b for b in bins if b <= t)
        histogram[f"{low}+" if low == bins[-1] else f"{low}-{bins[bins.index(low) + 1] - 1}"] += 1
    def by(field: str) -> dict[str, int]:
        return dict(Counter(r["metadata"][field] for r in kept).most_common())

    stats = {"documents": len(kept), "rejected": len(rejected),
             "rejected_by_reason": dict(Counter(r["reason"] for r in rejected).most_common()),
             "completion_tokens": sum(tokens), "mean_tokens": round(sum(tokens) / max(1, len(tokens)), 1),
             "token_histogram": {k: histogram[k] for k in sorted(histogram, key=lambda k: int(k.split("-")[0]
                                                                                         .rstrip("+")))},
             "per_format": by("format"), "per_audience": by("audience"), "per_style": by("style"),
             "per_area": by("area"), "per_topic": by("topic"),
             "with_web_passage": sum(1 for r in kept if r["metadata"]["passage_id"])}
    atomic_write_json(Path(out_dir) / "stats.json", stats)
    return stats
