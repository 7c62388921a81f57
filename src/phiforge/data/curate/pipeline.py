"""``phiforge curate``: read -> heuristics -> dedup -> decontam -> edu filter over sharded documents.

Each stage writes ``<output>/<stage>/<shard>.jsonl`` plus the removed documents with their reason under
``removed/``, so nothing disappears without a trace; per-shard completion markers make every stage resumable.
Global steps (the merge of dedup clusters, the benchmark index, the edu classifier) run once in the driver and
write their results to disk for the shard tasks; dedup's buckets are tasks of their own (one per band and key
partition), so the driver never holds every signature. The result lands in ``<output>/curated`` and ``stats.json``.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phiforge.config.loader import build_config, load_config
from phiforge.data.curate import decontam, dedup, heuristics
from phiforge.data.curate.annotate import AnnotateConfig
from phiforge.data.curate.executor import (
    CurateError,
    Executor,
    Shard,
    checked_records,
    filter_shard,
    iter_docs,
    make_executor,
    merge_stats,
    run_stage,
)
from phiforge.data.jsonl import DOCUMENT_SUFFIXES, Line, iter_lines, write_jsonl
from phiforge.io.atomic import atomic_write, atomic_write_bytes, atomic_write_json


@dataclass
class InputSection:
    paths: list[str] = field(default_factory=list)  # files, folders or globs of .jsonl/.jsonl.gz/.parquet
    text_field: str = "text"
    id_field: str = "id"
    on_error: str = "skip"  # bad line: "skip" (count, report, keep going) | "stop"


@dataclass
class ExecutorSection:
    kind: str = "local"  # local | ray
    workers: int = 1
    address: str = ""  # ray: "" starts a local instance, "auto" joins a cluster
    bucket_parts: int = 1  # dedup: key partitions per band bucket (more, smaller bucket tasks at scale)


@dataclass
class EduSection:
    enabled: bool = False
    classifier: str = ""  # a trained classifier folder; empty: label a sample with the teacher and train one
    embedder: str = "all-minilm-l6-v2"  # or a phiforge model (alias, folder, .gguf) for hidden-state embeddings
    head: str = "linear"  # linear (regression head) | forest
    threshold: float = 3.0
    batch_size: int = 64
    seed: int = 0
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)


@dataclass
class CurateConfig:
    output: str = ""
    input: InputSection = field(default_factory=InputSection)
    executor: ExecutorSection = field(default_factory=ExecutorSection)
    heuristics: heuristics.HeuristicsConfig = field(default_factory=heuristics.HeuristicsConfig)
    dedup: dedup.DedupConfig = field(default_factory=dedup.DedupConfig)
    decontam: decontam.DecontamConfig = field(default_factory=decontam.DecontamConfig)
    edu: EduSection = field(default_factory=EduSection)

    @classmethod
    def from_toml(cls, path: str | Path, overrides: list[str] | None = None) -> CurateConfig:
        return load_config(cls, path, overrides, error=CurateError)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], overrides: list[str] | None = None) -> CurateConfig:
        return build_config(cls, raw, overrides, error=CurateError)

    def validate(self) -> None:
        checks = [(bool(self.output), "output: set the output folder (output = \"runs/curated\")"),
                  (bool(self.input.paths), "input.paths: give at least one file, folder or glob"),
                  (self.input.on_error in ("skip", "stop"), f"input.on_error = {self.input.on_error!r}; "
                                                            "expected 'skip' or 'stop'"),
                  (self.executor.kind in ("local", "ray"), f"executor.kind = {self.executor.kind!r}; "
                                                           "expected 'local' or 'ray'"),
                  (self.dedup.bands > 0 and self.dedup.rows > 0, "dedup.bands and dedup.rows must be > 0"),
                  (self.executor.bucket_parts > 0, "executor.bucket_parts must be > 0")]
        for ok, message in checks:
            if not ok:
                raise CurateError(message)

    def fingerprint(self) -> dict[str, Any]:
        """What decides the output (everything but how it is executed)."""
        data = dataclasses.asdict(self)
        data.pop("executor")
        return data


# ---- inputs ---------------------------------------------------------------------------------------------
def find_shards(paths: list[str]) -> list[Shard]:
    files: list[Path] = []
    for item in paths:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(DOCUMENT_SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches:
                raise CurateError(f"input.paths: {item}: no such file, folder or glob match")
            files += matches
    shards: dict[str, Shard] = {}
    for f in files:
        if not f.name.endswith(DOCUMENT_SUFFIXES):
            raise CurateError(f"{f}: unsupported input; expected one of {', '.join(DOCUMENT_SUFFIXES)}")
        name = next(f.name[: -len(s)] for s in DOCUMENT_SUFFIXES if f.name.endswith(s))
        if name in shards and shards[name].path != f:
            raise CurateError(f"two input shards are both named {name!r}: {shards[name].path} and {f}; rename one")
        shards[name] = Shard(name, f)
    if not shards:
        raise CurateError(f"input.paths {paths}: no documents found")
    return [shards[k] for k in sorted(shards)]


# ---- stage functions (picklable, so local processes and Ray can run them) --------------------------------------
@dataclass
class ReadShard:
    """Validate an input file into the pipeline's JSONL: every record gets an id; bad lines are reported."""

    section: InputSection
    stage_dir: Path

    def __call__(self, shard: Shard) -> dict[str, Any]:
        good, bad = [], []
        seen: dict[str, int] = {}  # id -> the line that first had it
        id_field = self.section.id_field
        for line in checked_records(iter_lines(shard.path), self.section.text_field):
            if line.record is not None:
                ident = line.record.get(id_field, f"{shard.name}:{line.line}")
                if not isinstance(ident, str) or not ident:
                    line = Line(line.path, line.line, None, f"field {id_field!r} is {ident!r:.40}, not a non-empty "
                                                            "string (expected the document id)")
                elif ident in seen:
                    line = Line(line.path, line.line, None, f"duplicate {id_field} {ident!r:.80} (first on line "
                                                            f"{seen[ident]})")
                else:
                    seen[ident] = line.line
            if line.record is None:
                if self.section.on_error == "stop":
                    raise CurateError(f"{line.where}: {line.error} (input.on_error = 'stop'; "
                                      f"set it to 'skip' to count bad lines and go on)")
                bad.append({"file": str(line.path), "line": line.line, "error": line.error, "raw": line.raw})
                continue
            record = dict(line.record)
            record.setdefault(id_field, f"{shard.name}:{line.line}")
            if self.section.text_field != "text":
                record["text"] = record[self.section.text_field]
            good.append(record)
        write_jsonl(self.stage_dir / "removed" / f"{shard.name}.jsonl", bad)
        write_jsonl(self.stage_dir / f"{shard.name}.jsonl", good)
        return {"shard": shard.name, "docs_in": len(good) + len(bad), "docs_out": len(good),
                "removed": {"malformed": len(bad)} if bad else {},
                "bad_lines": [f"{b['file']} line {b['line']}: {b['error']}" for b in bad[:20]],
                "empty": len(good) + len(bad) == 0}


