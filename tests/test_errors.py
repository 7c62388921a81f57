"""One error base: every error class phiforge defines derives from PhiforgeError, and the CLI prints those as one
line while anything else (a bug) keeps its full traceback."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import phiforge
from phiforge.errors import PhiforgeError

SRC = Path(phiforge.__file__).parent
# control flow, not errors: the sandbox's parent/child signals must pass through `except Exception`
NOT_ERRORS = {"Gone", "Timeout"}


def _error_classes() -> list[tuple[str, str]]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        module = ".".join(("phiforge", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Exception")):
                found.append((module, node.name))
    return found


def test_every_error_class_derives_from_phiforge_error() -> None:
    classes = _error_classes()
    assert len(classes) >= 25  # the area errors of data, train, eval, io, tokenizers, serve, kernels
    wrong = [f"{module}.{name}" for module, name in classes if name not in NOT_ERRORS
             and not issubclass(getattr(importlib.import_module(module), name), PhiforgeError)]
    assert not wrong, f"not derived from PhiforgeError: {wrong}"


def _cli(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC.parent)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_cli_prints_one_line_for_phiforge_errors_and_a_traceback_for_bugs() -> None:
    mine = _cli("import sys; from phiforge.cli import main; sys.exit(main(['info', 'no-such-model']))")
    assert mine.returncode == 2
    assert mine.stderr.strip().splitlines() == [mine.stderr.strip()]  # one line
    assert mine.stderr.startswith("phiforge info: error: 'no-such-model' is not a preset")
    assert "Traceback" not in mine.stderr

    # a ValueError that phiforge did not raise on purpose is a bug: it must not be hidden behind one line
    bug = _cli("import sys, phiforge.info as info\n"
               "def broken(config): raise ValueError('an internal bug')\n"
               "info.describe = broken\n"
               "from phiforge.cli import main; sys.exit(main(['info', 'phi-1.5']))")
    assert bug.returncode == 1
    assert "Traceback (most recent call last)" in bug.stderr and "ValueError: an internal bug" in bug.stderr
    assert "in broken" in bug.stderr  # the frame that raised is shown
