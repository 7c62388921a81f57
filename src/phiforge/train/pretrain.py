"""Pretraining: a seeded, resumable loop over a token mixture, in one process or many (torchrun).

    phiforge train RECIPE.toml [section.key=value ...] [--resume]
    phiforge train RECIPE.toml --extend-context CHECKPOINT --seq-len 16384 --rope-theta 250000
    torchrun --nproc_per_node 2 -m phiforge.train.pretrain RECIPE.toml distributed.strategy=fsdp

Everything that can be wrong with the inputs (config keys, sources, shards, resume folder, batch
arithmetic) is checked in ``Pretrainer.__init__`` before a model is built or a FLOP is spent.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from phiforge.config.model import ModelConfig, preset
from phiforge.data.mixture import build_mixture, build_validation, describe_sources
from phiforge.errors import ConfigError, PhiforgeError
from phiforge.model.transformer import build_model
from phiforge.train import checkpointing as ckpt
from phiforge.train.config import OptimSection, TrainConfig, TrainConfigError
from phiforge.train.distributed import (
    DistEnv,
    all_reduce_sum,
    apply_activation_checkpointing,
    broadcast_object,
    compile_blocks,
    init_distributed,
    is_sharded,
    materialise,
    shard_model,
    shutdown,
    unwrap,
    wrap_model,
)
from phiforge.train.losses import chunked_cross_entropy
from phiforge.train.metrics import MetricsLogger, flops_per_token, measure_peak_flops
from phiforge.train.schedule import lr_multiplier

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch splits into ranks and micro-batches."""

    global_sequences: int
    per_rank: int
    micro_batch_size: int
    accum_steps: int
    seq_len: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_sequences * self.seq_len