@dataclass
class HeuristicShard:
    config: heuristics.HeuristicsConfig
    stage_dir: Path

    def __call__(self, shard: Shard) -> dict[str, Any]:
        return filter_shard(shard, self.stage_dir,
                            lambda docs: [heuristics.check(d["text"], self.config) for d in docs])


@dataclass
class SignatureShard:
    """A shard's MinHash band keys (and exact hashes) into per-bucket files: ``buckets/<column>-pP/<shard>.npz``."""

    config: dedup.DedupConfig
    bucket_dir: Path
    parts: int = 1  # key-range partitions per bucket column

    def __call__(self, shard: Shard) -> dict[str, Any]:
        texts = [d["text"] for d in iter_docs(shard.path)]
        exact = np.array([dedup.exact_hash(t) for t in texts], np.uint64)
        sigs = dedup.MinHasher(self.config).signatures(texts) if self.config.minhash else np.zeros((len(texts), 0))
        local = np.arange(len(texts), dtype=np.uint32)
        for column, keys in dedup.bucket_columns(sigs, exact, self.config).items():
            part = keys % np.uint64(self.parts)
            for p in range(self.parts):
                mine = part == p
                save_npz(self.bucket_dir / f"{column}-p{p}" / f"{shard.name}.npz", keys=keys[mine], docs=local[mine])
        return {"shard": shard.name, "docs": len(texts)}


