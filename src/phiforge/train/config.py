"""TrainConfig: one dataclass per TOML section, loaded from a recipe plus ``section.key=value`` overrides by the
one config loader (``phiforge.config.loader``: every key and type checked, unknown keys listed with the file)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phiforge.config.loader import build_config, load_config
from phiforge.config.model import ModelConfig
from phiforge.data.mixture import SourceConfig
from phiforge.errors import ConfigError
from phiforge.train.distributed import DTYPES, ShardPlan

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes" / "train"


class TrainConfigError(ConfigError):
    """A training config that cannot run; the message names the key."""


@dataclass
class ModelSection:
    CONFIG_EXTRA = ("overrides", ModelConfig)  # model.<ModelConfig field> = value lands in overrides

    preset: str = ""  # a name from phiforge.config.model.PRESETS (ignored when init_from is set)
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
        """A TOML file, or the name of a built-in recipe (phiforge/recipes/train/NAME.toml), plus overrides."""
        return load_config(cls, path, overrides, recipes=RECIPES_DIR, error=TrainConfigError)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], overrides: list[str] | None = None) -> TrainConfig:
        return build_config(cls, raw, overrides, error=TrainConfigError)

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
