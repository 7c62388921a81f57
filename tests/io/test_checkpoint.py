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

from phiforge.config.model import ConfigError, preset
from phiforge.io.checkpoint import CheckpointError, load_hf_folder, save_hf_folder
from phiforge.model.transformer import build_model


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
from phiforge.io.checkpoint import load_hf_folder
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


# ---- every header field and config value checked before anything is allocated ------------------------------------
def _rewrite_header(file: Path, edit) -> None:
    """Rewrite a .safetensors header (a JSON value) in place, keeping the data bytes."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = edit(json.loads(raw[8:8 + n]))
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    file.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def _first(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _set(field: str, value):  # noqa: ANN202
    def edit(h: dict) -> dict:
        h[_first(h)][field] = value
        return h
    return edit


def _overlap(h: dict) -> dict:
    a, b = [k for k in h if k != "__metadata__"][:2]
    h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + (
        h[b]["data_offsets"][1] - h[b]["data_offsets"][0])]
    return h


def _duplicate(h: dict) -> bytes:
    key = _first(h)
    text = json.dumps(h)
    return text.replace("{", "{" + json.dumps(key) + ": " + json.dumps(h[key]) + ", ", 1).encode()


HEADERS = [
    ("negative offset", _set("data_offsets", [-64, 0]), r"data_offsets \[-64, 0\] are not"),
    ("string offsets", _set("data_offsets", ["0", "8"]), r"data_offsets \['0', '8'\] are not"),
    ("no data_offsets", lambda h: {**h, _first(h): {"dtype": "F32", "shape": [1]}}, r"needs exactly dtype, shape"),
    ("a list", lambda h: list(h), r"header is a list, not an object"),
    ("tensor meta a string", lambda h: {**h, _first(h): "F32"}, r"needs exactly dtype, shape and data_offsets"),
    ("unknown dtype", _set("dtype", "F8_E9M9"), r"unsupported dtype 'F8_E9M9'"),
    ("dtype a number", _set("dtype", 7), r"unsupported dtype 7"),
    ("negative shape", _set("shape", [-1, 4]), r"shape \[-1, 4\] is not a list"),
    ("boolean shape", _set("shape", [True]), r"shape \[True\] is not a list"),
    ("offsets past the data", _set("data_offsets", [0, 10**12]), r"truncated: tensor"),
    ("overlapping tensors", _overlap, r"overlap"),
    ("duplicate names", _duplicate, r"is named twice"),
    ("bad metadata", lambda h: {**h, "__metadata__": {"format": 1}}, r"__metadata__ must map strings"),
    ("not JSON", lambda h: b"{" + b"[" * 5000, r"unreadable safetensors header"),
]


@pytest.mark.parametrize("case", HEADERS, ids=[c[0] for c in HEADERS])
def test_corrupted_header_names_file_and_field(saved, case) -> None:
    folder, _ = saved
    _, edit, message = case
    _rewrite_header(folder / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*" + message):
        load_hf_folder(folder)


@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside.safetensors", "sub/model.safetensors", ".."])
def test_index_shards_are_confined_to_the_folder(saved, shard: str) -> None:
    folder, _ = saved
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"index\.json: weight_map\['model\.embed_tokens\.weight'\] = .* is not "
                                              r"a file name"):
        load_hf_folder(folder)


CONFIGS = [
    ({"hidden_size": -1}, r"hidden_size must be an integer in \[1, 65536\], got -1"),
    ({"hidden_size": "64"}, r"wrong type or value|hidden_size must be an integer"),
    ({"hidden_size": [64]}, r"wrong type or value|hidden_size must be an integer"),
    ({"num_hidden_layers": 10**9},
     r"num_layers \(config\.json num_hidden_layers\) must be an integer in \[1, 1024\], got 1000000000"),
    ({"num_attention_heads": 0}, r"wrong type or value|num_heads must be an integer"),
    ({"rope_theta": float("nan")}, r"rope_theta must be a finite number"),
    ({"vocab_size": 3.5}, r"vocab_size must be an integer"),
    ({"eos_token_id": "</s>"}, r"eos_token_id must be a token id"),
    ({"max_position_embeddings": None}, r"max_position_embeddings must be an integer"),
]


@pytest.mark.parametrize("change,message", CONFIGS, ids=[next(iter(c)) + "=" + repr(v)[:12] for c, _ in CONFIGS
                                                          for v in c.values()])
def test_bad_config_json_refused_before_allocating(saved, change: dict, message: str) -> None:
    import tracemalloc

    folder, _ = saved
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match=r"config\.json: .*" + message):
            load_hf_folder(folder)
        assert tracemalloc.get_traced_memory()[1] < 50 * 1024**2
    finally:
        tracemalloc.stop()
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"config\.json: config\.json must be a JSON object, not list"):
        load_hf_folder(folder)


def test_nan_weights_warn_and_check_finite_refuses(saved) -> None:
    folder, _ = saved
    _edit_weights(folder, lambda t: t["model.norm.weight"].__setitem__(0, float("nan")))
    with pytest.warns(UserWarning, match=r"model\.safetensors: tensor 'model\.norm\.weight' holds 1 NaN/Inf"):
        load_hf_folder(folder)
    _edit_weights(folder, lambda t: t["model.embed_tokens.weight"].__setitem__((0, 0), float("inf")))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.(norm|embed_tokens)\.weight' holds 1 NaN/Inf"):
        load_hf_folder(folder, check_finite_values=True)
