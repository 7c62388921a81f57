"""Test corpora for curation, built from real text in shared/ (research notes, benchmark files).

Educational documents: paragraphs of the research notes, GSM8K *train* solutions and MMLU *dev* questions
(never the evaluated splits, so the clean text stays clean). Low-value documents: seeded adverts and chatter.
Contamination plants take GSM8K test, PIQA validation and MMLU val items verbatim, re-punctuated or edited.
"""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

from conftest import SHARED

BENCH = SHARED / "benchmarks"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def research_paragraphs(min_chars: int = 300) -> list[str]:
    out = []
    for file in sorted((SHARED / "research").glob("*.md")):
        for block in re.split(r"\n\s*\n", file.read_text()):
            text = " ".join(line.strip("#-| ") for line in block.splitlines()).strip()
            if len(text) >= min_chars and text.isascii():
                out.append(text)
    return out


def gsm8k_train(n: int) -> list[str]:
    rows = _jsonl(BENCH / "gsm8k" / "train.jsonl")[:n]
    return [f"{r['question']}\n{re.sub(r'<<[^>]*>>', '', r['answer'])}" for r in rows]


def mmlu_dev(n: int) -> list[str]:
    docs = []
    for file in sorted((BENCH / "mmlu" / "dev").glob("*.csv")):
        with open(file, newline="", encoding="utf-8") as f:
            for row in csv.reader(f):
                docs.append(f"{row[0]} The options are {row[1]}, {row[2]}, {row[3]} or {row[4]}; the answer is "
                            f"{row[1 + 'ABCD'.index(row[5])]}.")
    return docs[:n]


ADVERT = ["Buy now", "Limited offer", "Click here", "Best prices", "Free shipping", "Subscribe today",
          "Win a free phone", "Hot deals", "Call now", "Act fast", "Only today", "Cheap watches"]
CHAT = ["lol", "omg", "anyway", "going to the mall", "who wants to come", "so cute", "brb", "my cat",
        "new shoes", "party tonight", "cant wait", "weekend vibes", "so bored", "haha"]


def low_value(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = ADVERT if i % 2 == 0 else CHAT
        docs.append(" ".join(rng.choice(words) + rng.choice(["!", "!!", "...", " :)", "?", ""])
                             for _ in range(rng.randint(12, 30))))
    return docs


def clean_corpus(n: int, seed: int = 0) -> list[str]:
    """Real educational text that is not from an evaluated split, shuffled."""
    texts = research_paragraphs() + gsm8k_train(n) + mmlu_dev(n)
    random.Random(seed).shuffle(texts)
    return texts[:n]


def mixed_corpus(n_edu: int, n_low: int, seed: int = 0) -> list[dict]:
    """Documents with a ``kind`` field (edu / low) for end-to-end checks."""
    docs = [{"text": t, "kind": "edu"} for t in clean_corpus(n_edu, seed)]
    docs += [{"text": t, "kind": "low"} for t in low_value(n_low, seed)]
    random.Random(seed + 1).shuffle(docs)
    return [{"id": f"doc{i}", **d} for i, d in enumerate(docs)]


# ---- contamination plants --------------------------------------------------------------------------------
def benchmark_items(n: int, seed: int = 0) -> list[tuple[str, int, str]]:
    """(task, doc index in the harness's order, text as a web page would show it) for GSM8K, PIQA, MMLU."""
    rng = random.Random(seed)
    gsm = _jsonl(BENCH / "gsm8k" / "test.jsonl")
    piqa = _jsonl(BENCH / "piqa" / "valid.jsonl")
    labels = [int(x) for x in (BENCH / "piqa" / "valid-labels.lst").read_text().split()]
    mmlu = []
    for file in sorted((BENCH / "mmlu" / "val").glob("*.csv")):
        with open(file, newline="", encoding="utf-8") as f:
            mmlu += list(csv.reader(f))
    out = []
    for i in rng.sample(range(len(gsm)), n):
        out.append(("gsm8k", i, f"{gsm[i]['question']} {gsm[i]['answer']}"))
    for i in rng.sample(range(len(piqa)), n):
        sol = piqa[i]["sol1" if labels[i] == 0 else "sol2"]
        out.append(("piqa", i, f"{piqa[i]['goal']} {sol}"))
    for i in rng.sample(range(len(mmlu)), n):
        q = mmlu[i]
        out.append(("mmlu", i, f"{q[0]} (A) {q[1]} (B) {q[2]} (C) {q[3]} (D) {q[4]}. Correct answer: "
                               f"{q[1 + 'ABCD'.index(q[5])]}"))
    return out


def repunctuate(text: str, rng: random.Random) -> str:
    text = re.sub(r"[.,;:?!]", lambda m: rng.choice([" ", ";", " -", ",", "."]), text)
    return text.upper() if rng.random() < 0.5 else text.replace("  ", " ")


def small_edits(text: str, rng: random.Random, rate: float = 0.05) -> str:
    words = text.split()
    for i in range(len(words)):
        r = rng.random()
        if r < rate / 2:
            words[i] = rng.choice(["the", "a", "very", "really"])
        elif r < rate:
            words[i] = words[i] + " indeed"
    return " ".join(words)


def wrap(text: str, rng: random.Random, filler: list[str]) -> str:
    """A benchmark item inside an ordinary page: clean text before and after."""
    return f"{rng.choice(filler)}\n\n{text}\n\n{rng.choice(filler)}"
