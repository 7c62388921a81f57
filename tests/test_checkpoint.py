"""Loading and saving Hugging Face folders: dtypes, shards, streaming memory, and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_
from safetensors.torch import load_file, save_file

from phiforge.checkpoint import CheckpointError, load_hf_folder, save_hf_folder
from phiforge.config import ConfigError, preset
from phiforge.model import build_model


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = randomize_(build_model(preset("tiny-phi3"))).eval()
    save_hf_folder(model, tmp_path / "m")
    return tmp_path / "m", model


def _edit_weights(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_round_trip_in_each_dtype(saved) -> None:
    folder, model = saved
    ids = torch.randint(0, 320, (1, 30))
    with torch.no_grad():
        want = model(ids)
        for dtype, tolerance in ((torch.float32, 0.0), (torch.bfloat16, 0.03), (torch.float16, 0.005)):
            loaded = load_hf_folder(folder, dtype=dtype)
            assert loaded.embed.weight.dtype == dtype
            error = (loaded(ids).float() - want).abs().mean() / want.std()  # relative to the logits spread
            assert error <= tolerance, (dtype, error)


def test_tied_head_stays_tied_after_load(tmp_path: Path) -> None:
    model = randomize_(build_model(preset("tiny-phi4-mini")))
    save_hf_folder(model, tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = load_hf_folder(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.embed.weight.data_ptr()


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config\.json: no such file"):
        load_hf_folder(tmp_path)


def test_unknown_model_type(saved) -> None:
    folder, _ = saved
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(ConfigError, match="model_type 'mamba' is not supported"):
        load_hf_folder(folder)


def test_missing_tensor(saved) -> None:
    folder, _ = saved
    _edit_weights(folder, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors model\.layers\.1\.mlp\.down_proj\.weight"):
        load_hf_folder(folder)


def test_extra_tensor(saved) -> None:
    folder, _ = saved
    _edit_weights(folder, lambda t: t.update({"model.layers.7.mlp.fc9.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.7\.mlp\.fc9"):
        load_hf_folder(folder)


def test_misshaped_tensor(saved) -> None:
    folder, _ = saved
    _edit_weights(folder, lambda t: t.update({"model.layers.0.self_attn.qkv_proj.weight": torch.zeros(100, 64)}))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.qkv_proj\.weight' has shape "
                                              r"\[100, 64\], expected \[192, 64\]"):
        load_hf_folder(folder)


def test_truncated_file(saved) -> None:
    folder, _ = saved
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor '.+' ends at byte"):
        load_hf_folder(folder)


def test_garbage_file_and_pickle_only_folder(saved, tmp_path: Path) -> None:
    folder, _ = saved
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_hf_folder(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="never loads pickled weights"):
        load_hf_folder(folder)


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    model = randomize_(build_model(preset("tiny-llama")))
    save_hf_folder(model, tmp_path, max_shard_bytes=50_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"names shard {shards[-1].name}, which is not in"):
        load_hf_folder(tmp_path)


PEAK_SCRIPT = """
import resource, sys, torch
from phiforge.checkpoint import load_hf_folder
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = load_hf_folder(sys.argv[1], dtype=torch.float32)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)
"""


def test_loading_streams_with_peak_near_one_copy(tmp_path: Path) -> None:
    config = preset("tiny-llama").replace(hidden_size=1024, intermediate_size=2816, num_layers=8, num_heads=16,
                                          num_kv_heads=4, head_dim=64, vocab_size=8000)
    model = build_model(config)
    weights = model.num_parameters() * 4
    save_hf_folder(model, tmp_path)
    del model
    # warm the interpreter (imports) before measuring, in a fresh process so nothing else is resident
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         check=True)
    grown = int(out.stdout.strip().splitlines()[-1])
    assert grown < 1.25 * weights, f"peak grew {grown / 1e6:.0f} MB for {weights / 1e6:.0f} MB of weights"
