"""Weight-only int8/int4: kernels agree with the dequantized weights, checkpoints round-trip, bad files fail."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_
from safetensors.torch import load_file, save_file

from phiforge import kernels
from phiforge.config.model import preset
from phiforge.inference.engine import Engine, SamplingParams
from phiforge.io.checkpoint import CheckpointError
from phiforge.io.load import load_model
from phiforge.kernels import NATIVE_GEMV_ROWS
from phiforge.model.transformer import build_model
from phiforge.quant.quantize import QuantizedLinear, quantize_int8, quantize_model, save_quantized

NAMES = ["tiny-phi", "tiny-phi3", "tiny-llama", "tiny-phi4-mini"]


def _model(name: str) -> torch.nn.Module:
    config = preset(name).replace(intermediate_size=192)  # int4 kernels want K divisible by the group (32)
    return randomize_(build_model(config, dtype=torch.bfloat16), seed=0).eval()


@pytest.mark.parametrize("native", [True, False], ids=["native", "aten"])
@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_matches_dequantized_weights(bits: int, native: bool, monkeypatch) -> None:
    if native and not kernels.available():
        pytest.skip("no C compiler: the native kernels are not built here")
    if not native:  # the PyTorch kernels, as on a machine without a compiler
        monkeypatch.setattr(kernels, "available", lambda: False)
    linear = torch.nn.Linear(256, 96, bias=True).to(torch.bfloat16)
    q = QuantizedLinear.from_linear(linear, bits, group_size=32)
    assert q.kernel == ("native" if native else f"int{bits}pack")
    # int8 on the native kernel may hold its codes in row tiles; stored() gives the portable rows back
    assert q.tile == (kernels.int8_tile(256) if native and bits == 8 else 0)
    if bits == 8:
        assert torch.equal(q.stored()["qweight"], quantize_int8(linear.weight.detach().float())["qweight"])
    for rows in (1, 5, NATIVE_GEMV_ROWS + 3):  # the GEMV, and the dequantize + GEMM path for larger batches
        x = torch.randn(rows, 256, dtype=torch.bfloat16)
        want = x.float() @ q.dequantized().T + linear.bias.float()
        torch.testing.assert_close(q(x).float(), want, atol=0.05, rtol=0.02)
    # and the codes stay close to the original weights: int8 error <= half a step of the row scale
    err = (q.dequantized() - linear.weight.float()).abs().max()
    assert err <= (linear.weight.float().abs().max() / (127 if bits == 8 else 7.5)) * 0.51 + 1e-3


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_checkpoint_round_trip(name: str, bits: int, tmp_path) -> None:
    model = _model(name)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).float()
        quantize_model(model, bits, group_size=32)
        quantized = model(ids).float()
        save_quantized(model, tmp_path)
        loaded = load_model(tmp_path)
        assert torch.equal(loaded(ids).float(), quantized)
    drift = ((quantized - reference).abs().mean() / reference.std()).item()
    assert drift < (0.05 if bits == 8 else 0.35), drift  # random weights: int4 of N(0, .15) is coarse
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= files


def test_quantized_model_generates_like_its_float_self(tmp_path) -> None:
    model = _model("tiny-llama")
    prompt = [[3, 4, 5, 6]]
    float_tokens = Engine(model).generate(prompt, SamplingParams(max_new_tokens=12))[0].token_ids
    quantize_model(model, 8)  # group size is irrelevant for int8
    int8_tokens = Engine(model).generate(prompt, SamplingParams(max_new_tokens=12))[0].token_ids
    assert sum(a == b for a, b in zip(float_tokens, int8_tokens, strict=True)) >= 8


def test_missing_scales_are_named(tmp_path) -> None:
    model = quantize_model(_model("tiny-phi3"), 4, group_size=32)
    save_quantized(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["blocks.1.mlp.fc.scales"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"quantized layer blocks\.1\.mlp\.fc lacks blocks\.1\.mlp\.fc\.scales"):
        load_model(tmp_path)


def test_bad_bits_and_group() -> None:
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize_model(_model("tiny-phi"), 3)
    with pytest.raises(ValueError, match="in_features 64 is not a multiple of group size 48"):
        quantize_model(_model("tiny-phi"), 4, group_size=48)
