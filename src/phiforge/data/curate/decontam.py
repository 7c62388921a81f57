"""Benchmark decontamination: phi-4's hybrid 13-gram / 7-gram rule, confirmed by a diff ratio.

The index holds word n-grams of every benchmark item phiforge evaluates, read through the evaluation
harness's own loaders (``phiforge.eval.tasks``): question and answer as one word sequence, so n-grams
spanning the question/answer boundary are indexed too. Benchmark and training text get one normalization
(NFKD, diacritics and punctuation dropped, lowercase, ``\\w+`` words).

A document is a candidate for an item when it shares any 13-gram with it, or when the share of the item's
7-grams it contains reaches ``short_ratio``. A candidate is confirmed (and the document removed) when a
word-level ``difflib`` alignment against the document text around the hits covers at least ``diff_ratio`` of the
item's question or of its answer (Cosmopedia's confirm step), so generic phrases do not remove documents.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phiforge.data.curate.dedup import ngram_hashes, word_hashes
from phiforge.data.curate.executor import CurateError
from phiforge.io.atomic import atomic_write_bytes

SKIP_TASKS = {"perplexity"}  # a text corpus, not benchmark items
WORD = re.compile(r"[^\W_]+")
TEMPLATE = re.compile(r"^\s*(question|q)\s*:\s*|\s*answer\s*:\s*$", re.IGNORECASE)
LETTERS = "ABCDEFGH"
MIN_PART_CHARS = 25  # a question or answer shorter than this cannot confirm a match on its own
MIN_BLOCK_WORDS = 3  # aligned runs shorter than this are chance, not copying


@dataclass
class DecontamConfig:
    enabled: bool = True
    benchmarks: list[str] = field(default_factory=lambda: ["all"])  # task names, or "all" the harness has
    skip_missing: bool = False  # "all": index the benchmarks that load, instead of failing on the others
    data_dir: str = ""  # benchmark folder (default: the eval harness's: $PHIFORGE_BENCHMARKS, ./benchmarks, hub)
    paths: dict[str, str] = field(default_factory=dict)  # task -> explicit data path, as `phiforge eval --data`
    long_n: int = 13
    short_n: int = 7
    short_ratio: float = 0.5  # share of an item's 7-grams found in the document
    diff_ratio: float = 0.5  # share of the item's question (or answer) the diff alignment must cover
    max_items_per_gram: int = 20  # n-grams shared by more items are template text, not evidence


def normalize_words(text: str) -> list[str]:
    if not text.isascii():  # fold diacritics: é -> e
        text = unicodedata.normalize("NFKD", text)
        text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return WORD.findall(text.lower())


# ---- benchmark items ----------------------------------------------------------------------------------
def _strip_template(text: str) -> str:
    return TEMPLATE.sub("", text.strip())


def item_parts(task: Any, doc: dict[str, Any]) -> tuple[str, str]:
    """(question, answer) of a benchmark document as the harness renders it, without Question:/Answer:."""
    try:
        question, answer = task.shot_pair(doc)
    except (KeyError, TypeError, ValueError, IndexError, NotImplementedError):
        question, answer = task.doc_to_text(doc), ""
    if isinstance(question, list):  # winogrande: one context per option
        question = question[0]
    answer = str(answer)
    if len(answer) == 1 and answer in LETTERS and isinstance(doc.get("choices"), list):
        answer = str(doc["choices"][LETTERS.index(answer)])  # MMLU: the answer text, not its letter
    return _strip_template(question), answer.strip()


def load_benchmarks(config: DecontamConfig) -> tuple[dict[str, list[tuple[str, str]]], dict[str, str]]:
    """Items per task via the eval loaders, and the tasks skipped for lack of data (with the loader's reason).

    A task named explicitly must load; with "all" every task must load too, unless ``skip_missing``: then the
    tasks without data are skipped and reported.
    """
    from phiforge.eval.tasks import TaskDataError, UnknownTaskError, get_task, task_names

    wanted = config.benchmarks
    explicit = [b for b in wanted if b != "all"]
    names = explicit + ([n for n in task_names() if not n.startswith("mmlu_") and n not in SKIP_TASKS
                         and n not in explicit] if "all" in wanted else [])
    items: dict[str, list[tuple[str, str]]] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            task = get_task(name, config.paths.get(name), config.data_dir or None).load()
        except UnknownTaskError as err:
            raise CurateError(f"decontam.benchmarks: {err}") from None
        except (TaskDataError, FileNotFoundError) as err:
            if name in explicit:
                raise CurateError(f"decontam: benchmark {name!r} could not be loaded: {err}") from None
            skipped[name] = str(err)
            continue
        items[name] = [item_parts(task, doc) for doc in task.docs]
    if not items:
        raise CurateError(f"decontam: no benchmark could be loaded ({'; '.join(skipped.values())})")
    if skipped and not config.skip_missing:
        raise CurateError(f"decontam: benchmarks {sorted(skipped)} could not be loaded ("
                          f"{'; '.join(skipped.values())}); give their data (decontam.data_dir, decontam.paths, "
                          "$PHIFORGE_BENCHMARKS, or the Hugging Face datasets cache), name the benchmarks wanted, "
                          f"or set decontam.skip_missing = true to index only {sorted(items)}")
    return items, skipped


# ---- the index ------------------------------------------------------------------------------------------
@dataclass
class _Table:
    """Sorted unique n-gram hashes and, CSR-style, the items holding each."""

    keys: np.ndarray
    ptr: np.ndarray
    items: np.ndarray

    @classmethod
    def build(cls, grams: list[np.ndarray], max_items: int) -> tuple[_Table, int]:
        keys = np.concatenate(grams) if grams else np.zeros(0, np.uint64)
        owners = np.concatenate([np.full(len(g), i, np.int32) for i, g in enumerate(grams)]) if grams else \
            np.zeros(0, np.int32)
        order = np.lexsort((owners, keys))
        keys, owners = keys[order], owners[order]
        first = np.ones(len(keys), bool)
        first[1:] = (keys[1:] != keys[:-1]) | (owners[1:] != owners[:-1])
        keys, owners = keys[first], owners[first]
        uniq, start, counts = np.unique(keys, return_index=True, return_counts=True)
        common = counts > max_items  # template n-grams ("Your code should pass these tests" ...)
        keep = np.repeat(~common, counts)
        uniq, counts = uniq[~common], counts[~common]
        ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(uniq, ptr, owners[keep]), int(common.sum())

    def lookup(self, grams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(gram position, item) for every gram found and every item holding it."""
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int32))
        if len(self.keys) == 0 or len(grams) == 0:
            return empty
        pos = np.searchsorted(self.keys, grams)
        pos[pos == len(self.keys)] = 0
        where = np.flatnonzero(self.keys[pos] == grams)
        if len(where) == 0:
            return empty
        slots = pos[where]
        starts, counts = self.ptr[slots], self.ptr[slots + 1] - self.ptr[slots]
        # the concatenated CSR rows, gathered without a Python loop
        offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        items = self.items[offsets + np.arange(int(counts.sum()))]
        return np.repeat(where, counts), items


