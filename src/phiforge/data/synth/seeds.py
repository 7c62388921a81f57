"""Seeds: what each synthetic document is about and for whom, sampled combinatorially.

A document's seed is a topic (from a file or the built-in list of 300 across six areas) crossed with
an audience, a format and a style, and optionally a web passage placed in the prompt (Cosmopedia
style). Document ``i`` draws from its own RNG seeded by ``(seed, i)``, so the plan of a run is fixed by
its config alone: a resumed or re-sharded run asks for exactly the same documents.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILTIN_TOPICS = Path(__file__).with_name("topics.txt")

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

STYLES = {
    "academic": "an academic tone: rigorous and precise",
    "narrative": "a narrative tone, telling the ideas through a concrete example or a character",
    "conversational": "a warm, conversational tone that speaks to the reader directly",
    "practical": "a practical tone, focused on steps and real-world use",
}


class SeedError(ValueError):
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

    def metadata(self) -> dict[str, Any]:
        return {"index": self.index, "topic": self.topic, "area": self.area, "audience": self.audience,
                "format": self.format, "style": self.style, "passage_id": self.passage_id}


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
                passage.id if passage else "", passage.text if passage else "")
