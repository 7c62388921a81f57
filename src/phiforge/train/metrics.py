"""Run observability: metrics.jsonl, TensorBoard events, and model FLOPs utilisation (MFU)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from phiforge.config.model import ModelConfig


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weight matmuls plus 12 * layers * q_size * seq_len for attention.

    N counts the matrices a token multiplies through: every parameter except the input embedding table
    (a lookup), with the head counted when it is tied. The attention term is the PaLM convention
    (QK^T and AV, forward and backward, over the full sequence, not halved for causality).
    """
    c = config
    per_block = (c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size
                 + c.hidden_size * c.intermediate_size * (2 if c.gated_mlp else 1)
                 + c.intermediate_size * c.hidden_size)
    matmul_params = c.num_layers * per_block + c.hidden_size * c.vocab_size  # blocks + head
    return 6.0 * matmul_params + 12.0 * c.num_layers * c.q_size * seq_len


def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 2048, seconds: float = 0.5) -> float:
    """FLOP/s of the fastest of repeated square matmuls in ``dtype``: the denominator of MFU here.

    The fastest run, not the mean: on a shared machine other processes only ever slow a run down.
    """
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)  # warm-up (kernel selection, page faults)
    _sync(device)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        tick = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - tick)
    return 2.0 * size**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MetricsLogger:
    """Appends one JSON object per record to metrics.jsonl and mirrors numbers to TensorBoard (rank 0 only)."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, resume_step: int = 0) -> None:
        """``resume_step``: records after it (written before a crash) are dropped; 0 starts a new file."""
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step:
            self._truncate_after(resume_step)
        else:
            self.path.unlink(missing_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step or None)
        self._file = open(self.path, "a")

    def _truncate_after(self, step: int) -> None:
        """A resumed run drops records past its checkpoint, so the file reads as one clean run."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        from phiforge.io.atomic import atomic_write_bytes

        atomic_write_bytes(self.path, "".join(line + "\n" for line in kept).encode())

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.writer is not None:
            for key, value in _flatten(record).items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self.writer is not None:
                self.writer.close()


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out
