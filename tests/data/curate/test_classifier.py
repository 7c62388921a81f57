"""The edu classifier: offline MiniLM embeddings, linear and forest heads, safetensors round trip, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from curate_corpus import mixed_corpus

from phiforge.data.curate.classifier import (
    MINILM,
    EduClassifier,
    HiddenStateEmbedder,
    f1_at,
    get_embedder,
    split_indices,
    train_classifier,
)


@pytest.fixture(scope="module")
def corpus() -> tuple[list[dict], np.ndarray]:
    docs = mixed_corpus(48, 24, seed=0)
    return docs, get_embedder(MINILM).embed([d["text"] for d in docs])


def test_minilm_embeddings_offline(corpus) -> None:  # noqa: ANN001
    docs, emb = corpus
    assert emb.shape == (len(docs), 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    a, b, c = get_embedder(MINILM).embed(["How do plants make food from sunlight?",
                                          "Photosynthesis turns light into chemical energy in plants.",
                                          "Cheap watches on sale, click here now!"])
    assert a @ b > a @ c + 0.2


def test_heads_learn_and_round_trip(corpus, tmp_path: Path) -> None:  # noqa: ANN001
    docs, emb = corpus
    labels = np.array([4 if d["kind"] == "edu" else 0 for d in docs])
    for head in ("linear", "forest"):
        clf = train_classifier(emb, labels, embedder=MINILM, head=head, threshold=3.0, seed=0)
        assert clf.metrics["test"] > 0 and clf.metrics["f1_at_threshold"] >= 0.8, clf.metrics
        clf.save(tmp_path / head)
        loaded = EduClassifier.load(tmp_path / head)
        assert np.array_equal(loaded.predict(emb), clf.predict(emb))
        assert json.loads((tmp_path / head / "classifier.json").read_text())["kind"] == head
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*.pickle"))


def test_flat_forest_equals_scikit_learn(corpus) -> None:  # noqa: ANN001
    from sklearn.ensemble import RandomForestRegressor

    docs, emb = corpus
    labels = np.array([float(len(d["text"]) % 6) for d in docs])
    train, _ = split_indices(labels.astype(int), 0.0, 0)
    ours = train_classifier(emb, labels, embedder=MINILM, head="forest", test_fraction=0.0, seed=3, trees=20)
    ref = RandomForestRegressor(n_estimators=20, min_samples_leaf=2, random_state=3, n_jobs=1).fit(emb, labels)
    assert len(train) == len(docs)
    assert np.allclose(ours.predict(emb), np.clip(ref.predict(emb), 0, 5))


def test_f1_and_split() -> None:
    assert f1_at(np.array([5, 4, 1, 0]), np.array([4.2, 1.0, 3.5, 0.0]), 3) == 0.5
    assert f1_at(np.array([0, 1]), np.array([0.0, 1.0]), 3) is None
    train, test = split_indices(np.array([0] * 10 + [3] * 10), 0.2, 0)
    assert len(test) == 4 and len(set(train) | set(test)) == 20


@pytest.mark.slow
def test_hidden_state_embedder_on_teacher() -> None:
    emb = HiddenStateEmbedder("smollm2-135m-instruct")
    out = emb.embed(["The cell is the unit of life.", "Buy cheap watches now!", "A"])
    assert out.shape == (3, 576) and np.isfinite(out).all()
    assert np.allclose(emb.embed(["The cell is the unit of life."])[0], out[0], atol=1e-4)  # padding-independent


@pytest.mark.slow
def test_teacher_labels_train_a_classifier_that_filters_a_corpus(tmp_path: Path) -> None:
    """Must-show: real teacher annotations -> classifier -> `curate` edu stage over a mixed corpus."""
    from phiforge.data.curate.pipeline import CurateConfig, run_curate

    docs = mixed_corpus(36, 12, seed=0)
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "mixed.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    config = CurateConfig.from_dict({
        "output": str(tmp_path / "out"), "input": {"paths": [str(tmp_path / "in")]},
        "heuristics": {"enabled": False}, "dedup": {"enabled": False}, "decontam": {"enabled": False},
        "edu": {"enabled": True, "threshold": 2.0,
                "annotate": {"samples": 48, "max_new_tokens": 40, "max_chars": 600, "batch_size": 16}}})
    stats = run_curate(config)
    edu = stats["stages"]["edu"]
    print(json.dumps(edu["classifier"], indent=1))
    assert edu["docs_in"] == 48 and edu["classifier"]["train"] + edu["classifier"]["test"] == 48
    labels = [json.loads(line) for p in (tmp_path / "out" / "edu" / "annotations").glob("part-*.jsonl")
              for line in p.open()]
    assert len(labels) == 48 and all(r["teacher"] == "smollm2-135m-instruct" for r in labels)
    kept = [json.loads(line) for line in (tmp_path / "out" / "curated" / "mixed.jsonl").open()]
    assert all(d["edu_score"] >= 2.0 for d in kept)
