"""No committed file carries an absolute path of the machine that made it (a home, a workspace, /root)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# a path below the root's work, home, root or Users folders is a machine's own (a bare "/root" or "/work", as the
# sandbox tests name what they hide, is no path of this machine)
MACHINE_PATH = re.compile(rb"(?<![\w.~-])/(?:work|home|root|Users)/[\w.-]+")


def committed_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_absolute_machine_paths_in_committed_files() -> None:
    found = []
    for path in committed_files():
        if not path.is_file() or path.suffix == ".gguf":
            continue
        data = path.read_bytes()
        if b"\0" in data[:4096]:  # binary
            continue
        for match in MACHINE_PATH.finditer(data):
            line = data.count(b"\n", 0, match.start()) + 1
            found.append(f"{path.relative_to(ROOT)}:{line}: {match.group().decode(errors='replace')}")
    assert not found, "absolute machine paths:\n" + "\n".join(found)


def test_results_name_the_benchmarks_folder_not_the_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from phiforge.eval.tasks.data import portable_source

    monkeypatch.setenv("PHIFORGE_BENCHMARKS", str(tmp_path / "bench"))
    monkeypatch.chdir(tmp_path)
    source = f"{tmp_path}/bench/piqa/valid.jsonl + {tmp_path}/data/x.jsonl + hf:baber/piqa:validation"
    assert portable_source(source) == "$PHIFORGE_BENCHMARKS/piqa/valid.jsonl + data/x.jsonl + hf:baber/piqa:validation"
