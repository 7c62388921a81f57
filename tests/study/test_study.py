"""`phiforge study`: a tiny study (2 arms x 2 seeds, real training on GSM8K and MBPP text) killed with SIGKILL
mid-arm and rerun; equal token budgets, shared data stages run once, the paired bootstrap by hand."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED

from phiforge.study import StudyError, load_study
from phiforge.study.bootstrap import paired_bootstrap

STEPS, SEQUENCES, SEQ_LEN = 12, 16, 128  # the tiny recipe: 16 sequences of 128 tokens per step


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_study(folder: Path) -> Path:
    gsm = [json.loads(line) for line in (SHARED / "benchmarks/gsm8k/train.jsonl").read_text().splitlines()[:400]]
    mbpp = [json.loads(line) for line in (SHARED / "benchmarks/mbpp/mbpp.jsonl").read_text().splitlines()[:300]]
    test = [json.loads(line) for line in (SHARED / "benchmarks/gsm8k/test.jsonl").read_text().splitlines()[:60]]
    math = _jsonl(folder / "math.jsonl", [{"id": f"m{i}", "text": f"{r['question']}\n{r['answer']}"}
                                          for i, r in enumerate(gsm)])
    code = _jsonl(folder / "code.jsonl", [{"id": f"c{i}", "text": f"{r['text']}\n{r['code']}"}
                                          for i, r in enumerate(mbpp)])
    neutral = _jsonl(folder / "neutral.jsonl", [{"id": f"n{i}", "text": r["question"]} for i, r in enumerate(test)])
    path = folder / "study.toml"
    path.write_text(f"""
[study]
name = "tiny"
out_dir = "{folder / 'out'}"
seeds = [0, 1]

[train]
recipe = "tiny"
overrides = ["run.max_steps={STEPS}", "checkpoint.every=3", "log.every=3", "log.eval_every={STEPS}",
             "schedule.warmup_steps=2"]

[tokenizer]
vocab_size = 384

[tokenize]
heldout_fraction = 0.1

[corpora.math]
documents = "{math}"
curate = {{heuristics = {{min_words = 5}}, decontam = {{skip_missing = true}}}}

[corpora.code]
documents = "{code}"
curate = {{heuristics = {{enabled = false}}, decontam = {{skip_missing = true}}}}

[arms.math]
mixture = {{math = 1.0}}

[arms.mixed]
mixture = {{math = 0.5, code = 0.5}}

