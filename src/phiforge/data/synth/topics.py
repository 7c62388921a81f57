"""``phiforge topics``: grow a topic set from a seed taxonomy (areas -> subjects -> topics) with a teacher.

Round by round, every area below its quota asks the teacher for more subjects (when too few of its subjects
are still open) and for topics of its least-covered open subjects. Each candidate passes a format check,
a normalized-text dedup and a MiniLM embedding dedup against every topic accepted so far (all areas).
Quotas are equal per area; an area that yields nothing new for ``grow.patience`` rounds is closed and its
remainder is shared by the others, so any size can be asked for.

Resume: each round is one line of ``journal.jsonl`` (what it accepted, what it rejected and why), its topics'
embeddings appended to ``embeddings.f32`` first. A rerun replays the journal through the same state update
the run uses (``Grower.apply``) and goes on; the teacher's request cache makes a half-done round free to redo.
Outputs: ``topics.txt`` in the format synth reads (``# area``, ``## subject``, one topic per line),
``topics.jsonl`` (each topic's taxonomy path and nearest-neighbour similarity) and ``stats.json`` (per-area
coverage and a nearest-neighbour similarity histogram).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phiforge.config.loader import build_config, config_dict, load_config
from phiforge.data.synth import prompts as P
from phiforge.data.synth import seeds as S
from phiforge.data.synth.pipeline import check_resume
from phiforge.data.synth.teachers import Request, Result, Teacher, TeacherSection, attach_cache, teacher_from_section
from phiforge.data.synth.techniques import request_seed
from phiforge.data.synth.writer import read_journal
from phiforge.errors import ConfigError
from phiforge.inference.sampling import TEACHER_KEYS, SamplingParams, sampling_section
from phiforge.io.atomic import atomic_write_bytes, atomic_write_json


@dataclass
class TopicsRunSection:
    out_dir: str = "runs/topics"
    num_topics: int = 2000
    seed: int = 0
    progress: bool = True
    max_rounds: int = 0  # stop this process after so many new rounds (0 = until done); a rerun goes on


@dataclass
class TaxonomySection:
    file: str = ""  # a topics file ("# area", optional "## subject" headers, topics); "" = the built-in 300
    areas: list[str] = field(default_factory=list)  # a subset of the file's areas; empty = all
    keep_seed_topics: bool = True  # the file's own topics are part of the output (and count toward quotas)


@dataclass
class GrowSection:
    requests_per_area: int = 8  # topic requests per area per round (one teacher batch holds every area's)
    topics_per_request: int = 10
    subjects_per_request: int = 10
    max_asks_per_subject: int = 4  # then the subject is closed (its lists repeat themselves)
    patience: int = 3  # rounds without a new topic or subject before an area is closed
    min_words: int = 1
    max_words: int = 8
    max_chars: int = 80


@dataclass
class DedupSection:
    embedder: str = "all-minilm-l6-v2"  # or any phiforge model (mean-pooled hidden states)
    similarity: float = 0.85  # a candidate this cosine-similar to an accepted topic is a duplicate


@dataclass
class TopicsConfig:
    run: TopicsRunSection = field(default_factory=TopicsRunSection)
    taxonomy: TaxonomySection = field(default_factory=TaxonomySection)
    grow: GrowSection = field(default_factory=GrowSection)
    dedup: DedupSection = field(default_factory=DedupSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    sampling: SamplingParams = sampling_section(TEACHER_KEYS, max_new_tokens=128, temperature=0.8, top_p=0.95, top_k=50,
                                                repetition_penalty=1.1)

    @classmethod
    def from_toml(cls, path: str | Path, overrides: list[str] | None = None) -> TopicsConfig:
        return load_config(cls, path, overrides)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], overrides: list[str] | None = None) -> TopicsConfig:
        return build_config(cls, raw, overrides)

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)

    def validate(self) -> None:
        g = self.grow
        checks = [(self.run.num_topics > 0, f"run.num_topics must be > 0, got {self.run.num_topics}"),
                  (self.run.max_rounds >= 0, "run.max_rounds must be >= 0"),
                  (min(g.requests_per_area, g.topics_per_request, g.subjects_per_request, g.max_asks_per_subject,
                       g.patience) > 0, "grow: requests_per_area, topics_per_request, subjects_per_request, "
                                        "max_asks_per_subject and patience must be > 0"),
                  (0 < g.min_words <= g.max_words, "grow.min_words must be in (0, grow.max_words]"),
                  (0 < self.dedup.similarity <= 1, "dedup.similarity must be in (0, 1]"),
                  (self.teacher.kind in ("local", "openai"), f"teacher.kind = {self.teacher.kind!r}; expected "
                                                             "'local' or 'openai'")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def fingerprint(self) -> dict[str, Any]:
        """What fixes the topics; resuming with any of it changed is refused."""
        d = self.to_dict()
        return {"run": {k: d["run"][k] for k in ("num_topics", "seed")}, "taxonomy": d["taxonomy"],
                "grow": d["grow"], "dedup": d["dedup"], "sampling": d["sampling"],
                "teacher": {k: d["teacher"][k] for k in ("kind", "model", "dtype", "chat", "api", "system")}}


# ---- candidates ----------------------------------------------------------------------------------------------
_ITEM = re.compile(r"^\s*(?:[A-Za-z][:.)]\s+)?(?:[-*\u2022]+\s*|\(?\d{1,3}\s*[.):]\s*|#+\s*)?")
_STOP = frozenset("a an the and of in on to for with its their".split())
# words that make no topic on their own ("10 items", "Subject", "Introduction"), and chatty line openings
_GENERIC = frozenset("subject subjects topic topics item items chapter chapters section sections lesson lessons unit "
                     "units introduction conclusion summary overview example examples title titles name names list "
                     "number numbers question questions answer answers part parts matter thing things textbook "
                     "short first second third next final other more explanation description day days ago "
                     "today human".split())
_MARKUP = re.compile(r"[\[\]{}|<>=*/\\@~^]")
_CHATTY = ("here", "sure", "list", "so ", "note", "let ", "i ", "this ", "these ", "each ", "that ", "it ")


def parse_list(text: str) -> list[str]:
    """The item names of a teacher's list: numbering, bullets, explanations after a colon or dash and
    parenthetical remarks cut off."""
    items = []
    for line in text.splitlines():
        item = _ITEM.sub("", line, count=1)
        item = re.split(r"\s+[-\u2013\u2014]\s|:\s|\s\(|\.\s", item, maxsplit=1)[0]
        item = item.strip().strip("*_\"'`").strip().rstrip(".,;:!")
        if item:
            items.append(" ".join(item.split()))
    return items


def normalize(text: str) -> str:
    """The text dedup key: accents, case, punctuation, stop words and plural -s do not make a new topic."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    words = [w for w in re.findall(r"[a-z0-9]+", text) if w not in _STOP]
    return " ".join(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words)


