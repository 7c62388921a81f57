"""The engine's CPU fast paths (fast_paths): installed onto a model, the plain modules kept for training and
export, the same numbers as the plain model, and a true report of which route each layer takes."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from phiforge import kernels
from phiforge.cli import main
from phiforge.config.model import preset
from phiforge.inference import fast_paths
from phiforge.inference.engine import Engine, SamplingParams
from phiforge.inference.fast_paths import FastModel, NativeAttention, NativeRMSNorm, PackedLinear
from phiforge.kernels import GEMM_MAX_ROWS
from phiforge.model.transformer import Attention, PhiForgeModel, RMSNorm, build_model
from phiforge.quant.quantize import quantize_model

SRC = Path(fast_paths.__file__).parents[1]


def test_model_py_is_plain_pytorch() -> None:
    """The transformer imports nothing native and builds only torch modules; training and FSDP see exactly these."""
    tree = ast.parse((SRC / "model" / "transformer.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {m for m in imported if m and m.startswith("phiforge")} - {"phiforge.config.model"}
    model = build_model(preset("tiny-phi3"), dtype=torch.bfloat16)
    types = {type(m) for m in model.modules()}
    assert nn.Linear in types and not types & {PackedLinear, NativeRMSNorm, NativeAttention, FastModel}


def test_install_swaps_classes_keeps_the_state_and_remove_restores_them() -> None:
    model = build_model(preset("tiny-phi3"), dtype=torch.bfloat16).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plain = model(ids)
    added = fast_paths.install(model)
    # packed copies only where oneDNN's bf16 linear runs (AVX-512 or AVX-NE-CONVERT); idempotent: no second copy
    assert (added > 0) == kernels.onednn_bf16() and fast_paths.install(model) == added
    assert type(model) is FastModel and type(model.blocks[0].attn.qkv) is PackedLinear
    assert type(model.blocks[0].norm_1) is NativeRMSNorm and type(model.blocks[0].attn) is NativeAttention
    assert [id(p) for p in model.parameters()] == params  # the same parameter objects, nothing registered
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    with torch.inference_mode():
        if kernels.onednn_bf16():  # prefill: oneDNN's packed copy and the native RMSNorm, bitwise
            assert torch.equal(model(ids), plain)
        else:  # AVX2: the native GEMV's tiles sum in another order
            torch.testing.assert_close(model(ids), plain, atol=2e-2, rtol=2e-2)
    fast_paths.remove(model)
    assert type(model) is PhiForgeModel and type(model.blocks[0].attn.qkv) is nn.Linear
    assert type(model.blocks[0].norm_1) is RMSNorm and type(model.blocks[0].attn) is Attention
    assert "packed" not in vars(model.blocks[0].attn.qkv)


def test_engine_installs_and_training_keeps_the_plain_path() -> None:
    model = build_model(preset("tiny-llama"), dtype=torch.bfloat16)
    ids = [5, 6, 7, 8]
    Engine(model, max_batch_size=1).generate([ids], SamplingParams(max_new_tokens=3))
    assert type(model) is FastModel  # the engine owns and installs
    model.train()
    x = torch.randint(0, model.config.vocab_size, (2, 8))
    loss = model(x).float().logsumexp(-1).mean()
    loss.backward()  # gradients flow through the plain routes of every installed module
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_packed_linear_gives_f_linear_bitwise_and_never_a_stale_weight() -> None:
    linear = nn.Linear(96, 80).to(torch.bfloat16)
    linear.__class__ = PackedLinear
    if not linear.pack():
        pytest.skip("no oneDNN bf16 linear here (this PyTorch build or this CPU: it needs AVX-512 or AVX-NE-CONVERT)")
    x = torch.randn(2, 7, 96, dtype=torch.bfloat16)
    first = linear.packed
    assert linear.pack() and linear.packed is first  # asked again (another Engine): no second copy
    with torch.no_grad():
        assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))
        linear.weight.mul_(2)  # an update after packing: the packed copy must not be used
        assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))
        assert linear.pack() and linear.packed is not first  # repacked for the new weights
        assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))


def test_gemm_packed_linear_serves_decode_batches_and_never_a_stale_weight() -> None:
    linear = nn.Linear(96, 64).to(torch.bfloat16)
    linear.__class__ = PackedLinear
    if not (kernels.gemm_available() and linear.pack()):
        pytest.skip("no vector bf16 GEMM (AMX or AVX512-BF16) on this CPU")
    assert linear.gemm_packed is not None
    x = torch.randn(4, 96, dtype=torch.bfloat16)  # a decode batch of 4 rows: the native GEMM
    with torch.no_grad():
        torch.testing.assert_close(linear(x), F.linear(x, linear.weight, linear.bias), atol=2e-2, rtol=1e-2)
        linear.weight.mul_(-1)  # updated after packing: the packed copy must not be used either
        assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))
        big = torch.randn(GEMM_MAX_ROWS + 8, 96, dtype=torch.bfloat16)  # more rows: oneDNN's copy, bitwise
        linear.pack()
        assert torch.equal(linear(big), F.linear(big, linear.weight, linear.bias))


def _routes(report: dict, module: str) -> dict:
    return next(r for r in report["modules"] if r["module"] == module)


@pytest.mark.skipif(not kernels.available(), reason="native kernels not built on this machine")
def test_paths_report_what_runs() -> None:
    model = build_model(preset("tiny-phi3"), dtype=torch.bfloat16).eval()
    plain = fast_paths.paths(model)
    assert not plain["installed"] and _routes(plain, "blocks.0.attn.qkv")["one_row"] == "F.linear"
    assert _routes(plain, "(every block)")["one_row"] == "layer by layer"
    fast_paths.install(model)
    report = fast_paths.paths(model)
    assert report["installed"] and report["kernels"] == kernels.level()
    assert _routes(report, "blocks.1.attn.qkv")["one_row"].startswith("native GEMV")
    prefill = ("oneDNN packed" if kernels.onednn_bf16() else "native GEMM (avx2 tiles)"
               if kernels.bf16_rows_tiled(model.config.hidden_size) else "F.linear")
    assert _routes(report, "blocks.1.attn.qkv")["prefill"] == prefill
    assert _routes(report, "(every block)")["one_row"].startswith("native whole step")
    if kernels.bf16_rows_tiled(model.config.hidden_size):  # every projection tiles: batches take the whole step
        assert _routes(report, "(every block)")["batch"].startswith("native whole step, <= 128 rows")
    assert _routes(report, "norm_f")["one_row"] == "native RMSNorm"
    assert any(r["module"] == "blocks.0-1.attn.qkv" for r in fast_paths.grouped(report))  # layers folded
    quantize_model(model, 4, group_size=16)
    q = fast_paths.paths(model)
    assert _routes(q, "blocks.0.mlp.fc")["one_row"] == "native int4 GEMV (plain)"  # group 16: no vector path
    sparse = build_model(preset("tiny-phi3small")).eval()  # block-sparse layers: no whole step, SDPA there
    fast_paths.install(sparse)
    report = fast_paths.paths(sparse)
    assert _routes(report, "(every block)")["one_row"] == "layer by layer"
    layers = [_routes(report, f"blocks.{i}.attn")["one_row"] for i in range(sparse.config.num_layers)]
    assert "SDPA, block-sparse mask" in layers and any(r.startswith("native decode_attention") for r in layers)


def test_info_paths_cli_and_the_engine_debug_line(capsys, caplog) -> None:
    assert main(["info", "tiny-phi3", "--paths", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["installed"] and report["dtype"] == "bfloat16"
    assert main(["info", "tiny-phi3", "--paths", "--dtype", "float32"]) == 0
    table = capsys.readouterr().out
    assert "blocks.0-1.attn.qkv" in table and "F.linear" in table  # fp32 weights: no bf16 GEMV
    with caplog.at_level(logging.DEBUG, logger="phiforge.inference.fast_paths"):
        Engine(build_model(preset("tiny-phi3"), dtype=torch.bfloat16))
    assert any("engine paths: tiny-phi3" in r.getMessage() and "decode step" in r.getMessage()
               for r in caplog.records)


def _vm_flags(address: int) -> set[str]:
    """The VmFlags of the mapping that holds ``address`` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(part, 16) for part in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    return set()


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="no /proc/self/smaps (not Linux)")
def test_huge_page_weights_move_large_tensors_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(8, 8)).to(torch.bfloat16)
    model.register_buffer("codes", torch.randint(-127, 127, (2048, 1024), dtype=torch.int8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    big, small = model[0].weight, model[1].weight
    monkeypatch.setenv("PHIFORGE_HUGE_PAGES", "0")
    assert fast_paths.huge_page_weights(model) == 0  # opted out: nothing moves
    monkeypatch.delenv("PHIFORGE_HUGE_PAGES")
    assert fast_paths.huge_page_weights(model) == 2 * 1024 * 1024 * 2  # the 2 MB weight and the 2 MB buffer
    assert fast_paths.huge_page_weights(model) == 0  # idempotent
    assert model[0].weight is big and model[1].weight is small  # the same Parameter objects
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    for t in (big, model.codes):
        assert t.data_ptr() % fast_paths.HUGE_PAGE == 0 and "hg" in _vm_flags(t.data_ptr())  # MADV_HUGEPAGE
    x = torch.randn(3, 1024, dtype=torch.bfloat16)
    model[0](x).float().sum().backward()  # training still works on the moved weight, in place
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert big.grad is not None and not torch.equal(big, before["0.weight"])
