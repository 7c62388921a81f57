"""The engine under the local teacher: phiforge's ``Engine`` with two changes for bulk generation.

1. each request is reported the moment its row finishes (``on_finish``), so the writer can persist it
   while the other rows keep decoding;
2. sampling is batched: all sampled rows are filtered together (top-k, top-p, min-p) and each draws by
   inverse CDF with one uniform from its own seeded generator. The base engine sorts the vocabulary per
   row, which at 64+ rows costs more than the forward pass. A request's draws still come only from its
   own generator, so its output does not depend on what it was batched with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from phiforge.generate import Engine, SamplingParams, _apply_repetition_penalty


class SynthEngine(Engine):
    on_finish: Callable[[int, Any], None] | None = None

    def _finish(self, state: Any, reason: str) -> None:
        super()._finish(state, reason)
        if self.on_finish is not None:
            self.on_finish(state.index, state.result)

    def _sample(self, logits: torch.Tensor, states: list[Any]) -> torch.Tensor:
        logits = logits.float()
        penalties = [s.params.repetition_penalty for s in states]
        if any(p != 1.0 for p in penalties):
            logits = _apply_repetition_penalty(logits, [s.tokens for s in states], penalties)
        out = logits.argmax(dim=-1)
        rows = [i for i, s in enumerate(states) if s.params.temperature > 0]
        if rows:
            drawn = draw(logits[rows], [states[i].params for i in rows], [states[i].generator for i in rows])
            out[rows] = drawn.to(out.device)
        return out


def draw(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of ``logits`` [N, V] under each row's temperature, top-k, top-p and min-p."""
    device = logits.device
    logits = logits / torch.tensor([p.temperature for p in params], device=device)[:, None]
    vocab = logits.shape[-1]
    ks = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    width = int(ks.max())  # candidates per row, best first; a full sort only when some row has no top-k
    if width < vocab:
        values, order = torch.topk(logits, width, dim=-1)
    else:
        values, order = logits.sort(dim=-1, descending=True)
    values = values.masked_fill(torch.arange(width, device=device)[None] >= ks[:, None], float("-inf"))
    probs = torch.softmax(values, dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
    probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0.0)  # the smallest prefix reaching top_p
    min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]
    probs = probs.masked_fill(probs < min_p * probs[:, :1], 0.0)
    cdf = probs.cumsum(-1)
    u = torch.cat([torch.rand(1, generator=g) for g in generators]).to(device)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=width - 1)
    return order.gather(1, pick)[:, 0]