def format_problem(item: str, g: GrowSection) -> str:
    """Why ``item`` cannot be a topic name ("" when it can)."""
    words = len(item.split())
    if not g.min_words <= words <= g.max_words or len(item) > g.max_chars:
        return "format: length"
    if sum(c.isalpha() for c in item) < 3 or "#" in item or item.lower().startswith(_CHATTY) or _MARKUP.search(item):
        return "format: not a name"
    if all(w in _GENERIC or w.isdigit() for w in normalize(item).split()):  # normalize drops plural -s
        return "format: generic"
    return ""


# ---- state -------------------------------------------------------------------------------------------------
@dataclass
class Area:
    name: str
    subjects: list[str] = field(default_factory=list)
    topics: int = 0
    closed: bool = False
    stalled: int = 0  # rounds in a row without anything new


@dataclass
class Subject:
    area: str
    name: str
    asks: int = 0
    topics: int = 0
    closed: bool = False


class Grower:
    """The growing topic set; ``apply(round)`` is the only state update, for a live round and a replay alike."""

    def __init__(self, config: TopicsConfig, areas: list[str]) -> None:
        self.config = config
        self.areas = {a: Area(a) for a in areas}
        self.subjects: dict[tuple[str, str], Subject] = {}
        self.topics: list[dict[str, Any]] = []  # {"topic", "area", "subject", "source", "round"}
        self.keys: set[str] = set()
        self.subject_keys: set[tuple[str, str]] = set()
        self.vectors = np.zeros((0, 0), np.float32)
        self.rounds = 0
        self.rejected: Counter[str] = Counter()
        self.calls = self.tokens = 0

    def quotas(self) -> dict[str, int]:
        """Equal shares of num_topics over the open areas, after what the closed ones hold."""
        live = [a for a in self.areas.values() if not a.closed]
        left = self.config.run.num_topics - sum(a.topics for a in self.areas.values() if a.closed)
        out = {a.name: a.topics for a in self.areas.values() if a.closed}
        for i, a in enumerate(live):
            out[a.name] = max(0, left) // len(live) + (i < max(0, left) % len(live))
        return out

    def done(self) -> bool:
        quotas = self.quotas()
        return all(a.closed or a.topics >= quotas[a.name] for a in self.areas.values())

    def apply(self, record: dict[str, Any], vectors: np.ndarray) -> None:
        for area, name in record["subjects"]:
            self.subjects[(area, name)] = Subject(area, name)
            self.subject_keys.add((area, normalize(name)))
            self.areas[area].subjects.append(name)
        for area, name, accepted in record["asked"]:
            s = self.subjects[(area, name)]
            s.asks += 1
            s.closed = s.asks >= self.config.grow.max_asks_per_subject or accepted == 0
        for topic in record["topics"]:
            self.topics.append(topic)
            self.keys.add(normalize(topic["topic"]))
            self.areas[topic["area"]].topics += 1
            if topic["subject"]:
                self.subjects[(topic["area"], topic["subject"])].topics += 1
        self.vectors = vectors if not len(self.vectors) else np.concatenate([self.vectors, vectors])
        new = Counter(t["area"] for t in record["topics"]) + Counter(a for a, _ in record["subjects"])
        for a in record["areas"]:
            area = self.areas[a]
            area.stalled = 0 if new[a] else area.stalled + 1
            area.closed = area.closed or area.stalled >= self.config.grow.patience
        self.rejected.update(record["rejected"])
        self.calls += record["calls"]
        self.tokens += record["tokens"]
        self.rounds = record["round"] + 1

    def open_subjects(self, area: str) -> list[Subject]:
        return sorted((s for s in self.subjects.values() if s.area == area and not s.closed),
                      key=lambda s: (s.topics, s.asks))


