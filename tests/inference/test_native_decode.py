"""The whole-step native decode (native_decode, kernels' pf_decode_step, installed by fast_paths) against the
layer-by-layer path."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from phiforge import kernels
from phiforge.config.model import preset
from phiforge.inference import fast_paths, native_decode
from phiforge.inference.engine import Engine, SamplingParams
from phiforge.model.transformer import build_model
from phiforge.quant.quantize import quantize_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels not built on this machine")
FAMILIES = ["tiny-phi", "tiny-phi3", "tiny-phi4-mini", "tiny-llama"]


def decode_logits(model: torch.nn.Module, ids: torch.Tensor, prompt: int, *, native: bool,
                  monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """Prefill ids[:, :prompt], then feed the rest one token at a time; logits of every decode step."""
    with monkeypatch.context() as patch:
        if not native:
            patch.setattr(native_decode, "plan_for", lambda *args: None)
        cache = model.new_cache(1, ids.shape[1] + 1)
        steps = []
        with torch.inference_mode():
            model(ids[:, :prompt], cache=cache, last_only=True)
            for t in range(prompt, ids.shape[1]):
                steps.append(model(ids[:, t : t + 1], torch.tensor([t]), cache=cache)[0, -1].float())
        return torch.stack(steps)


def model_and_ids(name: str, dtype: torch.dtype, length: int = 24, **overrides: object
                  ) -> tuple[torch.nn.Module, torch.Tensor]:
    config = dataclasses.replace(preset(name), **overrides)
    model = build_model(config, dtype=dtype, seed=3).eval()
    fast_paths.install(model)  # what the Engine does to a model it runs
    ids = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(5))
    return model, ids


@pytest.mark.parametrize("name", FAMILIES)
def test_fp32_step_matches_layer_path(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, ids = model_and_ids(name, torch.float32)
    ours = decode_logits(model, ids, 8, native=True, monkeypatch=monkeypatch)
    reference = decode_logits(model, ids, 8, native=False, monkeypatch=monkeypatch)
    assert native_decode.plan_for(model, model.new_cache(1, 4), torch.float32) is not None  # the step did run
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-5)  # only the GEMV sum order differs


@pytest.mark.parametrize("name", FAMILIES)
def test_bf16_step_rounds_where_torch_rounds(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, ids = model_and_ids(name, torch.bfloat16)
    ours = decode_logits(model, ids, 8, native=True, monkeypatch=monkeypatch)
    reference = decode_logits(model, ids, 8, native=False, monkeypatch=monkeypatch)
    # same kernels and the same rounding points: a few bf16 ulps at most (an ulp at 1.0 is 0.0078)
    assert (ours - reference).abs().max() <= 0.016
    assert (ours.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize(("bits", "group"), [(8, 32), (4, 32), (4, 16)])  # int4 g32: the AVX512-BF16 path
def test_quantized_step_matches_layer_path(bits: int, group: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model, ids = model_and_ids("tiny-phi3", torch.bfloat16, intermediate_size=192)
    quantize_model(model, bits, group_size=group)
    ours = decode_logits(model, ids, 8, native=True, monkeypatch=monkeypatch)
    reference = decode_logits(model, ids, 8, native=False, monkeypatch=monkeypatch)
    assert (ours - reference).abs().max() <= 0.016


def test_sliding_window_is_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding past the window: keys older than it must drop out exactly as the mask drops them."""
    model, ids = model_and_ids("tiny-phi3", torch.float32, length=40, sliding_window=8)
    ours = decode_logits(model, ids, 4, native=True, monkeypatch=monkeypatch)
    reference = decode_logits(model, ids, 4, native=False, monkeypatch=monkeypatch)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-5)
    unwindowed, _ = model_and_ids("tiny-phi3", torch.float32, length=40)
    assert not torch.allclose(decode_logits(unwindowed, ids, 4, native=True, monkeypatch=monkeypatch)[-1],
                              ours[-1], atol=1e-3)  # the window changed the result: it was applied