class BenchmarkIndex:
    def __init__(self, config: DecontamConfig, items: list[dict[str, Any]], long: _Table, short: _Table,
                 short_counts: np.ndarray, meta: dict[str, Any]) -> None:
        self.config, self.items, self.long, self.short = config, items, long, short
        self.short_counts, self.meta = short_counts, meta

    @classmethod
    def build(cls, config: DecontamConfig) -> BenchmarkIndex:
        by_task, skipped = load_benchmarks(config)
        items: list[dict[str, Any]] = []
        long_grams, short_grams, word_lists = [], [], []
        too_short = Counter()
        for task, pairs in by_task.items():
            for doc_id, (question, answer) in enumerate(pairs):
                q_words, a_words = normalize_words(question), normalize_words(answer)
                words = q_words + a_words
                if len(words) < config.short_n:
                    too_short[task] += 1
                    continue
                hashes = word_hashes(words)
                items.append({"task": task, "doc": doc_id, "question": " ".join(q_words),
                              "answer": " ".join(a_words)})
                word_lists.append(q_words)
                long_grams.append(ngram_hashes(hashes, config.long_n) if len(words) >= config.long_n
                                  else np.zeros(0, np.uint64))
                short_grams.append(np.unique(ngram_hashes(hashes, config.short_n)))
        _strip_shared_text(items, word_lists, long_grams, config)
        long_grams = [np.unique(g) for g in long_grams]
        long, common_long = _Table.build(long_grams, config.max_items_per_gram)
        short, common_short = _Table.build(short_grams, config.max_items_per_gram)
        short_counts = np.array([len(g) for g in short_grams], np.int64)
        meta = {"tasks": {t: len(p) for t, p in by_task.items()}, "skipped": skipped,
                "items_too_short": dict(too_short), "template_ngrams_dropped": common_long + common_short,
                "long_ngrams": int(len(long.keys)), "short_ngrams": int(len(short.keys))}
        return cls(config, items, long, short, short_counts, meta)

    # -- persistence (npz of plain arrays + JSON; never pickle)
    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        import io

        buf = io.BytesIO()
        np.savez(buf, **{f"{name}_{part}": getattr(getattr(self, name), part)
                         for name in ("long", "short") for part in ("keys", "ptr", "items")},
                 short_counts=self.short_counts)
        atomic_write_bytes(folder / "index.npz", buf.getvalue())
        atomic_write_bytes(folder / "items.json", json.dumps({"meta": self.meta, "items": self.items}).encode())

    @classmethod
    def load(cls, folder: Path, config: DecontamConfig) -> BenchmarkIndex:
        arrays = np.load(folder / "index.npz", allow_pickle=False)
        data = json.loads((folder / "items.json").read_text())
        tables = {n: _Table(*(arrays[f"{n}_{p}"] for p in ("keys", "ptr", "items"))) for n in ("long", "short")}
        return cls(config, data["items"], tables["long"], tables["short"], arrays["short_counts"], data["meta"])

    # -- matching
    def match_batch(self, texts: list[str]) -> list[tuple[dict[str, Any], str] | None]:
        """``match`` for many texts: one vectorised n-gram lookup over the whole batch finds the few texts
        that share any n-gram with a benchmark item; only those go through the per-text check."""
        c = self.config
        words = [normalize_words(t) for t in texts]
        lengths = np.array([len(w) for w in words])
        if lengths.sum() == 0:
            return [None] * len(texts)
        hashes = word_hashes([w for ws in words for w in ws])
        owner = np.repeat(np.arange(len(texts)), lengths)
        suspect = np.zeros(len(texts), bool)
        for n, table in ((c.short_n, self.short), (c.long_n, self.long)):
            if len(hashes) < n or len(table.keys) == 0:
                continue
            grams = ngram_hashes(hashes, n)
            inside = owner[: len(grams)] == owner[n - 1:]  # grams that do not cross a document boundary
            pos = np.searchsorted(table.keys, grams)
            pos[pos == len(table.keys)] = 0
            suspect[owner[: len(grams)][inside & (table.keys[pos] == grams)]] = True
        return [self.match(t) if s else None for t, s in zip(texts, suspect)]

    def match(self, text: str) -> tuple[dict[str, Any], str] | None:
        """The first confirmed benchmark item ``text`` contains, with the rule that found it, else None."""
        c = self.config
        words = normalize_words(text)
        if len(words) < c.short_n:
            return None
        hashes = word_hashes(words)
        long_grams = ngram_hashes(hashes, c.long_n) if len(words) >= c.long_n else np.zeros(0, np.uint64)
        long_pos, long_items = self.long.lookup(long_grams)
        short_grams = ngram_hashes(hashes, c.short_n)
        short_pos, short_items = self.short.lookup(short_grams)
        ratios: dict[int, float] = {}
        if len(short_items):
            # an item's 7-grams found in the document, each counted once
            found = short_grams[short_pos]
            order = np.lexsort((found, short_items))
            items_sorted, grams_sorted = short_items[order], found[order]
            first = np.ones(len(order), bool)
            first[1:] = (items_sorted[1:] != items_sorted[:-1]) | (grams_sorted[1:] != grams_sorted[:-1])
            ids, counts = np.unique(items_sorted[first].astype(np.int64), return_counts=True)
            ratios = dict(zip(ids.tolist(), (counts / self.short_counts[ids]).tolist()))
        long_hits = set(long_items.tolist())
        candidates = sorted(long_hits | {i for i, r in ratios.items() if r >= c.short_ratio})
        best: tuple[float, float, int] | None = None
        for item_id in candidates:  # confirm each; report the best-aligned item (template-sharing items differ)
            item = self.items[item_id]
            at = np.concatenate([long_pos[long_items == item_id], short_pos[short_items == item_id]])
            span = len(item["question"].split()) + len(item["answer"].split())
            window = " ".join(words[max(0, int(at.min()) - span):int(at.max()) + c.long_n + span])
            diff = max(_coverage(part, window) for part in (item["question"], item["answer"])
                       if len(part) >= MIN_PART_CHARS or part == item["question"])
            if diff >= c.diff_ratio and (best is None or (diff, ratios.get(item_id, 0.0)) > best[:2]):
                best = (diff, ratios.get(item_id, 0.0), item_id)
        if best is None:
            return None
        diff, ratio, item_id = best
        rule = f"{c.long_n}gram" if item_id in long_hits else f"{c.short_n}gram"
        item = self.items[item_id]
        return ({"task": item["task"], "doc": item["doc"], "rule": rule, "short_ratio": round(ratio, 3),
                 "diff_ratio": round(diff, 3)}, rule)


