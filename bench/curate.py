"""Curation throughput: MinHash-LSH dedup (phiforge vs datasketch, same corpus, same 14x8 bands) and decontam MB/s.

    python bench/curate.py [--docs 4000] [--benchmarks gsm8k,piqa,mmlu]

The corpus is real text: GSM8K train solutions, MMLU dev questions and the research notes, with planted
near-duplicates. Both dedup implementations hash word 5-grams into 112 permutations and bucket 14 bands
of 8 rows; documents/s covers signatures + LSH insertion + candidate lookup. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "data" / "curate")]

from curate_corpus import SHARED, clean_corpus  # noqa: E402

from phiforge.data.curate.decontam import BenchmarkIndex, DecontamConfig  # noqa: E402
from phiforge.data.curate.dedup import DedupConfig, MinHasher, cluster, words_of  # noqa: E402


def corpus(n: int) -> list[str]:
    rng = random.Random(0)
    base = clean_corpus(int(n * 0.8), seed=0)
    near = []
    for doc in rng.sample(base, n - len(base)):
        words = doc.split()
        near.append(" ".join(w if rng.random() > 0.02 else "edited" for w in words))
    docs = base + near
    rng.shuffle(docs)
    return docs


def bench_phiforge(docs: list[str]) -> dict[str, float]:
    config = DedupConfig(exact=False)
    start = time.perf_counter()
    sigs = MinHasher(config).signatures(docs)
    roots = cluster(sigs, None, config)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3), "docs_per_s": round(len(docs) / seconds, 1),
            "removed": int((roots != range(len(roots))).sum())}


def bench_datasketch(docs: list[str]) -> dict[str, float]:
    from datasketch import MinHash, MinHashLSH

    start = time.perf_counter()
    lsh = MinHashLSH(num_perm=112, params=(14, 8))
    removed = 0
    for i, doc in enumerate(docs):
        words = words_of(doc)
        grams = {" ".join(words[j:j + 5]).encode() for j in range(max(1, len(words) - 4))}
        m = MinHash(num_perm=112, seed=1)
        m.update_batch(list(grams))
        if lsh.query(m):
            removed += 1
        else:
            lsh.insert(str(i), m)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3), "docs_per_s": round(len(docs) / seconds, 1), "removed": removed}


def bench_decontam(docs: list[str], benchmarks: list[str]) -> dict[str, float]:
    start = time.perf_counter()
    index = BenchmarkIndex.build(DecontamConfig(benchmarks=benchmarks, data_dir=str(SHARED / "benchmarks")))
    build = time.perf_counter() - start
    megabytes = sum(len(d.encode()) for d in docs) / 1e6
    start = time.perf_counter()
    hits = sum(m is not None for i in range(0, len(docs), 256) for m in index.match_batch(docs[i:i + 256]))
    seconds = time.perf_counter() - start
    return {"index_build_s": round(build, 2), "benchmark_items": sum(index.meta["tasks"].values()),
            "megabytes": round(megabytes, 2), "seconds": round(seconds, 3), "mb_per_s": round(megabytes / seconds, 3),
            "docs_per_s": round(len(docs) / seconds, 1), "flagged": hits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--benchmarks", default="gsm8k,piqa,mmlu")
    args = parser.parse_args()
    docs = corpus(args.docs)
    ours, ref = bench_phiforge(docs), bench_datasketch(docs)
    result = {"documents": len(docs), "mean_words": round(sum(len(d.split()) for d in docs) / len(docs), 1),
              "minhash_dedup": {"phiforge": ours, "datasketch": ref,
                                "speedup": round(ours["docs_per_s"] / ref["docs_per_s"], 2)},
              "decontam": bench_decontam(docs, args.benchmarks.split(","))}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
