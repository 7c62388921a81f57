"""GSM8K as lm-evaluation-harness 0.4 runs it: 5 random train shots, greedy generation, two extractions.

``strict-match`` takes the number after the first ``#### ``; ``flexible-extract`` takes the last number
in the text. Both are compared to the full reference with lm-eval's exact_match settings (case folded,
commas, ``$``, everything up to ``#### `` and a final period removed on both sides).
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any

from phiforge.eval.tasks.base import Instance, Task
from phiforge.eval.tasks.data import HubDataset, load_split_files

FALLBACK = "[invalid]"
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")
FILTERS = {"strict-match": (STRICT, 0), "flexible-extract": (FLEXIBLE, -1)}


def regex_extract(text: str, pattern: re.Pattern[str], group_select: int = 0, fallback: str = FALLBACK) -> str:
    """lm-eval's RegexFilter on one response: the selected match (first non-empty group), stripped."""
    matches = pattern.findall(text)
    if not matches:
        return fallback
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), fallback)
    return match.strip()


def normalize(text: str, regexes_to_ignore: tuple[str, ...] = (), ignore_case: bool = False,
              ignore_punctuation: bool = False) -> str:
    for pattern in regexes_to_ignore:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    return text


def exact_match(prediction: str, reference: str, **settings: Any) -> float:
    """lm-eval's exact_match (the HF evaluate metric) for one pair."""
    return float(normalize(prediction, **settings) == normalize(reference, **settings))


def extract_answers(text: str) -> dict[str, str]:
    """The answer each GSM8K filter pulls out of a generation."""
    return {name: regex_extract(text, pattern, group) for name, (pattern, group) in FILTERS.items()}


class GSM8K(Task):
    name = "gsm8k"
    hub = HubDataset("openai/gsm8k", "main", "test", "train")
    version = 3.0
    output_type = "generate_until"
    default_shots = 5
    metrics = ("exact_match",)
    filters = tuple(FILTERS)
    data_subdir = "gsm8k"
    generation_kwargs = {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False, "temperature": 0.0}

    def _load(self, root: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, str]:
        return load_split_files(self.name, root, ["test"], ["question", "answer"])

    def doc_to_text(self, doc: dict[str, Any]) -> str:
        return f"Question: {doc['question']}\nAnswer:"

    def doc_to_target(self, doc: dict[str, Any]) -> str:
        return doc["answer"]

    def instances(self, doc_id: int, doc: dict[str, Any], ctx: str) -> list[Instance]:
        return [Instance(self.name, doc_id, "generate_until", (ctx, dict(self.generation_kwargs)))]

    def process(self, doc: dict[str, Any], responses: list[Any]) -> dict[str, float]:
        settings = {"regexes_to_ignore": IGNORE, "ignore_case": True}
        return {f"exact_match,{name}": exact_match(answer, doc["answer"], **settings)
                for name, answer in extract_answers(responses[0]).items()}

    def log_fields(self, doc: dict[str, Any], responses: list[Any]) -> dict[str, Any]:
        return {"filtered_resps": extract_answers(responses[0])}
