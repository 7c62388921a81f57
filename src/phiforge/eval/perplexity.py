"""Perplexity and bits per byte of a model on a text, scored in non-overlapping context windows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from phiforge.errors import EvalError


@dataclass
class Perplexity:
    tokens: int  # predicted tokens
    nll: float  # summed negative log-likelihood, nats
    bytes: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes


@torch.inference_mode()
def window_losses(model: torch.nn.Module, ids: list[int], *, window: int = 512) -> list[tuple[float, int]]:
    """(summed NLL in nats, predicted tokens) of each window of ``window`` tokens; every token but the first
    of a window is predicted. Per-window losses are the items a paired bootstrap resamples."""
    if len(ids) < 2:
        raise EvalError("perplexity needs at least 2 tokens")
    device = model.embed.weight.device
    out = []
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start : start + window + 1]], device=device)
        logits = model(chunk[:, :-1]).float()
        out.append((F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item(), chunk.shape[1] - 1))
    return out


def perplexity(model: torch.nn.Module, ids: list[int], *, window: int = 512, num_bytes: int = 0) -> Perplexity:
    """Score ``ids`` in windows of ``window`` tokens; every token but the first of a window is predicted."""
    windows = window_losses(model, ids, window=window)
    count = sum(n for _, n in windows)
    return Perplexity(tokens=count, nll=sum(nll for nll, _ in windows), bytes=num_bytes or count)
