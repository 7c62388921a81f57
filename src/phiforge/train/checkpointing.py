"""Training checkpoints: atomic folders holding model, optimizer, schedule/data position and per-rank RNG.

    out_dir/checkpoints/step-00000100/
        state.json              step, tokens, model + train config, data position, loss scale (written last)
        model.safetensors       single process / DDP: weights under the model's parameter names
        optimizer.safetensors   AdamW moments keyed "<parameter name>/<slot>"; optimizer.json: param groups
        sharded/                FSDP: torch.distributed.checkpoint files, one per rank (model + optimizer)
        rng/rank-00000.json     torch, cuda, numpy and python RNG states of each rank

Every rank writes into ``.tmp-step-N``; rank 0 then renames it, so a folder named ``step-N`` is always
complete and a killed run leaves at most a temp folder that nothing trusts (it is removed on the next save).
Weights never go through pickle here; small state is JSON. The layout assumes every rank sees out_dir
(one machine, or a shared filesystem).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from phiforge.checkpoint import save_hf_folder, write_json
from phiforge.config import ModelConfig
from phiforge.errors import TrainError
from phiforge.model import PhiForgeModel, build_model
from phiforge.train.distributed import DistEnv, barrier, is_sharded, unwrap

CHECKPOINTS = "checkpoints"
STATE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# fields that change no tensor shape: a checkpoint may be continued with new values (context extension)
RESHAPE_FREE_FIELDS = {"name", "rope_theta", "max_position_embeddings", "original_max_position_embeddings",
                       "rope_scaling", "sliding_window", "embd_pdrop", "resid_pdrop", "attn_pdrop", "torch_dtype",
                       "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "extra"}


class TrainCheckpointError(TrainError):
    """A checkpoint that is missing, incomplete, or from an incompatible run; names the folder and field."""


# ---- finding checkpoints -----------------------------------------------------------------------------
def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (folders step-N holding state.json), oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    found = []
    for path in root.glob("step-*") if root.is_dir() else []:
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str, out_dir: str | Path) -> Path | None:
    """"" -> None; "auto" -> the latest complete checkpoint of out_dir (None on a first run); else a folder."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(out_dir)
    path = Path(resume)
    if path.is_dir() and not (path / STATE).is_file() and latest_checkpoint(path) is not None:
        return latest_checkpoint(path)  # a run folder: take its latest checkpoint
    if not (path / STATE).is_file():
        raise TrainCheckpointError(f"{path}: not a complete training checkpoint (no {STATE}); "
                                   f"complete ones in it: {[str(p) for _, p in list_checkpoints(path)]}")
    return path


def read_state(path: str | Path) -> dict[str, Any]:
    file = Path(path) / STATE
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise TrainCheckpointError(f"{file}: missing; not a complete training checkpoint") from None
    except json.JSONDecodeError as err:
        raise TrainCheckpointError(f"{file}: not valid JSON ({err})") from None


