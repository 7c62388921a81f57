"""One reader for document files (JSONL, gzip JSONL, Parquet) that reports bad records instead of losing them.

Every record comes back as a ``Line``: the parsed object, or ``None`` plus an error naming what was
expected. Callers decide whether a bad line stops the run or is counted and reported; the message
always carries the file and the 1-based line (or Parquet row).
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phiforge.errors import ConfigError, DataError
from phiforge.io.atomic import atomic_open

DOCUMENT_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


@dataclass
class Line:
    path: Path
    line: int  # 1-based line (JSONL) or row (Parquet)
    record: dict[str, Any] | None  # None when the line is bad
    error: str = ""
    raw: str = ""  # the undecodable line itself, for bad lines (cut to 1000 characters)

    @property
    def where(self) -> str:
        return f"{self.path} line {self.line}"


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[Line]:
    """Every non-blank line of a .jsonl or .jsonl.gz file, parsed; bad lines carry an error.

    A truncated or corrupt archive ends with one bad line (after the last whole line read); records whose
    strings are not valid Unicode (JSON escapes of lone surrogates) are bad lines, since nothing can write them."""
    path = Path(path)
    with open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
        lines = enumerate(stream, 1)
        line_no = 0
        while True:
            try:
                line_no, line = next(lines)
            except StopIteration:
                return
            except (EOFError, OSError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
                yield Line(path, line_no + 1, None, f"truncated or corrupt archive ({err or type(err).__name__}); "
                                                    f"the records after line {line_no} are lost")
                return
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
                yield Line(path, line_no, None, f"malformed JSON ({err}); expected one JSON object per line",
                           line[:1000].decode("utf-8", "replace"))
                continue
            if not isinstance(record, dict):
                yield Line(path, line_no, None, f"expected a JSON object, got {type(record).__name__}",
                           line[:1000].decode("utf-8", "replace"))
            elif b"\\u" in line and not _encodable(record):
                yield Line(path, line_no, None, "a string holds a lone surrogate (\\ud800-\\udfff): not valid "
                           "Unicode, so it cannot be written", line[:1000].decode("utf-8", "replace"))
            else:
                yield Line(path, line_no, record)


def _encodable(record: dict[str, Any]) -> bool:
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def iter_parquet(path: str | os.PathLike[str], batch_size: int = 1024) -> Iterator[Line]:
    path = Path(path)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        for record in batch.to_pylist():
            row += 1
            yield Line(path, row, record)


def iter_lines(path: str | os.PathLike[str]) -> Iterator[Line]:
    """Records of a document file, by suffix."""
    path = Path(path)
    if path.name.endswith(".parquet"):
        return iter_parquet(path)
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return iter_jsonl(path)
    raise DataError(f"{path}: unsupported document file; expected one of {', '.join(DOCUMENT_SUFFIXES)}")


def text_error(record: dict[str, Any], field: str) -> str:
    """Why ``record[field]`` is not usable text ('' when it is)."""
    value = record.get(field)
    if field not in record:
        return f"missing field {field!r}"
    if not isinstance(value, str):
        return f"field {field!r} is a {type(value).__name__}, not a string"
    return ""


def write_jsonl(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> int:
    """Write records atomically (temp file, fsync, rename); returns how many were written."""
    path = Path(path)
    count = 0
    try:
        with atomic_open(path, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
    except UnicodeEncodeError as err:
        raise DataError(f"{path}: record {count + 1} holds a string that is not valid Unicode ({err})") from None
    return count


def document_files(documents: str | list[str]) -> list[Path]:
    """A .jsonl file, a folder of them, or a list of either (``[run] documents``, a study's corpora)."""
    files: list[Path] = []
    for item in [documents] if isinstance(documents, str) else documents:
        files += [Path(item)] if Path(item).is_file() else sorted(Path(item).glob("*.jsonl"))
    return files
