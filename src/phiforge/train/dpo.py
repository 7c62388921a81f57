"""Direct Preference Optimization (sigmoid loss) on prompt/chosen/rejected pairs.

    phiforge dpo RECIPE [section.key=value ...]

Records, one pair each:
    {"prompt": "text", "chosen": "text", "rejected": "text"}                     completions get an EOS
    {"prompt": [messages], "chosen": [assistant msg], "rejected": [assistant msg]} rendered by the chat template
    {"prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...]}          token ids, scored exactly as given
Token-id pairs are what ``phiforge pts`` writes: one chosen and one rejected token after the prompt,
so the margin is exactly log pi(t_chosen | prefix) - log pi(t_rejected | prefix), with no EOS and no
re-tokenization at the boundary.

loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]), with
log-probabilities summed over the completion tokens. The reference log-probabilities are computed in
one pass before training and stored in out_dir (``dpo.reference = "precompute"``: no second model in
memory), or by a frozen copy at every step (``"live"``).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from phiforge.train.config import TrainConfig, TrainConfigError
from phiforge.train.distributed import all_reduce_sum, init_distributed, is_sharded, shutdown
from phiforge.train.pretrain import next_token_loss
from phiforge.train.sft import (
    IGNORE,
    LoRASection,
    PostTrainer,
    RecordError,
    record_id,
    render_conversation,
    render_text_pair,
    run_cli,
    validate_lora,
)

REF_FILE = "reference_logps.json"


@dataclass
class DPODataSection:
    path: str = ""  # pairs: .jsonl(.gz), .json or .parquet
    val_path: str = ""  # held-out pairs (optional)
    val_fraction: float = 0.0  # or: share of the training pairs held out
    seq_len: int = 1024  # prompt + completion tokens (prompts are cut from the left, completions from the right)
    tokenizer: str = ""  # "" = the one beside model.init_from
    chat_template: str = ""  # "" = the tokenizer's; a built-in name or a .jinja file
    append_eos: bool = True  # text pairs: end each completion with EOS (as TRL); never for token ids
    id_field: str = "id"
    skip_bad_records: bool = True


@dataclass
class DPOSection:
    beta: float = 0.1
    reference: str = "precompute"  # precompute (one pass, stored in out_dir) | live (a frozen copy each step)
    ref_model: str = ""  # reference weights for precompute; "" = model.init_from


@dataclass
class DPOConfig(TrainConfig):
    data: DPODataSection = field(default_factory=DPODataSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    lora: LoRASection = field(default_factory=LoRASection)

    def validate(self) -> None:
        super().validate()
        if not self.data.path:
            raise TrainConfigError("data.path: give the preference pairs (prompt/chosen/rejected)")
        if not self.model.init_from:
            raise TrainConfigError("model.init_from: DPO starts from a trained (SFT) model")
        if self.dpo.reference not in ("precompute", "live"):
            raise TrainConfigError(f"dpo.reference = {self.dpo.reference!r}; expected 'precompute' or 'live'")
        if self.dpo.ref_model and self.dpo.reference != "precompute":
            raise TrainConfigError("dpo.ref_model is read by the precompute pass; set dpo.reference=precompute")
        if self.dpo.beta <= 0:
            raise TrainConfigError(f"dpo.beta must be > 0, got {self.dpo.beta}")
        validate_lora(self)


# ---- pairs ------------------------------------------------------------------------------------------------
@dataclass
class Pair:
    id: str
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def _token_ids(record: dict[str, Any], key: str, vocab: int) -> list[int]:
    ids = record[key]
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and 0 <= i < vocab for i in ids):
        raise RecordError(f"{key} must be a non-empty list of token ids in [0, {vocab})")
    return ids


def encode_pair(tok: Any, record: dict[str, Any], rid: str, append_eos: bool, vocab: int) -> Pair:
    """Token ids of one record; chosen == rejected is an error (it carries no preference)."""
    if all(k in record for k in ("prompt_ids", "chosen_ids", "rejected_ids")):
        pair = Pair(rid, *(_token_ids(record, k, vocab) for k in ("prompt_ids", "chosen_ids", "rejected_ids")))
    elif not all(k in record for k in ("prompt", "chosen", "rejected")):
        raise RecordError(f"expected prompt/chosen/rejected (or *_ids); fields are {sorted(record)}")
    elif all(isinstance(record[k], str) for k in ("prompt", "chosen", "rejected")):
        c = render_text_pair(tok, record["prompt"], record["chosen"], append_eos)
        r = render_text_pair(tok, record["prompt"], record["rejected"], append_eos)
        cut = c.mask.index(True)
        pair = Pair(rid, c.ids[:cut], c.ids[cut:], r.ids[cut:])
    elif isinstance(record["prompt"], list):
        pair = _conversation_pair(tok, record, rid)
    else:
        raise RecordError("prompt/chosen/rejected must be strings, or a message list with assistant replies")
    if pair.chosen == pair.rejected:
        raise RecordError("chosen equals rejected: the pair expresses no preference")
    return pair


def _conversation_pair(tok: Any, record: dict[str, Any], rid: str) -> Pair:
    prompt, sides = record["prompt"], []
    for key in ("chosen", "rejected"):
        reply = record[key]
        reply = [{"role": "assistant", "content": reply}] if isinstance(reply, str) else reply
        if not isinstance(reply, list):
            raise RecordError(f"{key} must be a string or a list of messages")
        ex = render_conversation(tok, prompt + reply, train_from=len(prompt))
        first = ex.mask.index(True)
        last = len(ex.mask) - ex.mask[::-1].index(True)
        sides.append((ex.ids[:first], ex.ids[first:last]))
    if sides[0][0] != sides[1][0]:
        raise RecordError("the prompt renders to different tokens before chosen and rejected")
    return Pair(rid, sides[0][0], sides[0][1], sides[1][1])


def fit(pair: Pair, seq_len: int) -> tuple[Pair, bool]:
    """Cut the prompt from the left, then the completions from the right, to at most seq_len tokens."""
    longest = max(len(pair.chosen), len(pair.rejected))
    if len(pair.prompt) + longest <= seq_len:
        return pair, False
    keep = max(1, seq_len - longest)
    room = seq_len - keep
    return Pair(pair.id, pair.prompt[-keep:], pair.chosen[:room], pair.rejected[:room]), True


def read_pairs(path: str, tok: Any, cfg: DPODataSection, vocab: int) -> tuple[list[Pair], list[dict[str, str]], int]:
    from phiforge.eval.tasks.data import TaskDataError, read_records

    file = Path(path)
    try:
        records = read_records("dpo", file)
    except TaskDataError as err:
        raise TrainConfigError(str(err).replace("task dpo: ", "")) from None
    pairs, skipped, truncated = [], [], 0
    for record in records:
        rid = record_id(record, file, cfg.id_field)
        try:
            pair, cut = fit(encode_pair(tok, record, rid, cfg.append_eos, vocab), cfg.seq_len)
            if pair.chosen == pair.rejected:
                raise RecordError(f"chosen equals rejected after truncation to data.seq_len {cfg.seq_len}")
        except (RecordError, ValueError, TypeError) as err:
            if not cfg.skip_bad_records:
                raise RecordError(f"{file}: record {rid}: {err}") from None
            skipped.append({"id": rid, "reason": str(err)})
            continue
        pairs.append(pair)
        truncated += cut
    if not pairs:
        raise TrainConfigError(f"{file}: no usable pairs ({len(skipped)} skipped, e.g. {skipped[:3]})")
    return pairs, skipped, truncated


# ---- log-probabilities and the loss ------------------------------------------------------------------------
def completion_batch(pairs: list[Pair], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets [2B, T] (chosen rows, then rejected); targets are IGNORE outside completions."""
    seqs = [(p.prompt, c) for side in ("chosen", "rejected") for p in pairs for c in [getattr(p, side)]]
    T = max(len(a) + len(b) for a, b in seqs) - 1
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    targets = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    for row, (prompt, completion) in enumerate(seqs):
        full = torch.tensor(prompt + completion)
        ids[row, : len(full) - 1] = full[:-1]
        targets[row, len(prompt) - 1 : len(full) - 1] = full[len(prompt) :]
    return ids.to(device), targets.to(device)


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's target tokens (IGNORE positions skipped), in fp32."""
    nll = next_token_loss(logits, targets, reduction="none").view(targets.shape)
    return -nll.sum(dim=1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO loss and the implicit rewards beta * (log pi - log ref) of each side."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards, rejected_rewards


def pairs_fingerprint(pairs: list[Pair]) -> str:
    digest = hashlib.sha256()
    for p in pairs:
        digest.update(json.dumps([p.prompt, p.chosen, p.rejected]).encode())
    return digest.hexdigest()[:16]


class PairSampler:
    """Pair indices in a seeded order per epoch; the loop's data interface."""

    def __init__(self, count: int, seed: int) -> None:
        self.count, self.seed, self.served = count, seed, 0
        self._order: tuple[int, np.ndarray] | None = None

    def _at(self, position: int) -> int:
        epoch, i = divmod(position, self.count)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.count))
        return int(self._order[1][i])

    def next_batch(self, global_pairs: int, rank: int = 0, world_size: int = 1) -> list[int]:
        batch = [self._at(self.served + k) for k in range(global_pairs)]
        self.served += global_pairs
        per = global_pairs // world_size
        return batch[rank * per : (rank + 1) * per]

    def accounting(self) -> dict[str, dict[str, float]]:
        return {"pairs": {"sequences": self.served, "epochs": round(self.served / self.count, 4)}}

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "pairs": self.count, "served": self.served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("pairs") != self.count or state.get("seed") != self.seed:
            raise TrainConfigError(f"checkpoint data position is for {state.get('pairs')} pairs with seed "
                                   f"{state.get('seed')}; this run has {self.count} pairs, seed {self.seed}")
        self.served = int(state["served"])


