"""The phi-1.5 report's zero-shot multiple-choice sets, as lm-evaluation-harness 0.4 defines them.

piqa, social_iqa, hellaswag, winogrande (partial scoring), openbookqa, arc_easy, arc_challenge, boolq.
Documents are read in the original release formats where those differ (PIQA/SIQA's .jsonl + .lst,
ARC/OpenBookQA's nested question objects, BoolQ's boolean answer) or in the Hugging Face layouts
lm-eval reads, and normalised to the latter's field names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from phiforge.eval.tasks.base import Instance, Task, pick
from phiforge.eval.tasks.data import (
    HubDataset,
    TaskDataError,
    find_file,
    load_split_files,
    read_labels,
    read_records,
    require,
)

Loaded = tuple[list[dict[str, Any]], list[dict[str, Any]] | None, str]


def _with_lst_labels(task: str, root: Path, stem: str, fields: list[str], offset: int) -> Loaded | None:
    """Original PIQA/SIQA release: {stem}.jsonl plus {stem}-labels.lst; None if that is not the layout."""
    if not (root.is_dir() and (root / f"{stem}.jsonl").is_file()):
        return None
    file, label_file = root / f"{stem}.jsonl", root / f"{stem}-labels.lst"
    if not label_file.is_file():
        raise TaskDataError(f"task {task}: {file} needs its labels file {label_file}, which does not exist")
    docs = read_records(task, file)
    require(task, file, docs, fields)
    for doc, label in zip(docs, read_labels(task, label_file, len(docs))):
        doc["label"] = label + offset
    return docs, None, f"{file} + {label_file}"


class PIQA(Task):
    name = "piqa"
    hub = HubDataset("baber/piqa", None, "validation", "train")
    data_subdir = "piqa"

    def _load(self, root: Path) -> Loaded:
        fields = ["goal", "sol1", "sol2"]
        return (_with_lst_labels(self.name, root, "valid", fields, 0)
                or load_split_files(self.name, root, ["validation", "valid"], [*fields, "label"]))

    def doc_to_text(self, doc: dict[str, Any]) -> str:
        return f"Question: {doc['goal']}\nAnswer:"

    def doc_to_choice(self, doc: dict[str, Any]) -> list[str]:
        return [doc["sol1"], doc["sol2"]]

    def gold(self, doc: dict[str, Any]) -> int:
        return int(doc["label"])


class SocialIQA(Task):
    name = "social_iqa"
    hub = HubDataset("lighteval/siqa", None, "validation", "train")
    version = 0.0
    metrics = ("acc",)

    def _load(self, root: Path) -> Loaded:
        fields = ["context", "question", "answerA", "answerB", "answerC"]
        return (_with_lst_labels(self.name, root, "dev", fields, 0)
                or load_split_files(self.name, root, ["validation", "dev"], [*fields, "label"]))

    def doc_to_text(self, doc: dict[str, Any]) -> str:
        return f"Q: {doc['context']} {doc['question']}\nA:"

    def doc_to_choice(self, doc: dict[str, Any]) -> list[str]:
        return [doc["answerA"], doc["answerB"], doc["answerC"]]

    def gold(self, doc: dict[str, Any]) -> int:
        return int(doc["label"]) - 1  # labels are 1-based


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaning: WikiHow '[title]' markers become '. ', other brackets go."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


class HellaSwag(Task):
    name = "hellaswag"
    hub = HubDataset("Rowan/hellaswag", None, "validation", "train")

    def _load(self, root: Path) -> Loaded:
        fields = ["activity_label", "ctx_a", "ctx_b", "endings", "label"]
        return load_split_files(self.name, root, ["validation", "hellaswag_val", "val"], fields)

    def doc_to_text(self, doc: dict[str, Any]) -> str:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return hellaswag_preprocess(doc["activity_label"] + ": " + ctx)

    def doc_to_choice(self, doc: dict[str, Any]) -> list[str]:
        return [hellaswag_preprocess(e) for e in doc["endings"]]

    def gold(self, doc: dict[str, Any]) -> int:
        return int(doc["label"])


class WinoGrande(Task):
    """Partial scoring: the two contexts end with each option; only the text after the blank is scored."""

    name = "winogrande"
    metrics = ("acc",)
    hub = HubDataset("allenai/winogrande", "winogrande_xl", "validation", "train")

    def _load(self, root: Path) -> Loaded:
        return load_split_files(self.name, root, ["validation", "dev"], ["sentence", "option1", "option2", "answer"])

    def doc_to_text(self, doc: dict[str, Any]) -> str:
        return self.doc_to_choice(doc)[self.gold(doc)]

    def doc_to_choice(self, doc: dict[str, Any]) -> list[str]:
        i = doc["sentence"].index("_")
        return [doc["sentence"][:i] + doc["option1"], doc["sentence"][:i] + doc["option2"]]

    def continuation(self, doc: dict[str, Any]) -> str:
        i = doc["sentence"].index("_") + 1
        return doc["sentence"][i:].strip()

    def gold(self, doc: dict[str, Any]) -> int:
        return {"1": 0, "2": 1}[str(doc["answer"])]

    def shot_pair(self, doc: dict[str, Any]) -> tuple[str, str]:
        return self.doc_to_text(doc), self.continuation(doc)

    def context(self, doc: dict[str, Any], shots: list[dict[str, Any]]) -> list[str]:  # type: ignore[override]
        head = "".join(q + self.target_delimiter + a + self.fewshot_delimiter for q, a in map(self.shot_pair, shots))
        return [head + option for option in self.doc_to_choice(doc)]

    def instances(self, doc_id: int, doc: dict[str, Any], ctx: list[str]) -> list[Instance]:  # type: ignore[override]
        cont = self.target_delimiter + self.continuation(doc)
        return [Instance(self.name, doc_id, "loglikelihood", (c, cont)) for c in ctx]

    def process(self, doc: dict[str, Any], responses: list[Any]) -> dict[str, float]:
        return {"acc,none": float(np.argmax([r[0] for r in responses]) == self.gold(doc))}


def _hf_or_original(task: str, root: Path, fields: list[str], original: list[str]) -> Loaded:
    """The HF layout's test (+ train) files, else the original release's test file (no shots)."""
    try:
        return load_split_files(task, root, ["test"], fields)
    except TaskDataError:
        if root.is_file():
            raise
    file = find_file(task, root, original)
    docs = read_records(task, file)
    require(task, file, docs, fields)
    return docs, None, str(file)


def _choices(doc: dict[str, Any]) -> dict[str, list[str]]:
    """{'text': [...], 'label': [...]} from the HF layout or the original nested question object."""
    if "choices" in doc:
        return doc["choices"]
    listed = doc["question"]["choices"]
    return {"text": [c["text"] for c in listed], "label": [c["label"] for c in listed]}


def _original_stem(doc: dict[str, Any]) -> str | None:
    q = doc.get("question")
    return q["stem"] if isinstance(q, dict) else None


class ARCEasy(Task):
    name = "arc_easy"
    subset = "ARC-Easy"
    hub = HubDataset("allenai/ai2_arc", "ARC-Easy", "test", "train")

    def _load(self, root: Path) -> Loaded:
        return _hf_or_original(self.name, root, ["question", "answerKey"],
                               [f"{self.subset}-Test.jsonl", "*-Test.jsonl", "*/*-Test.jsonl"])

    def doc_to_text(self, doc: dict[str, Any]) -> str:
        stem = _original_stem(doc)
        return f"Question: {stem if stem is not None else doc['question']}\nAnswer:"

    def doc_to_choice(self, doc: dict[str, Any]) -> list[str]:
        return list(_choices(doc)["text"])

    def gold(self, doc: dict[str, Any]) -> int:
        return list(_choices(doc)["label"]).index(doc["answerKey"])


class ARCChallenge(ARCEasy):
    name = "arc_challenge"
    subset = "ARC-Challenge"
    hub = HubDataset("allenai/ai2_arc", "ARC-Challenge", "test", "train")


class OpenBookQA(Task):
    name = "openbookqa"
    hub = HubDataset("allenai/openbookqa", "main", "test", "train")

    def _load(self, root: Path) -> Loaded:
        return _hf_or_original(self.name, root, ["answerKey"], ["test_complete.jsonl", "*/*/test.jsonl"])

    def doc_to_text(self, doc: dict[str, Any]) -> str:
        stem = _original_stem(doc)
        return stem if stem is not None else doc["question_stem"]

    def doc_to_choice(self, doc: dict[str, Any]) -> list[str]:
        return list(_choices(doc)["text"])

    def gold(self, doc: dict[str, Any]) -> int:
        return list(_choices(doc)["label"]).index(doc["answerKey"].lstrip())


class BoolQ(Task):
    name = "boolq"
    hub = HubDataset("aps/super_glue", "boolq", "validation", "train")
    version = 2.0
    metrics = ("acc",)

    def _load(self, root: Path) -> Loaded:
        return load_split_files(self.name, root, ["validation", "dev", "val"], ["question", "passage"])

    def doc_to_text(self, doc: dict[str, Any]) -> str:
        return f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"

    def doc_to_choice(self, doc: dict[str, Any]) -> list[str]:
        return ["no", "yes"]

    def gold(self, doc: dict[str, Any]) -> int:
        return int(pick(doc, "label", "answer"))  # the original release stores answer: true/false


TASKS = {cls.name: cls for cls in (PIQA, SocialIQA, HellaSwag, WinoGrande, ARCEasy, ARCChallenge, OpenBookQA, BoolQ)}
