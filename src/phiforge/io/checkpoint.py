"""Hugging Face model folders <-> PhiForgeModel, through safetensors only (never pickle).

Each family's on-disk keys map onto phiforge's fused parameters: a key names an internal parameter
and, for split projections (phi's q/k/v, Llama's gate/up), the block of rows it fills. Loading checks
every file's header against that map before a byte of weights is read, then streams tensor by tensor
into an uninitialised model, so peak memory stays near one copy of the weights.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from phiforge.config.model import DTYPES, ModelConfig
from phiforge.errors import ConfigError, FormatError
from phiforge.io.atomic import atomic_write, atomic_write_json
from phiforge.model.transformer import PhiForgeModel, build_model

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Buffers some older checkpoints saved; they are recomputed from the config.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attn.masked_bias", "attn.bias")


class CheckpointError(FormatError):
    """A checkpoint that does not match its config; the message names the file and the tensor."""


# (HF key inside model.layers.N, internal key inside blocks.N, row block or None)
_LAYER_KEYS: dict[str, list[tuple[str, str, str | None]]] = {
    "phi": [
        ("input_layernorm", "norm_1", None), ("self_attn.q_proj", "attn.qkv", "q"),
        ("self_attn.k_proj", "attn.qkv", "k"), ("self_attn.v_proj", "attn.qkv", "v"),
        ("self_attn.dense", "attn.proj", None), ("self_attn.q_layernorm", "attn.q_norm", None),
        ("self_attn.k_layernorm", "attn.k_norm", None), ("mlp.fc1", "mlp.fc", None), ("mlp.fc2", "mlp.proj", None),
    ],
    "phi3": [
        ("input_layernorm", "norm_1", None), ("self_attn.qkv_proj", "attn.qkv", None),
        ("self_attn.o_proj", "attn.proj", None), ("post_attention_layernorm", "norm_2", None),
        ("mlp.gate_up_proj", "mlp.fc", None), ("mlp.down_proj", "mlp.proj", None),
    ],
    "phi3small": [
        ("input_layernorm", "norm_1", None), ("self_attn.query_key_value", "attn.qkv", None),
        ("self_attn.dense", "attn.proj", None), ("post_attention_layernorm", "norm_2", None),
        ("mlp.up_proj", "mlp.fc", None), ("mlp.down_proj", "mlp.proj", None),
    ],
    "llama": [
        ("input_layernorm", "norm_1", None), ("self_attn.q_proj", "attn.qkv", "q"),
        ("self_attn.k_proj", "attn.qkv", "k"), ("self_attn.v_proj", "attn.qkv", "v"),
        ("self_attn.o_proj", "attn.proj", None), ("post_attention_layernorm", "norm_2", None),
        ("mlp.gate_proj", "mlp.fc", "gate"), ("mlp.up_proj", "mlp.fc", "up"), ("mlp.down_proj", "mlp.proj", None),
    ],
}
_LAYER_KEYS["qwen2"] = _LAYER_KEYS["llama"]  # the Llama layout, q/k/v biases included
_FINAL_NORM = {"phi": "model.final_layernorm", "phi3": "model.norm", "phi3small": "model.final_layernorm",
               "llama": "model.norm", "qwen2": "model.norm"}


@dataclass(frozen=True)
class Target:
    """Where one on-disk tensor lands: a parameter, and optionally a block of its rows."""

    param: str
    rows: slice | None = None


def _row_blocks(config: ModelConfig) -> dict[str, slice]:
    q, kv, inter = config.q_size, config.kv_size, config.intermediate_size
    return {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv),
            "gate": slice(0, inter), "up": slice(inter, 2 * inter)}


def hf_key_map(model: PhiForgeModel) -> dict[str, Target]:
    """Every Hugging Face key this model's checkpoint holds, and where it goes. Tied heads have no key."""
    config = model.config
    params = dict(model.named_parameters())
    blocks = _row_blocks(config)
    pairs: list[tuple[str, str, str | None]] = [("model.embed_tokens", "embed", None),
                                                 (_FINAL_NORM[config.model_type], "norm_f", None),
                                                 ("lm_head", "lm_head", None)]
    for n in range(config.num_layers):
        pairs += [(f"model.layers.{n}.{hf}", f"blocks.{n}.{ours}", part)
                  for hf, ours, part in _LAYER_KEYS[config.model_type]]
    out = {}
    for hf, ours, part in pairs:
        for leaf in ("weight", "bias"):
            if f"{ours}.{leaf}" in params:
                out[f"{hf}.{leaf}"] = Target(f"{ours}.{leaf}", blocks[part] if part else None)
    return out


def expected_shape(model: PhiForgeModel, target: Target) -> tuple[int, ...]:
    shape = tuple(model.get_parameter(target.param).shape)
    if target.rows is None:
        return shape
    return (target.rows.stop - target.rows.start, *shape[1:])


