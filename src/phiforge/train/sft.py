"""Supervised fine-tuning on chat data: assistant-only loss, packed rows without cross-document attention.

    phiforge sft RECIPE [section.key=value ...]          e.g. phiforge sft sft model.init_from=runs/base/final

Records (JSONL/JSON/Parquet), in TRL's conventions:
    {"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}      every assistant turn is trained
    {"prompt": [messages...], "completion": [messages...]}                      the completion's assistant turns
    {"prompt": "text", "completion": "text"}                                    the completion and an EOS

Conversations are rendered with the model's chat template; the trained tokens are found from the
template itself: assistant turn i starts where ``render(messages[:i], add_generation_prompt=True)``
ends, and runs through the first end-of-turn token after it, located by token offsets in the one
tokenization of the whole conversation (no search for marker strings in the text).

Packing puts several examples in one row (best-fit decreasing, as TRL's ``bfd``); positions restart at
every example and a block-diagonal mask keeps attention inside it. The training loop, optimizer,
precision, distributed wrapping and checkpoints are the pretraining ``Pretrainer``'s: this module only
supplies the data, the masked loss, LoRA and the export.
"""

from __future__ import annotations

import bisect
import copy
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from phiforge.errors import DataError, PhiforgeError
from phiforge.train import checkpointing as ckpt
from phiforge.train.config import TrainConfig, TrainConfigError
from phiforge.train.distributed import DistEnv, all_reduce_sum, init_distributed, shutdown, unwrap
from phiforge.train.pretrain import Pretrainer, next_token_loss

IGNORE = -100  # target id that the cross-entropy skips


class RecordError(DataError):
    """One bad training record; the message names it."""


# ---- config ----------------------------------------------------------------------------------------
@dataclass
class SFTDataSection:
    path: str = ""  # training records: .jsonl(.gz), .json or .parquet, or arithmetic:N[:SEED] (generated chats)
    val_path: str = ""  # held-out records (optional)
    val_fraction: float = 0.0  # or: share of the training records held out
    seq_len: int = 1024  # tokens per row (longer examples are truncated)
    tokenizer: str = ""  # tokenizer folder; "" = the one beside model.init_from
    chat_template: str = ""  # "" = the tokenizer's; a built-in name (phi-3, phi-4, ...) or a .jinja file
    packing: bool = True  # several examples per row, no attention across them
    id_field: str = "id"  # record field used in messages about a record (else file:line)
    skip_bad_records: bool = True  # count and report bad records instead of stopping


@dataclass
class LoRASection:
    rank: int = 0  # 0 = full fine-tuning; > 0 trains only low-rank adapters (merged at export)
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"])


@dataclass
class SFTConfig(TrainConfig):
    data: SFTDataSection = field(default_factory=SFTDataSection)
    lora: LoRASection = field(default_factory=LoRASection)

    def validate(self) -> None:
        super().validate()
        if not self.data.path:
            raise TrainConfigError("data.path: give the training records (JSONL with messages or prompt/completion)")
        validate_lora(self)


def validate_lora(config: Any) -> None:
    if config.lora.rank < 0:
        raise TrainConfigError(f"lora.rank must be >= 0, got {config.lora.rank}")
    if config.lora.rank and not config.model.init_from:
        raise TrainConfigError("lora.rank > 0 adapts a trained model: set model.init_from")


# ---- tokenizer and starting weights -------------------------------------------------------------------
def load_tokenizer(data: Any, init_from: str) -> Any:
    """data.tokenizer, else the tokenizer beside model.init_from; data.chat_template replaces its template."""
    from phiforge.tokenizers.chat_templates import BUILTIN_TEMPLATES
    from phiforge.tokenizers.tokenizer import Tokenizer

    folder = data.tokenizer or init_from
    if not folder or not (Path(folder) / "tokenizer.json").is_file():
        raise TrainConfigError(f"data.tokenizer: no tokenizer.json in {folder!r}; give a tokenizer folder")
    tok = Tokenizer.from_folder(folder)
    if data.chat_template in BUILTIN_TEMPLATES:
        tok.chat_template = BUILTIN_TEMPLATES[data.chat_template]
    elif data.chat_template:
        path = Path(data.chat_template)
        if not path.is_file():
            raise TrainConfigError(f"data.chat_template {data.chat_template!r}: neither a built-in template "
                                   f"({', '.join(BUILTIN_TEMPLATES)}) nor a file")
        tok.chat_template = path.read_text()
    return tok


