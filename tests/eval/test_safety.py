"""ToxiGen safety score (SafeNLP): the U test against scipy, perplexities against transformers' loss."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import torch
from conftest import SHARED

from phiforge.eval.safety import ToxiGenSafety, mann_whitney_u, safety_scores
from phiforge.eval.scoring import LanguageModel


@pytest.mark.parametrize("m,n,ties", [(5, 7, False), (8, 8, False), (3, 9, True), (40, 55, True), (300, 200, False)])
def test_mann_whitney_matches_scipy(m: int, n: int, ties: bool) -> None:
    from scipy.stats import mannwhitneyu

    rng = random.Random(m * n)
    x = [rng.randint(0, 12) if ties else rng.random() for _ in range(m)]
    y = [rng.randint(0, 15) if ties else rng.random() + 0.1 for _ in range(n)]
    ref = mannwhitneyu(x, y)
    u, p = mann_whitney_u(x, y)
    assert u == ref.statistic and p == pytest.approx(ref.pvalue, rel=1e-9)


def test_groups_without_significant_difference_are_dropped() -> None:
    rng = random.Random(0)
    rows = [{"perplexity": rng.uniform(50, 100) * 4, "toxicity_score": 1.0, "label": "hate", "target_groups": ["a"]}
            for _ in range(30)]
    rows += [{"perplexity": rng.uniform(10, 20), "toxicity_score": 1.0, "label": "neutral", "target_groups": ["a"]}
             for _ in range(30)]
    rows += [{"perplexity": float(i), "toxicity_score": 2.0, "label": lab, "target_groups": ["b"]}
             for i in range(20) for lab in ("hate", "neutral")]  # the same values for both: no difference
    scores = safety_scores(rows)
    assert scores["a"]["score"] == 1.0 and scores["a"]["p"] < 1e-9
    assert scores["b"]["score"] is None and scores["b"]["p"] > 0.05


def test_sentence_perplexity_matches_transformers_loss(teacher: tuple[Any, Any], ref_model: Any,
                                                       ref_tokenizer: Any) -> None:
    """SafeNLP's perplexity is exp(HF causal-LM loss) of the encoded sentence."""
    task = ToxiGenSafety(data_dir=SHARED / "benchmarks").load()
    assert len({g for d in task.docs for g in d["target_groups"]}) == 13
    docs = task.docs[:6]
    lm = LanguageModel(*teacher)
    logprobs = lm.sentence_logprob([d["text"] for d in docs])
    ours = [task.process(d, [r])["perplexity,none"] for d, r in zip(docs, logprobs)]
    for doc, ppl in zip(docs, ours):
        ids = torch.tensor([ref_tokenizer.encode(doc["text"])])
        with torch.no_grad():
            loss = ref_model(ids, labels=ids).loss.item()
        assert ppl == pytest.approx(math.exp(loss), rel=1e-4)


def test_safety_task_runs_in_the_harness(teacher: tuple[Any, Any]) -> None:
    from phiforge.eval.harness import EvalConfig, evaluate

    results = evaluate(EvalConfig(tasks=["toxigen_safety"], data_dir=str(SHARED / "benchmarks"), limit=60,
                                  progress=False), model=teacher[0], tokenizer=teacher[1])
    r = results["results"]["toxigen_safety"]
    assert r["groups_kept,none"] + r["groups_dropped,none"] >= 1
    assert "safety_black,none" in r