def _strip_shared_text(items: list[dict[str, Any]], word_lists: list[list[str]], long_grams: list[np.ndarray],
                       config: DecontamConfig) -> None:
    """Drop from each item's question the words covered by 13-grams many items share (a task's template,
    e.g. MMLU's "For which of these two scenarios ..."), so the diff confirm weighs only what is specific."""
    if not long_grams:
        return
    keys, counts = np.unique(np.concatenate([np.unique(g) for g in long_grams]), return_counts=True)
    common = keys[counts > config.max_items_per_gram]
    if len(common) == 0:
        return
    for item, words, grams in zip(items, word_lists, long_grams):
        hit = np.flatnonzero(np.isin(grams, common))
        if len(hit) == 0:
            continue
        covered = np.zeros(len(words) + config.long_n, bool)
        for j in hit:
            covered[j:j + config.long_n] = True
        item["question"] = " ".join(w for w, c in zip(words, covered) if not c)


def _coverage(part: str, doc_text: str) -> float:
    """Share of ``part``'s characters inside runs of MIN_BLOCK_WORDS or more words that align with the text.

    The alignment is ``difflib`` over words, not characters: the same verdict on copied text, and fast
    (character-level matching is quadratic on long windows full of repeated letters).
    """
    if not part:
        return 0.0
    if part in doc_text:
        return 1.0
    a, b = part.split(), doc_text.split()
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    matched = sum(sum(len(w) + 1 for w in a[m.a:m.a + m.size])
                  for m in matcher.get_matching_blocks() if m.size >= MIN_BLOCK_WORDS)
    return min(1.0, matched / (len(part) + 1))