@dataclass
class BucketTask:
    """One bucket (a band's key partition) over every shard: its groups of equal keys as star edges."""

    shards: list[str]
    offsets: list[int]  # global index of each shard's first document ((shard, line) order)
    edge_dir: Path

    def __call__(self, bucket: Shard) -> dict[str, Any]:
        keys, docs = [], []
        for name, offset in zip(self.shards, self.offsets):
            with np.load(bucket.path / f"{name}.npz", allow_pickle=False) as z:
                keys.append(z["keys"])
                docs.append(z["docs"].astype(np.int64) + offset)
        edges = dedup.star_edges(np.concatenate(keys), np.concatenate(docs)) if keys else np.zeros((0, 2), np.int64)
        save_npz(self.edge_dir / f"{bucket.name}.npz", edges=edges)
        return {"shard": bucket.name, "docs": int(sum(map(len, keys))), "edges": len(edges)}


@dataclass
class DedupFilterShard:
    stage_dir: Path

    def __call__(self, shard: Shard) -> dict[str, Any]:
        decisions = json.loads((self.stage_dir / "decisions" / f"{shard.name}.json").read_text())
        position = iter(range(10**12))
        return filter_shard(shard, self.stage_dir, lambda docs: [decisions.get(str(next(position))) for _ in docs])


@dataclass
class DecontamShard:
    config: decontam.DecontamConfig
    stage_dir: Path

    def __call__(self, shard: Shard) -> dict[str, Any]:
        index = decontam.cached_index(self.stage_dir / "index", self.config)
        hits: list[dict[str, Any]] = []

        def decide(docs: list[dict[str, Any]]) -> list[str | None]:
            out = []
            for doc, found in zip(docs, index.match_batch([d["text"] for d in docs])):
                if found is None:
                    out.append(None)
                    continue
                hit, rule = found
                hits.append({"id": doc.get("id"), **hit})
                out.append(f"decontam_{hit['task']} ({rule} of item {hit['doc']}, diff {hit['diff_ratio']})")
            return out

        stats = filter_shard(shard, self.stage_dir, decide)
        return {**stats, "hits": hits}


@dataclass
class EduShard:
    classifier_dir: Path
    stage_dir: Path
    batch_size: int

    def __call__(self, shard: Shard) -> dict[str, Any]:
        from phiforge.data.curate.classifier import EduClassifier

        clf = EduClassifier.load(self.classifier_dir)

        def decide(docs: list[dict[str, Any]]) -> list[str | None]:
            scores = clf.score_texts([d["text"] for d in docs]) if docs else []
            out = []
            for doc, score in zip(docs, scores):
                doc["edu_score"] = round(float(score), 4)
                out.append(None if score >= clf.threshold else f"edu_below_threshold ({score:.2f})")
            return out

        return filter_shard(shard, self.stage_dir, decide, batch_size=self.batch_size)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    import io

    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


