"""Curate dedup at 10^6 short documents with planted near-duplicate clusters: 2 local workers vs Ray (2). JSON.

    python bench/curate_scale.py                    # 10^6 documents, 20 shards
    python bench/curate_scale.py --quick            # 2*10^4 documents, same JSON keys
    python bench/curate_scale.py --docs 200000 --shards 8

The corpus: random 60-word documents over a 5000-word vocabulary (unrelated documents share almost no
5-gram), with planted clusters: a seed document plus 1-4 copies, each either the seed with one word
replaced (5-gram Jaccard ~0.84) or an exact copy up to case and punctuation; every copy lands at a random
place in a random shard. `phiforge curate` (dedup only: exact + MinHash-LSH 14x8, the datatrove way)
runs as its own driver process with `executor.kind = local` (2 worker processes) and with Ray (2 CPUs).
Reported per executor: wall time, the driver's own peak RSS (getrusage RUSAGE_SELF in the driver, so the
workers are not in it), removals; and across them: same removed ids, recall of the planted copies and
how many removals were not planted. Timings on a shared machine are noisy; the removals are exact.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}

DRIVER = """
import json, resource, sys, time
from phiforge.data.curate.pipeline import CurateConfig, run_curate
start = time.perf_counter()
stats = run_curate(CurateConfig.from_toml(sys.argv[1]))
print(json.dumps({"seconds": round(time.perf_counter() - start, 1), "stats": stats,
                  "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def make_corpus(folder: Path, n: int, shards: int, seed: int = 0, words: int = 60) -> list[list[str]]:
    """Write the corpus; returns the planted clusters (ids of the seed document and its copies)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=int(rng.integers(3, 9)))) for _ in range(5000)]
    vocab_arr = np.array(vocab, dtype=object)
    n_seeds = n // 20  # ~5% of documents seed a cluster of 2-5
    copies_per = rng.integers(1, 5, size=n_seeds)
    n_copies = int(copies_per.sum())
    n_base = n - n_copies
    ids = rng.integers(0, len(vocab), size=(n_base, words), dtype=np.int16)
    seeds = rng.choice(n_base, size=n_seeds, replace=False)
    # each copy: (its seed, exact or one word replaced); copies take random slots in the final order
    copy_seed = np.repeat(seeds, copies_per)
    exact = rng.random(n_copies) < 0.3
    slots = rng.permutation(n)
    base_slot, copy_slot = np.sort(slots[:n_base]), slots[n_base:]
    order = np.empty(n, dtype=np.int64)  # slot -> row (rows >= n_base are copies)
    order[base_slot] = np.arange(n_base)
    order[copy_slot] = n_base + np.arange(n_copies)
    clusters: dict[int, list[str]] = {int(r): [f"d{base_slot[r]}"] for r in seeds}
    per_shard = -(-n // shards)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with open(folder / f"part-{s:04d}.jsonl", "w") as f:
            lines = []
            for slot in range(s * per_shard, min(n, (s + 1) * per_shard)):
                row = order[slot]
                if row < n_base:
                    text = " ".join(vocab_arr[ids[row]])
                    doc_id = f"d{slot}"
                else:
                    c = row - n_base
                    toks = vocab_arr[ids[copy_seed[c]]].copy()
                    if exact[c]:
                        text = " ".join(toks).upper() + "!"
                    else:
                        toks[int(rng.integers(0, words))] = "zz" + vocab[int(rng.integers(0, len(vocab)))]
                        text = " ".join(toks)
                    doc_id = f"copy{slot}"
                    clusters[int(copy_seed[c])].append(doc_id)
                lines.append(json.dumps({"id": doc_id, "text": text}) + "\n")
            f.writelines(lines)
    return list(clusters.values())


def run_curate(corpus: Path, out: Path, kind: str, workers: int) -> dict:
    config = out.with_suffix(".toml")
    config.write_text(f'output = "{out}"\n[input]\npaths = ["{corpus}"]\n[executor]\nkind = "{kind}"\n'
                      f"workers = {workers}\n[heuristics]\nenabled = false\n[decontam]\nenabled = false\n")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", DRIVER, str(config)], capture_output=True, text=True, env=ENV)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"curate ({kind}) failed: {done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    dedup = result["stats"]["stages"]["dedup"]
    removed = {json.loads(line)["id"] for f in (out / "dedup" / "removed").glob("*.jsonl") for line in f.open()}
    return {"wall_s": round(wall, 1), "curate_s": result["seconds"], "driver_peak_rss_mb": result["driver_peak_rss_mb"],
            "removed": len(removed), "removed_exact": dedup["clusters"]["removed_exact"],
            "removed_minhash": dedup["clusters"]["removed_minhash"], "clusters": dedup["clusters"]["clusters"],
            "stage_seconds": {k: v["seconds"] for k, v in result["stats"]["stages"].items()},
            "dedup_steps_seconds": result["stats"].get("dedup_steps_seconds"), "_ids": removed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2*10^4 documents")
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    n = 20_000 if args.quick else args.docs
    shards = 4 if args.quick else args.shards
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        planted = make_corpus(work / "corpus", n, shards)
        corpus_s = time.perf_counter() - t0
        runs = {"local": run_curate(work / "corpus", work / "local", "local", args.workers)}
        if not args.no_ray:
            runs["ray"] = run_curate(work / "corpus", work / "ray", "ray", args.workers)
    removed = runs["local"]["_ids"]
    # a cluster of k planted documents should lose k - 1 of them (whichever comes first is kept)
    expected = sum(len(c) - 1 for c in planted)
    found = sum(min(len(c) - 1, len(removed.intersection(c))) for c in planted)
    in_clusters = {i for c in planted for i in c}
    report = {
        "bench": "curate_scale", "cpu": _cpu(), "cores": os.cpu_count(), "load_average": os.getloadavg(),
        "documents": n, "shards": shards, "workers": args.workers, "corpus_seconds": round(corpus_s, 1),
        "planted_clusters": len(planted), "planted_duplicates": expected,
        "recall_of_planted": round(found / max(1, expected), 4),
        "removed_not_planted": len(removed - in_clusters),
        "same_removals": all(r["_ids"] == removed for r in runs.values()),
        "runs": {k: {kk: vv for kk, vv in r.items() if kk != "_ids"} for k, r in runs.items()},
        "driver_peak_rss_ok": all(r["driver_peak_rss_mb"] <= 1024 for r in runs.values()),
        "note": "dedup only (exact + MinHash-LSH 14x8): signatures -> bucket tasks -> merged components -> filter; "
                "timings on a shared machine",
    }
    print(json.dumps(report, indent=2))


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


if __name__ == "__main__":
    main()