def test_engine_greedy_tokens_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    model, ids = model_and_ids("tiny-llama", torch.float32)
    params = SamplingParams(max_new_tokens=24)
    ours = Engine(model, max_batch_size=1).generate([ids[0].tolist()], params)[0].token_ids
    with monkeypatch.context() as patch:
        patch.setattr(native_decode, "plan_for", lambda *args: None)
        reference = Engine(model, max_batch_size=1).generate([ids[0].tolist()], params)[0].token_ids
    assert ours == reference and len(ours) == 24


def test_plan_is_per_cache_and_declines_what_it_cannot_run() -> None:
    model, _ = model_and_ids("tiny-phi3", torch.float32)
    first, second = model.new_cache(1, 8), model.new_cache(1, 8)
    plan = native_decode.plan_for(model, first, torch.float32)
    assert plan is native_decode.plan_for(model, first, torch.float32)  # built once per cache
    assert native_decode.plan_for(model, second, torch.float32) is not plan
    assert native_decode.plan_for(model, model.new_cache(1, 8, torch.bfloat16), torch.float32) is None
    sparse = build_model(preset("tiny-phi3small")).eval()
    fast_paths.install(sparse)
    sparse_cache = sparse.new_cache(1, 8)
    assert native_decode.plan_for(sparse, sparse_cache, torch.float32) is None
    assert native_decode._PLANS[sparse_cache][2] is None  # the "no" is remembered: not re-decided every step
    model.train()
    assert model.decode_plan(torch.device("cpu"), torch.float32, first) is None


def batched_decode_logits(model: torch.nn.Module, rows: list[list[int]], steps: int, *, native: bool,
                          monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """Rows of different lengths prefilled into one cache, then decoded together, each at its own position."""
    with monkeypatch.context() as patch:
        if not native:
            patch.setattr(native_decode, "plan_for", lambda *args: None)
        cache = model.new_cache(len(rows), max(map(len, rows)) + steps + 1)
        out, last = [], []
        with torch.inference_mode():
            for r, ids in enumerate(rows):
                logits = model(torch.tensor([ids]), cache=cache, cache_rows=slice(r, r + 1), last_only=True)
                last.append(int(logits[0, -1].argmax()))
            positions = torch.tensor([[len(ids)] for ids in rows])
            for _ in range(steps):
                logits = model(torch.tensor(last)[:, None], positions, cache=cache)[:, -1]
                out.append(logits.float())
                last, positions = logits.argmax(-1).tolist(), positions + 1
        return torch.stack(out)


@pytest.mark.parametrize("quantized", [False, True])
def test_batched_step_matches_layer_path(quantized: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    model, ids = model_and_ids("tiny-llama", torch.bfloat16, intermediate_size=192)
    if quantized:
        quantize_model(model, 4, group_size=32)
    elif not kernels.bf16_rows_tiled(model.config.hidden_size) and not (kernels.gemm_available()
                                                                       and fast_paths.install(model, pack=True)):
        pytest.skip("batches take the native step with packed copies for a vector GEMM (AMX or AVX512-BF16) or "
                    "on AVX2's tiles")
    rows = [ids[0, :5].tolist(), ids[0, 3:14].tolist(), ids[0, 1:9].tolist()]
    cache = model.new_cache(len(rows), 8)
    assert native_decode.plan_for(model, cache, torch.bfloat16).max_rows >= len(rows)  # the batch runs natively
    ours = batched_decode_logits(model, rows, 6, native=True, monkeypatch=monkeypatch)
    reference = batched_decode_logits(model, rows, 6, native=False, monkeypatch=monkeypatch)
    assert (ours - reference).abs().max() <= 0.016


def test_plans_live_beside_their_cache_not_on_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import copy
    import gc

    model, ids = model_and_ids("tiny-phi3", torch.float32)
    decode_logits(model, ids, 8, native=True, monkeypatch=monkeypatch)  # builds a plan on the way
    copy.deepcopy(model)  # ctypes structs on the model would make this fail
    cache = model.new_cache(1, 8)
    assert native_decode.plan_for(model, cache, torch.float32) is not None
    gc.collect()
    held = len(native_decode._PLANS)
    del cache
    gc.collect()
    assert len(native_decode._PLANS) == held - 1  # the plan (and the cache tensors it holds) went with the cache
