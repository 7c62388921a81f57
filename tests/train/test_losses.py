"""The chunked training loss against the reference F.cross_entropy on fp32 logits: values and gradients."""

from __future__ import annotations

import pytest
import torch

from phiforge.train import losses
from phiforge.train.losses import chunked_cross_entropy
from phiforge.train.pretrain import next_token_loss


def loss_and_grad(fn, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.clone().requires_grad_()
    loss = fn(x, targets)
    (3.0 * loss).backward()  # an upstream gradient other than 1 (the step divides by micro-batches)
    return loss.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_chunked_cross_entropy_matches_the_reference(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 5 * 1000)  # 5 rows a block: 51 rows end in a partial block
    generator = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(3, 17, 1000, generator=generator)).to(dtype)
    targets = torch.randint(0, 1000, (3, 17), generator=generator)
    saved = logits.clone()
    ref_loss, ref_grad = loss_and_grad(next_token_loss, logits, targets)
    loss, grad = loss_and_grad(chunked_cross_entropy, logits, targets)
    assert torch.equal(logits, saved)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    # Both compute in fp32 and differ only in rounding order (x - lse vs x - max - log(sum)): the softmax's
    # exponent is rounded at the scale of the log-sum-exp (~10 here, 16 fp32 ulps of 1), so the gradient
    # agrees to 16 fp32 ulps, or one ulp of a bf16/fp16 gradient; the loss to fp32 precision.
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    tol = max(torch.finfo(dtype).eps, 16 * torch.finfo(torch.float32).eps)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=tol, atol=tol * ref_grad.abs().max().item())
