"""Programs per second through the code sandbox: bubblewrap + judge/candidate (now) beside main's single
``python -I`` process with an audit hook (the reference, loaded from ``git show main:src/phiforge/eval/sandbox.py``
into a temporary module), at 1 and 2 workers, on HumanEval's canonical solutions. Prints JSON.

    .venv/bin/python bench/sandbox.py [--programs 60] [--reference-rev main]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

from phiforge.eval import sandbox
from phiforge.eval.tasks import get_task


def _reference(rev: str) -> object | None:
    """main's sandbox module, or None when git cannot show it (a checkout without history)."""
    root = Path(__file__).resolve().parents[1]
    try:
        source = subprocess.run(["git", "show", f"{rev}:src/phiforge/eval/sandbox.py"], cwd=root, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp(prefix="phiforge-bench-")) / "sandbox_reference.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("sandbox_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sandbox_reference"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--programs", type=int, default=60, help="first N HumanEval problems")
    parser.add_argument("--reference-rev", default="main")
    args = parser.parse_args()
    docs = get_task("humaneval").load().docs[: args.programs]
    task = get_task("humaneval")
    now = [task.program(doc, doc["canonical_solution"]) for doc in docs]
    joined = [p.code + p.tests for p in now]  # what main's sandbox ran: one program
    ref = _reference(args.reference_rev)
    out: dict = {"machine": machine(), "programs": len(now), "sandbox": sandbox.sandbox_kind(sandbox.SandboxLimits()),
                 "note": "2 shared cores under contention: compare the columns of one run"}
    for workers in (1, 2):
        row = {}
        runs = {"bubblewrap": (sandbox.run_programs, now, sandbox.SandboxLimits())}
        if ref is not None:
            runs["reference"] = (ref.run_programs, joined, ref.SandboxLimits())
        for name, (run, programs, limits) in runs.items():
            start = time.perf_counter()
            results = run(programs, limits, workers)
            seconds = time.perf_counter() - start
            row[name] = {"programs_per_s": round(len(now) / seconds, 2), "passed": sum(r.passed for r in results)}
        if "reference" in row:
            row["ratio"] = round(row["bubblewrap"]["programs_per_s"] / row["reference"]["programs_per_s"], 3)
        out[f"workers_{workers}"] = row
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