def prepare_init(config: Any, env: DistEnv) -> None:
    """model.init_from may be a .gguf file or an embedded alias: convert it once to a Hugging Face folder."""
    ref = config.model.init_from
    if not ref or Path(ref).is_dir():
        return
    from phiforge.io.checkpoint import save_hf_folder
    from phiforge.io.load import load_pretrained
    from phiforge.train.distributed import barrier

    folder = Path(config.run.out_dir) / "init-model"
    if env.is_main and not (folder / "config.json").is_file():
        model, tokenizer = load_pretrained(ref, dtype=torch.float32, device="cpu")
        tmp = folder.with_name(".tmp-init-model")
        save_hf_folder(model, tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        tmp.rename(folder)
    barrier(env)
    config.model.init_from = str(folder)


# ---- rendering: token ids and the trained-token mask -------------------------------------------------------
@dataclass
class Example:
    ids: list[int]
    mask: list[bool]  # True: the model is trained to predict this token


def render_conversation(tok: Any, messages: Sequence[Mapping[str, Any]], train_from: int = 0) -> Example:
    """Token ids of the conversation and a mask of the assistant turns at index >= ``train_from``.

    A trained turn covers its content and the end-of-turn token that closes it (the first of the
    tokenizer's stop tokens after the content); the template's text around it is not trained.
    """
    if not isinstance(messages, Sequence) or not messages or not all(isinstance(m, Mapping) for m in messages):
        raise RecordError("expected a non-empty list of messages ({'role': ..., 'content': ...})")
    for m in messages:
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RecordError(f"every message needs a string 'role' and 'content', got {dict(m)!r}")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= train_from]
    if not turns:
        raise RecordError("the conversation has no assistant turn to train on")
    full = tok.apply_chat_template(messages)
    enc = tok.backend.encode(full, add_special_tokens=False)
    starts = [s for s, _ in enc.offsets]
    stops = set(tok.stop_token_ids)
    mask = [False] * len(enc.ids)
    for i in turns:
        if i == 0:
            raise RecordError("an assistant turn opens the conversation; it needs a prompt before it")
        begin = len(tok.apply_chat_template(messages[:i], add_generation_prompt=True))
        upto = tok.apply_chat_template(messages[: i + 1])
        end = len(os.path.commonprefix([upto, full]))
        if not full.startswith(tok.apply_chat_template(messages[:i], add_generation_prompt=True)) or end < begin:
            raise RecordError("the chat template does not render conversations prefix-stably; cannot find turn "
                              f"{i}'s tokens")
        first = bisect.bisect_left(starts, begin)
        last = bisect.bisect_left(starts, end)
        span = range(first, last)
        closing = next((k for k in span if enc.ids[k] in stops), None)
        for k in range(first, (closing + 1) if closing is not None else last):
            mask[k] = True
    return Example(list(enc.ids), mask)


def render_text_pair(tok: Any, prompt: str, completion: str, append_eos: bool = True) -> Example:
    """Prompt and completion tokenized separately, so the boundary is exact; the completion (+ EOS) is trained."""
    p = tok.encode(prompt)
    c = tok.encode(completion, add_special_tokens=False)
    if append_eos:
        if tok.eos_token_id is None:
            raise RecordError("append EOS: the tokenizer has no eos token")
        c = c + [tok.eos_token_id]
    return Example(p + c, [False] * len(p) + [True] * len(c))


def record_id(record: Mapping[str, Any], path: Path, id_field: str) -> str:
    if id_field in record and record[id_field] is not None:
        return str(record[id_field])
    return f"{path}:{record.get('__line__', '?')}"


def render_record(tok: Any, record: Mapping[str, Any]) -> Example:
    if "messages" in record:
        return render_conversation(tok, record["messages"])
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            return render_conversation(tok, prompt + completion, train_from=len(prompt))
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion:
                raise RecordError("empty completion")
            return render_text_pair(tok, prompt, completion)
        raise RecordError("prompt and completion must both be strings or both be lists of messages")
    raise RecordError(f"expected a 'messages' list or 'prompt' + 'completion'; fields are {sorted(record)}")


