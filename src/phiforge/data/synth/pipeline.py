"""``phiforge synth``: seeds -> prompts -> teacher (+ techniques) -> cleanup -> sharded, resumable output.

Document i's seed and prompt are a pure function of (config, i), so a run is an index range cut into
output shards of ``run.shard_size``; ``--shard K/N`` runs the K-th of N contiguous shard ranges, so N
processes on any hosts share one output folder, each resumable after kill -9. Documents stream through
a window of ``run.chunk_size`` in flight, each running its technique steps as soon as its own answers
land; stats are per-shard counts folded at the end (``--merge-stats`` folds all processes' shards).

The config is TOML with the sections below, loaded with the same ``section.key=value`` override
machinery as ``phiforge train`` (unknown keys are errors that list the valid ones).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phiforge.config.loader import build_config, config_dict, load_config
from phiforge.data.synth import prompts as P
from phiforge.data.synth import seeds as S
from phiforge.data.synth.teachers import Teacher, TeacherSection, attach_cache, teacher_from_section
from phiforge.data.synth.techniques import Draft, StepContext, check_steps, run_document
from phiforge.data.synth.writer import OutputError, ShardWriter, fold_stats
from phiforge.errors import ConfigError
from phiforge.inference.sampling import TEACHER_KEYS, SamplingParams, sampling_section
from phiforge.io.atomic import atomic_write_json


@dataclass
class RunSection:
    out_dir: str = "runs/synth"
    num_documents: int = 100
    seed: int = 0
    shard_size: int = 256  # documents per output shard (the unit of atomic completion)
    format: str = "jsonl"  # jsonl | parquet
    chunk_size: int = 512  # documents in flight at once (each runs its steps on its own); bounds memory
    progress: bool = True


@dataclass
class SeedsSection:
    topics: str = ""  # a topics file (one per line, "# area" headers); "" = the built-in 300
    audiences: list[str] = field(default_factory=list)  # subsets of the built-in lists; empty = all
    formats: list[str] = field(default_factory=list)
    styles: list[str] = field(default_factory=list)
    web_samples: str = ""  # .txt (blank-line separated) or .jsonl ("text") passages to seed prompts with
    web_fraction: float = 0.5  # share of documents whose prompt carries a passage (when web_samples is set)
    passage_chars: int = 1000
    balance_formats: bool = False  # cycle through the formats by document index (equal counts per format)
    # seeded sources: one document per item, after the run.num_documents topic documents (README, "Seeds")
    web_rewrites: list[str] = field(default_factory=list)  # JSONL/Parquet files, folders or globs ("text", "id")
    rewrite_forms: list[str] = field(default_factory=list)  # of textbook, exercises, qa; empty = all, in turn
    chunk_chars: int = 2000  # passages are cut at paragraph boundaries into chunks of at most this
    min_chunk_chars: int = 200
    code_seeds: list[str] = field(default_factory=list)  # .py files or folders (their functions), or JSONL "code"
    max_code_chars: int = 4000
    qa_seeds: list[str] = field(default_factory=list)  # JSONL/Parquet with "question" and "answer"


@dataclass
class TechniquesSection:
    steps: list[str] = field(default_factory=lambda: ["generate"])
    rubric: str = P.RUBRIC
    plurality_samples: int = 5
    reversal_similarity: float = 0.5
    sandbox_timeout: float = 10.0


@dataclass
class FilterSection:
    cleanup: bool = True  # strip stock openings and closings ("Sure! Here is ...", "I hope this helps")
    min_words: int = 40  # shorter documents are rejected (recorded in rejected/)
    drop_truncated: bool = False  # reject documents that hit max_new_tokens


@dataclass
class SynthConfig:
    run: RunSection = field(default_factory=RunSection)
    seeds: SeedsSection = field(default_factory=SeedsSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    sampling: SamplingParams = sampling_section(TEACHER_KEYS, temperature=0.7, top_p=0.95, top_k=50)
    prompts: dict[str, str] = field(default_factory=dict)  # format -> template overriding the built-in
    techniques: TechniquesSection = field(default_factory=TechniquesSection)
    filter: FilterSection = field(default_factory=FilterSection)

    @classmethod
    def from_toml(cls, path: str | Path, overrides: list[str] | None = None) -> SynthConfig:
        return load_config(cls, path, overrides)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], overrides: list[str] | None = None) -> SynthConfig:
        return build_config(cls, raw, overrides)

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)

    def validate(self) -> None:
        r, t = self.run, self.teacher
        s = self.seeds
        checks = [(r.num_documents >= 0, f"run.num_documents must be >= 0, got {r.num_documents}"),
                  (r.num_documents > 0 or bool(s.web_rewrites or s.code_seeds or s.qa_seeds),
                   "run.num_documents is 0 and no seeds.web_rewrites, code_seeds or qa_seeds are given"),
                  (0 < s.min_chunk_chars <= s.chunk_chars, "seeds.min_chunk_chars must be in (0, seeds.chunk_chars]"),
                  (r.shard_size > 0, f"run.shard_size must be > 0, got {r.shard_size}"),
                  (r.chunk_size > 0, f"run.chunk_size must be > 0, got {r.chunk_size}"),
                  (r.format in ("jsonl", "parquet"), f"run.format = {r.format!r}; expected 'jsonl' or 'parquet'"),
                  (t.kind in ("local", "openai"), f"teacher.kind = {t.kind!r}; expected 'local' or 'openai'"),
                  (t.kind != "openai" or bool(t.base_url), "teacher.base_url is required when teacher.kind = "
                                                           "'openai' (e.g. http://127.0.0.1:8000/v1)"),
                  (t.api in ("chat", "completions"), f"teacher.api = {t.api!r}; expected 'chat' or 'completions'"),
                  (t.concurrency > 0 and t.max_batch_size > 0, "teacher.concurrency and max_batch_size must be > 0"),
                  (0 <= self.seeds.web_fraction <= 1, "seeds.web_fraction must be in [0, 1]"),
                  (self.techniques.plurality_samples >= 2, "techniques.plurality_samples must be >= 2")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        for kind, known in (("audiences", S.AUDIENCES), ("formats", S.FORMATS), ("styles", S.STYLES),
                            ("rewrite_forms", dict.fromkeys(S.REWRITE_FORMS))):
            S.check_choices(kind, getattr(self.seeds, kind), known)
        for fmt, template in self.prompts.items():
            if fmt not in S.ALL_FORMATS:
                raise ConfigError(f"prompts.{fmt}: no such format; expected some of {list(S.ALL_FORMATS)}")
            if not isinstance(template, str):
                raise ConfigError(f"prompts.{fmt}: expected a template string, got {template!r}")
            P.check_template(f"prompts.{fmt}", template)
        check_steps(self.techniques.steps)

    def fingerprint(self) -> dict[str, Any]:
        """What fixes the documents of a run; resuming with any of it changed is refused."""
        d = self.to_dict()
        return {"run": {k: d["run"][k] for k in ("num_documents", "seed", "shard_size", "format")},
                "seeds": d["seeds"], "sampling": d["sampling"], "prompts": d["prompts"],
                "techniques": d["techniques"], "filter": d["filter"],
                "teacher": {k: d["teacher"][k] for k in ("kind", "model", "dtype", "chat", "api", "system")}}


# ---- cleanup ---------------------------------------------------------------------------------------------
_OPENING = re.compile(r"^\s*(?:(?:sure|certainly|of course|absolutely|great|okay)\b[^\n]{0,160}\n+|"
                      r"here(?:'s| is| are)\b[^\n]{0,160}:\s*\n+)", re.IGNORECASE)
_CLOSING = re.compile(r"\n+[^\n]*(?:i hope (?:this|that) helps|let me know if|feel free to ask)[^\n]*\s*$",
                      re.IGNORECASE)


def cleanup(text: str) -> str:
    """Strip the stock openings and sign-offs chat teachers add around the content."""
    previous = None
    while previous != text:
        previous = text
        text = _CLOSING.sub("", _OPENING.sub("", text, count=1), count=1)
    return text.strip()


def verdict(text: str, finish_reason: str, cfg: FilterSection) -> str:
    """"kept" or the reason the document is rejected."""
    words = len(text.split())
    if words < cfg.min_words:
        return f"too short: {words} words < filter.min_words {cfg.min_words}"
    if cfg.drop_truncated and finish_reason == "length":
        return "truncated at sampling.max_new_tokens"
    return "kept"


# ---- the run ------------------------------------------------------------------------------------------------
def build_teacher(config: SynthConfig) -> Teacher:
    return teacher_from_section(config.teacher, config.run.seed)


def document_id(config: SynthConfig, seed: S.Seed, prompt: str, teacher: dict[str, Any]) -> str:
    blob = json.dumps({"run_seed": config.run.seed, "seed": seed.metadata(), "prompt": prompt, "teacher": teacher,
                       "sampling": config.sampling.pick(TEACHER_KEYS), "steps": config.techniques.steps},
                      sort_keys=True)
    return "syn-" + hashlib.sha256(blob.encode()).hexdigest()[:20]


class Planner:
    """Document i -> its seed and prompt; the same for every run of the same config.

    Documents ``0 .. run.num_documents-1`` are topic documents; then one document per web chunk, code seed
    and Q&A seed, in that order (``total`` counts them all)."""

    def __init__(self, config: SynthConfig) -> None:
        s = config.seeds
        self.config = config
        self.topics = S.load_topics(s.topics or None) if config.run.num_documents else []
        self.passages = S.load_passages(s.web_samples, s.passage_chars) if s.web_samples else None
        self.audiences = S.check_choices("audiences", s.audiences, S.AUDIENCES)
        self.formats = S.check_choices("formats", s.formats, S.FORMATS)
        self.styles = S.check_choices("styles", s.styles, S.STYLES)
        self.forms = S.check_choices("rewrite_forms", s.rewrite_forms, dict.fromkeys(S.REWRITE_FORMS))
        self.items: list[S.SeedItem] = [
            *(S.load_web_chunks(s.web_rewrites, s.chunk_chars, s.min_chunk_chars) if s.web_rewrites else []),
            *(S.load_code_seeds(s.code_seeds, s.max_code_chars) if s.code_seeds else []),
            *(S.load_qa_seeds(s.qa_seeds) if s.qa_seeds else [])]
        self.total = config.run.num_documents + len(self.items)
        self.first_of = {src: next(i for i, it in enumerate(self.items) if it.source == src)
                         for src in S.SOURCES if any(it.source == src for it in self.items)}

    def plan(self) -> dict[str, Any]:
        """What the seeded sources hold (part of the resume fingerprint: changed seed files are refused)."""
        if not self.items:
            return {}
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(json.dumps(dataclasses.astuple(item)).encode())
        counts = Counter(item.source for item in self.items)
        return {"plan": {**{src: counts[src] for src in S.SOURCES}, "sha256": digest.hexdigest()[:20]}}

    def draft(self, index: int) -> Draft:
        s = self.config.seeds
        n = self.config.run.num_documents
        if index < n:
            seed = S.sample_seed(index, self.config.run.seed, self.topics, self.audiences, self.formats,
                                 self.styles, self.passages, s.web_fraction, s.balance_formats)
        else:
            item = self.items[index - n]
            seed = S.seeded_seed(index, index - n - self.first_of[item.source], self.config.run.seed, item,
                                 self.audiences, self.styles, self.forms)
        return Draft(index, seed, P.document_prompt(seed, self.config.prompts))


def check_resume(out: Path, config: Any, extra: dict[str, Any] | None = None) -> None:
    """Refuse to resume ``out`` with a config (synth's or topics') whose ``fingerprint()`` (plus ``extra``,
    e.g. what the seed files hold) differs."""
    manifest = out / "config.json"
    fingerprint = {**config.fingerprint(), **(extra or {})}
    if manifest.exists():
        saved = json.loads(manifest.read_text()).get("fingerprint")
        now = json.loads(json.dumps(fingerprint))
        if saved != now:
            diff = [f"{section}.{k}" for section in now for k in now[section]
                    if (saved or {}).get(section, {}).get(k) != now[section][k]] if isinstance(saved, dict) else []
            raise OutputError(f"{manifest}: {out} holds a run with a different config (changed: {diff or 'all'}); "
                              "use a new run.out_dir or the same settings")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(manifest, {"fingerprint": fingerprint, "config": config.to_dict()})


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` (0 <= K < N) -> (K, N)."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected K/N, e.g. 0/4 for the first of 4 processes") from None
    if not 0 <= k < n:
        raise ConfigError(f"--shard {text!r}: need 0 <= K < N")
    return k, n


def shard_range(config: SynthConfig, shard: tuple[int, int], documents: int | None = None) -> range:
    """The output shards process K of N owns: a contiguous range, so the N ranges tile the run
    (``documents``: the run's total, default ``run.num_documents``)."""
    k, n = shard
    total = -(-(config.run.num_documents if documents is None else documents) // config.run.shard_size)
    return range(k * total // n, (k + 1) * total // n)


def run_synth(config: SynthConfig, teacher: Teacher | None = None, shard: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Generate process ``shard`` = (K, N)'s share of ``run.num_documents`` into ``run.out_dir`` (resuming
    what is there); its stats. When every shard of the run is complete, ``stats.json`` folds them all."""
    out = Path(config.run.out_dir)
    planner = Planner(config)  # bad seeds fail before anything is loaded
    sampling = config.sampling
    check_resume(out, config, planner.plan())
    k, n = shard
    name = f"{k}-of-{n}"
    writer = ShardWriter(out, planner.total, config.run.shard_size, config.run.format,
                         shards=shard_range(config, shard, planner.total))
    owned = sum(len(writer.shard_range(s)) for s in writer.shards)
    todo = writer.todo()
    first = next(todo, None)  # None: nothing left, so no teacher is loaded
    start, new_tokens = time.perf_counter(), 0
    own_teacher = teacher is None
    if first is not None:
        teacher = teacher or build_teacher(config)
        # one writer per SQLite file
        attach_cache(teacher, config.teacher, out / ("cache.sqlite" if n == 1 else f"cache-{name}.sqlite"))
    identity = teacher.identity() if teacher else {}
    bar = _progress(config, owned)

    def finished(d: Draft) -> None:
        nonlocal new_tokens
        status = d.status if d.status != "kept" else verdict(d.text, d.finish_reason, config.filter)
        writer.add(make_record(config, d, d.text, status, identity))
        new_tokens += d.total_tokens
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - start):.0f} tok/s")

    try:
        if first is not None and teacher is not None:
            ctx = StepContext(teacher, sampling, config.run.seed, config.teacher.system, config.techniques.rubric,
                              config.techniques.plurality_samples, config.techniques.reversal_similarity,
                              config.techniques.sandbox_timeout, cleanup if config.filter.cleanup else str.strip)
            indices = itertools.chain([first], todo)
            asyncio.run(_pipeline(indices, planner, ctx, config.techniques.steps, config.run.chunk_size, finished))
    finally:
        writer.close()
        if bar is not None:
            bar.close()
        if teacher is not None and own_teacher:
            teacher.close()
    seconds = time.perf_counter() - start
    stats, missing = fold_stats(writer)
    generated = writer.written
    stats.update({"out_dir": str(out), "shard": f"{k}/{n}", "output_shards": [writer.shards.start,
                                                                               writer.shards.stop],
                  "resumed_from": owned - generated, "generated_this_run": generated, "seconds": round(seconds, 2),
                  "docs_per_s": round(generated / max(seconds, 1e-9), 1), "new_completion_tokens": new_tokens,
                  "tokens_per_s": round(new_tokens / max(seconds, 1e-9), 1),
                  "teacher": identity, "teacher_stats": dict(teacher.stats) if teacher else {}})
    if missing:  # only when a document failed: the run raised before this
        raise OutputError(f"{out}: shards {missing[:5]} of process {k}/{n} are incomplete")
    coverage = topics_coverage(config)
    if coverage:  # the topics file came from `phiforge topics`: its coverage goes into the run report
        atomic_write_json(out / "topics_stats.json", coverage)
    atomic_write_json(out / "stats" / f"process-{name}.json", stats)
    if n == 1:
        atomic_write_json(out / "stats.json", stats)
    elif _all_complete(config, planner.total):  # the last to finish folds every shard (the same fold if two race)
        merge_stats(config, planner.total)
    return stats


def topics_coverage(config: SynthConfig) -> dict[str, Any]:
    """The coverage stats ``phiforge topics`` wrote beside ``seeds.topics`` ({} for other topics files)."""
    if not config.seeds.topics:
        return {}
    path = Path(config.seeds.topics).parent / "stats.json"
    try:
        stats = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return stats if isinstance(stats, dict) and "nn_similarity_histogram" in stats else {}


async def _pipeline(indices: Iterator[int], planner: Planner, ctx: StepContext, steps: list[str], window: int,
                    finished: Callable[[Draft], None]) -> None:
    """Keep ``window`` documents in flight, each running its steps on its own; a document is written the
    moment it finishes and a new one takes its place. Memory is the window, not the run."""
    async with ctx.teacher.session():
        running: set[asyncio.Task[Draft]] = set()
        try:
            for index in indices:
                if len(running) >= window:
                    done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    for task in sorted(done, key=lambda t: t.result().index):
                        finished(task.result())
                running.add(asyncio.ensure_future(run_document(planner.draft(index), steps, ctx)))
            while running:
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=lambda t: t.result().index):
                    finished(task.result())
        finally:  # a fatal error: stop the rest (what finished is already written)
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)


def _all_complete(config: SynthConfig, total: int) -> bool:
    writer = ShardWriter(config.run.out_dir, total, config.run.shard_size, config.run.format)
    return all(writer.shard_path(s).exists() for s in writer.shards)


def merge_stats(config: SynthConfig, total: int | None = None) -> dict[str, Any]:
    """``phiforge synth --merge-stats``: fold every shard's counts and every process's teacher stats into
    ``stats.json`` (names the shards still missing, if any). ``total``: the run's documents (default: the plan's)."""
    out = Path(config.run.out_dir)
    total = Planner(config).total if total is None else total
    writer = ShardWriter(out, total, config.run.shard_size, config.run.format)
    stats, missing = fold_stats(writer)
    teacher: Counter[str] = Counter()
    processes = {}
    for file in sorted((out / "stats").glob("process-*.json")):
        p = json.loads(file.read_text())
        teacher.update(p.get("teacher_stats", {}))
        processes[p["shard"]] = {k: p[k] for k in ("output_shards", "generated_this_run", "seconds", "docs_per_s")}
    stats.update({"out_dir": str(out), "complete": not missing, "missing_shards": len(missing),
                  "teacher_stats": dict(teacher), "processes": processes})
    atomic_write_json(out / "stats.json", stats)
    return stats


def make_record(config: SynthConfig, d: Draft, text: str, status: str, teacher: dict[str, Any]) -> dict[str, Any]:
    metadata = {**d.seed.metadata(), "teacher": teacher, "prompt": d.prompt, "system": config.teacher.system,
                "sampling": config.sampling.pick(TEACHER_KEYS), "steps": config.techniques.steps,
                "finish_reason": d.finish_reason,
                "tokens": {"prompt": d.prompt_tokens, "completion": d.completion_tokens,
                           "all_calls": d.total_tokens, "calls": d.calls}}
    if d.chain:
        metadata["chain"] = d.chain
    if d.fields:
        metadata["fields"] = d.fields
    return {"index": d.index, "status": status, "id": document_id(config, d.seed, d.prompt, teacher),
            "text": text, "metadata": metadata}


def _progress(config: SynthConfig, total: int) -> Any:
    if not config.run.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="doc", desc="synth", dynamic_ncols=True)
