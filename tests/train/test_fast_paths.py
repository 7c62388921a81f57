"""The training step's fast paths against their references: values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from phiforge.config.model import preset
from phiforge.model.transformer import build_model
from phiforge.train import losses
from phiforge.train.distributed import compile_blocks, sigmoid_gelu_tanh
from phiforge.train.losses import chunked_cross_entropy
from phiforge.train.pretrain import next_token_loss


def loss_and_grad(fn, x: torch.Tensor, targets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(x, targets) and the gradient of 3 * its sum with respect to x."""
    x = x.clone().requires_grad_()
    out = fn(x, targets)
    (3.0 * out.sum()).backward()  # an upstream gradient other than 1 (the step divides by micro-batches)
    return out.detach(), x.grad


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sigmoid_gelu_tanh_matches_f_gelu(dtype: torch.dtype) -> None:
    x = (3 * torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))).to(dtype)
    ref_y, ref_grad = loss_and_grad(lambda h, _: F.gelu(h, approximate="tanh"), x, None)
    y, grad = loss_and_grad(lambda h, _: sigmoid_gelu_tanh(h), x, None)
    # the same function in fp32 (0.5 (1 + tanh z) = sigmoid(2z)); tanh and exp round differently, by a few
    # fp32 ulps, which shows as at most one ulp of a bf16 result. The derivative's terms cancel (near
    # x = -0.75 and for large negative x), so its error is relative to the gradient's scale, not each value.
    tol = max(torch.finfo(dtype).eps, 16 * torch.finfo(torch.float32).eps)
    torch.testing.assert_close(y, ref_y, rtol=tol, atol=tol)
    torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol * ref_grad.abs().max().item())


@pytest.mark.parametrize(("layout", "swapped"), [("tiny-phi", True), ("tiny-phi3", False)])
def test_compile_blocks_uses_the_sigmoid_gelu_only_for_tanh_gelu(layout: str, swapped: bool) -> None:
    model = build_model(preset(layout))
    compile_blocks(model)  # compiles lazily: nothing runs here
    assert all((b.mlp.act is sigmoid_gelu_tanh) == swapped for b in model.blocks)