def read_examples(path: str, tok: Any, seq_len: int, id_field: str,
                  skip_bad: bool) -> tuple[list[Example], list[dict[str, str]], int]:
    """Render every record of ``path``: (examples, skipped [{id, reason}], truncated count)."""
    from phiforge.eval.tasks.data import TaskDataError, read_records
    from phiforge.train.arithmetic import ARITHMETIC, arithmetic_chats

    file = Path(path)
    try:
        records = arithmetic_chats(path) if path.startswith(ARITHMETIC) else read_records("sft", file)
    except TaskDataError as err:
        raise TrainConfigError(str(err).replace("task sft: ", "")) from None
    examples, skipped, truncated = [], [], 0
    for record in records:
        rid = record_id(record, file, id_field)
        try:
            ex = render_record(tok, record)
            if len(ex.ids) > seq_len + 1:
                ex, truncated = Example(ex.ids[: seq_len + 1], ex.mask[: seq_len + 1]), truncated + 1
            if not any(ex.mask[1:]):
                raise RecordError(f"no trained token left within data.seq_len {seq_len}")
        except (RecordError, ValueError, TypeError) as err:
            if not skip_bad:
                raise RecordError(f"{file}: record {rid}: {err}") from None
            skipped.append({"id": rid, "reason": str(err)})
            continue
        examples.append(ex)
    if not examples:
        raise TrainConfigError(f"{file}: no usable records ({len(skipped)} skipped, e.g. {skipped[:3]})")
    return examples, skipped, truncated


# ---- packing ---------------------------------------------------------------------------------------------
def pack(lengths: Sequence[int], capacity: int, packing: bool = True) -> list[list[int]]:
    """Rows of example indices: best-fit decreasing (each example into the fullest row it fits)."""
    if not packing:
        return [[i] for i in range(len(lengths))]
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at < len(free):
            space, row = free.pop(at)
            rows[row].append(i)
        else:
            space, row = capacity, len(rows)
            rows.append([i])
        if space - lengths[i] > 0:
            bisect.insort(free, (space - lengths[i], row))
    return rows


@dataclass
class Row:
    inputs: list[int]
    targets: list[int]  # IGNORE where not trained
    positions: list[int]  # restart at 0 for every example
    segments: list[int]  # example number inside the row


def build_row(examples: Sequence[Example]) -> Row:
    row = Row([], [], [], [])
    for seg, ex in enumerate(examples):
        n = len(ex.ids) - 1  # each example shifts on its own: no prediction across a boundary
        row.inputs += ex.ids[:-1]
        row.targets += [t if m else IGNORE for t, m in zip(ex.ids[1:], ex.mask[1:])]
        row.positions += range(n)
        row.segments += [seg] * n
    return row


def document_mask(segments: torch.Tensor, positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, 1, T, T]: a query sees earlier keys of its own example (and within the sliding window)."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal
    if window is not None:
        allowed &= (positions[:, :, None] - positions[:, None, :]) < window
    return allowed[:, None]


