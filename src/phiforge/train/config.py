"""TrainConfig: one dataclass per TOML section, loaded from a recipe plus ``section.key=value`` overrides.

Every key is checked against the dataclasses, so a typo is an error that names the key and the valid
ones, before anything is built. Values in overrides are parsed as TOML values (``optim.betas=[0.9,0.95]``,
``run.precision=bf16``); a value that is not valid TOML is taken as a string.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from phiforge.config import ModelConfig
from phiforge.data.mixture import SourceConfig
from phiforge.train.distributed import DTYPES, ShardPlan

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class TrainConfigError(ValueError):
    """A training config that cannot run; the message names the key."""


@dataclass
class ModelSection:
    preset: str = ""  # a name from phiforge.config.PRESETS (ignored when init_from is set)
    init_from: str = ""  # weights only: a training checkpoint folder or a Hugging Face model folder
    vocab_from_tokenizer: bool = True  # size vocab and bos/eos to data.tokenizer (new models only)
    pad_vocab_multiple: int = 64  # round that vocab up, for matmul-friendly shapes
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields, written model.<field>


@dataclass
class DataSection:
    sources: list[SourceConfig] = field(default_factory=list)
    val_sources: list[SourceConfig] = field(default_factory=list)  # whole sources used only for validation
    val_fraction: float = 0.0  # share of each training source's sequences held out for validation
    seq_len: int = 256
    tokenizer: str = ""  # tokenizer folder: vocab size for new models, and exported with the final model


@dataclass
class BatchSection:
    global_sequences: int = 0  # give one of these two
    global_tokens: int = 0  # must be a multiple of seq_len
    micro_batch_size: int = 8  # sequences per forward/backward on one rank


@dataclass
class OptimSection:
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-7
    weight_decay: float = 0.1
    decay_exclusions: bool = False  # no weight decay on norms, biases and embeddings
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    fused: bool = True  # fused AdamW kernel where torch has one for the device


@dataclass
class ScheduleSection:
    kind: str = "constant"  # constant | cosine | linear | wsd
    warmup_steps: int = 0
    decay_fraction: float = 0.1  # wsd: share of the steps spent decaying at the end
    decay_shape: str = "linear"  # wsd: linear | 1-sqrt
    min_lr_ratio: float = 0.0  # the lr that cosine/linear/wsd decay to, relative to optim.lr


@dataclass
class RunSection:
    out_dir: str = "runs/default"
    max_steps: int = 0  # give one of max_steps and max_tokens
    max_tokens: int = 0
    seed: int = 0
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + dynamic loss scaling)
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each block
    attention: str = "auto"  # packed documents (SFT): flex (FlexAttention block masks) | sdpa (explicit masks)
    # | auto (flex on CUDA, sdpa elsewhere)
    threads: int = 0  # torch CPU threads per process; 0 = torch's default


@dataclass
class DistributedSection:
    """How more than one process (torchrun, or ``phiforge run`` with nproc_per_node) holds the model."""

    strategy: str = "ddp"  # ddp (replicated) | fsdp (ZeRO-3: params, grads, optimizer sharded) | hsdp (2-D)
    reshard_after_forward: bool = True  # fsdp/hsdp: False keeps each block gathered from forward to backward
    param_dtype: str = "auto"  # fsdp/hsdp: gathered (compute) dtype; auto = run.precision; shards stay fp32
    reduce_dtype: str = "fp32"  # fsdp/hsdp: dtype of the gradient reduce-scatter / all-reduce
    shard_size: int = 0  # hsdp: ranks that shard one replica (0 = the ranks of one node)


# names users reach for that this trainer does not build, and what to use instead
UNBUILT_STRATEGIES = {
    "zero2": "ZeRO-2 (replicated params, sharded grads + optimizer) is not built: use 'fsdp' (ZeRO-3) with "
             "distributed.reshard_after_forward=false (params gathered once per step, sharded at rest), "
             "'hsdp' to shard within a node only, or 'ddp'",
    "zero3": "ZeRO-3 is strategy 'fsdp'",
}


@dataclass
class CheckpointSection:
    every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2
    resume: str = ""  # "" = fresh run | "auto" = latest complete checkpoint in out_dir, if any | a folder
    export: bool = True  # write the final model as a Hugging Face folder (out_dir/final)
    export_dtype: str = ""  # float32 | bfloat16 | float16; "" = the model config's torch_dtype


@dataclass
class LogSection:
    every: int = 10  # steps between metrics records
    eval_every: int = 0  # steps between validation passes; 0 = only at the start and the end
    eval_sequences: int = 64  # held-out sequences per validation source
    progress: bool = True
    tensorboard: bool = True  # when torch.utils.tensorboard can be imported
    peak_flops: float = 0.0  # per device, for MFU; 0 = measure with a matmul at start


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    batch: BatchSection = field(default_factory=BatchSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    run: RunSection = field(default_factory=RunSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    @classmethod
    def from_toml(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        """A TOML file, or the name of a built-in recipe (phiforge/recipes/NAME.toml), plus overrides."""
        return build_config(cls, read_toml(resolve_recipe(path)), overrides)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], overrides: list[str] | None = None) -> TrainConfig:
        return build_config(cls, raw, overrides)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["optim"]["betas"] = list(self.optim.betas)
        model = out.pop("model")
        out["model"] = {**{k: v for k, v in model.items() if k != "overrides"}, **model["overrides"]}
        return out

    def replace(self, **sections: Any) -> TrainConfig:
        return dataclasses.replace(self, **sections)

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise TrainConfigError(message)

        m, d, b, r = self.model, self.data, self.batch, self.run
        need(bool(m.preset) or bool(m.init_from), "model: give model.preset (a preset name) or model.init_from")
        need(d.seq_len > 0, f"data.seq_len must be > 0, got {d.seq_len}")
        need((b.global_sequences > 0) != (b.global_tokens > 0),
             "batch: give exactly one of batch.global_sequences and batch.global_tokens")
        need(b.global_tokens % d.seq_len == 0,
             f"batch.global_tokens {b.global_tokens} is not a multiple of data.seq_len {d.seq_len}")
        need(b.micro_batch_size > 0, "batch.micro_batch_size must be > 0")
        need((r.max_steps > 0) != (r.max_tokens > 0), "run: give exactly one of run.max_steps and run.max_tokens")
        _choice("run.precision", r.precision, ("fp32", "bf16", "fp16"))
        _choice("run.attention", r.attention, ("auto", "sdpa", "flex"))
        _choice("schedule.kind", self.schedule.kind, ("constant", "cosine", "linear", "wsd"))
        _choice("schedule.decay_shape", self.schedule.decay_shape, ("linear", "1-sqrt"))
        dist = self.distributed
        need(dist.strategy not in UNBUILT_STRATEGIES,
             f"distributed.strategy = {dist.strategy!r}: {UNBUILT_STRATEGIES.get(dist.strategy)}")
        _choice("distributed.strategy", dist.strategy, ("ddp", "fsdp", "hsdp"))
        _choice("distributed.param_dtype", dist.param_dtype, ("auto", "fp32", "bf16", "fp16"))
        _choice("distributed.reduce_dtype", dist.reduce_dtype, ("fp32", "bf16"))
        need(dist.shard_size >= 0, f"distributed.shard_size must be >= 0, got {dist.shard_size}")
        _choice("checkpoint.export_dtype", self.checkpoint.export_dtype, ("", "float32", "bfloat16", "float16"))
        need(0 < self.schedule.decay_fraction <= 1, "schedule.decay_fraction must be in (0, 1]")
        need(self.optim.lr > 0, f"optim.lr must be > 0, got {self.optim.lr}")
        need(self.checkpoint.keep_last >= 1, "checkpoint.keep_last must be >= 1")
        need(self.log.every >= 1, "log.every must be >= 1")

    def shard_plan(self) -> ShardPlan:
        d = self.distributed
        param = self.run.precision if d.param_dtype == "auto" else d.param_dtype
        return ShardPlan(d.strategy, d.reshard_after_forward, DTYPES[param], DTYPES[d.reduce_dtype], d.shard_size)

    @property
    def global_sequences(self) -> int:
        return self.batch.global_sequences or self.batch.global_tokens // self.data.seq_len


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise TrainConfigError(f"{key} = {value!r}; expected one of {', '.join(map(repr, allowed))}")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def resolve_recipe(path: str | Path, folder: Path = RECIPES_DIR,
                   error: type[Exception] = TrainConfigError) -> Path:
    """A TOML file, or the name of a built-in recipe in ``folder``."""
    file = Path(path)
    if file.is_file():
        return file
    builtin = folder / f"{path}.toml"
    if builtin.is_file():
        return builtin
    names = sorted(p.stem for p in folder.glob("*.toml"))
    raise error(f"{path}: no such recipe file, and not a built-in recipe ({', '.join(names)})")


def read_recipe(name: str | Path, folder: Path, error: type[Exception]) -> tuple[Path, str, dict[str, Any]]:
    """A recipe file (a path or a built-in name in ``folder``): its path, text and parsed TOML; a syntax error
    is ``error`` naming the file."""
    path = resolve_recipe(name, folder, error)
    text = path.read_text(encoding="utf-8")
    try:
        return path, text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise error(f"{path}: not valid TOML ({err})") from None


# ---- loading any stage's config (train, sft, dpo, pts, synth, curate) ----------------------------------
def read_toml(path: str | Path, error: type[Exception] = TrainConfigError) -> dict[str, Any]:
    """The parsed file; a missing file or a syntax error is ``error`` naming the file."""
    file = Path(path)
    try:
        return tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise error(f"{file}: no such config file (TOML)") from None
    except tomllib.TOMLDecodeError as err:
        raise error(f"{file}: not valid TOML ({err})") from None


def build_config(cls: type, raw: dict[str, Any], overrides: list[str] | None = None) -> Any:
    """``cls`` (a dataclass of sections) from a raw TOML dict plus ``section.key=value`` overrides, every key
    and type checked, then ``cls.validate()``."""
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        apply_override(raw, item)
    config = _build(cls, raw, "")
    config.validate()
    return config


# ---- overrides ---------------------------------------------------------------------------------------
def parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in the raw TOML dict; list entries are picked by name or index."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise TrainConfigError(f"override {item!r} must look like section.key=value")
    parts = key.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = _list_entry(node, part, where)
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise TrainConfigError(f"override {item!r}: {where} is a value, not a section")
    if isinstance(node, list):
        raise TrainConfigError(f"override {item!r}: pick an entry of {'.'.join(parts[:-1])} by name or index")
    node[parts[-1]] = parse_value(value.strip())


def _list_entry(entries: list[Any], part: str, where: str) -> Any:
    for entry in entries:
        if isinstance(entry, dict) and entry.get("name") == part:
            return entry
    if part.isdigit() and int(part) < len(entries):
        return entries[int(part)]
    names = [e.get("name") for e in entries if isinstance(e, dict)]
    raise TrainConfigError(f"{where}: no entry named {part!r}; entries are {names}")


# ---- dict -> dataclasses, with exact key and type checks --------------------------------------------------
_MODEL_FIELDS = {f.name for f in fields(ModelConfig)} - {"name"}


def _build(cls: type, table: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(table, dict):
        raise TrainConfigError(f"{where}: expected a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls) if not (cls is ModelSection and f.name == "overrides")]
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in table.items():
        if key in known:
            values[key] = _convert(hints[key], value, f"{prefix}{key}")
        elif cls is ModelSection and key in _MODEL_FIELDS:
            extra[key] = _convert(typing.get_type_hints(ModelConfig)[key], value, f"{prefix}{key}")
        else:
            valid = ", ".join(known)
            if cls is ModelSection:
                valid += ", or any ModelConfig field (" + ", ".join(sorted(_MODEL_FIELDS)) + ")"
            raise TrainConfigError(f"unknown key '{prefix}{key}' in [{where}]; valid keys: {valid}")
    if cls is ModelSection:
        values["overrides"] = extra
    if cls is SourceConfig:
        missing = [f.name for f in fields(cls) if f.name not in values and f.name in ("name", "path")]
        if missing:
            raise TrainConfigError(f"{where}: a source needs {missing} (and optionally weight)")
    return cls(**values)


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    if origin is list:
        if not isinstance(value, list):
            raise TrainConfigError(f"{key}: expected a list (an array of tables), got {value!r}")
        return [_convert(args[0], v, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise TrainConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_convert(a, v, f"{key}.{i}") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise TrainConfigError(f"{key}: expected a table, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):  # e.g. int | None: the first arm that accepts the value
        for arm in (a for a in args if a is not type(None)):
            try:
                return _convert(arm, value, key)
            except TrainConfigError:
                continue
        raise TrainConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool), str: isinstance(value, str)}
    if not ok.get(hint, True):
        raise TrainConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")
    return float(value) if hint is float else value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)
