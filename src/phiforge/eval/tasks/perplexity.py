"""Perplexity and bits per byte of a text file, scored like lm-eval's wikitext task.

Each document's log-likelihood comes from lm-eval's disjoint rolling windows (the first token conditioned
on the prefix token); word_perplexity = exp(-Σll / Σwords), byte_perplexity = exp(-Σll / Σbytes),
bits_per_byte = -Σll / Σbytes / ln 2. A .txt file is one document, a .jsonl file one per record ("text").
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from phiforge.eval.tasks.base import Instance, Task
from phiforge.eval.tasks.data import TaskDataError, read_records, require


class TextPerplexity(Task):
    name = "perplexity"
    output_type = "loglikelihood_rolling"
    metrics = ("word_perplexity", "byte_perplexity", "bits_per_byte")

    def _load(self, root: Path) -> tuple[list[dict[str, Any]], None, str]:
        files = sorted(root.glob("*.txt")) if root.is_dir() else [root]
        if not files:
            raise TaskDataError(f"task {self.name}: no .txt files in {root}")
        docs: list[dict[str, Any]] = []
        for file in files:
            if file.name.endswith((".jsonl", ".jsonl.gz", ".json", ".parquet")):
                records = read_records(self.name, file)
                require(self.name, file, records, ["text"])
                docs += [{"text": r["text"]} for r in records]
            else:
                docs.append({"text": file.read_text(encoding="utf-8")})
        return docs, None, ", ".join(map(str, files))

    def doc_to_text(self, doc: dict[str, Any]) -> str:
        return doc["text"]

    def instances(self, doc_id: int, doc: dict[str, Any], ctx: str) -> list[Instance]:
        return [Instance(self.name, doc_id, "loglikelihood_rolling", (doc["text"],))]

    def context(self, doc: dict[str, Any], shots: Any) -> str:
        return ""

    def process(self, doc: dict[str, Any], responses: list[Any]) -> dict[str, Any]:
        ll, text = responses[0], doc["text"]
        words, size = len(re.split(r"\s+", text)), len(text.encode("utf-8"))
        return {"word_perplexity,none": (ll, words), "byte_perplexity,none": (ll, size),
                "bits_per_byte,none": (ll, size)}

    def aggregate(self, scores: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in scores[0]:
            ll = sum(s[key][0] for s in scores)
            units = sum(s[key][1] for s in scores)
            value = -ll / units / math.log(2) if key.startswith("bits") else math.exp(-ll / units)
            out[key] = value
            out[key.replace(",", "_stderr,")] = "N/A"
        return out