def plan_batches(config: TrainConfig, world_size: int) -> BatchPlan:
    total = config.global_sequences
    if total % world_size:
        raise TrainConfigError(f"global batch of {total} sequences does not split over {world_size} ranks")
    per_rank = total // world_size
    micro = min(config.batch.micro_batch_size, per_rank)
    if per_rank % micro:
        raise TrainConfigError(f"{per_rank} sequences per rank is not a multiple of batch.micro_batch_size {micro}")
    return BatchPlan(total, per_rank, micro, per_rank // micro, config.data.seq_len)


def resolve_model_config(config: TrainConfig) -> ModelConfig:
    """The preset (sized to the tokenizer) or the init_from model, with model.<field> overrides applied."""
    m = config.model
    if m.init_from:
        base = _init_from_config(Path(m.init_from))
        new = base.replace(**m.overrides)
        changed = ckpt.config_differences(dataclasses.asdict(base), new, ckpt.RESHAPE_FREE_FIELDS)
        if changed:
            raise TrainConfigError(f"model.init_from {m.init_from}: overrides may only change fields that keep "
                                   f"every tensor shape ({', '.join(sorted(ckpt.RESHAPE_FREE_FIELDS))}); "
                                   f"got {'; '.join(changed)}")
    else:
        changes: dict[str, Any] = {}
        if m.vocab_from_tokenizer and config.data.tokenizer:
            from phiforge.tokenizers.tokenizer import Tokenizer

            tok = Tokenizer.from_folder(config.data.tokenizer)
            vocab = max(tok.vocab_size, len(tok))
            changes = {"vocab_size": -(-vocab // m.pad_vocab_multiple) * m.pad_vocab_multiple,
                       "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
        new = preset(m.preset).replace(**{**changes, **m.overrides})
    if config.data.seq_len > new.max_position_embeddings:
        raise TrainConfigError(f"data.seq_len {config.data.seq_len} exceeds the model's max_position_embeddings "
                               f"{new.max_position_embeddings}; raise model.max_position_embeddings")
    return new


def _init_from_config(path: Path) -> ModelConfig:
    if (path / ckpt.STATE).is_file():
        return ModelConfig(**ckpt.read_state(path)["model_config"])
    if (path / "config.json").is_file():
        return ModelConfig.from_file(path / "config.json")
    raise TrainConfigError(f"model.init_from {path}: neither a training checkpoint ({ckpt.STATE}) nor a "
                           "Hugging Face model folder (config.json)")


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy in fp32 whatever the logits' dtype (bf16/fp16 logits lose too much in log-softmax)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)


def build_optimizer(model: nn.Module, o: OptimSection, device: torch.device) -> torch.optim.AdamW:
    """AdamW; with decay_exclusions, norms, biases and embeddings (1-D tensors and embed.*) get no decay."""
    named = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
    if o.decay_exclusions:
        decay = [p for n, p in named if p.ndim >= 2 and not n.startswith("embed.")]
        keep = [p for n, p in named if not (p.ndim >= 2 and not n.startswith("embed."))]
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": keep, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
    else:
        groups = [{"params": [p for _, p in named], "weight_decay": o.weight_decay}]
    fused = o.fused and device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=fused or None)


class Pretrainer:
    """One training run. The constructor validates everything; ``run()`` builds the model and trains."""

    def __init__(self, config: TrainConfig, env: DistEnv) -> None:
        config.validate()
        self.config, self.env = config, env
        self.out_dir = Path(config.run.out_dir)
        self.resume_from = ckpt.resolve_resume(config.checkpoint.resume, self.out_dir, env, self._say)
        existing = ckpt.latest_checkpoint(self.out_dir)
        if self.resume_from is None and existing is not None:
            raise TrainConfigError(f"run.out_dir {self.out_dir} already holds checkpoints (latest {existing.name}); "
                                   "set checkpoint.resume=auto to continue that run, or choose a new run.out_dir")
        self.model_config = resolve_model_config(config)
        if self.resume_from is not None:
            ckpt.check_resumable(self.resume_from, self.model_config)
        self.mixture, self.validation = self.build_data()
        self.plan = plan_batches(config, env.world_size)
        r = config.run
        self.total_steps = r.max_steps or math.ceil(r.max_tokens / self.plan.tokens_per_step)
        self.autocast_dtype = AUTOCAST[r.precision]
        # packed documents' masks as FlexAttention block masks: a fused kernel on CUDA; on the CPU the explicit
        # mask with SDPA stays the default there (flex compiles once per batch shape; not measured faster on CPU)
        self.flex_attention = r.attention == "flex" or (r.attention == "auto" and env.device.type == "cuda")

    # ---- hooks for post-training stages (SFT, DPO): their data, loss and export ---------------------------
    def build_data(self) -> tuple[Any, Any]:
        """(training batches, validation): anything with next_batch/accounting/state_dict/load_state_dict."""
        d = self.config.data
        mixture = build_mixture(d.sources, d.seq_len, self.config.run.seed, val_fraction=d.val_fraction,
                                vocab_size=self.model_config.vocab_size)
        return mixture, build_validation(mixture, d.val_sources, self.config.log.eval_sequences,
                                         self.model_config.vocab_size)

    def micro_batches(self, batch: Any) -> list[Any]:
        """This rank's share of one step, cut into micro-batches."""
        ids = torch.from_numpy(batch).to(self.env.device, non_blocking=True)
        size = self.plan.micro_batch_size
        return [ids[m * size : (m + 1) * size] for m in range(self.plan.accum_steps)]

    def micro_loss(self, chunk: Any) -> torch.Tensor:
        """The loss of one micro-batch; the step minimises the mean over micro-batches."""
        return self._loss(chunk)

    def extra_metrics(self) -> dict[str, Any]:
        """More numbers for the next metrics record (called on every rank at the same steps)."""
        return {}

    def describe_data(self) -> Any:
        return describe_sources(self.mixture)

    def export(self) -> Path:
        """The final model as a Hugging Face folder (collective)."""
        cfg = self.config
        return ckpt.export_hf(self.model, self.env, self.out_dir / "final", tokenizer=cfg.data.tokenizer,
                              dtype=cfg.checkpoint.export_dtype or None)

    # ---- setup -----------------------------------------------------------------------------------------
    def _say(self, message: str) -> None:
        if self.env.is_main:
            from tqdm.auto import tqdm

            tqdm.write(message, file=sys.stderr)

    def _build(self) -> None:
        r, env = self.config, self.env
        if r.run.threads:
            torch.set_num_threads(r.run.threads)
        # the training loss never holds fp32 [tokens, vocab] tensors (2.4x faster than next_token_loss
        # eager on bench/train.py's shapes, same values)
        self._cross_entropy = chunked_cross_entropy
        if r.run.compile:
            # inductor fuses the fp32 upcast, log-softmax and their backward into two kernels: faster still
            # (1.2x the chunked loss). Training shapes are fixed, so it compiles once.
            self._cross_entropy = torch.compile(next_token_loss, dynamic=False)
        self.model = self.new_model(r.model.init_from)
        self.optimizer = build_optimizer(self.model, r.optim, env.device)
        self.scaler = torch.amp.GradScaler(env.device.type) if r.run.precision == "fp16" else None
        # distinct per-rank streams (dropout); model init above is seeded per parameter, not by these
        torch.manual_seed(r.run.seed + env.rank)
        np.random.seed(r.run.seed + env.rank)
        random.seed(r.run.seed + env.rank)

    def new_model(self, init_from: str = "", trainable: bool = True) -> nn.Module:
        """The model as this run holds it: built on ``meta``, sharded (fsdp/hsdp) before any storage exists,
        then each rank materialises and initialises (seeded) or loads (``init_from``) only its own shards.
        ``trainable=False``: a frozen copy (DPO's live reference)."""
        r, env, plan = self.config.run, self.env, self.config.shard_plan()
        model = build_model(self.model_config, device="meta", dtype=torch.float32)
        sharded = env.distributed and plan.sharded
        if not sharded:  # plain / DDP: whole weights first (LoRA wraps loaded Linear layers)
            self._init_weights(materialise(model, env.device, r.seed), init_from, trainable)
        if trainable and r.activation_checkpointing:
            apply_activation_checkpointing(model)
        if trainable and r.compile:
            compile_blocks(model)
        if sharded:
            self._init_weights(materialise(shard_model(model, env, plan), env.device, r.seed), init_from, trainable)
        if not trainable:
            return model.eval().requires_grad_(False)
        return wrap_model(model, env, plan)

    def _init_weights(self, model: nn.Module, init_from: str, trainable: bool) -> None:
        """After the seeded init: the init_from weights (a hook: SFT adds LoRA adapters here)."""
        if init_from:
            self._load_init_weights(model, init_from)

    def _load_init_weights(self, model: nn.Module, init_from: str) -> None:
        """Weights from a training checkpoint or a Hugging Face folder, each tensor read once and only the
        rows of this rank's shards kept."""
        path = Path(init_from)
        if (path / ckpt.STATE).is_file():
            ckpt.load_weights(path, model)
        else:
            from phiforge.io.checkpoint import fill_from_hf_folder

            fill_from_hf_folder(model, path)
        self._say(f"initialised weights from {path}")

    def _restore(self) -> tuple[int, int]:
        if self.resume_from is None:
            return 0, 0
        state = ckpt.load_checkpoint(self.resume_from, self.model, self.optimizer, self.env)
        self.mixture.load_state_dict(state["data"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self._say(f"resumed from {self.resume_from} at step {state['step']}")
        return state["step"], state["tokens"]

    # ---- one optimizer step ------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype)

    def _sync_grads(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradients are reduced once per optimizer step, on the last micro-batch: DDP's no_sync, FSDP's
        set_requires_gradient_sync (unsharded grads accumulate locally until then)."""
        if is_sharded(self.model):
            self.model.set_requires_gradient_sync(last)
        elif not last and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _loss(self, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        with self._autocast():
            logits = self.model(ids[:, :-1])
        if reduction == "mean":
            return self._cross_entropy(logits, ids[:, 1:])
        return next_token_loss(logits, ids[:, 1:], reduction)

    def train_step(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over this rank's micro-batches, clip, step. Returns (mean loss, grad norm)."""
        chunks = self.micro_batches(batch)
        total = torch.zeros((), device=self.env.device)
        for m, chunk in enumerate(chunks):
            with self._sync_grads(last=m == len(chunks) - 1):
                loss = self.micro_loss(chunk)
                scaled = loss / len(chunks)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += loss.detach()
        norm = self._clip_gradients()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / len(chunks), norm

    def _clip_gradients(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            self._agree_on_overflow()
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if hasattr(norm, "full_tensor"):  # FSDP: a partial norm per rank -> the global one
            norm = norm.full_tensor()
        if self.config.optim.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.config.optim.grad_clip, norm, foreach=True)
        return norm

    def _agree_on_overflow(self) -> None:
        """FSDP ranks see different gradient shards: one rank's inf must skip the step on all of them."""
        if not (self.env.distributed and is_sharded(self.model)):
            return
        state = self.scaler._per_optimizer_states[id(self.optimizer)]  # GradScaler keeps found_inf here
        for found in state["found_inf_per_device"].values():
            torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)

    # ---- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean next-token loss per validation source, and over all of them ("all")."""
        self.model.eval()
        env, micro = self.env, self.plan.micro_batch_size
        sums: dict[str, torch.Tensor] = {}
        for name, windows in self.validation.windows.items():
            seqs = self.validation.sequences(name, env.rank, env.world_size)
            if seqs is None:
                seqs = np.zeros((0, self.plan.seq_len + 1), dtype=np.int64)
            chunks = math.ceil(math.ceil(len(windows) / env.world_size) / micro)
            totals = torch.zeros(2, dtype=torch.float64, device=env.device)
            for i in range(chunks):  # the same forward count on every rank: FSDP gathers collectively
                part = seqs[i * micro : (i + 1) * micro]
                weight = 1.0 if len(part) else 0.0  # a rank with fewer sequences runs a dummy, weighted 0
                ids = torch.from_numpy(part if len(part) else np.zeros_like(seqs[:1], shape=(1, seqs.shape[1])))
                ids = ids.to(env.device)
                totals[0] += weight * self._loss(ids, reduction="sum").double()
                totals[1] += weight * (ids.shape[0] * self.plan.seq_len)
            sums[name] = all_reduce_sum(totals, env)
        self.model.train()
        out = {name: (t[0] / t[1]).item() for name, t in sums.items()}
        if sums:
            grand = sum(sums.values())
            out["all"] = (grand[0] / grand[1]).item()
        return out

    # ---- the run -----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self._build()
        start, tokens = self._restore()
        cfg, env = self.config, self.env
        self.flops_per_token = flops_per_token(self.model_config, self.plan.seq_len)
        self.peak = cfg.log.peak_flops or broadcast_object(
            measure_peak_flops(env.device, self.autocast_dtype or torch.float32) if env.is_main else None, env)
        self.logger = MetricsLogger(self.out_dir, env.is_main, cfg.log.tensorboard, resume_step=start)
        self.evals: dict[int, dict[str, float]] = {}
        self.losses: list[float] = []
        self.last_checkpoint = self.resume_from
        if env.is_main and not self.resume_from:
            self._write_run_info()
        try:
            tokens, train_time = self._loop(start, tokens)
            return self._finish(start, tokens, train_time)
        finally:
            self.logger.close()

    def _write_run_info(self) -> None:
        from phiforge.io.checkpoint import write_json

        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.out_dir / "run.json", {
            "train_config": self.config.to_dict(), "model_config": dataclasses.asdict(self.model_config),
            "parameters": unwrap(self.model).num_parameters() if not is_sharded(self.model) else None,
            "world_size": self.env.world_size, "batch": dataclasses.asdict(self.plan),
            "total_steps": self.total_steps, "peak_flops_per_device": self.peak,
            "sources": self.describe_data()})

    def _loop(self, start: int, tokens: int) -> tuple[int, float]:
        """Steps start..total; returns the tokens seen and the seconds spent training (not evaluating/saving)."""
        from tqdm.auto import tqdm

        env, cfg, plan = self.env, self.config, self.plan
        bar = tqdm(total=self.total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (env.is_main and cfg.log.progress))
        if self.validation and start == 0:
            self._evaluate_and_log(0)
        interval = _Interval(torch.zeros((), device=env.device))
        train_time = 0.0
        for step in range(start, self.total_steps):
            tick = time.perf_counter()
            lr = cfg.optim.lr * lr_multiplier(step, self.total_steps, cfg.schedule)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, norm = self.train_step(self.mixture.next_batch(plan.global_sequences, env.rank, env.world_size))
            interval.loss += loss
            interval.steps += 1
            tokens += plan.tokens_per_step
            done = step + 1
            if done % cfg.log.every == 0 or done == self.total_steps:
                mean_loss = all_reduce_sum(interval.loss.clone(), env).item() / (env.world_size * interval.steps)
                interval.seconds += time.perf_counter() - tick  # after .item(): includes queued GPU work
                self._log_train(done, tokens, lr, mean_loss, norm.item(), interval, bar)
                train_time += interval.seconds
                interval = _Interval(torch.zeros((), device=env.device))
            else:
                interval.seconds += time.perf_counter() - tick
            bar.update(1)
            if self.validation and _due(cfg.log.eval_every, done, self.total_steps):
                self._evaluate_and_log(done)
            if _due(cfg.checkpoint.every, done, self.total_steps):
                self.last_checkpoint = self._save(done, tokens)
        bar.close()
        return tokens, train_time

    def _log_train(self, step: int, tokens: int, lr: float, loss: float, grad_norm: float, interval: _Interval,
                   bar: Any) -> None:
        rate = interval.steps * self.plan.tokens_per_step / interval.seconds
        mfu = self.flops_per_token * rate / (self.peak * self.env.world_size)
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                  "tokens_per_s": rate, "mfu": mfu, "sources": self.mixture.accounting()}
        if self.scaler is not None:
            record["loss_scale"] = self.scaler.get_scale()
        record.update(self.extra_metrics())
        self.logger.log(record)
        self.losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", mfu=f"{mfu:.1%}")

    def _evaluate_and_log(self, step: int) -> None:
        self.evals[step] = self.evaluate()
        self.logger.log({"step": step, "val_loss": self.evals[step]})

    def _save(self, step: int, tokens: int) -> Path:
        state = {"tokens": tokens, "total_steps": self.total_steps,
                 "model_config": dataclasses.asdict(self.model_config), "train_config": self.config.to_dict(),
                 "data": self.mixture.state_dict(), "data_accounting": self.mixture.accounting(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None}
        path = ckpt.save_checkpoint(self.out_dir, step, self.model, self.optimizer, self.env, state,
                                    self.config.checkpoint.keep_last)
        self._say(f"checkpoint {path}")
        return path

    def _finish(self, start: int, tokens: int, train_time: float) -> dict[str, Any]:
        """Final validation, checkpoint and Hugging Face export; the summary (also out_dir/summary.json)."""
        cfg, total = self.config, self.total_steps
        if self.validation and total not in self.evals and start < total:  # a finished run resumed: done
            self._evaluate_and_log(total)
        if start < total or self.last_checkpoint is None:
            self.last_checkpoint = self._save(total, tokens)
        export = self.export() if cfg.checkpoint.export else None
        rate = (total - start) * self.plan.tokens_per_step / train_time if train_time else 0.0
        summary = {
            "out_dir": str(self.out_dir), "start_step": start, "steps": total, "tokens": tokens,
            "losses": self.losses, "val_loss": {str(k): v for k, v in self.evals.items()},
            "tokens_per_s": rate, "mfu": self.flops_per_token * rate / (self.peak * self.env.world_size),
            "peak_flops_per_device": self.peak, "sources": self.mixture.accounting(),
            "world_size": self.env.world_size,
            "strategy": cfg.distributed.strategy if self.env.distributed else "single",
            "checkpoint": str(self.last_checkpoint), "export": str(export) if export else None}
        if self.env.is_main:
            from phiforge.io.checkpoint import write_json

            write_json(self.out_dir / "summary.json", summary)
        return summary


@dataclass
class _Interval:
    """Loss and training seconds since the last metrics record (evaluation and saving excluded)."""

    loss: torch.Tensor
    steps: int = 0
    seconds: float = 0.0


def _due(every: int, step: int, total: int) -> bool:
    """Periodic work at every ``every`` steps, except the last step, which the end of the run handles."""
    return bool(every) and step % every == 0 and step < total


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) pretraining as configured; returns the run summary (also in out_dir/summary.json)."""
    config.validate()
    env = init_distributed(config.run.device)
    try:
        return Pretrainer(config, env).run()
    finally:
        shutdown(env)


def extend_context(config: TrainConfig, checkpoint: str, seq_len: int, rope_theta: float,
                   lr_scale: float = 0.1) -> TrainConfig:
    """A config that continues ``checkpoint``'s weights at a longer context and a new RoPE base.

    A fresh run (new optimizer, schedule from step 0) at ``lr_scale`` times the lr, as phi-4's
    mid-training (4K -> 16K, base 250K, 10x lower lr); the data sources stay those of ``config``.
    """
    new = copy.deepcopy(config)
    new.model.init_from = checkpoint
    new.model.overrides = {**new.model.overrides, "rope_theta": float(rope_theta),
                           "max_position_embeddings": seq_len}
    new.data.seq_len = seq_len
    if new.batch.global_tokens:  # keep the tokens per step: fewer, longer sequences
        new.batch.global_tokens -= new.batch.global_tokens % seq_len
    new.optim.lr = config.optim.lr * lr_scale
    new.checkpoint.resume = ""
    new.validate()
    return new


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe name (tiny, phi-1.5, phi-4, phi-4-midtrain) or TOML file")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=3e-4 run.max_steps=200")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in checkpoint.out_dir (fresh if none)")
    p.add_argument("--extend-context", metavar="CHECKPOINT", default=None,
                   help="continue CHECKPOINT's weights at --seq-len with a new --rope-theta and lower lr")
    p.add_argument("--seq-len", type=int, default=None, help="with --extend-context: the new sequence length")
    p.add_argument("--rope-theta", type=float, default=None, help="with --extend-context: the new RoPE base")
    p.add_argument("--lr-scale", type=float, default=0.1, help="with --extend-context: lr multiplier (phi-4: 0.1)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = list(args.overrides) + (["checkpoint.resume=auto"] if args.resume else [])
    config = TrainConfig.from_toml(args.recipe, overrides)
    if args.extend_context is None:
        if args.seq_len is not None or args.rope_theta is not None:
            raise ConfigError("--seq-len/--rope-theta belong to --extend-context CHECKPOINT "
                             "(for a plain run use data.seq_len=... model.overrides.rope_theta=...)")
        return config
    if args.seq_len is None or args.rope_theta is None:
        raise ConfigError("--extend-context needs --seq-len and --rope-theta")
    if not Path(args.extend_context).is_dir():
        raise ConfigError(f"--extend-context {args.extend_context}: no such checkpoint folder")
    return extend_context(config, args.extend_context, args.seq_len, args.rope_theta, args.lr_scale)


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``phiforge train``, ``python -m`` and torchrun; prints the summary JSON on rank 0."""
    parser = argparse.ArgumentParser(prog="phiforge train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        summary = train(config_from_args(args))
    except PhiforgeError as err:  # config, data and checkpoint errors name the key or file; others keep a traceback
        print(f"phiforge train: error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
