"""The one atomic writer: concurrent writers of one target never collide, failures leave the old file and no temp."""

from __future__ import annotations

import multiprocessing as mp
import os
import stat
from pathlib import Path

import pytest

from phiforge.io.atomic import atomic_open, atomic_write, atomic_write_bytes, atomic_write_json

SIZE = 1 << 18  # big enough that a write takes several syscalls, so interleaving would show


def _writer(path: str, letter: str, rounds: int, errors) -> None:  # noqa: ANN001
    try:
        for _ in range(rounds):
            atomic_write_bytes(Path(path), letter.encode() * SIZE)
    except BaseException as err:  # reported to the parent: any collision is a failure
        errors.put(f"{letter}: {type(err).__name__}: {err}")


def test_two_concurrent_writers_never_collide(tmp_path: Path) -> None:
    target = tmp_path / "shared.bin"
    atomic_write_bytes(target, b"o" * SIZE)
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(target), letter, 60, errors)) for letter in "ab"]
    for p in procs:
        p.start()
    seen = set()
    while any(p.is_alive() for p in procs):  # every read sees one writer's whole file, never a mix or a short one
        data = target.read_bytes()
        assert len(data) == SIZE and data == data[:1] * SIZE, f"torn read: {len(data)} bytes, {set(data)}"
        seen.add(data[:1])
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert errors.empty(), errors.get()
    assert target.read_bytes() in (b"a" * SIZE, b"b" * SIZE)
    assert sorted(os.listdir(tmp_path)) == ["shared.bin"]  # no temp file left by either writer


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "config.json"
    atomic_write_json(target, {"version": 1})

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text('{"version": 2, "trunc')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    with pytest.raises(KeyboardInterrupt), atomic_open(target, "w", encoding="utf-8") as fh:  # streamed writer
        fh.write('{"version": 3, "trunc')
        raise KeyboardInterrupt
    assert target.read_text() == '{\n "version": 1\n}\n'
    assert sorted(os.listdir(tmp_path)) == ["config.json"]


def test_published_files_get_the_umask_mode_not_mkstemps_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    os.umask(old)
    target = tmp_path / "sub" / "weights.bin"  # the folder is created
    atomic_write_bytes(target, b"x")
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~old
