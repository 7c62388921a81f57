"""Training checkpoints: atomic folders holding model, optimizer, schedule/data position and per-rank RNG.

    out_dir/checkpoints/step-00000100/
        state.json              step, tokens, model + train config, data position, loss scale, and the
                                manifest: bytes + sha256 of every other file (written last)
        model.safetensors       single process / DDP: weights under the model's parameter names
        optimizer.safetensors   AdamW moments keyed "<parameter name>/<slot>"; optimizer.json: param groups
        sharded/                FSDP: torch.distributed.checkpoint files, one per rank (model + optimizer)
        rng/rank-00000.json     torch, cuda, numpy and python RNG states of each rank

Every rank writes into ``.tmp-step-N``; rank 0 then renames it, so a folder named ``step-N`` is always
complete and a killed run leaves at most a temp folder that nothing trusts (it is removed on the next save).
Resuming with ``checkpoint.resume=auto`` takes the newest checkpoint whose files match its manifest; one
that does not (a flipped bit, a truncated shard) is named, renamed ``corrupt-step-N`` and skipped.
Weights never go through pickle here; small state is JSON. The layout assumes every rank sees out_dir
(one machine, or a shared filesystem).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from phiforge.config.model import ModelConfig
from phiforge.errors import TrainError
from phiforge.io.checkpoint import save_hf_folder, write_json
from phiforge.model.transformer import PhiForgeModel, build_model
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


def resolve_resume(resume: str, out_dir: str | Path, env: DistEnv | None = None,
                   say: Callable[[str], None] | None = None) -> Path | None:
    """"" -> None; "auto" -> the newest checkpoint of out_dir that verifies (None on a first run); a run
    folder -> the same in it; else that checkpoint folder, which must verify. Collective when ``env`` is
    distributed (every rank hashes a share of the files); ``say`` gets a line per skipped checkpoint."""
    if not resume:
        return None
    path = Path(resume)
    if resume != "auto" and not (path / STATE).is_file():
        if not (path.is_dir() and list_checkpoints(path)):
            raise TrainCheckpointError(f"{path}: not a complete training checkpoint (no {STATE}); "
                                       f"complete ones in it: {[str(p) for _, p in list_checkpoints(path)]}")
        out_dir = path  # a run folder: take its newest good checkpoint
    elif resume != "auto":
        problem = verify_checkpoint(path, env)
        if problem:
            raise TrainCheckpointError(f"{path}: does not verify against its manifest: {problem}")
        return path
    return newest_verified(out_dir, env, say)


def newest_verified(out_dir: str | Path, env: DistEnv | None = None,
                    say: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint whose files match its manifest. Newer ones that do not are renamed
    ``corrupt-step-N`` (kept for a look, out of resume's and keep_last's way) and reported to ``say``."""
    found = list_checkpoints(out_dir)
    bad: list[tuple[Path, str]] = []
    chosen = None
    for _, path in reversed(found):
        problem = verify_checkpoint(path, env)
        if not problem:
            chosen = path
            break
        bad.append((path, problem))
    if bad and chosen is None:
        raise TrainCheckpointError(f"{Path(out_dir) / CHECKPOINTS}: no checkpoint verifies against its manifest: "
                                   + "; ".join(f"{p.name}: {why}" for p, why in bad))
    main = env is None or env.is_main
    for path, problem in bad:
        if main:
            path.rename(path.with_name(f"corrupt-{path.name}"))
        if say is not None:
            say(f"skipping checkpoint {path}: {problem}; renamed corrupt-{path.name}, resuming from {chosen}")
    if bad and env is not None:
        barrier(env)  # no rank looks at the folder again before the renames are done
    return chosen


# ---- manifest: size and sha256 of every file ---------------------------------------------------------------
def _sha256(file: Path) -> str:
    with open(file, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _share_of_work(names: list[str], work: Callable[[str], Any], env: DistEnv | None) -> dict[str, Any]:
    """{name: work(name)} for all names, each rank doing every world_size-th one (one rank would read the
    whole model + optimizer of a large run alone)."""
    if env is None or not env.distributed:
        return {name: work(name) for name in names}
    parts: list[Any] = [None] * env.world_size
    dist.all_gather_object(parts, {name: work(name) for name in names[env.rank :: env.world_size]})
    return {name: value for part in parts for name, value in part.items()}


def file_manifest(folder: Path, env: DistEnv | None = None) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} of every file in ``folder`` but state.json. Collective."""
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != STATE)
    return _share_of_work(names, lambda n: {"bytes": (folder / n).stat().st_size, "sha256": _sha256(folder / n)},
                          env)


def verify_checkpoint(path: Path, env: DistEnv | None = None) -> str:
    """"" when every file in the checkpoint's manifest is there with its size and sha256 (or it predates
    manifests); else what is wrong, naming the first bad file. Collective."""
    try:
        manifest = read_state(path).get("files")
    except TrainCheckpointError as err:
        return str(err)
    if manifest is None:
        return ""

    def check(name: str) -> str:
        file, want = path / name, manifest[name]
        if not file.is_file():
            return f"{file}: missing"
        if file.stat().st_size != want["bytes"]:
            return f"{file}: {file.stat().st_size} bytes, the manifest says {want['bytes']}"
        if _sha256(file) != want["sha256"]:
            return f"{file}: sha256 differs from the manifest's"
        return ""

    problems = _share_of_work(sorted(manifest), check, env)
    return next((problems[n] for n in sorted(problems) if problems[n]), "")


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
    # a field newer than the checkpoint (e.g. qkv_bias) has its default there
    defaults = {f.name: f.default for f in dataclasses.fields(current) if f.default is not dataclasses.MISSING}
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
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
    files = file_manifest(tmp, env)
    if env.is_main:
        write_json(tmp / STATE, {**state, "step": step, "format": "dcp" if sharded else "safetensors",
                                 "world_size": env.world_size, "files": files})
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
    from phiforge.io.checkpoint import read_safetensors_header, read_tensor
    from phiforge.model.transformer import local_rows

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
            from phiforge.tokenizers.tokenizer import Tokenizer

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
