"""MinHash-LSH on planted near-duplicates: detection follows the S-curve at each Jaccard level."""

from __future__ import annotations

import random

import numpy as np
from curate_corpus import clean_corpus

from phiforge.data.curate.dedup import (
    DedupConfig,
    MinHasher,
    band_keys,
    candidate_probability,
    dedup_texts,
    exact_hash,
    words_of,
)


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    w = words_of(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def edit(text: str, rate: float, rng: random.Random) -> str:
    return " ".join(w if rng.random() > rate else f"x{rng.randrange(10**6)}" for w in text.split())


def test_defaults_match_datatrove() -> None:
    c = DedupConfig()
    assert (c.ngram, c.bands, c.rows, c.num_perm) == (5, 14, 8, 112)
    assert abs(c.threshold() - 0.719) < 0.01


def test_signature_estimates_jaccard_and_is_deterministic() -> None:
    docs = clean_corpus(60, seed=2)
    mh, rng = MinHasher(DedupConfig()), random.Random(0)
    errors = []
    for doc in docs:
        other = edit(doc, 0.05, rng)
        a, b = shingles(doc), shingles(other)
        true = len(a & b) / len(a | b)
        estimate = float((mh.signature(doc) == mh.signature(other)).mean())
        errors.append(abs(estimate - true))
    assert np.mean(errors) < 0.06  # the estimator's standard error at 112 hashes is <= 0.047
    assert (MinHasher(DedupConfig()).signature(docs[0]) == mh.signature(docs[0])).all()
    assert not (MinHasher(DedupConfig(seed=2)).signature(docs[0]) == mh.signature(docs[0])).all()


def test_planted_near_duplicates_found_at_expected_rates() -> None:
    """Pairs at several Jaccard levels: observed candidate rate vs 1 - (1 - s^8)^14 for each pair."""
    config, rng = DedupConfig(), random.Random(1)
    mh = MinHasher(config)
    docs = [d for d in clean_corpus(300, seed=3) if len(words_of(d)) >= 60][:200]
    for rate in (0.01, 0.03, 0.06, 0.12):
        observed, expected, jaccards = [], [], []
        for doc in docs:
            other = edit(doc, rate, rng)
            a, b = shingles(doc), shingles(other)
            j = len(a & b) / len(a | b)
            keys = band_keys(np.stack([mh.signature(doc), mh.signature(other)]), config.bands, config.rows)
            observed.append(bool((keys[0] == keys[1]).any()))
            expected.append(candidate_probability(j, config.bands, config.rows))
            jaccards.append(j)
        obs, exp = np.mean(observed), np.mean(expected)
        print(f"edit rate {rate}: mean Jaccard {np.mean(jaccards):.2f}, found {obs:.3f}, expected {exp:.3f}")
        assert abs(obs - exp) < 0.08


def test_exact_and_near_duplicates_removed_keeping_the_first() -> None:
    docs = [d for d in clean_corpus(200, seed=4) if len(d.split()) >= 80][:50]
    words = docs[10].split()
    near = " ".join(words[:40] + ["zebra"] + words[41:])  # one word changed: Jaccard ~0.9
    texts = docs + [docs[3].upper(), docs[7].replace(",", " ;"), near, docs[0]]
    keep, stats = dedup_texts(texts)
    assert keep[:50] == [True] * 50 and keep[50:] == [False] * 4
    assert stats["removed_exact"] == 3 and stats["removed_minhash"] == 1 and stats["clusters"] == 4
    assert exact_hash("Hello,   World!") == exact_hash("hello world")
