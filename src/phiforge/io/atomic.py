"""One atomic writer: readers see the old file or the whole new one, never half of it.

Every write goes to a temp file with a unique name in the target's folder (so two writers of the same target never
share a temp file, and the rename stays on one file system), is fsynced, renamed over the target with ``os.replace``,
and the folder is fsynced so the rename survives a crash. On any failure the temp file is removed and the old target
is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

# mkstemp creates 0600 files; published files get the mode a plain open() would give them
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory fds: the rename is still atomic, just not yet durable
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_in(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)
    return Path(tmp)


def _publish(tmp: Path, path: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> None:
    """Write ``path`` through ``write(tmp_path)`` (for writers that want a file name: safetensors, GGUF, Parquet)."""
    path = Path(path)
    tmp = _temp_in(path)
    try:
        write(tmp)
        _publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """A file object for streamed writes; the target appears (whole) only when the block exits without error."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode {mode!r}; expected 'w' or 'wb'")
    path = Path(path)
    tmp = _temp_in(path)
    try:
        with open(tmp, mode, encoding=encoding if "b" not in mode else None) as fh:
            yield fh
        _publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], data: Any, indent: int | None = 1, **dumps: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent, **dumps) + "\n")
