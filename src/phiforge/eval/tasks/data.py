"""Benchmark data: local files (the original formats, or Hugging Face layouts) or the Hugging Face hub.

Where a task's data comes from, first found: ``--data TASK=PATH``; the benchmarks folder (``--data-dir``,
``$PHIFORGE_BENCHMARKS``, else ``./benchmarks`` in the working directory; nothing outside it is looked at); the
hub dataset lm-eval 0.4.13's task reads (same id, config and splits), through ``datasets`` and its cache
(``HF_DATASETS_OFFLINE=1`` reads the cache only). ``$PHIFORGE_HUB_MIRROR`` names a folder of hub-layout dataset
repositories (``<owner>/<name>/``), read with ``datasets.load_dataset(folder)`` instead of the hub.

Every error names the task, the file and the record (1-based line for JSONL), as the design asks.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phiforge.errors import EvalError

BENCHMARKS_ENV = "PHIFORGE_BENCHMARKS"
HUB_MIRROR_ENV = "PHIFORGE_HUB_MIRROR"
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")


class TaskDataError(EvalError):
    """Missing or malformed benchmark data; the message names task, file and record."""


@dataclass(frozen=True)
class HubDataset:
    """A task's data on the Hugging Face hub, as lm-eval 0.4.13's task config names it."""

    path: str
    name: str | None
    split: str
    shot_split: str | None = None

    def __str__(self) -> str:
        return self.path + (f" ({self.name})" if self.name else "")


def default_data_dir() -> Path | None:
    """$PHIFORGE_BENCHMARKS, else ./benchmarks in the working directory (nothing outside it)."""
    env = os.environ.get(BENCHMARKS_ENV)
    if env:
        return Path(env)
    local = Path.cwd() / "benchmarks"
    return local if local.is_dir() else None


def portable_source(source: str) -> str:
    """``source`` for results that others read: the benchmarks folder as $PHIFORGE_BENCHMARKS, the working
    directory's files relative to it, so no machine's absolute paths end up in shared results."""
    env = os.environ.get(BENCHMARKS_ENV)
    if env:
        source = source.replace(str(Path(env)).rstrip("/") + "/", f"${BENCHMARKS_ENV}/")
    return source.replace(str(Path.cwd()).rstrip("/") + "/", "")


def load_hub(task: str, hub: HubDataset) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, str]:
    """(documents, shot documents, source) of the hub dataset, through ``datasets`` (its cache, its offline mode)."""
    try:
        import datasets
    except ImportError:
        raise TaskDataError(f"task {task}: reading {hub} from the hub needs `datasets` "
                            "(pip install 'phiforge[eval]')") from None
    mirror = os.environ.get(HUB_MIRROR_ENV)
    source = str(Path(mirror) / hub.path) if mirror and (Path(mirror) / hub.path).is_dir() else hub.path

    def read(split: str) -> list[dict[str, Any]]:
        try:
            return [dict(row) for row in datasets.load_dataset(source, hub.name, split=split)]
        except Exception as err:  # datasets raises many kinds (network, cache miss, bad config)
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TaskDataError(f"task {task}: the hub dataset {hub} split {split!r} could not be loaded "
                                f"({type(err).__name__}: {reason[:300]})") from None

    docs = read(hub.split)
    shots = read(hub.shot_split) if hub.shot_split else None
    # the hub id, also when a mirror stood in for the hub: results name the dataset, not this machine's folder
    return docs, shots, f"hf:{hub.path}" + (f"/{hub.name}" if hub.name else "") + f":{hub.split}"


def resolve_root(task: str, explicit: str | os.PathLike[str] | None, data_dir: str | os.PathLike[str] | None,
                 subdir: str | None) -> Path:
    """Where a task's data lives: the path given for it, else data_dir/subdir for the sets shipped there."""
    if explicit is not None:
        path = Path(explicit)
        if not path.exists():
            raise TaskDataError(f"task {task}: data path {path} does not exist")
        return path
    base = Path(data_dir) if data_dir is not None else default_data_dir()
    if subdir is not None and base is not None and (base / subdir).exists():
        return base / subdir
    where = (f"{base / subdir} does not exist" if subdir is not None and base is not None else
             f"no benchmarks folder: ${BENCHMARKS_ENV} is unset and there is no ./benchmarks" if base is None else
             f"the benchmarks folder {base} has no files of this task's own format")
    raise TaskDataError(f"task {task}: no data ({where}); give a path with --data {task}=PATH "
                        f"(a .jsonl/.json/.parquet file or a folder in the Hugging Face layout)")