def document_block_mask(segments: torch.Tensor, positions: torch.Tensor, window: int | None) -> Any:
    """document_mask as a FlexAttention BlockMask: the same allowed pairs, but blocks of 128x128 that no
    query may use are skipped, and attention stays one fused kernel (SDPA with an explicit mask is not)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def allowed(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        ok = (segments[b, q] == segments[b, kv]) & (q >= kv)
        if window is not None:
            ok = ok & (positions[b, q] - positions[b, kv] < window)
        return ok

    B, T = segments.shape
    return create_block_mask(allowed, B, None, T, T, device=segments.device)


@dataclass
class RowBatch:
    """Tensors of a micro-batch of rows, trimmed to its longest row; padding has its own segment."""

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    mask: Any  # document_mask's [B, 1, T, T] booleans, or document_block_mask's BlockMask (flex=True)

    @classmethod
    def from_rows(cls, rows: Sequence[Row], device: torch.device, window: int | None,
                  flex: bool = False) -> RowBatch:
        T = max(len(r.inputs) for r in rows)
        pad = T - np.array([len(r.inputs) for r in rows])
        ids = [r.inputs + [0] * p for r, p in zip(rows, pad)]
        targets = [r.targets + [IGNORE] * p for r, p in zip(rows, pad)]
        positions = [r.positions + list(range(p)) for r, p in zip(rows, pad)]
        segments = [r.segments + [len(r.inputs) + 1] * p for r, p in zip(rows, pad)]
        t = {k: torch.tensor(v, device=device) for k, v in
             (("i", ids), ("t", targets), ("p", positions), ("s", segments))}
        masking = document_block_mask if flex else document_mask
        return cls(t["i"], t["t"], t["p"], masking(t["s"], t["p"], window))


class RowSampler:
    """Rows in a seeded order per epoch; the loop's data interface (next_batch, accounting, state)."""

    def __init__(self, rows: list[Row], seed: int, name: str = "sft") -> None:
        self.rows, self.seed, self.name = rows, seed, name
        self.served = 0  # global rows served
        self.targets = 0
        self._order: tuple[int, np.ndarray] | None = None

    def _row_at(self, position: int) -> Row:
        epoch, i = divmod(position, len(self.rows))
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.rows)))
        return self.rows[int(self._order[1][i])]

    def next_batch(self, global_rows: int, rank: int = 0, world_size: int = 1) -> list[Row]:
        batch = [self._row_at(self.served + k) for k in range(global_rows)]
        self.served += global_rows
        self.targets += sum(sum(t != IGNORE for t in r.targets) for r in batch)
        per = global_rows // world_size
        return batch[rank * per : (rank + 1) * per]

    def accounting(self) -> dict[str, dict[str, float]]:
        return {self.name: {"sequences": self.served, "trained_tokens": self.targets,
                            "epochs": round(self.served / len(self.rows), 4)}}

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "rows": len(self.rows), "served": self.served, "targets": self.targets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("rows") != len(self.rows) or state.get("seed") != self.seed:
            raise TrainConfigError(f"checkpoint data position is for {state.get('rows')} rows with seed "
                                   f"{state.get('seed')}; this run has {len(self.rows)} rows, seed {self.seed}")
        self.served, self.targets = int(state["served"]), int(state["targets"])


