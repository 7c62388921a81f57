"""Dedup the datatrove way (buckets -> star edges -> merged components) removes what in-memory clustering does."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from curate_corpus import clean_corpus

from phiforge.data.curate.dedup import DedupConfig, cluster, components, dedup_texts, exact_hash, star_edges
from phiforge.data.curate.pipeline import CurateConfig, run_curate


def edit(text: str, rate: float, rng: random.Random) -> str:
    return " ".join(w if rng.random() > rate else f"x{rng.randrange(10**6)}" for w in text.split())


def union_find_roots(n: int, edges: np.ndarray) -> np.ndarray:
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in edges.tolist():
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)])


def test_components_match_union_find_and_star_edges_group_equal_keys() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 300))
        edges = rng.integers(0, n, size=(int(rng.integers(1, 2 * n)), 2))
        nodes, roots = components(edges)
        expected = union_find_roots(n, edges)
        assert (roots == expected[nodes]).all()
        assert set(nodes.tolist()) == set(edges.ravel().tolist())
    keys = np.array([5, 3, 5, 9, 3, 5], np.uint64)
    docs = np.array([10, 11, 2, 13, 14, 7])
    assert sorted(map(tuple, star_edges(keys, docs).tolist())) == [(2, 7), (2, 10), (11, 14)]


def test_pipeline_dedup_removes_what_in_memory_clustering_removes(tmp_path: Path) -> None:
    rng = random.Random(5)
    base = [d for d in clean_corpus(300, seed=11) if len(d.split()) >= 60][:90]
    texts = list(base)
    for i in range(0, 90, 3):  # near-duplicate chains, exact copies, and copies of copies across shards
        texts.append(edit(base[i], 0.02, rng))
        texts.append(base[i + 1].upper() if i % 2 else edit(texts[-1], 0.02, rng))
    rng.shuffle(texts)
    docs = [{"id": f"d{k}", "text": t} for k, t in enumerate(texts)]
    inputs = tmp_path / "in"
    inputs.mkdir()
    n_shards = 4
    for s in range(n_shards):  # contiguous shards: (shard, line) order is the list order
        part = docs[s * len(docs) // n_shards:(s + 1) * len(docs) // n_shards]
        (inputs / f"part{s}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in part))
    keep, stats = dedup_texts(texts)
    roots = cluster(None, np.array([exact_hash(t) for t in texts], np.uint64), DedupConfig(minhash=False))
    assert stats["removed_exact"] > 5 and stats["removed_minhash"] > 10 and (roots != np.arange(len(texts))).any()
    for workers, parts in ((1, 1), (2, 3)):
        out = tmp_path / f"out-{workers}-{parts}"
        result = run_curate(CurateConfig.from_dict({
            "output": str(out), "input": {"paths": [str(inputs)]}, "heuristics": {"enabled": False},
            "decontam": {"enabled": False}, "executor": {"workers": workers, "bucket_parts": parts}}))
        kept = {json.loads(line)["id"] for p in (out / "curated").glob("*.jsonl") for line in p.open()}
        assert kept == {d["id"] for d, k in zip(docs, keep) if k}
        clusters = result["stages"]["dedup"]["clusters"]
        assert clusters == stats, (clusters, stats)
        assert len(list((out / "dedup" / "edges").glob("*.npz"))) == (1 + 14) * parts
