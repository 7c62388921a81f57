"""Seeds: what each synthetic document is about and for whom, sampled combinatorially.

A document's seed is a topic (from a file or the built-in list of 300 across six areas) crossed with
an audience, a format and a style, and optionally a web passage placed in the prompt (Cosmopedia
style). Document ``i`` draws from its own RNG seeded by ``(seed, i)``, so the plan of a run is fixed by
its config alone: a resumed or re-sharded run asks for exactly the same documents.

Beside topics, three seed sources each give one document per item (phi-4's web, code and Q&A seeds):
organic web passages (curate's JSONL/Parquet shards, chunked at paragraph boundaries) rewritten into
textbook, exercise or Q&A form; code snippets (the functions of Python files, or JSONL ``code``) turned into
explained exercises whose tests must pass on the snippet in the sandbox; and question/answer pairs turned
into worked solutions whose final answer must match the seed's.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phiforge.errors import DataError

BUILTIN_TOPICS = Path(__file__).with_name("topics.txt")
BUILTIN_SEEDS = Path(__file__).with_name("seed_data")  # "builtin:web.jsonl", "builtin:functions.py", "builtin:qa.jsonl"

AUDIENCES = {
    "young children": "young children (ages 5 to 10): very simple words, everyday examples, no jargon",
    "middle school students": "middle school students: clear explanations, relatable examples",
    "college students": "college students: rigorous, with definitions, derivations and applications",
    "professionals": "professionals and researchers: precise, dense, technical",
}

# format -> (what to write, audiences it suits; () = all)
FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    "textbook": ("a section of a textbook", ()),
    "exercises": ("exercises with worked solutions", ()),
    "story": ("a short story for children", ("young children",)),
    "dialogue": ("a dialogue between Alice and Bob", ()),
    "python": ("a Python exercise with a solution and tests", ("middle school students", "college students",
                                                             "professionals")),
    "wikihow": ("a wikiHow-style how-to article", ()),
}

# formats of the seeded sources: document i of a source gets its format from the source, not by sampling
REWRITE_FORMS = ("textbook", "exercises", "qa")
SEEDED_FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    "rewrite_textbook": ("a textbook section rewritten from a web passage", ()),
    "rewrite_exercises": ("exercises with worked solutions rewritten from a web passage", ()),
    "rewrite_qa": ("questions and answers rewritten from a web passage", ()),
    "code_exercise": ("an explained Python exercise with tests, built on a given function",
                      ("middle school students", "college students", "professionals")),
    "qa_solution": ("a worked solution to a given question", ()),
}
ALL_FORMATS = {**FORMATS, **SEEDED_FORMATS}
SOURCES = ("web", "code", "qa")  # the seeded sources, in the order their documents follow the topic documents

STYLES = {
    "academic": "an academic tone: rigorous and precise",
    "narrative": "a narrative tone, telling the ideas through a concrete example or a character",
    "conversational": "a warm, conversational tone that speaks to the reader directly",
    "practical": "a practical tone, focused on steps and real-world use",
}


class SeedError(DataError):
    """Unusable seed input; the message names the file and what was expected."""


@dataclass(frozen=True)
class Topic:
    name: str
    area: str = ""
    subject: str = ""  # the taxonomy level between area and topic ("## subject" in a topics file)


@dataclass(frozen=True)
class Passage:
    id: str  # "<file name>:<record>:<hash>", stored in the record's metadata
    text: str


@dataclass(frozen=True)
class SeedItem:
    """One item of a seeded source: a web passage chunk, a code snippet or a question/answer pair."""

    source: str  # web | code | qa
    id: str  # web: "<passage id>#<chunk>"; code: "<file>:<function>" or the record's id; qa: the record's id
    title: str  # what the document is about (its metadata "topic")
    text: str = ""  # web: the chunk; code: the snippet
    question: str = ""
    answer: str = ""
    passage_id: str = ""  # web: the source passage's id


@dataclass(frozen=True)
class Seed:
    """Everything sampled for one document (all of it goes into the record's metadata)."""

    index: int
    topic: str
    area: str
    audience: str
    format: str
    style: str
    passage_id: str = ""
    passage: str = ""
    subject: str = ""
    source: str = "topics"  # or one of SOURCES
    seed_id: str = ""
    code: str = ""
    question: str = ""
    answer: str = ""

    def metadata(self) -> dict[str, Any]:
        out = {"index": self.index, "topic": self.topic, "area": self.area, "audience": self.audience,
               "format": self.format, "style": self.style, "passage_id": self.passage_id}
        if self.subject:  # only when set: documents of older configs keep their ids
            out["subject"] = self.subject
        if self.source != "topics":
            out.update({"source": self.source, "seed_id": self.seed_id})
            if self.source == "qa":
                out["seed_answer"] = self.answer
        return out


def load_topics(path: str | Path | None = None) -> list[Topic]:
    """Topics from a text file (one per line; ``# area`` starts an area, ``## subject`` a subject within it;
    a ``#`` line with a colon or over three words is a comment) or the built-in list."""
    file = Path(path) if path else BUILTIN_TOPICS
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SeedError(f"{file}: no such topics file") from None
    topics, area, subject = [], "", ""
    for line in (raw.strip() for raw in lines):
        if line.startswith("##"):
            header = line.lstrip("#").strip()
            subject = header if header and ":" not in header else subject
        elif line.startswith("#"):
            header = line.lstrip("#").strip()
            if header and ":" not in header and len(header.split()) <= 3:
                area, subject = header, ""
        elif line:
            topics.append(Topic(line, area, subject))
    if not topics:
        raise SeedError(f"{file}: the topic list is empty; expected one topic per line")
    return topics


def load_passages(path: str | Path, max_chars: int = 1000) -> list[Passage]:
    """Web passages for prompt seeding: a .txt file (blank-line separated) or JSONL with a ``text`` field.

    Each passage is cut to at most ``max_chars`` characters at a word boundary, as Cosmopedia does.
    """
    file = Path(path)
    if not file.is_file():
        raise SeedError(f"{file}: no such web-sample file (expected .txt or .jsonl)")
    raw = file.read_text(encoding="utf-8")
    if file.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise SeedError(f"{file}:{n}: not valid JSON ({err})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise SeedError(f"{file}:{n}: expected an object with a string field 'text'")
            texts.append((n, record["text"]))
    else:
        texts = list(enumerate((p for p in raw.split("\n\n") if p.strip()), 1))
    passages = [Passage(f"{file.name}:{n}:{_short_hash(t)}", _truncate(" ".join(t.split()), max_chars))
                for n, t in texts if t.strip()]
    if not passages:
        raise SeedError(f"{file}: no passages; expected text separated by blank lines or JSONL with 'text'")
    return passages


# ---- seeded sources ----------------------------------------------------------------------------------------
def _records(paths: list[str], kind: str) -> Any:
    """(file, line, record) of every JSONL/Parquet file the paths name (files, folders, globs), through the
    reader curate uses; a bad line is an error naming it."""
    from phiforge.data.curate.executor import CurateError
    from phiforge.data.curate.pipeline import find_shards
    from phiforge.data.jsonl import iter_lines

    try:
        shards = find_shards(paths)
    except CurateError as err:
        raise SeedError(f"seeds.{kind}: {err}") from None
    for shard in shards:
        for line in iter_lines(shard.path):
            if line.record is None:
                raise SeedError(f"seeds.{kind}: {line.where}: {line.error}")
            yield shard.path, line.line, line.record


def seed_paths(paths: list[str]) -> list[str]:
    """``builtin:NAME`` -> phiforge's own small seed file NAME (for recipes that run anywhere)."""
    return [str(BUILTIN_SEEDS / p.removeprefix("builtin:")) if p.startswith("builtin:") else p for p in paths]


def _field(record: dict[str, Any], name: str, where: str, kind: str) -> str:
    value = record.get(name)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and name == "answer":
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise SeedError(f"seeds.{kind}: {where}: expected a non-empty string field {name!r}")
    return value


def _title(text: str, words: int = 10) -> str:
    return " ".join(text.split()[:words])


def chunk_paragraphs(text: str, max_chars: int = 2000, min_chars: int = 200) -> list[str]:
    """``text`` cut into chunks of at most ``max_chars`` at paragraph boundaries (blank lines); a paragraph
    longer than that is cut at sentence ends, a sentence longer than that at words. Chunks under
    ``min_chars`` are dropped (navigation crumbs, captions: too little to rewrite)."""
    pieces: list[tuple[str, str]] = []  # (text, the joiner to the piece before: a paragraph break or a space)
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        if len(paragraph) <= max_chars:
            pieces += [(paragraph, "\n\n")] if paragraph else []
            continue
        joiner = "\n\n"
        for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
            while len(sentence) > max_chars:
                cut = _truncate(sentence, max_chars)
                pieces.append((cut, joiner))
                sentence, joiner = sentence[len(cut):].strip(), " "
            if sentence:
                pieces.append((sentence, joiner))
                joiner = " "
    chunks: list[str] = []
    for piece, joiner in pieces:  # greedy: whole paragraphs (or sentences of one) packed up to max_chars
        if chunks and len(chunks[-1]) + len(joiner) + len(piece) <= max_chars:
            chunks[-1] += joiner + piece
        else:
            chunks.append(piece)
    return [c for c in chunks if len(c) >= min_chars]


def load_web_chunks(paths: list[str], max_chars: int = 2000, min_chars: int = 200) -> list[SeedItem]:
    """Organic passages (``text``, optional ``id``/``title``) chunked for rewriting, in file and record order."""
    items = []
    for path, line, record in _records(seed_paths(paths), "web_rewrites"):
        where = f"{path} line {line}"
        text = _field(record, "text", where, "web_rewrites")
        pid = str(record.get("id") or f"{path.name}:{line}")
        title = record.get("title") if isinstance(record.get("title"), str) else ""
        for k, chunk in enumerate(chunk_paragraphs(text, max_chars, min_chars)):
            items.append(SeedItem("web", f"{pid}#{k}", title or _title(chunk), chunk, passage_id=pid))
    if not items:
        raise SeedError(f"seeds.web_rewrites {paths}: no passages of at least {min_chars} characters")
    return items


def load_code_seeds(paths: list[str], max_chars: int = 4000) -> list[SeedItem]:
    """Code snippets: every top-level, undecorated function of the ``.py`` files the paths name (files or
    folders), with the module's imports, and/or the ``code`` records of JSONL/Parquet files."""
    items: list[SeedItem] = []
    documents: list[str] = []
    for item in seed_paths(paths):
        p = Path(item)
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p] if p.suffix == ".py" else []
        if not files and p.suffix == ".py":
            raise SeedError(f"seeds.code_seeds: {p}: no such file")
        if p.is_dir() and not files:
            documents.append(item)  # maybe a folder of JSONL
        for file in files:
            items += _functions(file, file.relative_to(p) if p.is_dir() else Path(file.name), max_chars)
        if not p.is_dir() and p.suffix != ".py":
            documents.append(item)
    if documents:
        for path, line, record in _records(documents, "code_seeds"):
            code = _field(record, "code", f"{path} line {line}", "code_seeds")
            name = next((n.name for n in ast.walk(_parse(code, f"{path} line {line}")) if
                         isinstance(n, ast.FunctionDef)), "")
            items.append(SeedItem("code", str(record.get("id") or f"{path.name}:{line}"), name or _title(code, 6),
                                  code))
    if not items:
        raise SeedError(f"seeds.code_seeds {paths}: no functions found")
    return items


def _parse(code: str, where: str) -> ast.Module:
    try:
        return ast.parse(code)
    except SyntaxError as err:
        raise SeedError(f"seeds.code_seeds: {where}: not valid Python ({err.msg}, line {err.lineno})") from None


def _functions(file: Path, name: Path, max_chars: int) -> list[SeedItem]:
    source = file.read_text(encoding="utf-8")
    module = _parse(source, str(file))
    imports = "\n".join(ast.get_source_segment(source, n) or "" for n in module.body
                        if isinstance(n, (ast.Import, ast.ImportFrom)))
    out = []
    for node in module.body:
        if isinstance(node, ast.FunctionDef) and not node.decorator_list:
            code = ((imports + "\n\n\n") if imports else "") + (ast.get_source_segment(source, node) or "")
            if len(code) <= max_chars:
                out.append(SeedItem("code", f"{name.as_posix()}:{node.name}", node.name, code))
    return out


def load_qa_seeds(paths: list[str]) -> list[SeedItem]:
    """Question/answer pairs (``question``, ``answer``, optional ``id``) from JSONL/Parquet files."""
    items = []
    for path, line, record in _records(seed_paths(paths), "qa_seeds"):
        where = f"{path} line {line}"
        question = _field(record, "question", where, "qa_seeds")
        items.append(SeedItem("qa", str(record.get("id") or f"{path.name}:{line}"), _title(question), "",
                              question, _field(record, "answer", where, "qa_seeds")))
    if not items:
        raise SeedError(f"seeds.qa_seeds {paths}: no question/answer pairs")
    return items


def seeded_seed(index: int, item_index: int, seed: int, item: SeedItem, audiences: list[str], styles: list[str],
                forms: list[str]) -> Seed:
    """Document ``index``'s seed, built on the ``item_index``-th item of its source (web rewrites cycle the
    forms by item, so each form gets an equal share)."""
    rng = random.Random(f"phiforge-synth:{seed}:{index}")
    fmt = {"web": f"rewrite_{forms[item_index % len(forms)]}", "code": "code_exercise",
           "qa": "qa_solution"}[item.source]
    suited = [a for a in audiences if not SEEDED_FORMATS[fmt][1] or a in SEEDED_FORMATS[fmt][1]]
    audience = rng.choice(suited or list(SEEDED_FORMATS[fmt][1]))
    style = rng.choice(styles)
    return Seed(index, item.title, item.source, audience, fmt, style, item.passage_id,
                item.text if item.source == "web" else "", source=item.source, seed_id=item.id,
                code=item.text if item.source == "code" else "", question=item.question, answer=item.answer)


def _truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def check_choices(kind: str, chosen: list[str], known: dict[str, Any]) -> list[str]:
    """The configured subset of audiences/formats/styles (empty = all), with unknown names rejected."""
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise SeedError(f"seeds.{kind}: unknown {unknown}; expected some of {list(known)}")
    return list(chosen) or list(known)


def sample_seed(index: int, seed: int, topics: list[Topic], audiences: list[str], formats: list[str],
                styles: list[str], passages: list[Passage] | None = None, passage_fraction: float = 0.0,
                balance_formats: bool = False) -> Seed:
    """Document ``index``'s attributes, from an RNG of its own (independent of every other document).

    ``balance_formats`` cycles through the formats by index instead of drawing one (equal counts)."""
    rng = random.Random(f"phiforge-synth:{seed}:{index}")
    topic = rng.choice(topics)
    fmt = rng.choice(formats)
    fmt = formats[index % len(formats)] if balance_formats else fmt
    suited = [a for a in audiences if not FORMATS[fmt][1] or a in FORMATS[fmt][1]]
    audience = rng.choice(suited or list(FORMATS[fmt][1]))
    style = rng.choice(styles)
    passage = rng.choice(passages) if passages and rng.random() < passage_fraction else None
    return Seed(index, topic.name, topic.area, audience, fmt, style,
                passage.id if passage else "", passage.text if passage else "", topic.subject)
