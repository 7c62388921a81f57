"""Sharded output that survives SIGKILL: journals while running, atomic shards when complete.

Document ``i`` belongs to shard ``i // shard_size``; a process may own any range of shards (``--shard K/N``),
so N processes on any hosts write disjoint shards of one folder. While a shard is open, each finished record
(kept or rejected) is appended as one line to ``journal/shard-NNNNN.jsonl``; a rerun reads the
journals back (a torn last line from a kill is cut off) and skips what they hold. When every index of
a shard is in, its kept records are written, sorted by index, to ``shard-NNNNN.jsonl`` (or ``.parquet``)
and its rejects to ``rejected/shard-NNNNN.jsonl`` (temp + fsync + rename), with its counts in
``stats/shard-NNNNN.json``; then the journal is deleted. Run stats are folds of the per-shard counts.
So a document is never written twice and never skipped, however often the run is killed.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from phiforge.errors import DataError
from phiforge.io.atomic import atomic_write, atomic_write_bytes, atomic_write_json


class OutputError(DataError):
    """An output folder that cannot be resumed; the message names the file."""


class ShardWriter:
    """The output shards ``shards`` (default: all) of a run of ``total`` documents.

    Nothing is read up front: ``todo()`` walks the shards lazily, skipping complete ones and resuming a
    journaled one from its journal, so memory holds only the open shards' records (at most the in-flight
    window plus one shard), however large the run.
    """

    def __init__(self, out_dir: str | Path, total: int, shard_size: int, fmt: str = "jsonl",
                 fsync_every: float = 1.0, shards: Sequence[int] | None = None) -> None:
        if fmt not in ("jsonl", "parquet"):
            raise OutputError(f"output format {fmt!r}; expected 'jsonl' or 'parquet'")
        self.out = Path(out_dir)
        self.total, self.shard_size, self.fmt = total, shard_size, fmt
        self.fsync_every = fsync_every
        self.shards = range(self.num_shards) if shards is None else shards
        for folder in (self.out, self.out / "journal", self.out / "rejected", self.out / "stats"):
            folder.mkdir(parents=True, exist_ok=True)
        self.pending: dict[int, dict[int, dict[str, Any]]] = {}  # open shard -> index -> record
        self.handles: dict[int, Any] = {}
        self.last_sync = time.monotonic()
        self.written = 0  # records added by this writer
        for journal in sorted((self.out / "journal").glob("shard-*.jsonl")):  # only open shards have one
            shard = int(journal.name[6:11])
            if shard in self.shards:
                self._open(shard)  # a corrupt journal fails now, before any teacher is loaded

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

    def stats_path(self, shard: int) -> Path:
        return self.out / "stats" / f"shard-{shard:05d}.json"

    # ---- resume ----------------------------------------------------------------------------------------
    def _open(self, shard: int) -> bool:
        """Load a shard's journal (once); False when the shard is complete."""
        if shard in self.pending:
            return True
        journal = self.journal_path(shard)
        if self.shard_path(shard).exists():
            journal.unlink(missing_ok=True)  # killed between the final rename and the unlink
            return False
        records = read_journal(journal) if journal.exists() else []
        self.pending[shard] = {r["index"]: r for r in records if r["index"] in self.shard_range(shard)}
        if len(self.pending[shard]) == len(self.shard_range(shard)):
            self._finalize(shard)
            return False
        return True

    def todo(self) -> Iterator[int]:
        """The indices still to generate, in order, shard by shard (lazily: nothing is listed up front)."""
        for shard in self.shards:
            if self._open(shard):
                have = self.pending[shard]
                yield from (i for i in self.shard_range(shard) if i not in have)

    @property
    def done(self) -> set[int]:
        """Every finished index of this writer's shards (reads them all: for tests and small runs)."""
        out: set[int] = set()
        for shard in self.shards:
            out.update(self.pending[shard] if self._open(shard) else self.shard_range(shard))
        return out

    # ---- writing -----------------------------------------------------------------------------------------
    def add(self, record: dict[str, Any]) -> None:
        """Persist one finished record: ``{"index", "status": "kept"|"rejected", ...}``."""
        index = record["index"]
        shard = index // self.shard_size
        if not self._open(shard) or index in self.pending[shard]:
            raise OutputError(f"document {index} was already written (id {record.get('id')})")
        handle = self.handles.get(shard)
        if handle is None:
            handle = self.handles[shard] = open(self.journal_path(shard), "a", encoding="utf-8")
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()  # in the kernel now: a SIGKILL cannot lose it
        self.pending[shard][index] = record
        self.written += 1
        if time.monotonic() - self.last_sync > self.fsync_every:
            self.sync()
        if len(self.pending[shard]) == len(self.shard_range(shard)):
            self._finalize(shard)

    def sync(self) -> None:
        for handle in self.handles.values():
            os.fsync(handle.fileno())
        self.last_sync = time.monotonic()

    def _finalize(self, shard: int) -> None:
        """Stats, rejects, then the shard itself (its existence marks the shard complete), then no journal."""
        pending = self.pending.pop(shard)
        records = [pending[i] for i in sorted(pending)]
        kept = [public_record(r) for r in records if r["status"] == "kept"]
        rejected = [public_record(r) for r in records if r["status"] != "kept"]
        atomic_write_json(self.stats_path(shard), shard_stats(kept, rejected))
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
        return all(not self._open(shard) for shard in self.shards)


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
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_journal(path: Path, remedy: str = "delete the file to redo its shard",
                 error: type[ValueError] = OutputError) -> list[dict[str, Any]]:
    """Records of a JSON-lines journal; a torn last line (killed mid-write) is cut off the file. A corrupt line
    before it raises ``error`` naming the line and the ``remedy``."""
    data = path.read_bytes()
    good = data[: data.rfind(b"\n") + 1]
    records = []
    for n, line in enumerate(good.splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise error(f"{path}:{n}: corrupt journal line ({err}); {remedy}") from None
    if len(good) != len(data):
        with open(path, "r+b") as fh:
            fh.truncate(len(good))
    return records


def _read_shard(file: Path) -> list[dict[str, Any]]:
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [{**row, "metadata": json.loads(row["metadata"])} for row in pq.read_table(file).to_pylist()]
    return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line]