[probes]
tasks = {{piqa = 12}}
neutral_documents = "{neutral}"
heldout_tokens = 1024
sample_tokens = 4
prompts = {{completion = "Janet has"}}
bootstrap = 300
""")
    return path


def _hand_bootstrap(a: np.ndarray, b: np.ndarray, replicates: int) -> tuple[float, float, float]:
    """The bootstrap written out with loops over replicates, seeds and items (same random draws)."""
    rng = np.random.default_rng(0)
    items = rng.integers(0, a.shape[1], size=(replicates, a.shape[1]))
    seeds_a = rng.integers(0, a.shape[0], size=(replicates, a.shape[0]))
    seeds_b = rng.integers(0, b.shape[0], size=(replicates, b.shape[0]))
    diffs = []
    for r in range(replicates):
        mean_a = sum(sum(a[s, i] for i in items[r]) / a.shape[1] for s in seeds_a[r]) / a.shape[0]
        mean_b = sum(sum(b[s, i] for i in items[r]) / b.shape[1] for s in seeds_b[r]) / b.shape[0]
        diffs.append(mean_a - mean_b)
    diffs.sort()
    # numpy's default percentile: linear interpolation between order statistics at (R - 1) * q
    def pct(q: float) -> float:
        pos = (replicates - 1) * q
        lo = int(np.floor(pos))
        return diffs[lo] + (diffs[min(lo + 1, replicates - 1)] - diffs[lo]) * (pos - lo)

    return float(a.mean() - b.mean()), pct(0.025), pct(0.975)


def test_bootstrap_of_a_known_difference() -> None:
    a = np.array([[1, 0, 1, 1], [1, 1, 1, 0]], dtype=float)
    b = np.array([[0, 0, 1, 1], [0, 1, 1, 0]], dtype=float)
    diff = paired_bootstrap(a, b, replicates=400)
    assert diff.difference == pytest.approx(0.25)  # (3 + 3)/8 - (2 + 2)/8
    assert (diff.difference, diff.low, diff.high) == pytest.approx(_hand_bootstrap(a, b, 400), abs=1e-12)
    same = paired_bootstrap(a, a, replicates=50)
    assert same.difference == 0 and not same.significant
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap(a, b[:, :3])


def test_tiny_study_killed_mid_arm_resumes_with_equal_budgets_and_shared_stages_run_once(tmp_path: Path) -> None:
    study = write_study(tmp_path)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "phiforge", "study", str(study), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2] / "src"),
                                                                      os.environ.get("PYTHONPATH")]))}
    with open(tmp_path / "first.log", "w") as log:
        victim = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        target = out / "arms" / "mixed" / "seed-0" / "pretrain" / "checkpoints"
        deadline = time.monotonic() + 600
        while not list(target.glob("step-*")) and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
    first = (tmp_path / "first.log").read_text()
    assert victim.returncode == -signal.SIGKILL, f"the study ended before it could be killed:\n{first[-2000:]}"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    second = done.stdout + done.stderr
    both = first + second
    # shared data stages ran once across both invocations (each arm reads the same corpus folders)
    for corpus in ("math", "code"):
        assert both.count(f"[corpora/{corpus}] == curate: running") == 1
        assert both.count(f"[corpora/{corpus}] == tokenize: running") == 1
    assert both.count("[tokenizer] == tokenizer: running") == 1
    assert not list((out / "arms").glob("*/*/curate")) and not list((out / "arms").glob("*/*/tokenizer"))
    # resume per arm and seed: the finished arm skipped, the killed one resumed from its checkpoint
    assert "[arms/math/seed-0] == pretrain: unchanged, skipped" in second
    assert "[arms/math/seed-1] == probes: unchanged, skipped" in second
    assert "[arms/mixed/seed-0] == pretrain: resuming" in second
    assert json.loads((out / "arms/mixed/seed-0/pretrain/summary.json").read_text())["start_step"] > 0
    results = json.loads((out / "results.json").read_text())
    budget = STEPS * SEQUENCES * SEQ_LEN
    assert results["equal_token_budget"] and results["token_budget"] == [budget]
    for arm in results["arms"].values():
        for run in arm["runs"]:
            assert run["tokens"] == budget and sum(s["tokens"] for s in run["sources"].values()) == budget
    mixed = results["arms"]["mixed"]["runs"][0]["sources"]
    assert set(mixed) == {"math", "code"} and min(s["tokens"] for s in mixed.values()) > 0
    # the reported interval equals the bootstrap by hand on the per-item scores the probes wrote
    for probe in ("task:piqa", "loss:code"):
        kind, name = probe.split(":")

        def scores(arm: str, seed: int, kind: str = kind, name: str = name) -> list[float]:
            record = json.loads((out / f"arms/{arm}/seed-{seed}/probes.json").read_text())
            return record["losses"][name] if kind == "loss" else record["tasks"][name]["items"]

        a, b = (np.array([scores(arm, s) for s in (0, 1)], dtype=float) for arm in ("math", "mixed"))
        pair = results["probes"][probe]["pairs"]["math - mixed"]
        assert (pair["difference"], pair["low"], pair["high"]) == pytest.approx(_hand_bootstrap(a, b, 300), abs=1e-9)
    assert (out / "report.html").is_file() and "report:" in done.stdout
    assert any("held-out loss on code text" in line for line in results["findings"])


def test_study_files_are_checked_and_recipe_arms_share_their_corpus(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[corpora.a]\ndocuments = "x.jsonl"\n[arms.one]\nmixture = {a = 1.0}\n'
                    '[arms.two]\nmixture = {b = 1.0}\n')
    with pytest.raises(StudyError, match=r"mixture names \['b'\]"):
        load_study(path)
    path.write_text('[corpora.a]\norganic = ["nope"]\n[arms.one]\nmixture = {a = 1.0}\n')
    with pytest.raises(StudyError, match="organic sources"):
        load_study(path)
    with pytest.raises(StudyError, match="sizes are"):
        load_study("textbooks-vs-web", size="huge")
    builtin = load_study("textbooks-vs-web", size="small")
    assert len(builtin.seeds) >= 3 and builtin.corpora["textbooks"].recipe["synth"]["run"]["num_documents"] == 512
    path.write_text('[arms.a]\nrecipe = "tiny-textbooks"\n[arms.b]\nrecipe = "tiny-textbooks"\n')
    shared = load_study(path)  # two arms naming one run recipe share its corpus (synth + curate run once)
    assert list(shared.corpora) == ["tiny-textbooks"] and shared.corpora["tiny-textbooks"].kind == "recipe"
    assert shared.arms == {"a": {"tiny-textbooks": 1.0}, "b": {"tiny-textbooks": 1.0}}
