"""Next-token cross-entropy for training that never holds the fp32 [tokens, vocab] logits.

``F.cross_entropy(logits.float(), ...)`` writes an fp32 copy of the logits, an fp32 log-softmax, and in
backward a zero-filled fp32 gradient, its log-softmax gradient and a bf16 copy of that: five passes
over [tokens, vocab] in fp32, a large share of a small model's step on the CPU. ``chunked_cross_entropy``
computes the same fp32 values a block of rows at a time (each block stays in cache) and writes the
gradient once, in the logits' dtype. Backward recomputes the softmax from the saved logits and the fp32
log-sum-exp per row, so nothing of size [tokens, vocab] is saved beyond the logits themselves.
"""

from __future__ import annotations

from typing import Any

import torch

CHUNK_ELEMENTS = 1 << 18  # fp32 elements per block (1 MiB): rows of the vocabulary that stay in L2


def _row_blocks(rows: int, vocab: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // vocab)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for rows in _row_blocks(*logits.shape):
            lse[rows] = torch.logsumexp(logits[rows].float(), dim=-1)
        picked = logits.gather(1, targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, targets, lse)
        return (lse - picked).mean()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        scale = grad.float() / logits.shape[0]  # d(mean)/d(row loss)
        out = torch.empty_like(logits)
        for rows in _row_blocks(*logits.shape):
            # softmax * scale - scale at the target: log_softmax_backward's order of operations; a copy
            # even of fp32 logits, which are saved and must not change
            block = logits[rows].to(torch.float32, copy=True).sub_(lse[rows, None]).exp_().mul_(scale)
            picked = targets[rows, None]
            block.scatter_add_(1, picked, (-scale).expand(picked.shape))
            out[rows] = block
        return out, None


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean fp32 cross-entropy of logits [..., V] against targets [...] (all valid ids: no ignore_index)."""
    return _ChunkedCrossEntropy.apply(logits.flatten(0, -2), targets.flatten())