def seed_taxonomy(config: TopicsConfig) -> tuple[list[str], list[S.Topic]]:
    """The areas to grow and the seed topics (with their subjects), from the taxonomy file."""
    t = config.taxonomy
    topics = S.load_topics(t.file or None)
    areas = list(dict.fromkeys(topic.area for topic in topics))
    unknown = [a for a in t.areas if a not in areas]
    if unknown:
        raise S.SeedError(f"taxonomy.areas: {unknown} are not areas of {t.file or S.BUILTIN_TOPICS}; "
                          f"it has {areas}")
    if "" in areas and not t.areas:
        raise S.SeedError(f"{t.file}: topics before the first '# area' header; every topic needs an area")
    areas = list(t.areas) or areas
    return areas, [topic for topic in topics if topic.area in areas]


class Embedder:
    """Unit-length embeddings of short texts (curate's embedders, cached per process)."""

    def __init__(self, name: str) -> None:
        from phiforge.data.curate.classifier import get_embedder

        self.model = get_embedder(name)
        self.dim = int(np.asarray(self.model.embed(["topic"])).shape[1])

    def __call__(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        v = np.asarray(self.model.embed(texts, batch_size=128), np.float32)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)  # hidden-state embedders are not


def dedup(grower: Grower, candidates: list[tuple[str, str, str]], vectors: np.ndarray, quotas: dict[str, int],
          threshold: float, rejected: Counter[str], counts: Counter[str]) -> list[int]:
    """Indices of the candidates (area, subject, topic) to accept, in order: new by normalized text and by
    embedding (against the accepted set and this round's earlier picks), and under their area's quota."""
    picked: list[int] = []
    base = grower.vectors
    for i, (area, subject, topic) in enumerate(candidates):
        key = normalize(topic)
        if not key or key in grower.keys or key == normalize(subject) or key == normalize(area):
            rejected["duplicate: text"] += 1
            continue
        if grower.areas[area].topics + counts[area] >= quotas[area]:
            rejected["over quota"] += 1
            continue
        v = vectors[i]
        sims = [base @ v] if len(base) else []
        if picked:
            sims.append(vectors[picked] @ v)
        if sims and float(max(s.max() for s in sims)) >= threshold:
            rejected["duplicate: embedding"] += 1
            continue
        picked.append(i)
        counts[area] += 1
        grower.keys.add(key)  # so a later candidate of this round is a text duplicate (undone by the caller)
    return picked