# ---- per-process cache for workers -----------------------------------------------------------------------------
_loaded: dict[str, BenchmarkIndex] = {}


def cached_index(folder: Path, config: DecontamConfig) -> BenchmarkIndex:
    key = str(folder)
    if key not in _loaded:
        _loaded[key] = BenchmarkIndex.load(folder, config)
    return _loaded[key]


def build_index(folder: Path, config: DecontamConfig) -> dict[str, Any]:
    """Build (or reuse) the index in ``folder``; returns its description. Skipped tasks are printed."""
    if not (folder / "items.json").is_file():
        index = BenchmarkIndex.build(config)
        index.save(folder)
    meta = json.loads((folder / "items.json").read_text())["meta"]
    for task, reason in meta["skipped"].items():
        print(f"decontam: benchmark {task} skipped: {reason}", file=sys.stderr)
    return meta


def merge_reports(per_shard: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Per benchmark: documents removed, distinct items hit, counts by rule, and examples."""
    report: dict[str, Any] = {t: {"items": n, "documents_removed": 0, "items_hit": set(), "by_rule": Counter(),
                                  "examples": []} for t, n in meta["tasks"].items()}
    for shard in per_shard:
        for hit in shard.get("hits", []):
            entry = report[hit["task"]]
            entry["documents_removed"] += 1
            entry["items_hit"].add(hit["doc"])
            entry["by_rule"][hit["rule"]] += 1
            if len(entry["examples"]) < 20:
                entry["examples"].append(hit)
    for entry in report.values():
        entry["items_hit"] = len(entry["items_hit"])
        entry["by_rule"] = dict(entry["by_rule"])
    return {"benchmarks": report, "skipped": meta["skipped"], "items_too_short": meta["items_too_short"],
            "template_ngrams_dropped": meta["template_ngrams_dropped"]}
