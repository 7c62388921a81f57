"""Teacher labels: score parsing, and the embedded teacher labelling real documents."""

from __future__ import annotations

import pytest

from phiforge.data.curate.annotate import PROMPT_SHA, PROMPT_VERSION, AnnotateConfig, Annotator, parse_score


@pytest.mark.parametrize("text, score", [
    ("The extract is useful. Educational score: 4", 4),
    ("**Educational Score:** 3 points", 3),
    ("Justification ... Educational score: 2\nEducational score: 5", 5),
    ("I would give it a score of 2.", 2),
    ("Overall 3/5.", 3),
    ("It earns 1 point.", 1),
    ("Educational score: 100", None),
    ("Educational score: 4.5", None),
    ("No number here.", None),
])
def test_parse_score(text: str, score: int | None) -> None:
    assert parse_score(text) == score


@pytest.mark.slow  # 15 s on a quiet machine, minutes under contention
def test_teacher_labels_documents(teacher) -> None:  # noqa: ANN001
    model, tokenizer = teacher
    annotator = Annotator(model, tokenizer, AnnotateConfig(max_new_tokens=12, max_chars=300))
    texts = ["Photosynthesis is how plants turn light, water and carbon dioxide into sugar and oxygen.",
             "BUY NOW!!! cheap watches, click here, limited offer!!!"]
    records = annotator.annotate(texts)
    for r in records:
        assert r["score"] in range(6) and r["method"] in ("parsed", "logits")
        assert r["teacher"] == "smollm2-135m-instruct" and r["prompt_version"] == PROMPT_VERSION
        assert r["prompt_sha"] == PROMPT_SHA and isinstance(r["raw"], str)
        if r["method"] == "logits":
            assert 0.0 <= r["expected"] <= 5.0
    assert annotator.annotate(texts) == records  # greedy: the same labels again