# ---- the run -------------------------------------------------------------------------------------------------
class TopicsRun:
    def __init__(self, config: TopicsConfig, teacher: Teacher | None = None) -> None:
        self.config = config
        self.out = Path(config.run.out_dir)
        self.areas, self.seed_topics = seed_taxonomy(config)  # bad input fails before anything is loaded
        self.sampling = config.sampling
        self.teacher, self.own_teacher = teacher, teacher is None
        self.embed: Embedder | None = None

    @property
    def journal(self) -> Path:
        return self.out / "journal.jsonl"

    @property
    def embeddings(self) -> Path:
        return self.out / "embeddings.f32"

    def replay(self) -> Grower:
        """The state after every journaled round; a torn last line or stray embedding rows are cut off."""
        grower = Grower(self.config, self.areas)
        if not self.journal.exists():
            return grower
        records = read_journal(self.journal, f"delete {self.out} to start over", S.SeedError)
        rows = sum(len(r["topics"]) for r in records)
        flat = np.fromfile(self.embeddings, np.float32) if self.embeddings.exists() else np.zeros(0, np.float32)
        dim = records[0]["dim"] if records else 0
        if dim and flat.size < rows * dim:
            raise S.SeedError(f"{self.embeddings}: {flat.size // dim} rows for the {rows} journaled topics; "
                              f"delete {self.out} to start over")
        if flat.size != rows * dim:
            with open(self.embeddings, "r+b") as fh:
                fh.truncate(rows * dim * 4)
        at = 0
        for record in records:
            n = len(record["topics"])
            grower.apply(record, flat[at * dim:(at + n) * dim].reshape(n, dim) if dim else flat.reshape(0, 0))
            at += n
        return grower

    def commit(self, grower: Grower, record: dict[str, Any], vectors: np.ndarray) -> None:
        """Embeddings first, then the journal line that makes them count (a kill between leaves extra rows,
        which the replay cuts off)."""
        with open(self.embeddings, "ab") as fh:
            fh.write(np.ascontiguousarray(vectors, np.float32).tobytes())
            fh.flush()
        with open(self.journal, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
        grower.apply(record, vectors)

    def run(self) -> dict[str, Any]:
        check_resume(self.out, self.config)
        start = time.perf_counter()
        grower = self.replay()
        resumed = grower.rounds
        if not grower.done():
            self.embed = Embedder(self.config.dedup.embedder)
            if grower.rounds == 0:
                self.seed_round(grower)
            if not grower.done():
                asyncio.run(self.grow(grower, start))
        stats = self.write(grower, time.perf_counter() - start, resumed)
        if self.teacher is not None and self.own_teacher:
            self.teacher.close()
        return stats

    def seed_round(self, grower: Grower) -> None:
        """Round 0: the taxonomy's own subjects and (when kept) topics, deduplicated like teacher topics."""
        subjects, seen = [], set()
        for t in self.seed_topics:
            if t.subject and (t.area, normalize(t.subject)) not in seen:
                seen.add((t.area, normalize(t.subject)))
                subjects.append([t.area, t.subject])
        topics = [(t.area, t.subject, t.name) for t in self.seed_topics] if self.config.taxonomy.keep_seed_topics \
            else []
        self.finish_round(grower, 0, list(grower.areas), subjects, [], topics, "seed", Counter(), calls=0, tokens=0)

    def finish_round(self, grower: Grower, number: int, areas: list[str], subjects: list[list[str]],
                     asked: list[tuple[str, str]], candidates: list[tuple[str, str, str]], source: str,
                     rejected: Counter[str], calls: int, tokens: int) -> None:
        """Dedup the round's candidates, then journal it (``areas``: those that asked, for stall counting)."""
        assert self.embed is not None
        vectors = self.embed([c[2] for c in candidates])
        counts: Counter[str] = Counter()
        keys = set(grower.keys)
        picked = dedup(grower, candidates, vectors, grower.quotas(), self.config.dedup.similarity, rejected, counts)
        grower.keys = keys  # apply() adds the accepted ones
        per_subject = Counter((candidates[i][0], candidates[i][1]) for i in picked)
        record = {"round": number, "dim": self.embed.dim, "areas": areas,
                  "subjects": subjects, "asked": [[a, s, per_subject[(a, s)]] for a, s in asked],
                  "topics": [{"topic": candidates[i][2], "area": candidates[i][0], "subject": candidates[i][1],
                              "source": source, "round": number} for i in picked],
                  "rejected": dict(rejected), "calls": calls, "tokens": tokens}
        self.commit(grower, record, vectors[picked])

    async def grow(self, grower: Grower, start: float) -> None:
        if self.teacher is None:
            self.teacher = teacher_from_section(self.config.teacher, self.config.run.seed)
        attach_cache(self.teacher, self.config.teacher, self.out / "cache.sqlite")
        bar = _progress(self.config, len(grower.topics))
        new_rounds, cap = 0, self.config.run.max_rounds
        try:
            async with self.teacher.session():
                while not grower.done() and (not cap or new_rounds < cap):
                    await self.one_round(grower)
                    new_rounds += 1
                    if bar is not None:
                        bar.n = len(grower.topics)
                        rate = len(grower.topics) / (time.perf_counter() - start)
                        bar.set_postfix_str(f"round {grower.rounds}, {rate:.1f} topics/s")
                        bar.refresh()
        finally:
            if bar is not None:
                bar.close()

    async def one_round(self, grower: Grower) -> None:
        g, number = self.config.grow, grower.rounds
        quotas = grower.quotas()
        plan: list[tuple[str, str, str]] = []  # (kind, area, subject)
        for a in grower.areas.values():
            if a.closed or a.topics >= quotas[a.name]:
                continue
            open_subjects = grower.open_subjects(a.name)
            if len(open_subjects) < g.requests_per_area:
                plan.append(("subjects", a.name, ""))
            plan += [("topics", a.name, s.name) for s in open_subjects[: g.requests_per_area]]
        requests = [self.request(number, k, kind, area, subject, grower) for k, (kind, area, subject)
                    in enumerate(plan)]
        results: list[Result] = await asyncio.gather(*(self.teacher.ask(r) for r in requests))  # type: ignore[union-attr]
        rejected: Counter[str] = Counter()
        subjects: list[list[str]] = []
        candidates: list[tuple[str, str, str]] = []
        asked: list[tuple[str, str]] = []
        keys = set(grower.subject_keys)
        for (kind, area, subject), result in zip(plan, results):
            items = parse_list(result.text)
            if kind == "subjects":
                for item in items:
                    key = (area, normalize(item))
                    if format_problem(item, g) or not key[1] or key in keys or key[1] == normalize(area):
                        rejected["subject: duplicate or bad format"] += 1
                        continue
                    keys.add(key)
                    subjects.append([area, item])
                continue
            asked.append((area, subject))
            for item in items:
                problem = format_problem(item, g)
                if problem:
                    rejected[problem] += 1
                else:
                    candidates.append((area, subject, item))
        areas = list(dict.fromkeys(a for _, a, _ in plan))
        self.finish_round(grower, number, areas, subjects, asked, candidates, "teacher", rejected,
                          calls=len(results), tokens=sum(r.completion_tokens for r in results))

    def request(self, number: int, k: int, kind: str, area: str, subject: str, grower: Grower) -> Request:
        g = self.config.grow
        if kind == "subjects":
            prompt = P.render(P.SUBJECTS, n=g.subjects_per_request, area=area)
        else:
            prompt = P.render(P.TOPICS, n=g.topics_per_request, area=area, subject=subject)
        return Request(prompt, request_seed(self.config.run.seed, number, "topics", kind, area, subject, k),
                       self.sampling, self.config.teacher.system)

    # ---- outputs ---------------------------------------------------------------------------------------------
    def write(self, grower: Grower, seconds: float, resumed_rounds: int) -> dict[str, Any]:
        topics = grower.topics
        nn = nearest_neighbour(grower.vectors) if len(topics) > 1 else np.zeros(len(topics), np.float32)
        records = [{"topic": t["topic"], "area": t["area"], "subject": t["subject"],
                    "path": [p for p in (t["area"], t["subject"], t["topic"]) if p], "source": t["source"],
                    "round": t["round"], "nn_similarity": round(float(s), 4)} for t, s in zip(topics, nn)]
        atomic_write_bytes(self.out / "topics.jsonl",
                           "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
        atomic_write_bytes(self.out / "topics.txt", topics_file(grower, self.config).encode())
        stats = coverage(grower, nn, self.config)
        stats.update({"out_dir": str(self.out), "topics_file": str(self.out / "topics.txt"),
                      "resumed_rounds": resumed_rounds, "seconds": round(seconds, 2),
                      "topics_per_s": round((len(topics)) / max(seconds, 1e-9), 2),
                      "teacher": self.teacher.identity() if self.teacher else {},
                      "teacher_stats": dict(self.teacher.stats) if self.teacher else {}})
        atomic_write_json(self.out / "stats.json", stats)
        return stats


def nearest_neighbour(vectors: np.ndarray, block: int = 2048) -> np.ndarray:
    """Each row's largest cosine similarity to any other row (rows are unit vectors), in blocks."""
    out = np.empty(len(vectors), np.float32)
    for start in range(0, len(vectors), block):
        sims = vectors[start:start + block] @ vectors.T
        np.fill_diagonal(sims[:, start:start + block], -1.0)
        out[start:start + block] = sims.max(1)
    return out


HISTOGRAM_BINS = 20  # nearest-neighbour similarity in steps of 0.05


def coverage(grower: Grower, nn: np.ndarray, config: TopicsConfig) -> dict[str, Any]:
    """Per-area counts and subjects, the nearest-neighbour similarity histogram, rejects per reason."""
    areas = list(grower.areas)
    per_area = Counter(t["area"] for t in grower.topics)
    edges = np.linspace(0, 1, HISTOGRAM_BINS + 1)
    counts, _ = np.histogram(np.clip(nn, 0, 1), edges)
    histogram = {f"{lo:.2f}-{hi:.2f}": int(c) for lo, hi, c in zip(edges[:-1], edges[1:], counts)}
    first = next((i for i, c in enumerate(counts) if c), 0)
    by_area_nn = {a: round(float(nn[[t["area"] == a for t in grower.topics]].mean()), 4) if per_area[a] else 0.0
                  for a in areas}
    quotas = grower.quotas()
    return {"topics": len(grower.topics), "num_topics": config.run.num_topics,
            "complete": len(grower.topics) >= config.run.num_topics,
            "shortfall": max(0, config.run.num_topics - len(grower.topics)),
            "rounds": grower.rounds, "teacher_calls": grower.calls, "completion_tokens": grower.tokens,
            "seed_topics": sum(1 for t in grower.topics if t["source"] == "seed"),
            "per_area": {a: per_area[a] for a in areas}, "per_area_quota": quotas,
            "per_area_subjects": {a: len(grower.areas[a].subjects) for a in areas},
            "closed_areas": [a for a in areas if grower.areas[a].closed],
            "per_area_mean_nn_similarity": by_area_nn,
            "nn_similarity_histogram": dict(list(histogram.items())[first:]),
            "nn_similarity": {"mean": round(float(nn.mean()), 4) if len(nn) else 0.0,
                              "p50": round(float(np.percentile(nn, 50)), 4) if len(nn) else 0.0,
                              "p95": round(float(np.percentile(nn, 95)), 4) if len(nn) else 0.0,
                              "max": round(float(nn.max()), 4) if len(nn) else 0.0,
                              "dedup_threshold": config.dedup.similarity},
            "rejected_by_reason": dict(grower.rejected.most_common())}


def topics_file(grower: Grower, config: TopicsConfig) -> str:
    """The topics as synth reads them: ``# area``, then its subject-less topics, then ``## subject`` blocks."""
    lines = [f"# phiforge topics: {len(grower.topics)} topics in {len(grower.areas)} areas, grown from "
             f"{config.taxonomy.file or 'the built-in taxonomy'}; paths in topics.jsonl"]
    for area in grower.areas:
        mine = [t for t in grower.topics if t["area"] == area]
        lines.append(f"# {area}")
        lines += [t["topic"] for t in mine if not t["subject"]]
        for subject in dict.fromkeys(t["subject"] for t in mine if t["subject"]):
            lines.append(f"## {subject}")
            lines += [t["topic"] for t in mine if t["subject"] == subject]
    return "\n".join(lines) + "\n"


def run_topics(config: TopicsConfig, teacher: Teacher | None = None) -> dict[str, Any]:
    """Grow ``run.num_topics`` topics into ``run.out_dir`` (resuming what is there); the coverage stats."""
    return TopicsRun(config, teacher).run()


def _progress(config: TopicsConfig, done: int) -> Any:
    if not config.run.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=config.run.num_topics, initial=done, unit="topic", desc="topics", dynamic_ncols=True)


