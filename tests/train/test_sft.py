"""SFT: template-derived assistant masks, packing without cross-document attention, a real run, LoRA, bad input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from chat_data import chat_tokenizer, colour_records, gsm8k_rows, tiny_model_folder, write_jsonl
from gsm8k_corpus import PYTHON, subprocess_env

from phiforge.config.model import preset
from phiforge.io.checkpoint import load_hf_folder
from phiforge.model.transformer import build_model
from phiforge.tokenizers.chat_templates import BUILTIN_TEMPLATES
from phiforge.train.config import TrainConfigError
from phiforge.train.sft import (
    Example,
    RecordError,
    RowBatch,
    RowSampler,
    SFTConfig,
    build_row,
    pack,
    read_examples,
    render_conversation,
    render_record,
    sft,
)

END_TOKEN = {"phi-3": "<|end|>", "phi-3.5": "<|end|>", "phi-3-medium": "<|end|>", "phi-3-small": "<|end|>",
             "phi-4": "<|im_end|>", "phi-4-mini": "<|end|>"}
CONVERSATION = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "2 + 3 = 5.\nThe answer is 5."},
                {"role": "user", "content": "And 4 + 4?"},
                {"role": "assistant", "content": "It is 8."}]


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, tok) -> Path:
    return tiny_model_folder(tmp_path_factory.mktemp("sft-base"), tok)


def masked_spans(tokenizer, ex: Example) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    spans, run = [], []
    for token, trained in zip(ex.ids + [None], ex.mask + [False]):
        if trained:
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return spans


# ---- masks -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_mask_is_assistant_content_and_end_token_for_every_builtin_template(tok, name: str) -> None:
    tok.chat_template = BUILTIN_TEMPLATES[name]
    ex = render_conversation(tok, CONVERSATION)
    assert ex.ids == tok.apply_chat_template(CONVERSATION, tokenize=True)  # one tokenization of the render
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert masked_spans(tok, ex) == [r + END_TOKEN[name] for r in replies]


def test_mask_for_the_teachers_chatml_template(teacher) -> None:
    tok = teacher[1]
    ex = render_conversation(tok, CONVERSATION[1:])  # no system message: the template inserts its own
    assert masked_spans(tok, ex) == ["2 + 3 = 5.\nThe answer is 5.<|im_end|>", "It is 8.<|im_end|>"]


def test_prompt_completion_records(tok) -> None:
    tok.chat_template = BUILTIN_TEMPLATES["phi-3"]
    conv = render_record(tok, {"prompt": CONVERSATION[:3], "completion": CONVERSATION[3:]})
    assert masked_spans(tok, conv) == ["It is 8.<|end|>"]  # only the completion's assistant turn
    text = render_record(tok, {"prompt": "Q: 2+3?\nA:", "completion": " 5"})
    assert text.ids[: len(tok.encode("Q: 2+3?\nA:"))] == tok.encode("Q: 2+3?\nA:")
    assert masked_spans(tok, text) == [" 5" + tok.eos_token]


def test_bad_conversations_are_named(tok, tmp_path: Path) -> None:
    tok.chat_template = BUILTIN_TEMPLATES["phi-3"]
    with pytest.raises(RecordError, match="no assistant turn"):
        render_conversation(tok, [{"role": "user", "content": "hi"}])
    with pytest.raises(RecordError, match="role"):
        render_conversation(tok, [{"role": "user"}, {"role": "assistant", "content": "x"}])
    good = {"id": "ok", "messages": CONVERSATION}
    path = write_jsonl(tmp_path / "d.jsonl", [good, {"id": "lonely", "messages": CONVERSATION[:2]}, {"text": "x"}])
    examples, skipped, _ = read_examples(str(path), tok, 256, "id", skip_bad=True)
    assert len(examples) == 1
    assert [s["id"] for s in skipped] == ["lonely", f"{path}:3"]
    assert "no assistant turn" in skipped[0]["reason"]
    with pytest.raises(RecordError, match="record lonely: the conversation has no assistant turn"):
        read_examples(str(path), tok, 256, "id", skip_bad=False)


# ---- packing ------------------------------------------------------------------------------------------------
def test_best_fit_decreasing_packing() -> None:
    lengths = [70, 60, 50, 40, 30, 20, 10, 90, 5]
    rows = pack(lengths, 100)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 100 for r in rows)
    assert len(rows) == 4  # 375 tokens: the lower bound
    assert pack(lengths, 100, packing=False) == [[i] for i in range(len(lengths))]


@pytest.mark.parametrize("name", ["tiny-phi3", "tiny-phi"])  # tiny-phi3 has a sliding window of 47
def test_packed_examples_do_not_see_each_other(name: str) -> None:
    model = build_model(preset(name), seed=3).eval()
    g = torch.Generator().manual_seed(0)
    docs = [Example(torch.randint(0, 256, (n,), generator=g).tolist(), [True] * n) for n in (30, 61, 25)]
    row = build_row(docs)
    batch = RowBatch.from_rows([row], torch.device("cpu"), model.config.sliding_window)
    with torch.no_grad():
        packed = model(batch.inputs, batch.positions, attn_mask=batch.mask)[0]
        start = 0
        for doc in docs:
            alone = model(torch.tensor([doc.ids[:-1]]))[0]
            torch.testing.assert_close(packed[start : start + len(doc.ids) - 1], alone, atol=1e-5, rtol=1e-5)
            start += len(doc.ids) - 1
    assert row.targets[:29] == docs[0].ids[1:] and row.positions[29:31] == [0, 1]


@pytest.mark.slow  # compiles flex_attention forward and backward (~1-2 min on 2 busy cores)
def test_flex_attention_block_masks_equal_the_explicit_document_masks() -> None:
    """Two packed rows (three and two documents, one row padded) through the compiled FlexAttention kernel and
    through SDPA with document_mask: logits and every gradient agree within fp32 rounding (1e-5); tiny-phi4-mini
    has grouped kv heads, tiny-phi3 a sliding window of 47 inside documents longer than it."""
    g = torch.Generator().manual_seed(0)
    for name in ("tiny-phi3", "tiny-phi4-mini"):
        model = build_model(preset(name), seed=3)
        rows = [build_row([Example(torch.randint(0, 256, (n,), generator=g).tolist(), [True] * n) for n in lens])
                for lens in ((30, 61, 25), (70, 20))]
        results = []
        for flex in (False, True):
            b = RowBatch.from_rows(rows, torch.device("cpu"), model.config.sliding_window, flex=flex)
            model.zero_grad()
            logits = model(b.inputs, b.positions, attn_mask=b.mask)
            logits.float().square().mean().backward()
            results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        (want, want_grads), (got, got_grads) = results
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for key in want_grads:
            torch.testing.assert_close(got_grads[key], want_grads[key], atol=1e-5, rtol=1e-4, msg=f"{name} {key}")


def test_row_sampler_resumes_where_it_stopped() -> None:
    rows = [build_row([Example([i, i + 1, i + 2], [False, True, True])]) for i in range(10)]
    whole = [r.inputs for r in RowSampler(rows, seed=3).next_batch(8)]
    ranks = [[r.inputs for r in RowSampler(rows, seed=3).next_batch(8, rank, 2)] for rank in (0, 1)]
    assert ranks[0] + ranks[1] == whole  # each rank takes its own half of the same global batch
    a = RowSampler(rows, seed=3)
    a.next_batch(8)
    b = RowSampler(rows, seed=3)
    b.load_state_dict(a.state_dict())
    assert [r.inputs for r in b.next_batch(8)] == [r.inputs for r in a.next_batch(8)]  # crosses an epoch
    assert a.accounting()["sft"]["epochs"] == 1.6
    with pytest.raises(TrainConfigError, match="rows"):
        RowSampler(rows[:5], seed=3).load_state_dict(a.state_dict())


# ---- runs -------------------------------------------------------------------------------------------------------
def sft_overrides(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.init_from={base}", f"data.path={data}", f"run.out_dir={out}", "log.progress=false",
            "log.tensorboard=false", "log.peak_flops=1e11", *extra]


@pytest.fixture(scope="module")
def gsm8k_chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = gsm8k_rows("train", 160)
    records = [{"id": f"gsm-{i}", "messages": [{"role": "user", "content": r["question"]},
                                               {"role": "assistant", "content": r["answer"]}]}
               for i, r in enumerate(rows)]
    records.append({"id": "no-reply", "messages": [{"role": "user", "content": "Hello?"}]})
    return write_jsonl(tmp_path_factory.mktemp("sft-data") / "gsm8k-chat.jsonl", records)


def test_sft_learns_the_assistant_turns_and_exports(base: Path, gsm8k_chat: Path, tmp_path: Path, tok) -> None:
    config = SFTConfig.from_toml("sft", sft_overrides(base, gsm8k_chat, tmp_path, "run.max_steps=12",
                                                      "data.seq_len=256", "data.val_fraction=0.1",
                                                      "batch.global_sequences=8", "batch.micro_batch_size=4",
                                                      "optim.lr=3e-3", "log.every=4", "log.eval_every=6"))
    summary = sft(config)
    val = summary["val_loss"]
    assert val["12"]["all"] < val["6"]["all"] < val["0"]["all"] - 0.4, val  # measured: 6.48 -> 5.99 -> 5.85
    assert summary["skipped_records"] == [{"id": "no-reply", "reason": "the conversation has no assistant turn "
                                                                        "to train on"}]
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["sources"]["packing"] and run["sources"]["fill"] > 0.8  # packed rows are nearly full
    ref = transformers.AutoModelForCausalLM.from_pretrained(summary["export"]).eval()
    mine = load_hf_folder(summary["export"], dtype=torch.float32, device="cpu")
    ids = torch.tensor([tok.encode("Natalia sold clips")])
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, mine(ids), atol=1e-4, rtol=1e-4)
    assert transformers.AutoTokenizer.from_pretrained(summary["export"]).chat_template == tok.chat_template


def test_lora_trains_only_adapters_and_merges_at_export(base: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "colour.jsonl", colour_records(64))
    config = SFTConfig.from_toml("sft", sft_overrides(base, data, tmp_path / "run", "run.max_steps=4",
                                                      "data.seq_len=128", "lora.rank=4", "optim.lr=1e-2",
                                                      "batch.global_sequences=4", "batch.micro_batch_size=4"))
    summary = sft(config)
    before = load_hf_folder(base, dtype=torch.float32, device="cpu").state_dict()
    after = load_hf_folder(summary["export"], dtype=torch.float32, device="cpu").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("qkv.weight", "proj.weight", "fc.weight")) for k in changed), changed
    assert "embed.weight" not in changed
    transformers.AutoModelForCausalLM.from_pretrained(summary["export"])


def test_cli_reports_a_bad_record_by_id(base: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [*colour_records(3), {"id": "only-user", "messages": [
        {"role": "user", "content": "hi"}]}])
    cmd = [PYTHON, "-m", "phiforge.cli", "sft", "sft", *sft_overrides(base, data, tmp_path / "r", "run.max_steps=1",
                                                                   "data.seq_len=128", "data.skip_bad_records=false")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "record only-user: the conversation has no assistant turn" in proc.stderr
    with pytest.raises(TrainConfigError, match="data.path"):
        SFTConfig.from_toml("sft", [f"model.init_from={base}"])


@pytest.mark.slow
def test_ddp_on_two_ranks_matches_one_process(base: Path, gsm8k_chat: Path, tmp_path: Path) -> None:
    """The global batch's per-token mean, whatever the split: two DDP ranks give one process's losses."""
    args = ["run.max_steps=4", "data.seq_len=256", "batch.global_sequences=8", "batch.micro_batch_size=2",
            "optim.lr=3e-3", "log.every=1", "checkpoint.every=0"]
    single = sft(SFTConfig.from_toml("sft", sft_overrides(base, gsm8k_chat, tmp_path / "one", *args)))
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "phiforge.train.sft", "sft", *sft_overrides(base, gsm8k_chat, tmp_path / "two", *args)]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(done.stdout.strip().splitlines()[-1])
    assert two["world_size"] == 2 and two["strategy"] == "ddp"
    assert two["losses"] == pytest.approx(single["losses"], abs=1e-4)