# ---- global steps -------------------------------------------------------------------------------------------
def cluster_shards(stage_dir: Path, shards: list[Shard], counts: list[int], config: dedup.DedupConfig,
                   buckets: list[str]) -> dict[str, Any]:
    """Merge every bucket's edges into clusters; write each shard's removals; return cluster stats.

    The driver holds the edges (a few per duplicate document) and per-shard counts, never the signatures."""
    done = stage_dir / "clusters.json"
    if done.is_file():
        return json.loads(done.read_text())

    def edges(names: list[str]) -> np.ndarray:
        loaded = [np.load(stage_dir / "edges" / f"{b}.npz", allow_pickle=False)["edges"] for b in names]
        return np.concatenate(loaded) if loaded else np.zeros((0, 2), np.int64)

    exact = edges([b for b in buckets if b.startswith("exact-")])
    nodes, roots = dedup.components(np.concatenate([exact, edges([b for b in buckets if b.startswith("band-")])]))
    removed = roots != nodes
    docs, roots = nodes[removed], roots[removed]
    # exact groups are whole buckets (hash equality is transitive): a doc's exact root is its star's centre
    order = np.argsort(exact[:, 1], kind="stable")
    members, centres = exact[order, 1], exact[order, 0]

    def exact_root(x: np.ndarray) -> np.ndarray:
        if not len(members):
            return x
        at = np.minimum(np.searchsorted(members, x), len(members) - 1)
        return np.where(members[at] == x, centres[at], x)

    is_exact = exact_root(docs) == exact_root(roots)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    (stage_dir / "decisions").mkdir(parents=True, exist_ok=True)
    for shard, lo, hi in zip(shards, starts[:-1], starts[1:]):
        a, b = np.searchsorted(docs, [lo, hi])
        decisions = {str(int(d - lo)): f"{'dedup_exact' if e else 'dedup_minhash'} (cluster of document {int(r)})"
                     for d, r, e in zip(docs[a:b], roots[a:b], is_exact[a:b])}
        atomic_write_json(stage_dir / "decisions" / f"{shard.name}.json", decisions)
    _, sizes = np.unique(np.concatenate([roots, np.unique(roots)]), return_counts=True)
    stats = dedup.size_stats(int(starts[-1]), Counter(sizes.tolist()), int(is_exact.sum()),
                             int((~is_exact).sum()))
    atomic_write_json(done, stats)
    return stats


def prepare_classifier(config: EduSection, stage_dir: Path, inputs: list[Shard]) -> tuple[Path, dict[str, Any]]:
    """The classifier to apply: the configured folder, or one trained here on teacher labels of a sample."""
    from phiforge.data.curate.annotate import annotate_documents
    from phiforge.data.curate.classifier import EduClassifier, get_embedder, train_classifier

    if config.classifier:
        folder = Path(config.classifier)
        return folder, EduClassifier.load(folder).metrics
    folder = stage_dir / "classifier"
    if (folder / "classifier.json").is_file():
        return folder, EduClassifier.load(folder).metrics
    docs = [d for s in inputs for d in iter_docs(s.path)]
    if not docs:
        raise CurateError("edu: no documents left to label for training the classifier")
    rng = np.random.default_rng(config.annotate.seed)
    sample = [docs[i] for i in sorted(rng.choice(len(docs), min(config.annotate.samples, len(docs)), replace=False))]
    labels = annotate_documents(sample, stage_dir / "annotations", config.annotate)
    embeddings = get_embedder(config.embedder).embed([r["text"] for r in labels])
    clf = train_classifier(embeddings, np.array([r["score"] for r in labels]), embedder=config.embedder,
                           head=config.head, threshold=config.threshold, seed=config.seed)
    clf.metrics["label_methods"] = dict(Counter(r["method"] for r in labels))
    clf.save(folder)
    return folder, clf.metrics


# ---- the pipeline ---------------------------------------------------------------------------------------------
def _next(stage_dir: Path, shards: list[Shard]) -> list[Shard]:
    return [Shard(s.name, stage_dir / f"{s.name}.jsonl") for s in shards]


def run_curate(config: CurateConfig, executor: Executor | None = None) -> dict[str, Any]:
    """Run every enabled stage (resuming finished shards) and return the stats also written to stats.json."""
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_run(out, config)
    own = executor is None
    executor = executor or make_executor(config.executor.kind, config.executor.workers, config.executor.address)
    try:
        return _run(config, out, executor)
    finally:
        if own:
            executor.shutdown()


