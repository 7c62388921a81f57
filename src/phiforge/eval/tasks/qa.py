"""Short-answer generation: TriviaQA (lm-eval's task) and SQuAD v1.1 exact match (phi-1.5's row).

lm-eval has no SQuAD v1.1 exact-match task, so ``squad`` uses lm-eval's SQuAD prompt (the squadv2
task's ``Title: … Background: … Question: … Answer:``, generation until a newline) with the official
SQuAD answer normalisation (lowercase, no punctuation, no articles, single spaces), best over the golds.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from pathlib import Path
from typing import Any

from phiforge.eval.tasks.base import Instance, Task
from phiforge.eval.tasks.data import HubDataset, TaskDataError, load_split_files
from phiforge.eval.tasks.gsm8k import exact_match

Loaded = tuple[list[dict[str, Any]], list[dict[str, Any]] | None, str]


class TriviaQA(Task):
    name = "triviaqa"
    hub = HubDataset("mandarjoshi/trivia_qa", "rc.nocontext", "validation", "train")
    version = 3.0
    output_type = "generate_until"
    metrics = ("exact_match",)
    filters = ("remove_whitespace",)
    generation_kwargs = {"until": ["\n", ".", ","], "do_sample": False, "temperature": 0.0}

    def _load(self, root: Path) -> Loaded:
        return load_split_files(self.name, root, ["validation"], ["question", "answer"])

    def doc_to_text(self, doc: dict[str, Any]) -> str:
        return f"Question: {doc['question']}?\nAnswer:"

    def doc_to_target(self, doc: dict[str, Any]) -> list[str]:
        return list(doc["answer"]["aliases"])

    def instances(self, doc_id: int, doc: dict[str, Any], ctx: str) -> list[Instance]:
        return [Instance(self.name, doc_id, "generate_until", (ctx, dict(self.generation_kwargs)))]

    def process(self, doc: dict[str, Any], responses: list[Any]) -> dict[str, float]:
        answer = responses[0].strip()
        hit = any(exact_match(answer, alias, ignore_case=True, ignore_punctuation=True)
                  for alias in self.doc_to_target(doc))
        return {"exact_match,remove_whitespace": float(hit)}


def squad_normalize(text: str) -> str:
    """The official SQuAD v1.1 answer normalisation."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_f1(prediction: str, gold: str) -> float:
    pred, ref = squad_normalize(prediction).split(), squad_normalize(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _flatten_squad(task: str, file: Path) -> list[dict[str, Any]]:
    """The original dev-v1.1.json (data → paragraphs → qas) as Hugging Face squad rows."""
    import json

    rows = []
    for article in json.loads(file.read_text(encoding="utf-8"))["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                rows.append({"id": qa["id"], "title": article["title"], "context": paragraph["context"],
                             "question": qa["question"],
                             "answers": {"text": [a["text"] for a in qa["answers"]],
                                         "answer_start": [a["answer_start"] for a in qa["answers"]]}})
    if not rows:
        raise TaskDataError(f"task {task}: {file} holds no questions")
    return rows


class SQuAD(Task):
    name = "squad"
    hub = HubDataset("rajpurkar/squad", "plain_text", "validation", "train")
    output_type = "generate_until"
    metrics = ("exact_match", "f1")
    generation_kwargs = {"until": ["\n"], "do_sample": False, "temperature": 0.0}
    dataset_note = "SQuAD v1.1 validation; prompt of lm-eval's squadv2 task, official v1.1 normalisation"

    def _load(self, root: Path) -> Loaded:
        if (root.is_file() and root.suffix == ".json") or (root.is_dir() and (root / "dev-v1.1.json").is_file()):
            file = root if root.is_file() else root / "dev-v1.1.json"
            try:
                return _flatten_squad(self.name, file), None, str(file)
            except (KeyError, TypeError) as err:
                raise TaskDataError(f"task {self.name}: {file}: not the SQuAD json layout (missing {err})") from None
        return load_split_files(self.name, root, ["validation"], ["title", "context", "question", "answers"])

    def doc_to_text(self, doc: dict[str, Any]) -> str:
        return f"Title: {doc['title']}\n\nBackground: {doc['context']}\n\nQuestion: {doc['question']}\n\nAnswer:"

    def doc_to_target(self, doc: dict[str, Any]) -> list[str]:
        return list(doc["answers"]["text"]) or ["unanswerable"]

    def instances(self, doc_id: int, doc: dict[str, Any], ctx: str) -> list[Instance]:
        return [Instance(self.name, doc_id, "generate_until", (ctx, dict(self.generation_kwargs)))]

    def process(self, doc: dict[str, Any], responses: list[Any]) -> dict[str, float]:
        golds = self.doc_to_target(doc)
        answer = responses[0]
        return {"exact_match,none": max(float(squad_normalize(answer) == squad_normalize(g)) for g in golds),
                "f1,none": max(squad_f1(answer, g) for g in golds)}