# ---- LoRA ------------------------------------------------------------------------------------------------
class LoRA(nn.Module):
    """weight + scale * B @ A as a parametrization: parameter names stay, so checkpoints and export work."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))  # zero: training starts at the base model
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.B @ self.A).to(weight.dtype) * self.scale


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str]) -> list[str]:
    """Freeze the model and add adapters to the Linear layers whose names end with a target."""
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(name.endswith(t) for t in targets):
            out_f, in_f = module.weight.shape
            lora = LoRA(out_f, in_f, rank, alpha).to(module.weight.device)
            parametrize.register_parametrization(module, "weight", lora)
            adapted.append(name)
    if not adapted:
        raise TrainConfigError(f"lora.targets {list(targets)} match no Linear layer of the model")
    return adapted


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the weights (in place); the model is plain again."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ---- the trainer -------------------------------------------------------------------------------------------
class PostTrainer(Pretrainer):
    """The pretraining loop with a post-training stage's data; subclasses fill in the data and the loss."""

    def __init__(self, config: Any, env: DistEnv) -> None:
        prepare_init(config, env)
        self.tokenizer = load_tokenizer(config.data, config.model.init_from)
        self.skipped: list[dict[str, str]] = []
        super().__init__(config, env)
        if config.lora.rank and config.shard_plan().sharded and env.distributed:
            raise TrainConfigError(f"lora with distributed.strategy={config.distributed.strategy} is not "
                                   "supported; use ddp (adapters are small: replicating them is cheap)")

    def _init_weights(self, model: nn.Module, init_from: str, trainable: bool) -> None:
        super()._init_weights(model, init_from, trainable)
        lora = self.config.lora
        if lora.rank and trainable:
            adapted = apply_lora(model, lora.rank, lora.alpha, lora.targets)
            self._say(f"LoRA rank {lora.rank} on {len(adapted)} layers; "
                      f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters")

    def _autocast_forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        with self._autocast():
            return self.model(*args, **kwargs)

    def export(self) -> Path:
        """The Hugging Face folder (LoRA merged into a copy) with this run's tokenizer and chat template."""
        model = self.model
        if self.config.lora.rank:
            model = merge_lora(copy.deepcopy(unwrap(self.model)))
        folder = ckpt.export_hf(model, self.env, self.out_dir / "final",
                                dtype=self.config.checkpoint.export_dtype or None)
        if self.env.is_main:
            self.tokenizer.save(folder)
        return folder

    def _finish(self, start: int, tokens: int, train_time: float) -> dict[str, Any]:
        summary = super()._finish(start, tokens, train_time)
        summary["skipped_records"] = self.skipped
        if self.env.is_main:
            from phiforge.io.checkpoint import write_json

            write_json(self.out_dir / "summary.json", summary)
        return summary


class SFTTrainer(PostTrainer):
    def build_data(self) -> tuple[RowSampler, list[Row]]:
        d, seed = self.config.data, self.config.run.seed
        train, skipped, truncated = read_examples(d.path, self.tokenizer, d.seq_len, d.id_field, d.skip_bad_records)
        val: list[Example] = []
        if d.val_path:
            val, val_skipped, _ = read_examples(d.val_path, self.tokenizer, d.seq_len, d.id_field,
                                                d.skip_bad_records)
            skipped += val_skipped
        elif d.val_fraction > 0:
            order = np.random.default_rng([seed, 7]).permutation(len(train))
            held = set(order[: max(1, round(len(train) * d.val_fraction))].tolist())
            val = [e for i, e in enumerate(train) if i in held]
            train = [e for i, e in enumerate(train) if i not in held]
        self.skipped = skipped
        for s in skipped:
            self._say(f"skipped record {s['id']}: {s['reason']}")
        rows = [build_row([train[i] for i in r]) for r in pack([len(e.ids) - 1 for e in train], d.seq_len, d.packing)]
        self.data_info = {"path": d.path, "examples": len(train), "rows": len(rows), "skipped": len(skipped),
                          "truncated": truncated, "packing": d.packing,
                          "fill": sum(len(r.inputs) for r in rows) / (len(rows) * d.seq_len)}
        val_rows = [build_row([val[i] for i in r]) for r in pack([len(e.ids) - 1 for e in val], d.seq_len, d.packing)]
        return RowSampler(rows, seed), val_rows

    def describe_data(self) -> Any:
        return self.data_info

    def micro_batches(self, batch: list[Row]) -> list[tuple[RowBatch, int]]:
        size, window = self.plan.micro_batch_size, self.model_config.sliding_window
        local = torch.tensor(float(sum(sum(t != IGNORE for t in r.targets) for r in batch)), device=self.env.device)
        trained = all_reduce_sum(local, self.env).item()  # the whole step's trained tokens, over all ranks
        return [(RowBatch.from_rows(batch[m : m + size], self.env.device, window, self.flex_attention), trained)
                for m in range(0, len(batch), size)]

    def micro_loss(self, chunk: tuple[RowBatch, float]) -> torch.Tensor:
        b, trained = chunk
        logits = self._autocast_forward(b.inputs, b.positions, attn_mask=b.mask)
        # the loop averages micro-batches and DDP averages ranks: scale so the step's objective is the
        # mean over every trained token of the global batch, however the rows split
        scale = self.plan.accum_steps * self.env.world_size / max(trained, 1.0)
        return next_token_loss(logits, b.targets, reduction="sum") * scale

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over the held-out examples' trained tokens (every rank evaluates all of them)."""
        self.model.eval()
        total = count = 0.0
        size, window = self.plan.micro_batch_size, self.model_config.sliding_window
        for m in range(0, len(self.validation), size):
            b = RowBatch.from_rows(self.validation[m : m + size], self.env.device, window, self.flex_attention)
            logits = self._autocast_forward(b.inputs, b.positions, attn_mask=b.mask)
            total += next_token_loss(logits, b.targets, reduction="sum").item()
            count += int((b.targets != IGNORE).sum())
        self.model.train()
        return {"all": total / max(count, 1)}


def sft(config: SFTConfig) -> dict[str, Any]:
    """Run (or resume) supervised fine-tuning; returns the summary (also out_dir/summary.json)."""
    config.validate()
    env = init_distributed(config.run.device)
    try:
        return SFTTrainer(config, env).run()
    finally:
        shutdown(env)


def run_cli(stage: str, config_cls: type, entry: Any, argv: list[str] | None, doc: str) -> int:
    """RECIPE [section.key=value ...] -> run ``entry`` and print its summary JSON (rank 0)."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(doc)
        return 0 if args else 2
    try:
        summary = entry(config_cls.from_toml(args[0], args[1:]))
    except PhiforgeError as err:  # config, data and checkpoint errors name the key, file or record
        print(f"phiforge {stage}: error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("sft", SFTConfig, sft, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
