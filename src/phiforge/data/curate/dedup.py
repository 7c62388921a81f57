"""Exact and MinHash-LSH near-duplicate removal.

Exact: a 64-bit hash of the lowercased, punctuation-free, whitespace-collapsed text. Near: MinHash over word
5-grams with ``bands x rows`` permutations (datatrove's defaults, 14 x 8: pairs above Jaccard ~0.72 are
likely caught, since P(candidate) = 1 - (1 - s^rows)^bands). Hashing is numpy-vectorised: each word gets
a cached 64-bit blake2b hash, an n-gram is a fixed linear combination of its word hashes, and every
permutation is a multiply-add-shift hash of the n-gram, so one document is a few array operations.

Clusters are the connected components of LSH collisions (plus exact matches). The kept document of a
cluster is the first one in (shard, line) order, so results do not depend on workers or scheduling.

At scale it runs the datatrove way (the pipeline's dedup stage): per-shard signatures and band keys go to
per-band bucket files; each bucket (band, partition) is grouped by its own task into star edges (every
member -> the bucket's first document); the edges of all buckets are merged into components (``components``:
vectorised min-label propagation over the documents that have an edge, not over the corpus); a filter task
per shard drops what the merge marked. No step holds every signature. ``cluster`` is the same clustering in
memory, for small inputs and as the reference the distributed path is tested against.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

WORDS = re.compile(r"\w+")
MASK32 = np.uint64(0xFFFFFFFF)
_word_cache: dict[str, int] = {}


@dataclass
class DedupConfig:
    enabled: bool = True
    exact: bool = True
    minhash: bool = True
    ngram: int = 5  # words per shingle
    bands: int = 14
    rows: int = 8  # hashes per band; bands * rows permutations
    seed: int = 1

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows

    def threshold(self) -> float:
        """The Jaccard similarity at which P(candidate) crosses ~1/2 (the S-curve's steep point)."""
        return (1 / self.bands) ** (1 / self.rows)


def candidate_probability(jaccard: float, bands: int, rows: int) -> float:
    return 1 - (1 - jaccard**rows) ** bands


def words_of(text: str) -> list[str]:
    return WORDS.findall(text.lower())


def exact_hash(text: str) -> int:
    """Same value for texts equal up to case, punctuation and whitespace."""
    return int.from_bytes(hashlib.blake2b(" ".join(words_of(text)).encode(), digest_size=8).digest(), "little")


def word_hashes(words: list[str]) -> np.ndarray:
    """64-bit hashes of words (deterministic across processes, unlike ``hash``), cached per process."""
    cache = _word_cache
    if len(cache) > 2_000_000:
        cache.clear()
    out = list(map(cache.get, words))  # the common case: every word seen before, no Python loop
    if None in out:
        for i, w in enumerate(words):
            if out[i] is None:
                out[i] = cache[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
    return np.array(out, dtype=np.uint64)


@functools.lru_cache(maxsize=64)
def _multipliers(n: int) -> np.ndarray:
    """Fixed odd 64-bit constants that mix word positions into an n-gram hash."""
    rng = np.random.default_rng(0x5EED + n)
    return rng.integers(1, 2**63, size=n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """One 64-bit hash per word n-gram: sum_i word[j+i] * M_i (wrapping). Short texts give one gram."""
    if len(hashes) == 0:
        return np.zeros(0, dtype=np.uint64)
    n = min(n, len(hashes))
    mult = _multipliers(n)
    count = len(hashes) - n + 1
    acc = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n):
            acc += hashes[i:i + count] * mult[i]
    return acc


class MinHasher:
    """MinHash signatures: ``h_k(x) = (a_k * x32 + b_k) >> 32`` over 32-bit shingle keys, min per k."""

    def __init__(self, config: DedupConfig) -> None:
        self.config = config
        rng = np.random.default_rng(config.seed)
        self.a = rng.integers(1, 2**63, size=config.num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2**63, size=config.num_perm, dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        grams = ngram_hashes(word_hashes(words_of(text)), self.config.ngram)
        sig = np.full(self.config.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
        if len(grams) == 0:
            return sig
        keys = np.unique((grams >> np.uint64(32)) ^ (grams & MASK32))
        with np.errstate(over="ignore"):
            for start in range(0, len(keys), 2048):  # bound the [grams x perms] temporary
                chunk = keys[start:start + 2048, None]
                values = ((chunk * self.a + self.b) >> np.uint64(32)).astype(np.uint32)
                np.minimum(sig, values.min(axis=0), out=sig)
        return sig

    def signatures(self, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), self.config.num_perm), dtype=np.uint32)
        for i, text in enumerate(texts):
            out[i] = self.signature(text)
        return out


# ---- clustering ---------------------------------------------------------------------------------------
def _find(parent: np.ndarray, i: int) -> int:
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:  # path compression
        parent[i], i = root, parent[i]
    return root


def _union_groups(parent: np.ndarray, keys: np.ndarray) -> None:
    """Union every run of equal keys; the smaller index becomes the root, so roots are first occurrences."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
    for j in same:
        a, b = _find(parent, int(order[j])), _find(parent, int(order[j + 1]))
        if a != b:
            parent[max(a, b)] = min(a, b)


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[N, bands] 64-bit keys: each band's rows hashed together (bands are salted so they never collide)."""
    mult = _multipliers(rows)
    n = signatures.shape[0]
    keys = np.zeros((n, bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            block = signatures[:, b * rows:(b + 1) * rows].astype(np.uint64)
            keys[:, b] = (block * mult).sum(axis=1) + np.uint64(b) * np.uint64(0x9E3779B97F4A7C15)
    return keys


def cluster(signatures: np.ndarray | None, exact: np.ndarray | None, config: DedupConfig) -> np.ndarray:
    """Root (first member) of each document's duplicate cluster; a document is kept iff root == itself."""
    n = len(exact) if exact is not None else len(signatures)
    parent = np.arange(n, dtype=np.int64)
    if config.exact and exact is not None and n:
        _union_groups(parent, exact)
    if config.minhash and signatures is not None and n:
        keys = band_keys(signatures, config.bands, config.rows)
        for b in range(config.bands):
            _union_groups(parent, keys[:, b])
    return np.array([_find(parent, i) for i in range(n)], dtype=np.int64)


def removal_reasons(roots: np.ndarray, exact: np.ndarray | None) -> list[str | None]:
    """Per document: None (kept), 'dedup_exact' or 'dedup_minhash' (what tied it to its cluster's root)."""
    out: list[str | None] = []
    for i, root in enumerate(roots):
        if root == i:
            out.append(None)
        elif exact is not None and exact[i] == exact[root]:
            out.append("dedup_exact")
        else:
            out.append("dedup_minhash")
    return out


def cluster_stats(roots: np.ndarray, reasons: list[str | None]) -> dict[str, object]:
    sizes = Counter(Counter(roots.tolist()).values())
    return size_stats(len(roots), sizes, reasons.count("dedup_exact"), reasons.count("dedup_minhash"))


def size_stats(documents: int, sizes: Counter[int], removed_exact: int, removed_minhash: int) -> dict[str, object]:
    """Cluster statistics from {cluster size: how many clusters} (size-1 entries are ignored)."""
    dup_sizes = {k: v for k, v in sizes.items() if k > 1}
    buckets = {"2": 0, "3-5": 0, "6-20": 0, ">20": 0}
    for size, count in dup_sizes.items():
        key = "2" if size == 2 else "3-5" if size <= 5 else "6-20" if size <= 20 else ">20"
        buckets[key] += count
    return {"documents": int(documents), "clusters": int(sum(dup_sizes.values())),
            "documents_in_clusters": int(sum(k * v for k, v in dup_sizes.items())),
            "largest_cluster": int(max(dup_sizes, default=1)), "cluster_sizes": buckets,
            "removed_exact": int(removed_exact), "removed_minhash": int(removed_minhash)}


# ---- distributed clustering: buckets -> star edges -> components ---------------------------------------
def bucket_columns(signatures: np.ndarray, exact: np.ndarray, config: DedupConfig) -> dict[str, np.ndarray]:
    """The bucket keys of a shard's documents: ``exact`` (when on) and ``band-NN`` per LSH band (when on)."""
    columns: dict[str, np.ndarray] = {"exact": exact} if config.exact else {}
    if config.minhash and len(signatures):
        keys = band_keys(signatures, config.bands, config.rows)
        columns.update({f"band-{b:02d}": keys[:, b] for b in range(config.bands)})
    elif config.minhash:
        columns.update({f"band-{b:02d}": np.zeros(0, np.uint64) for b in range(config.bands)})
    return columns


def star_edges(keys: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """[E, 2] edges (first doc of the key's group, another doc of it): one bucket's clusters.

    Within a band every document has one key, so a bucket's clusters are exactly its groups of equal keys."""
    if len(keys) < 2:
        return np.zeros((0, 2), np.int64)
    order = np.lexsort((docs, keys))  # by key, then by document: a group's first member is its smallest
    k, d = keys[order], docs[order].astype(np.int64)
    starts = np.concatenate([[True], k[1:] != k[:-1]])
    group = np.cumsum(starts) - 1
    first = d[np.flatnonzero(starts)][group]
    member = ~starts
    return np.stack([first[member], d[member]], axis=1)


def components(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, root of each node): connected components of an edge list, each rooted at its smallest node.

    Min-label propagation with pointer jumping, vectorised; memory is the edges, not the corpus."""
    if len(edges) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    nodes, inverse = np.unique(edges.ravel(), return_inverse=True)
    a, b = inverse.reshape(-1, 2).T
    label = np.arange(len(nodes), dtype=np.int64)  # nodes are sorted: the smallest label is the smallest doc
    while True:
        low = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        while True:  # pointer jumping: follow labels to their labels' labels
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, label):
            return nodes, nodes[label]
        label = new


def dedup_texts(texts: list[str], config: DedupConfig | None = None) -> tuple[list[bool], dict[str, object]]:
    """In-memory dedup of a list of texts: (keep flags, cluster stats). The pipeline does the same per shard."""
    config = config or DedupConfig()
    exact = np.array([exact_hash(t) for t in texts], dtype=np.uint64)
    sigs = MinHasher(config).signatures(texts) if config.minhash else None
    roots = cluster(sigs, exact, config)
    reasons = removal_reasons(roots, exact)
    return [r is None for r in reasons], cluster_stats(roots, reasons)