def _run(config: CurateConfig, out: Path, executor: Executor) -> dict[str, Any]:
    shards = find_shards(config.input.paths)
    stats: dict[str, Any] = {"shards": len(shards), "stages": {}}
    started = time.perf_counter()

    def stage(name: str, fn: Any, current: list[Shard]) -> tuple[list[Shard], list[dict[str, Any]]]:
        t0 = time.perf_counter()
        per_shard = run_stage(executor, out / name, fn, current, name)
        stats["stages"][name] = {**merge_stats(per_shard), "seconds": round(time.perf_counter() - t0, 2)}
        return _next(out / name, current), per_shard

    current, per_shard = stage("read", ReadShard(config.input, out / "read"), shards)
    read = stats["stages"]["read"]
    read["empty_shards"] = [s["shard"] for s in per_shard if s["empty"]]
    read["bad_lines"] = [b for s in per_shard for b in s["bad_lines"]]
    for name in read["empty_shards"]:
        print(f"curate: input shard {name} is empty (no documents)", file=sys.stderr)
    for message in read["bad_lines"]:
        print(f"curate: skipped {message}", file=sys.stderr)
    if config.heuristics.enabled:
        current, _ = stage("heuristics", HeuristicShard(config.heuristics, out / "heuristics"), current)
    if config.dedup.enabled:
        d = out / "dedup"
        parts, t0 = config.executor.bucket_parts, time.perf_counter()
        counts = [s["docs"] for s in run_stage(executor, d / "signatures", SignatureShard(
            config.dedup, d / "buckets", parts), current, "dedup-signatures")]
        t1 = time.perf_counter()
        columns = list(dedup.bucket_columns(np.zeros((0, config.dedup.num_perm), np.uint32), np.zeros(0, np.uint64),
                                            config.dedup))
        buckets = [f"{c}-p{p}" for c in columns for p in range(parts)]
        names = [s.name for s in current]
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        run_stage(executor, d / "edges", BucketTask(names, offsets, d / "edges"),
                  [Shard(b, d / "buckets" / b) for b in buckets], "dedup-buckets")
        t2 = time.perf_counter()
        clusters = cluster_shards(d, current, counts, config.dedup, buckets)
        stats["dedup_steps_seconds"] = {"signatures": round(t1 - t0, 2), "buckets": round(t2 - t1, 2),
                                        "merge": round(time.perf_counter() - t2, 2)}
        current, _ = stage("dedup", DedupFilterShard(d), current)
        stats["stages"]["dedup"]["clusters"] = clusters
    if config.decontam.enabled:
        d = out / "decontam"
        meta = decontam.build_index(d / "index", config.decontam)
        current, per_shard = stage("decontam", DecontamShard(config.decontam, d), current)
        report = decontam.merge_reports(per_shard, meta)
        atomic_write_json(d / "report.json", report)
        stats["stages"]["decontam"]["report"] = {t: {k: v for k, v in r.items() if k != "examples"}
                                                 for t, r in report["benchmarks"].items()}
        stats["stages"]["decontam"]["skipped_benchmarks"] = sorted(report["skipped"])
    if config.edu.enabled:
        d = out / "edu"
        classifier_dir, metrics = prepare_classifier(config.edu, d, current)
        current, _ = stage("edu", EduShard(classifier_dir, d, config.edu.batch_size), current)
        stats["stages"]["edu"]["classifier"] = {"path": str(classifier_dir), **metrics}
    stats["output"] = _publish(out / "curated", current)
    stats["seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_json(out / "stats.json", stats)
    return stats


def _publish(folder: Path, shards: list[Shard]) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    docs = 0
    for s in shards:
        atomic_write(folder / f"{s.name}.jsonl", lambda tmp, src=s.path: shutil.copyfile(src, tmp))
        docs += sum(1 for _ in iter_docs(s.path))
    return {"dir": str(folder), "documents": docs, "shards": len(shards)}


def _check_same_run(out: Path, config: CurateConfig) -> None:
    """Resuming into a folder made with other settings would mix two runs: refuse, naming what changed."""
    file = out / "config.json"
    new = config.fingerprint()
    if file.is_file():
        old = json.loads(file.read_text())
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            raise CurateError(f"{out} holds a run made with different settings ({', '.join(changed)}); "
                              f"use a new output folder or delete it")
    else:
        atomic_write_json(file, new)