def config_differences(saved: dict[str, Any], current: ModelConfig, ignore: set[str]) -> list[str]:
    now = dataclasses.asdict(current)
    keys = sorted((set(saved) | set(now)) - ignore)
    return [f"{k}: checkpoint {saved.get(k)!r}, this run {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def check_resumable(path: Path, model_config: ModelConfig) -> dict[str, Any]:
    """The checkpoint's state, after proving it was written for exactly this model config."""
    state = read_state(path)
    diffs = config_differences(state["model_config"], model_config, {"name"})
    if diffs:
        raise TrainCheckpointError(f"{path}: cannot resume, the checkpoint is from a different model config ("
                                   + "; ".join(diffs) + "). Use a new run.out_dir, or model.init_from to start "
                                   "a new run from its weights")
    return state


# ---- RNG states as JSON ----------------------------------------------------------------------------------
def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode()


def _from_b64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state(device: torch.device) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    out = {"torch": _b64(torch.get_rng_state()), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
           "python": [version, list(internal), gauss]}
    if device.type == "cuda":
        out["cuda"] = _b64(torch.cuda.get_rng_state(device))
    return out


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(_from_b64(state["torch"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(_from_b64(state["cuda"]), device)


# ---- saving ------------------------------------------------------------------------------------------
def _unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses shared storage (tied embeddings): keep one name, remember the aliases."""
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    unique, aliases = {}, {}
    for key, tensor in state.items():
        ident = (tensor.data_ptr(), tuple(tensor.shape))
        if ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
            unique[key] = tensor.detach().to("cpu").contiguous()
    return unique, aliases


def _save_full(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Single process / DDP: every rank holds everything; rank 0 writes it."""
    weights, aliases = _unique_tensors(unwrap(model).state_dict())
    save_file(weights, str(folder / "model.safetensors"), metadata={"aliases": json.dumps(aliases)})
    osd = get_optimizer_state_dict(model, optimizer)
    tensors, scalars = {}, {}
    for name, slots in osd["state"].items():
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{slot}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(name, {})[slot] = value
    save_file(tensors, str(folder / "optimizer.safetensors"))
    write_json(folder / "optimizer.json", {"param_groups": osd["param_groups"], "scalars": scalars})


def _save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """FSDP: each rank writes its own shards through torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(folder / "sharded"))


def save_checkpoint(out_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    env: DistEnv, state: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint step-N atomically (collective: every rank must call it), then keep the last K."""
    root = Path(out_dir) / CHECKPOINTS
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if env.is_main:
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale)
        (tmp / "rng").mkdir(parents=True)
    barrier(env)
    sharded = is_sharded(model)
    if sharded:
        _save_sharded(tmp, model, optimizer)
    elif env.is_main:
        _save_full(tmp, model, optimizer)
    write_json(tmp / "rng" / f"rank-{env.rank:05d}.json", rng_state(env.device))
    barrier(env)
    if env.is_main:
        write_json(tmp / STATE, {**state, "step": step, "format": "dcp" if sharded else "safetensors",
                                 "world_size": env.world_size})
        if final.exists():  # a resumed run re-saving a step it already had
            shutil.rmtree(final)
        tmp.rename(final)
        for _, old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return final


# ---- loading -------------------------------------------------------------------------------------------
def _load_weights_file(folder: Path) -> dict[str, torch.Tensor]:
    file = folder / "model.safetensors"
    if not file.is_file():
        raise TrainCheckpointError(f"{file}: missing from the checkpoint")
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
    weights = load_file(str(file))
    weights.update({alias: weights[target] for alias, target in aliases.items()})
    return weights


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG from ``path``; returns its state.json."""
    state = read_state(path)
    sharded = is_sharded(model)
    if (state["format"] == "dcp") != sharded:
        raise TrainCheckpointError(f"{path}: written by a {'FSDP' if state['format'] == 'dcp' else 'DDP/single'} "
                                   f"run; resume it with the same distributed.strategy (fsdp <-> ddp is not "
                                   "converted)")
    if sharded:
        import torch.distributed.checkpoint as dcp

        full = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.load(full, checkpoint_id=str(path / "sharded"))
        set_model_state_dict(model, full["model"])
        set_optimizer_state_dict(model, optimizer, full["optim"])
    else:
        unwrap(model).load_state_dict(_load_weights_file(path), strict=True)
        set_optimizer_state_dict(model, optimizer, _load_optimizer(path))
    rng_file = path / "rng" / f"rank-{env.rank:05d}.json"
    if rng_file.is_file():  # absent when resuming on more ranks than wrote the checkpoint
        set_rng_state(json.loads(rng_file.read_text()), env.device)
    return state


def _load_optimizer(path: Path) -> dict[str, Any]:
    meta = json.loads((path / "optimizer.json").read_text())
    slots: dict[str, dict[str, Any]] = {name: dict(values) for name, values in meta["scalars"].items()}
    for key, tensor in load_file(str(path / "optimizer.safetensors")).items():
        name, slot = key.rsplit("/", 1)
        slots.setdefault(name, {})[slot] = tensor
    return {"state": slots, "param_groups": meta["param_groups"]}


def load_weights(path: str | Path, model: nn.Module) -> None:
    """Weights only (continued or context-extended training), into a plain model or one of FSDP row
    shards: each rank reads only its rows of each tensor (safetensors) or its shards (DCP reshards)."""
    folder = Path(path)
    state = read_state(folder)
    if state["format"] == "safetensors":
        _stream_weights(folder / "model.safetensors", unwrap(model))
        return
    import torch.distributed.checkpoint as dcp

    weights = {"model": get_model_state_dict(model)}
    dcp.load(weights, checkpoint_id=str(folder / "sharded"))
    set_model_state_dict(model, weights["model"])


def _stream_weights(file: Path, model: PhiForgeModel) -> None:
    from phiforge.checkpoint import read_safetensors_header, read_tensor
    from phiforge.model import local_rows

    if not file.is_file():
        raise TrainCheckpointError(f"{file}: missing from the checkpoint")
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
    entries = read_safetensors_header(file)
    names = set(model.state_dict())
    if names != set(entries) | set(aliases):
        raise TrainCheckpointError(f"{file}: tensors differ from the model's: missing "
                                   f"{sorted(names - set(entries) - set(aliases))[:5]}, unexpected "
                                   f"{sorted(set(entries) | set(aliases) - names)[:5]}")
    with open(file, "rb") as handle, torch.no_grad():
        for name, param in model.named_parameters():
            entry = entries[aliases.get(name, name)]
            if entry.shape != tuple(param.shape):
                raise TrainCheckpointError(f"{file}: {name} has shape {list(entry.shape)}, the model "
                                           f"{list(param.shape)}")
            dest, offset = local_rows(param)
            rows = (offset, offset + len(dest)) if dest.dim() else None
            dest.copy_(read_tensor(entry, handle, rows))


# ---- final export ----------------------------------------------------------------------------------------
def export_hf(model: nn.Module, env: DistEnv, folder: str | Path, *, tokenizer: str = "",
              dtype: str | None = None) -> Path:
    """Write the trained model (and its tokenizer) as a Hugging Face folder, atomically. Collective."""
    folder = Path(folder)
    full = None
    if is_sharded(model):  # gather the shards into whole CPU tensors on rank 0
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.is_main:
        plain = unwrap(model)
        if full is not None:
            plain = _plain_copy(plain.config, full)
        tmp = folder.with_name(f".tmp-{folder.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        save_hf_folder(plain, tmp, dtype=dtype or None)
        if tokenizer:
            from phiforge.tokenizer import Tokenizer

            Tokenizer.from_folder(tokenizer).save(tmp)
        _replace_dir(tmp, folder)
    barrier(env)
    return folder


def _plain_copy(config: ModelConfig, weights: dict[str, torch.Tensor]) -> PhiForgeModel:
    plain = build_model(config, device="meta").to_empty(device="cpu")
    if config.tie_word_embeddings:  # to_empty unties the head
        plain.lm_head.weight = plain.embed.weight
    plain.load_state_dict(weights, strict=True)
    return plain


def _replace_dir(new: Path, target: Path) -> None:
    old = target.with_name(f".old-{target.name}")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)