def read_records(out_dir: str | Path, rejected: bool = False) -> list[dict[str, Any]]:
    """Every finished record of a synth output folder (kept, or with ``rejected`` the rejects)."""
    out = Path(out_dir)
    files = sorted((out / "rejected").glob("shard-*.jsonl")) if rejected else sorted(out.glob("shard-*.*"))
    return [record for file in files for record in _read_shard(file)]


BINS = (0, 64, 128, 256, 512, 1024, 2048, 4096)
COUNTED = ("format", "audience", "style", "area", "topic")


def _bin(tokens: int) -> str:
    low = max(b for b in BINS if b <= tokens)
    return f"{low}+" if low == BINS[-1] else f"{low}-{BINS[BINS.index(low) + 1] - 1}"


def shard_stats(kept: list[dict[str, Any]], rejected: list[dict[str, Any]]) -> dict[str, Any]:
    """One shard's counts (first-seen order, so a fold ranks ties as a single pass over the run would)."""
    tokens = [r["metadata"]["tokens"]["completion"] for r in kept]
    return {"documents": len(kept), "rejected": len(rejected), "completion_tokens": sum(tokens),
            "with_web_passage": sum(1 for r in kept if r["metadata"]["passage_id"]),
            "rejected_by_reason": dict(Counter(r["reason"] for r in rejected)),
            "token_histogram": dict(Counter(map(_bin, tokens))),
            **{f"per_{f}": dict(Counter(r["metadata"][f] for r in kept)) for f in COUNTED}}


class StatsFold:
    """Per-shard stats folded into run totals: counts only, so memory does not grow with the run."""

    def __init__(self) -> None:
        self.totals: Counter[str] = Counter()
        self.counters: dict[str, Counter[str]] = {k: Counter() for k in
                                                   ("rejected_by_reason", "token_histogram",
                                                    *(f"per_{f}" for f in COUNTED))}
        self.shards = 0

    def add(self, stats: dict[str, Any]) -> None:
        self.shards += 1
        for key in ("documents", "rejected", "completion_tokens", "with_web_passage"):
            self.totals[key] += stats[key]
        for key, counter in self.counters.items():
            counter.update(stats[key])

    def result(self) -> dict[str, Any]:
        t, c = self.totals, self.counters
        hist = c["token_histogram"]
        return {"documents": t["documents"], "rejected": t["rejected"],
                "rejected_by_reason": dict(c["rejected_by_reason"].most_common()),
                "completion_tokens": t["completion_tokens"],
                "mean_tokens": round(t["completion_tokens"] / max(1, t["documents"]), 1),
                "token_histogram": {k: hist[k] for k in sorted(hist, key=lambda k: int(k.split("-")[0].rstrip("+")))},
                **{f"per_{f}": dict(c[f"per_{f}"].most_common()) for f in ("format", "audience", "style", "area",
                                                                           "topic")},
                "with_web_passage": t["with_web_passage"]}


def fold_stats(writer: ShardWriter) -> tuple[dict[str, Any], list[int]]:
    """The folded stats of ``writer``'s complete shards, and the shards still missing."""
    fold, missing = StatsFold(), []
    for shard in writer.shards:
        if not writer.shard_path(shard).exists():
            missing.append(shard)
            continue
        path = writer.stats_path(shard)
        if not path.exists():  # a shard written before per-shard stats existed: count it once, now
            kept = _read_shard(writer.shard_path(shard))
            rejected = _read_shard(writer.rejected_path(shard)) if writer.rejected_path(shard).exists() else []
            atomic_write_json(path, shard_stats(kept, rejected))
        fold.add(json.loads(path.read_text()))
    return fold.result(), missing


def summarize(out_dir: str | Path) -> dict[str, Any]:
    """Counts per topic/format/audience/style, rejects per reason, a token histogram: the fold of every
    shard's stats (the shard count comes from the folder); written to stats.json."""
    out = Path(out_dir)
    shards = sorted(int(p.name[6:11]) for p in out.glob("shard-*.*"))
    fmt = next((p.suffix[1:] for p in out.glob("shard-*.*")), "jsonl")
    stats, _ = fold_stats(ShardWriter(out, max(shards, default=0) + 1, 1, fmt, shards=shards))
    atomic_write_json(out / "stats.json", stats)
    return stats