class DPOTrainer(PostTrainer):
    def build_data(self) -> tuple[PairSampler, list[Pair]]:
        d, seed, vocab = self.config.data, self.config.run.seed, self.model_config.vocab_size
        train, skipped, truncated = read_pairs(d.path, self.tokenizer, d, vocab)
        val: list[Pair] = []
        if d.val_path:
            val, val_skipped, _ = read_pairs(d.val_path, self.tokenizer, d, vocab)
            skipped += val_skipped
        elif d.val_fraction > 0:
            order = np.random.default_rng([seed, 7]).permutation(len(train))
            held = set(order[: max(1, round(len(train) * d.val_fraction))].tolist())
            val = [p for i, p in enumerate(train) if i in held]
            train = [p for i, p in enumerate(train) if i not in held]
        self.skipped = skipped
        for s in skipped:
            self._say(f"skipped pair {s['id']}: {s['reason']}")
        self.train_pairs = train
        self.data_info = {"path": d.path, "pairs": len(train), "val_pairs": len(val), "skipped": len(skipped),
                          "truncated": truncated}
        self._sums = torch.zeros(6, dtype=torch.float64)
        return PairSampler(len(train), seed), val

    def describe_data(self) -> Any:
        return self.data_info

    # ---- reference log-probabilities ------------------------------------------------------------------------
    def _build(self) -> None:
        super()._build()
        self.ref_model = None
        self.ref: dict[str, torch.Tensor] = {}
        if self.config.dpo.reference == "live":
            self.ref_model = self.new_model(self.config.model.init_from, trainable=False)
            return
        for name, pairs in (("train", self.train_pairs), ("val", self.validation)):
            self.ref[name] = self._precomputed(name, pairs)

    def _precomputed(self, name: str, pairs: list[Pair]) -> torch.Tensor:
        """[N, 2] reference log-probs (chosen, rejected), computed once and kept in out_dir for resumes."""
        if not pairs:
            return torch.zeros(0, 2, dtype=torch.float64)
        file = self.out_dir / f"{name}-{REF_FILE}"
        key = {"pairs": pairs_fingerprint(pairs), "ref_model": self.config.dpo.ref_model or
               self.config.model.init_from, "precision": self.config.run.precision}
        if file.is_file():
            saved = json.loads(file.read_text())
            if saved["key"] == key:
                return torch.tensor(saved["logps"], dtype=torch.float64)
        model = self.model
        if self.config.dpo.ref_model and is_sharded(self.model):  # sharded like the policy, then dropped
            model = self.new_model(self.config.dpo.ref_model, trainable=False)
        elif self.config.dpo.ref_model:
            from phiforge.io.load import load_pretrained

            model = load_pretrained(self.config.dpo.ref_model, dtype=torch.float32, device=self.env.device,
                                    with_tokenizer=False)[0]
        logps = self._score(model, pairs, desc=f"reference log-probs ({name})")
        if self.env.is_main:
            from phiforge.io.checkpoint import write_json

            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_json(file, {"key": key, "logps": logps.tolist()})
        return logps

    @torch.no_grad()
    def _score(self, model: Any, pairs: list[Pair], desc: str = "") -> torch.Tensor:
        """Summed completion log-probs [N, 2] of ``model`` (every rank scores all pairs: same forward count)."""
        from tqdm.auto import tqdm

        was_training = model.training
        model.eval()
        out, size = [], self.plan.micro_batch_size
        for m in tqdm(range(0, len(pairs), size), desc=desc, unit="batch", disable=not (
                desc and self.env.is_main and self.config.log.progress)):
            part = pairs[m : m + size]
            ids, targets = completion_batch(part, self.env.device)
            with self._autocast():
                logits = model(ids)
            lp = sequence_logps(logits, targets).double().cpu()
            out.append(torch.stack([lp[: len(part)], lp[len(part) :]], dim=1))
        model.train(was_training)
        return torch.cat(out)

    def _ref_logps(self, name: str, pairs: list[Pair], index: list[int]) -> torch.Tensor:
        if self.ref_model is not None:
            return self._score(self.ref_model, pairs).to(self.env.device)
        return self.ref[name][index].to(self.env.device)

    # ---- the loss ------------------------------------------------------------------------------------------
    def micro_batches(self, batch: list[int]) -> list[list[int]]:
        size = self.plan.micro_batch_size
        return [batch[m : m + size] for m in range(0, len(batch), size)]

    def pair_losses(self, pairs: list[Pair], ref: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ids, targets = completion_batch(pairs, self.env.device)
        logits = self._autocast_forward(ids)
        logps = sequence_logps(logits, targets)
        n = len(pairs)
        return dpo_loss(logps[:n], logps[n:], ref[:, 0], ref[:, 1], self.config.dpo.beta)

    def micro_loss(self, chunk: list[int]) -> torch.Tensor:
        pairs = [self.train_pairs[i] for i in chunk]
        losses, chosen, rejected = self.pair_losses(pairs, self._ref_logps("train", pairs, chunk))
        with torch.no_grad():
            self._sums += torch.tensor([len(chunk), losses.sum().item(), chosen.sum().item(),
                                        rejected.sum().item(), (chosen > rejected).sum().item(),
                                        (chosen - rejected).sum().item()], dtype=torch.float64)
        return losses.mean()

    def extra_metrics(self) -> dict[str, Any]:
        sums = all_reduce_sum(self._sums.to(self.env.device), self.env).cpu()
        self._sums = torch.zeros_like(self._sums)
        n = max(sums[0].item(), 1.0)
        return {"rewards/chosen": sums[2].item() / n, "rewards/rejected": sums[3].item() / n,
                "rewards/accuracy": sums[4].item() / n, "rewards/margin": sums[5].item() / n}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss, reward margin and accuracy (every rank evaluates all pairs)."""
        if not self.validation:
            return {}
        policy = self._score(self.model, self.validation)
        ref = self._score(self.ref_model, self.validation) if self.ref_model is not None else self.ref["val"]
        losses, chosen, rejected = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], self.config.dpo.beta)
        return {"all": losses.mean().item(), "margin": (chosen - rejected).mean().item(),
                "accuracy": (chosen > rejected).double().mean().item(),
                "rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item()}


def dpo(config: DPOConfig) -> dict[str, Any]:
    """Run (or resume) DPO; returns the summary (also out_dir/summary.json)."""
    config.validate()
    env = init_distributed(config.run.device)
    try:
        return DPOTrainer(config, env).run()
    finally:
        shutdown(env)


def main(argv: list[str] | None = None) -> int:
    return run_cli("dpo", DPOConfig, dpo, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
