"""Running per-shard work: resumable stages over sharded files, on local processes or a Ray cluster.

A stage maps one picklable function over shards. Each shard's outputs are written atomically and then a
completion marker (``.done/<shard>.json``, holding the shard's stats) is written last, so a relaunch after
kill -9 skips finished shards and redoes the rest from scratch: no duplicates, no gaps. As in datatrove, a
shard is a whole input file and is never split, so the output does not depend on the number of workers.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from phiforge.data.jsonl import Line, iter_lines, text_error, write_jsonl
from phiforge.errors import DataError
from phiforge.io.atomic import atomic_write_json


class CurateError(DataError):
    """Bad input or configuration; the message names the file, the line or the key."""


@dataclass(frozen=True)
class Shard:
    name: str  # output file stem, unique in the run
    path: Path  # the file this stage reads


# ---- executors ---------------------------------------------------------------------------------------
class Executor(Protocol):
    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], desc: str) -> list[Any]:
        """``[fn(item) for item in items]`` in item order, run wherever the executor runs things."""
        ...

    def shutdown(self) -> None:
        ...


class LocalExecutor:
    """In this process (workers=1) or a pool of spawned processes, kept for the whole run.

    spawn, not fork: safe after torch has started threads, and the same start method on every platform.
    """

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise CurateError(f"executor.workers must be >= 1, got {workers}")
        self.workers = workers
        self._pool: Any = None

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], desc: str) -> list[Any]:
        bar = tqdm(total=len(items), desc=desc, unit="shard", disable=not items)
        results: dict[int, Any] = {}
        if self.workers == 1 or len(items) <= 1:
            for i, item in enumerate(items):
                results[i] = fn(item)
                bar.update()
        else:
            if self._pool is None:
                self._pool = multiprocessing.get_context("spawn").Pool(self.workers)
            for index, result in self._pool.imap_unordered(_indexed, [(fn, i, x) for i, x in enumerate(items)]):
                results[index] = result
                bar.update()
        bar.close()
        return [results[i] for i in range(len(items))]

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None


def _indexed(job: tuple[Callable[[Any], Any], int, Any]) -> tuple[int, Any]:
    fn, index, item = job
    return index, fn(item)


class RayExecutor:
    """One Ray task per shard. ``address=None`` starts a local Ray instance; "auto" joins a running cluster."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise CurateError("executor.kind = 'ray' needs Ray: pip install 'phiforge[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            # workers must import phiforge from the same place as this driver
            package_root = str(Path(__file__).resolve().parents[3])
            paths = [package_root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
            ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                     log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}})

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], desc: str) -> list[Any]:
        remote = self.ray.remote(_indexed)
        pending = [remote.remote((fn, i, item)) for i, item in enumerate(items)]
        results: dict[int, Any] = {}
        with tqdm(total=len(items), desc=desc, unit="shard", disable=not items) as bar:
            while pending:
                done, pending = self.ray.wait(pending, num_returns=1)
                index, result = self.ray.get(done[0])
                results[index] = result
                bar.update()
        return [results[i] for i in range(len(items))]

    def shutdown(self) -> None:
        self.ray.shutdown()


def make_executor(kind: str, workers: int, address: str = "") -> Executor:
    if kind == "local":
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(address or None, workers)
    raise CurateError(f"executor.kind = {kind!r}; expected 'local' or 'ray'")


# ---- resumable stages ---------------------------------------------------------------------------------
def marker_path(stage_dir: Path, shard: str) -> Path:
    return stage_dir / ".done" / f"{shard}.json"


@dataclass
class _ShardJob:
    """Picklable wrapper: run ``fn(shard)`` then write its completion marker with the stats it returned."""

    fn: Callable[[Shard], dict[str, Any]]
    stage_dir: Path

    def __call__(self, shard: Shard) -> dict[str, Any]:
        stats = self.fn(shard)
        marker = marker_path(self.stage_dir, shard.name)
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(marker, stats)
        return stats


def run_stage(executor: Executor, stage_dir: Path, fn: Callable[[Shard], dict[str, Any]], shards: list[Shard],
              desc: str) -> list[dict[str, Any]]:
    """Stats of ``fn`` on every shard, skipping shards whose marker says they are done (resume)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    done = {s.name: json.loads(marker_path(stage_dir, s.name).read_text())
            for s in shards if marker_path(stage_dir, s.name).is_file()}
    todo = [s for s in shards if s.name not in done]
    if done:
        print(f"{desc}: {len(done)} of {len(shards)} shards already done, resuming", file=sys.stderr)
    fresh = dict(zip([s.name for s in todo], executor.map(_ShardJob(fn, stage_dir), todo, desc)))
    return [done.get(s.name) or fresh[s.name] for s in shards]


# ---- reading and filtering documents --------------------------------------------------------------------
def iter_docs(path: Path) -> Iterator[dict[str, Any]]:
    """Documents of a file this pipeline wrote itself (already validated by the read stage)."""
    for line in iter_lines(path):
        if line.record is None:  # only a hand-edited intermediate file can get here
            raise CurateError(f"{line.where}: {line.error}")
        yield line.record


def checked_records(lines: Iterator[Line], text_field: str) -> Iterator[Line]:
    """Lines whose record lacks a string text field become bad lines with that reason."""
    for line in lines:
        if line.record is not None:
            problem = text_error(line.record, text_field)
            if problem:
                line = Line(line.path, line.line, None, f"{problem} (expected the document text)")
        yield line


def filter_shard(shard: Shard, stage_dir: Path, decide: Callable[[list[dict[str, Any]]], list[str | None]],
                 batch_size: int = 256) -> dict[str, Any]:
    """Write kept documents to ``stage_dir/<shard>.jsonl`` and removed ones, with the reason, to ``removed/``.

    ``decide(batch)`` returns one drop reason (or None to keep) per document, so steps can batch work.
    """
    kept: list[dict[str, Any]] = []
    removed: list[dict[str, Any]] = []
    reasons: dict[str, int] = {}
    docs = list(iter_docs(shard.path))
    for start in range(0, len(docs), batch_size):
        batch = docs[start:start + batch_size]
        for doc, reason in zip(batch, decide(batch)):
            if reason is None:
                kept.append(doc)
            else:
                removed.append({**doc, "removed_by": reason})
                key = reason.split(" ")[0]  # "rule (detail)" counts under rule
                reasons[key] = reasons.get(key, 0) + 1
    write_jsonl(stage_dir / "removed" / f"{shard.name}.jsonl", removed)
    write_jsonl(stage_dir / f"{shard.name}.jsonl", kept)
    return {"shard": shard.name, "docs_in": len(docs), "docs_out": len(kept), "removed": reasons}


def merge_stats(per_shard: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over shards: documents in/out and removals by reason."""
    reasons: dict[str, int] = {}
    for s in per_shard:
        for key, n in s.get("removed", {}).items():
            reasons[key] = reasons.get(key, 0) + n
    return {"docs_in": sum(s["docs_in"] for s in per_shard), "docs_out": sum(s["docs_out"] for s in per_shard),
            "removed": dict(sorted(reasons.items()))}
