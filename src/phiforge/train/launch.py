"""Training stages of ``phiforge run`` on more than one process: the stage spawns ``torchrun`` itself.

A [pretrain] / [pretrain2] / [sft] section with ``nproc_per_node = N`` (and, across machines, ``nnodes``
and ``rdzv_endpoint = "head:29500"``) runs ``python -m torch.distributed.run ... -m phiforge.train.<x>``
with the same recipe and overrides as the in-process path, streams its output, and reads the run
summary that rank 0 writes. The trainer resumes from its newest checkpoint (checkpoint.resume=auto), so a
killed rank fails the stage and a rerun of ``phiforge run`` continues where the checkpoints stop (or,
with ``max_restarts``, torchrun restarts the ranks itself and they resume the same way).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import phiforge
from phiforge.errors import TrainError


@dataclass
class Launch:
    """How a training stage runs, not what it computes: the keys every training section of a run recipe has.
    Not part of a stage's fingerprint (the data order and the sharded checkpoints do not depend on them)."""

    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: str = ""  # HOST:PORT of the head node when nnodes > 1
    rdzv_id: str = "phiforge"
    max_restarts: int = 0


LAUNCH_KEYS = tuple(f.name for f in fields(Launch))


class LaunchError(TrainError):
    """A training stage's torchrun that is misconfigured or failed; names the key or the exit status."""


def check_launch(section: Launch) -> None:
    n, nodes, endpoint = section.nproc_per_node, section.nnodes, section.rdzv_endpoint
    if n < 1:
        raise LaunchError(f"nproc_per_node = {n!r}: processes per node, an integer >= 1")
    if nodes < 1:
        raise LaunchError(f"nnodes = {nodes!r}: an integer >= 1")
    if nodes > 1 and not endpoint:
        raise LaunchError(f"nnodes = {nodes}: give rdzv_endpoint = \"HOST:PORT\" (the head node), and run the "
                          "same command on every node")


def distributed(section: Launch) -> bool:
    return section.nproc_per_node > 1 or section.nnodes > 1


def torchrun_command(module: str, recipe: str, overrides: list[str], section: Launch) -> list[str]:
    """The torchrun command line for ``python -m MODULE RECIPE OVERRIDES...`` as the section asks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(section.nproc_per_node)]
    if section.nnodes > 1:
        cmd += ["--nnodes", str(section.nnodes), "--rdzv_backend", "c10d",
                "--rdzv_endpoint", section.rdzv_endpoint, "--rdzv_id", section.rdzv_id]
    else:
        cmd += ["--standalone"]
    if section.max_restarts:
        cmd += ["--max_restarts", str(section.max_restarts)]
    return [*cmd, "-m", module, recipe, *overrides]


def run_torchrun(module: str, recipe: str, overrides: list[str], section: Launch, out_dir: Path,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the trainer under torchrun, its stdout lines passed to ``log`` (stderr, with the progress bars,
    goes straight through); the summary rank 0 wrote to ``out_dir``/summary.json."""
    cmd = torchrun_command(module, recipe, overrides, section)
    src = str(Path(phiforge.__file__).resolve().parents[1])  # the children import this very phiforge
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    log(f"   torchrun: {section.nnodes} node(s) x {section.nproc_per_node} process(es): -m {module} {recipe}")
    summary = out_dir / "summary.json"
    summary.unlink(missing_ok=True)  # a stale one from an earlier finished run must not pass for this one
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, bufsize=1) as child:
        assert child.stdout is not None
        for line in child.stdout:
            if not line.startswith("{"):  # the summary JSON is read from its file below
                log(line.rstrip("\n"))
    if child.returncode:
        raise LaunchError(f"torchrun -m {module} exited with status {child.returncode}; rerun to resume from "
                          f"the newest checkpoint in {out_dir / 'checkpoints'}")
    if not summary.is_file():  # not rank 0's node: the run finished; rank 0's node holds the summary
        return {"out_dir": str(out_dir), "node": "not rank 0"}
    return json.loads(summary.read_text())