# ---- loading ------------------------------------------------------------------------------------
class Filler:
    """Copies named on-disk tensors into an empty model, then proves nothing is missing.

    The model may hold row shards (FSDP DTensors): each tensor's rows outside this process's shard are
    never read (``put_rows``), so no rank ever holds more than its shards plus one tensor's slice.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32, device: Any = None, *,
                 model: PhiForgeModel | None = None) -> None:
        """A meta-built model of ``config`` to ``allocate``, or an existing ``model`` to fill in place."""
        self.model = model if model is not None else build_model(config, device="meta", dtype=dtype)
        self.keys = hf_key_map(self.model)
        self.tied_head = self.model.config.tie_word_embeddings
        self.filled: set[str] = set()

    def check(self, key: str, shape: tuple[int, ...], where: str) -> bool:
        """False for keys to skip; raises on unknown keys and wrong shapes."""
        if key.endswith(IGNORED_SUFFIXES) or (self.tied_head and key == "lm_head.weight"):
            return False
        target = self.keys.get(key)
        if target is None:
            raise CheckpointError(f"{where}: unexpected tensor {key!r} for a {self.model.config.model_type} model "
                                  f"with this config.json")
        want = expected_shape(self.model, target)
        if tuple(shape) != want:
            raise CheckpointError(f"{where}: tensor {key!r} has shape {list(shape)}, expected {list(want)} "
                                  f"from config.json")
        return True

    def allocate(self, device: str | torch.device) -> None:
        self.model.to_empty(device=device)
        if self.tied_head and isinstance(self.model.lm_head, torch.nn.Linear):  # to_empty unties the head
            self.model.lm_head.weight = self.model.embed.weight

    def put(self, key: str, tensor: torch.Tensor) -> None:
        self.put_rows(key, len(tensor) if tensor.dim() else 1, lambda a, b: tensor[a:b] if tensor.dim() else tensor)

    def put_rows(self, key: str, rows: int, read: Callable[[int, int], torch.Tensor]) -> None:
        """Copy rows of on-disk tensor ``key`` (``read(a, b)`` gives its rows a..b) that land in this
        process's part of the target parameter."""
        from phiforge.model.transformer import local_rows

        target = self.keys[key]
        dest, offset = local_rows(self.model.get_parameter(target.param))
        base = target.rows.start if target.rows is not None else 0  # where the tensor's row 0 lands
        lo, hi = max(base, offset), min(base + rows, offset + (len(dest) if dest.dim() else 1))
        if lo < hi:
            with torch.no_grad():
                (dest[lo - offset : hi - offset] if dest.dim() else dest).copy_(read(lo - base, hi - base))
        self.filled.add(key)

    def finish(self, where: str, eval_mode: bool = True) -> PhiForgeModel:
        missing = sorted(set(self.keys) - self.filled)
        if missing:
            shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
            raise CheckpointError(f"{where}: missing tensors {shown}")
        return self.model.eval() if eval_mode else self.model


