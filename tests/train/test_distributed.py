"""torchrun --nproc_per_node 2 on CPU/gloo: DDP, FSDP2 (ZeRO-3) and HSDP match one process at the same global batch.

Tolerance: one process sums 4 micro-batch gradients; two ranks each sum 2 and then average over gloo
(all-reduce for DDP, reduce-scatter for FSDP). fp32 addition in a different order differs by ~1e-7
relative per step, and 12 steps of training carry that forward without blowing it up: measured loss
differences are below 1e-6. The bound of 1e-4 is far above that noise and far below what a real bug
moves (a wrong rank slice, a missing gradient average or a skipped micro-batch changes the loss by
1e-2 or more within a step or two).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from gsm8k_corpus import PYTHON, Corpus, build_corpus, subprocess_env
from safetensors.torch import load_file

from phiforge.train import TrainConfig, train
from phiforge.train.checkpointing import list_checkpoints

STEPS = 12
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return build_corpus(tmp_path_factory.getbasetemp() / "gsm8k-corpus")


def overrides(corpus: Corpus, out: Path, *extra: str) -> list[str]:
    # 8 sequences per step: 4 micro-batches of 2 in one process, 2 per rank on two ranks
    return [f"data.tokenizer={corpus.tokenizer}", f"data.sources.text.path={corpus.train_tokens}",
            f"run.out_dir={out}", f"run.max_steps={STEPS}", "batch.global_sequences=8", "batch.micro_batch_size=2",
            "log.every=1", "log.eval_every=6", "log.eval_sequences=7", "log.progress=false", "log.peak_flops=1e11",
            "log.tensorboard=false", "checkpoint.every=6", "checkpoint.keep_last=2", *extra]


def torchrun(corpus: Corpus, out: Path, *extra: str, stderr: list[str] | None = None) -> dict:
    """The run summary of a 2-rank torchrun (its stderr appended to ``stderr`` when given)."""
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "phiforge.train.pretrain", "tiny", *overrides(corpus, out, *extra)]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    if stderr is not None:
        stderr.append(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def losses(out: Path) -> tuple[list[float], list[float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], [r["val_loss"]["all"] for r in records if "val_loss" in r]


@pytest.fixture(scope="module")
def single(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single")
    train(TrainConfig.from_toml("tiny", overrides(corpus, out)))
    return out


@pytest.fixture(scope="module")
def two_ranks(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, dict]]:
    """One torchrun per strategy, run on first use and shared by the tests below."""
    runs: dict[str, tuple[Path, dict]] = {}

    def run(strategy: str) -> tuple[Path, dict]:
        if strategy not in runs:  # fsdp-keep: params stay gathered from forward to backward; hsdp: 2 replicas
            name, _, keep = strategy.partition("-")
            out = tmp_path_factory.mktemp(strategy)
            runs[strategy] = out, torchrun(corpus, out, f"distributed.strategy={name}", "distributed.shard_size=1",
                                           f"distributed.reshard_after_forward={str(keep != 'keep').lower()}")
        return runs[strategy]

    return run


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "fsdp-keep", "hsdp"])
def test_two_ranks_match_one_process(strategy: str, single: Path, two_ranks: Callable) -> None:
    name = strategy.partition("-")[0]
    out, summary = two_ranks(strategy)
    assert summary["world_size"] == 2 and summary["strategy"] == name
    want_train, want_val = losses(single)
    got_train, got_val = losses(out)
    assert len(got_train) == STEPS and len(got_val) == 3
    diff = max(abs(a - b) for a, b in zip(want_train + want_val, got_train + got_val))
    print(f"{strategy}: max |loss difference| vs one process = {diff:.2e}")
    assert diff < TOLERANCE
    assert got_train[-1] < got_train[0] - 0.3  # and it did train
    # the exported Hugging Face weights (gathered from shards for FSDP) match too
    want = load_file(str(single / "final" / "model.safetensors"))
    got = load_file(str(out / "final" / "model.safetensors"))
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=0)
    kind = "model.safetensors" if name == "ddp" else "sharded"
    assert (list_checkpoints(out)[-1][1] / kind).exists()


def test_fsdp_resume_continues_exactly(corpus: Corpus, two_ranks: Callable, tmp_path: Path) -> None:
    """A sharded (DCP) checkpoint from step 6, resumed by a fresh torchrun, repeats steps 7-12 exactly; the
    newer step-12 checkpoint beside it, one DCP shard corrupted, fails its manifest (both ranks hash a share
    of the files) and is skipped by name."""
    full, _ = two_ranks("fsdp")
    resumed = tmp_path / "resumed"
    for step in (6, 12):
        source = dict(list_checkpoints(full))[step]
        shutil.copytree(source, resumed / "checkpoints" / source.name)
    step12 = resumed / "checkpoints" / "step-00000012"
    shard = sorted((step12 / "sharded").glob("*.distcp"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    err: list[str] = []
    summary = torchrun(corpus, resumed, "distributed.strategy=fsdp", "checkpoint.resume=auto", stderr=err)
    assert summary["start_step"] == 6
    assert f"skipping checkpoint {step12}: {shard}: sha256 differs from the manifest's" in err[0]
    assert losses(resumed)[0] == losses(full)[0][6:]


def test_fsdp_fp16_with_compile_and_activation_checkpointing(single: Path, corpus: Corpus, tmp_path: Path) -> None:
    """Every option on the FSDP path at once; fp16 rounding keeps it within 5e-3 of the fp32 run."""
    torchrun(corpus, tmp_path, "distributed.strategy=fsdp", "run.precision=fp16", "run.compile=true",
             "run.activation_checkpointing=true", "run.max_steps=6")
    got, want = losses(tmp_path)[0], losses(single)[0][:6]
    assert max(abs(a - b) for a, b in zip(got, want)) < 5e-3
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_scale"] > 0 for r in records if "loss" in r)
    state = json.loads((list_checkpoints(tmp_path)[-1][1] / "state.json").read_text())
    assert state["scaler"]["scale"] > 0 and state["format"] == "dcp"


def test_fsdp_meta_init_sharded_load_mixed_precision_and_one_sync_per_step(corpus: Corpus, tmp_path: Path) -> None:
    """tests/train/dist_checks.py in two real ranks: meta init equals a 1-process init bit for bit (fsdp and
    hsdp, tied head too); init_from an HF folder keeps half the weights per rank and gives the 1-process
    logits; gradients are reduced once per optimizer step however many micro-batches (FSDP reduce-scatters
    counted by wrapping dist.reduce_scatter_single, DDP bucket all-reduces by a comm hook); bf16 FSDP
    gathers bf16 params, reduces in fp32 and keeps fp32 master weights and moments."""
    from phiforge.config.model import preset
    from phiforge.io.checkpoint import save_hf_folder
    from phiforge.model.transformer import build_model

    hf = tmp_path / "hf"
    save_hf_folder(build_model(preset("tiny-phi").replace(vocab_size=1024), seed=3), hf)
    script = Path(__file__).with_name("dist_checks.py")
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path), str(hf), str(corpus.tokenizer), str(corpus.train_tokens)]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        for name, check in [*r["meta_init"].items(), ("hsdp", r["meta_init_hsdp"])]:
            assert check["exact"], name
        assert r["meta_init"]["tiny-phi"]["local_fraction"] == pytest.approx(0.5, abs=0.02)
        assert r["meta_init_hsdp"]["local_fraction"] == 1.0  # shard_size 1: two replicas
        assert r["meta_init"]["tiny-phi4-mini"]["tied"]
        assert r["init_from"]["max_logit_diff"] < 1e-5
        assert r["init_from"]["local_numel"] <= 0.52 * r["init_from"]["total_numel"]
        groups = preset("tiny-phi").num_layers + 3  # one reduce-scatter per FSDP unit (embed, blocks, head, root)
        assert r["fsdp-micro6"]["reductions"] == r["fsdp-micro2"]["reductions"] == groups  # 1 vs 3 micro-batches
        assert r["fsdp-micro2"]["reduce_dtypes"] == ["torch.float32"]
        assert r["fsdp-micro2"]["compute_dtypes"] == ["torch.bfloat16"]
        assert r["fsdp-micro2"]["master_dtypes"] == r["fsdp-micro2"]["moment_dtypes"] == ["torch.float32"]
        assert r["ddp-micro2"]["reductions"] == r["ddp-micro6"]["reductions"] >= 1