def find_file(task: str, root: Path, patterns: Sequence[str]) -> Path:
    """``root`` itself if it is a file, else the first file under it matching one of ``patterns`` (globs)."""
    if root.is_file():
        return root
    for pattern in patterns:
        found = sorted(p for p in root.glob(pattern) if p.is_file())
        if found:
            return found[0]
    raise TaskDataError(f"task {task}: no data file in {root} (looked for {', '.join(patterns)})")


def split_patterns(*splits: str) -> list[str]:
    """Globs for a split in the usual Hugging Face layouts: test.jsonl, data/test-00000-of-00001.parquet …"""
    out = []
    for split in splits:
        for suffix in DATA_SUFFIXES:
            out += [f"{split}{suffix}", f"*/{split}{suffix}", f"{split}-*{suffix}", f"*/{split}-*{suffix}"]
    return out


def read_records(task: str, path: Path) -> list[dict[str, Any]]:
    """Records of a .jsonl(.gz), .json (a list, or {"data": [...]}), .parquet or headed .csv file."""
    if not path.is_file():
        raise TaskDataError(f"task {task}: data file {path} does not exist")
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _read_jsonl(task, path)
    if name.endswith(".json"):
        return _read_json(task, path)
    if name.endswith(".parquet"):
        return _read_parquet(task, path)
    if name.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    raise TaskDataError(f"task {task}: {path}: unsupported format (expected one of {', '.join(DATA_SUFFIXES)})")


def _read_jsonl(task: str, path: Path) -> list[dict[str, Any]]:
    from phiforge.data.jsonl import iter_jsonl

    records = []
    for line in iter_jsonl(path):
        if line.error:  # a benchmark with a lost item would score a different test: stop
            raise TaskDataError(f"task {task}: {line.where}: {line.error}")
        records.append({**line.record, "__line__": line.line})
    return records


def _read_json(task: str, path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TaskDataError(f"task {task}: {path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise TaskDataError(f"task {task}: {path}: expected a list of objects")
    return data


def _read_parquet(task: str, path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TaskDataError(f"task {task}: {path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    return pq.read_table(path).to_pylist()


def where(path: Path, index: int, record: dict[str, Any]) -> str:
    """'file line N' for JSONL records, else 'file record N' (1-based)."""
    line = record.get("__line__")
    return f"{path} line {line}" if line is not None else f"{path} record {index + 1}"


def require(task: str, path: Path, records: Iterable[dict[str, Any]], fields: Sequence[str]) -> None:
    """Every record has every field, or a TaskDataError naming the first record that does not."""
    for i, record in enumerate(records):
        missing = [f for f in fields if f not in record]
        if missing:
            raise TaskDataError(f"task {task}: {where(path, i, record)}: missing field "
                                f"{', '.join(repr(m) for m in missing)} (each record needs {', '.join(fields)})")


def read_labels(task: str, path: Path, count: int) -> list[int]:
    """A .lst label file (one integer per line), checked against the number of records."""
    labels = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                labels.append(int(line))
            except ValueError:
                raise TaskDataError(f"task {task}: {path} line {line_no}: expected an integer label, "
                                    f"got {line!r}") from None
    if len(labels) != count:
        raise TaskDataError(f"task {task}: {path} has {len(labels)} labels for {count} records")
    return labels


def load_split_files(task: str, root: Path, eval_splits: Sequence[str], fields: Sequence[str],
                     shot_split: str | None = "train") -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, str]:
    """Hugging Face layout: the eval split's file (or ``root`` itself), plus the shot split's file if present."""
    file = find_file(task, root, split_patterns(*eval_splits))
    docs = read_records(task, file)
    require(task, file, docs, fields)
    shots, source = None, str(file)
    if root.is_dir() and shot_split is not None:
        try:
            shot_file = find_file(task, root, split_patterns(shot_split))
        except TaskDataError:
            shot_file = None
        if shot_file is not None and shot_file != file:
            shots = read_records(task, shot_file)
            require(task, shot_file, shots, fields)
            source += f" + {shot_file}"
    return docs, shots, source
