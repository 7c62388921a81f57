"""DPO: loss and gradients against a hand computation, a run that widens held-out margins, bad pairs,
and the end-to-end chain tiny model -> SFT -> PTS pairs -> DPO -> export loaded by transformers."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from chat_data import (
    OBJECTS,
    chat_tokenizer,
    colour_conversation,
    colour_records,
    gsm8k_rows,
    tiny_model_folder,
    wants_red,
    write_jsonl,
)

from phiforge.config.model import preset
from phiforge.io.load import load_pretrained
from phiforge.model.transformer import build_model
from phiforge.train.config import TrainConfigError
from phiforge.train.dpo import DPOConfig, Pair, completion_batch, dpo, dpo_loss, read_pairs, sequence_logps
from phiforge.train.pts import PTSConfig, pts
from phiforge.train.sft import RecordError, SFTConfig, sft

BETA = 0.3


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, tok) -> Path:
    return tiny_model_folder(tmp_path_factory.mktemp("dpo-base"), tok)


def quiet(out: Path, *extra: str) -> list[str]:
    return [f"run.out_dir={out}", "log.progress=false", "log.tensorboard=false", "log.peak_flops=1e11", *extra]


# ---- the loss -------------------------------------------------------------------------------------------------
def hand_logp(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """sum_t log p(completion_t | prompt, completion_<t), one position at a time."""
    full = prompt + completion
    logits = model(torch.tensor([full]))[0]
    total = torch.zeros(())
    for t in range(len(prompt), len(full)):
        total = total + torch.log_softmax(logits[t - 1].double(), -1)[full[t]]
    return total


def test_loss_and_gradients_equal_a_hand_computation() -> None:
    policy = build_model(preset("tiny-phi3"), seed=0)
    ref = build_model(preset("tiny-phi3"), seed=1)  # a different reference: non-zero rewards at the start
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, 256, (n,), generator=g).tolist()  # noqa: E731
    pairs = [Pair("a", rand(7), rand(5), rand(3)), Pair("b", rand(12), rand(1), rand(1)),
             Pair("c", rand(3), rand(9), rand(6))]

    ids, targets = completion_batch(pairs, torch.device("cpu"))
    logps = sequence_logps(policy(ids), targets)
    with torch.no_grad():
        ref_logps = sequence_logps(ref(ids), targets)
    n = len(pairs)
    losses, chosen_r, rejected_r = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], BETA)
    losses.mean().backward()
    grads = {k: p.grad.clone() for k, p in policy.named_parameters()}

    twin = copy.deepcopy(policy)
    twin.zero_grad()
    hand_losses = []
    for p in pairs:
        with torch.no_grad():
            rc, rr = hand_logp(ref, p.prompt, p.chosen), hand_logp(ref, p.prompt, p.rejected)
        z = BETA * ((hand_logp(twin, p.prompt, p.chosen) - rc) - (hand_logp(twin, p.prompt, p.rejected) - rr))
        hand_losses.append(-torch.log(1 / (1 + torch.exp(-z))))
        assert BETA * (hand_logp(twin, p.prompt, p.chosen) - rc).item() == pytest.approx(
            chosen_r[len(hand_losses) - 1].item(), abs=1e-5)
    hand = torch.stack(hand_losses).mean()
    hand.backward()
    assert losses.mean().item() == pytest.approx(hand.item(), abs=1e-6)
    assert not math.isclose(hand.item(), math.log(2), abs_tol=1e-3)  # the reference differs: a real test
    for k, p in twin.named_parameters():
        torch.testing.assert_close(grads[k], p.grad.float(), atol=1e-6, rtol=1e-4, msg=k)


# ---- data ------------------------------------------------------------------------------------------------------
def test_pair_formats_and_bad_pairs(tok, tmp_path: Path) -> None:
    from phiforge.tokenizers.chat_templates import BUILTIN_TEMPLATES
    from phiforge.train.dpo import DPODataSection

    tok.chat_template = BUILTIN_TEMPLATES["phi-3"]
    user = [{"role": "user", "content": "Pick a colour for the car."}]
    records = [
        {"id": "text", "prompt": "Q: 1+1?\nA:", "chosen": " 2", "rejected": " 3"},
        {"id": "chat", "prompt": user, "chosen": [{"role": "assistant", "content": "red"}],
         "rejected": [{"role": "assistant", "content": "blue"}]},
        {"id": "ids", "prompt_ids": [5, 6, 7], "chosen_ids": [8], "rejected_ids": [9]},
        {"id": "same", "prompt": "Q", "chosen": "A", "rejected": "A"},
        {"id": "same-ids", "prompt_ids": [5], "chosen_ids": [8], "rejected_ids": [8]},
        {"id": "big-id", "prompt_ids": [5], "chosen_ids": [10**6], "rejected_ids": [8]},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    pairs, skipped, _ = read_pairs(str(path), tok, DPODataSection(), tok.vocab_size)
    by_id = {p.id: p for p in pairs}
    assert by_id["text"].prompt == tok.encode("Q: 1+1?\nA:")
    assert by_id["text"].chosen == tok.encode(" 2", add_special_tokens=False) + [tok.eos_token_id]
    assert tok.decode(by_id["chat"].chosen) == "red<|end|>" and tok.decode(by_id["chat"].rejected) == "blue<|end|>"
    assert tok.decode(by_id["chat"].prompt) == "<|user|>\nPick a colour for the car.<|end|>\n<|assistant|>\n"
    assert (by_id["ids"].prompt, by_id["ids"].chosen, by_id["ids"].rejected) == ([5, 6, 7], [8], [9])  # no EOS
    assert [s["id"] for s in skipped] == ["same", "same-ids", "big-id"]
    assert "chosen equals rejected" in skipped[0]["reason"]
    strict = DPODataSection(skip_bad_records=False)
    with pytest.raises(RecordError, match="record same: chosen equals rejected"):
        read_pairs(str(path), tok, strict, tok.vocab_size)


def test_config_errors(base: Path) -> None:
    with pytest.raises(TrainConfigError, match="dpo.reference"):
        DPOConfig.from_toml("dpo", [f"model.init_from={base}", "data.path=x.jsonl", "dpo.reference=none"])
    with pytest.raises(TrainConfigError, match="unknown key 'dpo.alpha'"):
        DPOConfig.from_toml("dpo", [f"model.init_from={base}", "data.path=x.jsonl", "dpo.alpha=1"])


# ---- runs ------------------------------------------------------------------------------------------------------
def preference_pairs(n: int, offset: int = 0) -> list[dict]:
    """Chosen: the GSM8K answer; rejected: a refusal. Learnable, so held-out pairs must follow."""
    rows = gsm8k_rows("train", offset + n)[offset:]
    return [{"id": f"p{offset + i}", "prompt": [{"role": "user", "content": r["question"]}],
             "chosen": [{"role": "assistant", "content": r["answer"].split("\n")[-1]}],
             "rejected": [{"role": "assistant", "content": "I cannot say."}]} for i, r in enumerate(rows)]


def test_dpo_raises_the_held_out_margin(base: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", preference_pairs(24))
    val = write_jsonl(tmp_path / "val.jsonl", preference_pairs(8, offset=100))
    args = [f"model.init_from={base}", f"data.path={train}", f"data.val_path={val}", "data.seq_len=160",
            "dpo.beta=0.1", "optim.lr=1e-3", "run.max_steps=8", "batch.global_sequences=8",
            "batch.micro_batch_size=8", "log.every=4", "log.eval_every=4", "checkpoint.every=4"]
    summary = dpo(DPOConfig.from_toml("dpo", quiet(tmp_path / "run", *args)))
    val_log = summary["val_loss"]
    assert val_log["0"]["margin"] == pytest.approx(0.0, abs=1e-6) and val_log["0"]["all"] == pytest.approx(math.log(2))
    assert val_log["8"]["margin"] > val_log["4"]["margin"] > 0.5, val_log
    assert val_log["8"]["accuracy"] == 1.0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"} <= set(logged[-1])
    assert logged[-1]["rewards/margin"] > 0
    assert (tmp_path / "run" / "train-reference_logps.json").is_file()

    # resume after losing the last checkpoint: the cached reference pass and the pair order carry over
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-00000008")
    resumed = dpo(DPOConfig.from_toml("dpo", quiet(tmp_path / "run", *args, "checkpoint.resume=auto")))
    assert resumed["start_step"] == 4
    assert resumed["losses"] == pytest.approx(summary["losses"][1:], abs=1e-6)
    assert resumed["val_loss"]["8"]["margin"] == pytest.approx(val_log["8"]["margin"], abs=1e-6)

    # the same first step with a live frozen reference: identical loss (both start at the policy's weights)
    live = dpo(DPOConfig.from_toml("dpo", quiet(tmp_path / "live", *args[:-4], "run.max_steps=1",
                                                "batch.global_sequences=8", "batch.micro_batch_size=4",
                                                "dpo.reference=live")))
    assert live["losses"][0] == pytest.approx(math.log(2), abs=1e-6)


def test_end_to_end_sft_pts_dpo_export(base: Path, tmp_path: Path, tok) -> None:
    """tiny model -> SFT on the colour task -> PTS finds the colour word -> DPO on those pairs -> transformers."""
    data = write_jsonl(tmp_path / "colour.jsonl", colour_records(160))
    sft_summary = sft(SFTConfig.from_toml("sft", quiet(
        tmp_path / "sft", f"model.init_from={base}", f"data.path={data}", "data.seq_len=96", "optim.lr=1e-2",
        "run.max_steps=30", "batch.global_sequences=4", "batch.micro_batch_size=4", "schedule.kind=constant")))
    sft_model = sft_summary["export"]

    queries = write_jsonl(tmp_path / "q.jsonl", [{"id": o, "question": f"Pick a colour for the {o}."}
                                                 for o in OBJECTS[:6]])
    config = PTSConfig.from_toml("pts", [f"model.path={sft_model}", f"data.path={queries}", "data.oracle="
                                         "chat_data:wants_red", f"run.out_dir={tmp_path / 'pts'}", "run.progress=false",
                                         "sampling.max_new_tokens=8", "search.min_prob=0.1", "search.max_prob=0.9",
                                         "search.queries_per_batch=6", "model.dtype=float32", "model.device=cpu"])
    found = pts(config)
    assert found["pairs"] >= 3, found["status"]
    red, blue = (tok.encode(c, add_special_tokens=False) for c in ("red", "blue"))
    pairs = [json.loads(line) for line in Path(found["pairs_file"]).read_text().splitlines()]
    for p in pairs:  # the pivot is the colour word, first token of the reply; "red" is the side that succeeds
        assert p["position"] == 0 and p["chosen_ids"] == red[:1] and p["rejected_ids"] != red[:1], p
        assert p["p_chosen"] == 1.0 and p["p_rejected"] == 0.0
        assert tok.decode(p["prompt_ids"]).endswith("<|assistant|>\n")
    assert any(p["rejected_ids"] == blue[:1] for p in pairs)

    dpo_summary = dpo(DPOConfig.from_toml("dpo", quiet(
        tmp_path / "dpo", f"model.init_from={sft_model}", f"data.path={found['pairs_file']}", "data.seq_len=64",
        "optim.lr=3e-3", "run.max_steps=6", f"batch.global_sequences={len(pairs)}",
        f"batch.micro_batch_size={len(pairs)}", "log.every=1")))
    assert dpo_summary["losses"][-1] < dpo_summary["losses"][0] < 0.7

    hf = transformers.AutoModelForCausalLM.from_pretrained(dpo_summary["export"]).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(dpo_summary["export"])
    prompt = hf_tok.apply_chat_template(colour_conversation("kite", "")[:1], add_generation_prompt=True,
                                     tokenize=False)
    ids = torch.tensor([hf_tok.encode(prompt, add_special_tokens=False)])
    before, _ = load_pretrained(sft_model, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        after_p = torch.softmax(hf(ids).logits[0, -1], -1)
        before_p = torch.softmax(before(ids)[0, -1], -1)
    assert after_p[red[0]] - after_p[blue[0]] > before_p[red[0]] - before_p[blue[0]]  # DPO moved towards red
    assert wants_red({}, ["red"], [[]]) == [True]


def test_cli_names_a_pair_without_preference(base: Path, tmp_path: Path) -> None:
    import subprocess

    from gsm8k_corpus import PYTHON, subprocess_env

    data = write_jsonl(tmp_path / "p.jsonl", [{"id": "tie", "prompt": "Q", "chosen": "A", "rejected": "A"}])
    cmd = [PYTHON, "-m", "phiforge.cli", "dpo", "dpo", f"model.init_from={base}", f"data.path={data}",
           "data.seq_len=64", "data.skip_bad_records=false", *quiet(tmp_path / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert done.returncode == 2 and "record tie: chosen equals rejected" in done.stderr, done.stderr[-2000:]