def resolve_dtype(dtype: torch.dtype | str | None, config: ModelConfig | None) -> torch.dtype:
    if dtype is None:
        return DTYPES[config.torch_dtype] if config is not None else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} must be one of {list(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a model folder, from the shard index when there is one."""
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({err})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
        for key, name in weight_map.items():  # shards are files of this folder, nothing else
            if name != Path(name).name or name in ("", ".", "..") or "\\" in name:
                raise CheckpointError(f"{index}: weight_map[{key!r}] = {name!r} is not a file name in {folder}")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.exists():
                raise CheckpointError(f"{index}: names shard {file.name}, which is not in {folder}")
        return files
    if (folder / SINGLE_NAME).exists():
        return [folder / SINGLE_NAME]
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    hint = f" (found {pickles}: phiforge never loads pickled weights; convert them to safetensors)" if pickles else ""
    raise CheckpointError(f"{folder}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's place in a .safetensors file, from its header."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise CheckpointError(f"tensor {next(k for k in keys if keys.count(k) > 1)!r} is named twice")
    return dict(pairs)


def _nonneg_int(value: Any) -> bool:  # noqa: ANN401
    return type(value) is int and value >= 0


def read_safetensors_header(file: Path) -> dict[str, TensorEntry]:
    """Parse and check a .safetensors header before anything is allocated: its structure, every dtype and
    shape, offsets inside the data region, no duplicate names, no two tensors sharing bytes (truncation too)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if not 2 <= header_len <= min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{file}: not a safetensors file (header length {header_len}, file {size} B)"
                                      + (": truncated?" if size < 8 + header_len else ""))
            header = json.loads(f.read(header_len), object_pairs_hook=_no_duplicates)
    except CheckpointError as err:
        raise CheckpointError(f"{file}: {err}" if not str(err).startswith(str(file)) else str(err)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{file}: unreadable safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: the safetensors header is a {type(header).__name__}, not an object")
    base, data = 8 + header_len, size - 8 - header_len
    entries = {}
    for key, meta in header.items():
        where = f"{file}: tensor {key!r}"
        if key == "__metadata__":
            if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
                raise CheckpointError(f"{file}: __metadata__ must map strings to strings")
            continue
        if not isinstance(meta, dict) or set(meta) != {"dtype", "shape", "data_offsets"}:
            got = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
            raise CheckpointError(f"{where}: needs exactly dtype, shape and data_offsets (got {got})")
        dtype = SAFETENSORS_DTYPES.get(meta["dtype"]) if isinstance(meta["dtype"], str) else None
        if dtype is None:
            raise CheckpointError(f"{where}: unsupported dtype {meta['dtype']!r}")
        shape, offsets = meta["shape"], meta["data_offsets"]
        if not (isinstance(shape, list) and len(shape) <= 8 and all(map(_nonneg_int, shape))):
            raise CheckpointError(f"{where}: shape {shape!r:.80} is not a list of at most 8 sizes >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_nonneg_int, offsets))
                and offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: data_offsets {offsets!r:.80} are not [begin, end] with 0 <= begin <= end")
        if offsets[1] > data:
            raise CheckpointError(f"{file}: truncated: tensor {key!r} ends at byte {base + offsets[1]}, "
                                  f"file has {size}")
        if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{where}: spans {offsets[1] - offsets[0]} B, shape {list(shape)} "
                                  f"needs {math.prod(shape) * dtype.itemsize}")
        entries[key] = TensorEntry(file, dtype, tuple(shape), base + offsets[0], base + offsets[1])
    ordered = sorted(entries.items(), key=lambda item: (item[1].start, item[1].end))
    for (name_a, a), (name_b, b) in zip(ordered, ordered[1:]):
        if b.start < a.end:
            raise CheckpointError(f"{file}: tensors {name_a!r} and {name_b!r} overlap (bytes {b.start}-{a.end})")
    return entries


def read_tensor(entry: TensorEntry, handle: Any, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Read one tensor (or its rows a..b) with a plain file read: no mmap keeps the file's pages resident."""
    shape, start, end = entry.shape, entry.start, entry.end
    if rows is not None and shape:
        row_bytes = (end - start) // shape[0] if shape[0] else 0
        shape = (rows[1] - rows[0], *shape[1:])
        start, end = start + rows[0] * row_bytes, start + rows[1] * row_bytes
    buffer = bytearray(end - start)
    handle.seek(start)
    if handle.readinto(buffer) != len(buffer):
        raise CheckpointError(f"{entry.file}: short read at byte {start}")
    if not buffer:
        return torch.empty(shape, dtype=entry.dtype)
    return torch.frombuffer(buffer, dtype=entry.dtype).view(shape)


def read_headers(files: list[Path]) -> dict[str, TensorEntry]:
    found: dict[str, TensorEntry] = {}
    for file in files:
        for key, entry in read_safetensors_header(file).items():
            if key in found:
                raise CheckpointError(f"{file}: tensor {key!r} also appears in {found[key].file.name}")
            found[key] = entry
    return found


CHEAP_FINITE = 1 << 16  # tensors up to this many elements (norms, biases) are always checked for NaN/Inf


def check_finite(key: str, entry: TensorEntry, tensor: torch.Tensor, strict: bool) -> None:
    """NaN/Inf in a loaded tensor: an error with ``strict`` (--check-finite), else a warning for small tensors."""
    if not tensor.is_floating_point() or not (strict or tensor.numel() <= CHEAP_FINITE):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if not bad:
        return
    message = f"{entry.file}: tensor {key!r} holds {bad} NaN/Inf values of {tensor.numel()}"
    if strict:
        raise CheckpointError(message)
    warnings.warn(message + " (--check-finite checks every tensor and refuses)", stacklevel=3)


def is_quantized_folder(folder: Path) -> bool:
    return "quantization_config" in json.loads((folder / "config.json").read_text())


def load_hf_folder(path: str | Path, *, dtype: torch.dtype | str | None = None,
                   device: str | torch.device = "cpu", check_finite_values: bool = False) -> PhiForgeModel:
    """Load a Hugging Face model folder (config.json + safetensors, sharded or not).

    Every header is checked against the config before any weight is read; then tensors stream one at a
    time into an uninitialised model, so peak memory is the model plus its largest tensor. Small tensors are
    checked for NaN/Inf (a warning); ``check_finite_values`` checks all of them and refuses.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a model folder")
    config = ModelConfig.from_file(folder / "config.json")
    if is_quantized_folder(folder):
        raise CheckpointError(f"{folder}: a quantized model folder; load it with phiforge.io.load.load_pretrained")
    filler = Filler(config, resolve_dtype(dtype, config))
    filler.allocate(device)
    return _fill(filler, folder, check_finite_values=check_finite_values)


def fill_from_hf_folder(model: PhiForgeModel, path: str | Path) -> PhiForgeModel:
    """Load a Hugging Face folder's weights into an existing model, in place, whose parameters may be
    FSDP row shards: each tensor is read once, and only the rows of this process's shards."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a model folder")
    return _fill(Filler(model.config, model=model), folder, eval_mode=False)


def _fill(filler: Filler, folder: Path, eval_mode: bool = True, check_finite_values: bool = False) -> PhiForgeModel:
    """Every header is checked against the model before any weight is read; then tensors stream one at
    a time (their needed rows only), so peak memory is the model plus one tensor."""
    headers = read_headers(safetensors_files(folder))
    wanted = {key: e for key, e in headers.items() if filler.check(key, e.shape, str(e.file))}
    missing = sorted(set(filler.keys) - set(wanted))
    if missing:
        raise CheckpointError(f"{folder}: missing tensors {', '.join(missing[:5])}"
                              + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    for file in sorted({e.file for e in wanted.values()}):
        with open(file, "rb") as handle:
            for key, entry in sorted(wanted.items(), key=lambda item: item[1].start):
                if entry.file == file:
                    def read_rows(a: int, b: int, key: str = key, entry: TensorEntry = entry) -> torch.Tensor:
                        tensor = read_tensor(entry, handle, (a, b) if entry.shape else None)
                        check_finite(key, entry, tensor, check_finite_values)
                        return tensor

                    filler.put_rows(key, entry.shape[0] if entry.shape else 1, read_rows)
    return filler.finish(str(folder), eval_mode)


def model_from_tensors(hf_config: dict[str, Any], tensors: Iterable[tuple[str, torch.Tensor]], *,
                       dtype: torch.dtype | str | None = torch.float32,
                       device: str | torch.device = "cpu", source: str = "tensors") -> PhiForgeModel:
    """Build a model from (HF key, tensor) pairs, e.g. converted from a GGUF file."""
    config = ModelConfig.from_hf_config(hf_config)
    filler = Filler(config, resolve_dtype(dtype, config))
    filler.allocate(device)
    for key, tensor in tensors:
        if filler.check(key, tuple(tensor.shape), source):
            filler.put(key, tensor)
    return filler.finish(source)


# ---- saving -------------------------------------------------------------------------------------
def write_json(path: Path, data: Any) -> None:
    atomic_write_json(path, data, indent=2)


def hf_state_dict(model: PhiForgeModel, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face keys (views; split projections are sliced out)."""
    out = {}
    for key, target in hf_key_map(model).items():
        tensor = model.get_parameter(target.param).detach()
        tensor = tensor if target.rows is None else tensor[target.rows]
        out[key] = tensor.to(dtype) if dtype is not None else tensor
    return out


def save_hf_folder(model: PhiForgeModel, path: str | Path, *, dtype: torch.dtype | str | None = None,
                   max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Save as a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads unchanged."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = resolve_dtype(dtype, model.config) if dtype is not None else model.embed.weight.dtype
    state = hf_state_dict(model)
    shards = _plan_shards(state, max_shard_bytes, dtype)
    weight_map = {}
    for number, keys in enumerate(shards, start=1):
        name = SINGLE_NAME if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: state[k].to(device="cpu", dtype=dtype).contiguous().clone() for k in keys}
        atomic_write(folder / name, lambda tmp, t=tensors: save_file(t, str(tmp), metadata={"format": "pt"}))
        weight_map.update(dict.fromkeys(keys, name))
    if len(shards) > 1:
        total = sum(t.numel() for t in state.values()) * torch.finfo(dtype).bits // 8
        write_json(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    elif (folder / INDEX_NAME).exists():
        (folder / INDEX_NAME).unlink()
    dtype_name = next(name for name, value in DTYPES.items() if value == dtype)
    write_json(folder / "config.json", {**model.config.to_hf_config(), "torch_dtype": dtype_name})
    write_json(folder / "generation_config.json", generation_config(model.config))
    return folder


def generation_config(config: ModelConfig) -> dict[str, Any]:
    out = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    if config.pad_token_id is not None:
        out["pad_token_id"] = config.pad_token_id
    return {k: v for k, v in out.items() if v is not None}


def _plan_shards(state: dict[str, torch.Tensor], max_bytes: int, dtype: torch.dtype) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    per_elem = torch.finfo(dtype).bits // 8
    for key, tensor in state.items():
        nbytes = tensor.numel() * per_elem
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards
