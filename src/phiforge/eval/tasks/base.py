"""What a benchmark is: documents, lm-eval's prompt construction, the requests a document makes, its metrics.

Prompts follow lm-evaluation-harness 0.4 without a chat template, byte for byte:
``description + Σ_shots(question + target_delimiter + answer + fewshot_delimiter) + question``.
Shots come from lm-eval's samplers: ``default`` draws ``random.Random(1234).sample`` once per document in
document order (n+1 and the document itself dropped when shots and documents share a split), ``first_n``
takes the first n.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phiforge.eval.tasks.data import (
    BENCHMARKS_ENV,
    HubDataset,
    TaskDataError,
    load_hub,
    portable_source,
    resolve_root,
    where,
)

FEWSHOT_SEED = 1234


@dataclass
class Instance:
    """One request to the model, as lm-eval's Instance: kind is loglikelihood, generate_until or rolling."""

    task: str
    doc_id: int
    kind: str
    args: tuple[Any, ...]
    response: Any = None


def same_doc(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Document equality as lm-eval compares dicts (our bookkeeping field aside)."""
    return {k: v for k, v in a.items() if k != "__line__"} == {k: v for k, v in b.items() if k != "__line__"}


class FewshotSampler:
    """lm-eval's ContextSampler (``default``) and FirstNSampler (``first_n``)."""

    def __init__(self, pool: list[dict[str, Any]], kind: str = "default", seed: int = FEWSHOT_SEED) -> None:
        self.pool, self.kind = pool, kind
        self.rnd = random.Random(seed)

    def sample(self, n: int, eval_doc: dict[str, Any] | None) -> list[dict[str, Any]]:
        if n == 0:
            return []
        if self.kind == "first_n":
            pool = [d for d in self.pool if not same_doc(d, eval_doc)] if eval_doc is not None else self.pool
            return pool[:n]
        if eval_doc is None:
            return self.rnd.sample(self.pool, n)
        shots = [d for d in self.rnd.sample(self.pool, n + 1) if not same_doc(d, eval_doc)][:n]
        if len(shots) < n:  # duplicates of the document were drawn: redraw without any of them
            shots = self.rnd.sample([d for d in self.pool if not same_doc(d, eval_doc)], n)
        return shots


class Task:
    """Base class: subclasses set the class attributes and implement _load and the doc_to_* methods."""

    name = ""
    version = 1.0
    output_type = "multiple_choice"  # | "generate_until" | "loglikelihood_rolling"
    default_shots = 0
    sampler = "default"
    target_delimiter = " "
    fewshot_delimiter = "\n\n"
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    filters: tuple[str, ...] = ("none",)
    data_subdir: str | None = None  # folder under the benchmarks directory holding the original files
    hub: HubDataset | None = None  # lm-eval 0.4.13's dataset, read when no local data is found
    generation_kwargs: dict[str, Any] = {}
    dataset_note = ""  # where the data comes from, for the results' configs

    def __init__(self, path: str | Path | None = None, data_dir: str | Path | None = None) -> None:
        self.path, self.data_dir = path, data_dir
        self.docs: list[dict[str, Any]] = []
        self.shot_docs: list[dict[str, Any]] | None = None  # None: shots come from the evaluated split
        self.source = ""

    # -- data
    def load(self) -> Task:
        try:
            root = resolve_root(self.name, self.path, self.data_dir, self.data_subdir)
        except TaskDataError as local:
            if self.path is not None or self.hub is None:
                raise
            try:
                self.docs, self.shot_docs, self.source = self._from_hub(*load_hub(self.name, self.hub))
            except TaskDataError as remote:
                raise TaskDataError(f"{local}; nor from the hub: {remote}. Set ${BENCHMARKS_ENV} to a folder of "
                                    f"benchmark files, give --data {self.name}=PATH, or let `datasets` fetch "
                                    f"{self.hub.path} once (online, pip install 'phiforge[eval]')") from None
        else:
            self.docs, self.shot_docs, self.source = self._load(root)
        if not self.docs:
            raise TaskDataError(f"task {self.name}: {self.source} holds no documents")
        for i, doc in enumerate(self.docs):
            self._check_doc(i, doc)
        return self

    def _load(self, root: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, str]:
        raise NotImplementedError

    def _from_hub(self, docs: list[dict[str, Any]], shots: list[dict[str, Any]] | None, source: str
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, str]:
        """The hub rows as documents (the Hugging Face layout every loader reads); subclasses pick from them."""
        return docs, shots, source

    def _check_doc(self, index: int, doc: dict[str, Any]) -> None:
        """Render each document once at load time, so a bad record fails before any model work."""
        try:
            self.doc_to_text(doc)
            if self.output_type == "multiple_choice":
                gold, choices = self.gold(doc), self.doc_to_choice(doc)
                if not 0 <= gold < len(choices):
                    raise ValueError(f"answer index {gold} is outside the {len(choices)} choices")
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
            file = Path(self.source.split(" + ")[0])
            raise TaskDataError(f"task {self.name}: {where(file, index, doc)}: {_describe(err)}") from None

    # -- prompts (override)
    def description(self, doc: dict[str, Any]) -> str:
        return ""

    def doc_to_text(self, doc: dict[str, Any]) -> str:
        raise NotImplementedError

    def doc_to_choice(self, doc: dict[str, Any]) -> list[str]:
        raise NotImplementedError

    def doc_to_target(self, doc: dict[str, Any]) -> Any:
        """The gold index for multiple choice, the reference text for generation tasks."""
        return self.gold(doc)

    def gold(self, doc: dict[str, Any]) -> int:
        raise NotImplementedError

    def shot_pair(self, doc: dict[str, Any]) -> tuple[str, str]:
        """(question, answer) of a document used as a shot."""
        target = self.doc_to_target(doc)
        if isinstance(target, int):
            return self.doc_to_text(doc), self.doc_to_choice(doc)[target]
        return self.doc_to_text(doc), target[0] if isinstance(target, list) else target

    def context(self, doc: dict[str, Any], shots: Sequence[dict[str, Any]]) -> str:
        text = self.description(doc)
        for shot in shots:
            question, answer = self.shot_pair(shot)
            text += question + self.target_delimiter + answer + self.fewshot_delimiter
        return text + self.doc_to_text(doc)

    def fewshot_sampler(self, seed: int = FEWSHOT_SEED) -> FewshotSampler:
        pool = self.docs if self.shot_docs is None else self.shot_docs
        return FewshotSampler(pool, self.sampler, seed)

    def shots_for(self, sampler: FewshotSampler, doc: dict[str, Any], k: int) -> list[dict[str, Any]]:
        if k > len(sampler.pool) - (1 if self.shot_docs is None else 0):
            raise TaskDataError(f"task {self.name}: {k} shots asked but the shot pool has {len(sampler.pool)} "
                                f"documents ({self.source})")
        return sampler.sample(k, doc if self.shot_docs is None else None)

    # -- requests and scoring
    def instances(self, doc_id: int, doc: dict[str, Any], ctx: str) -> list[Instance]:
        return [Instance(self.name, doc_id, "loglikelihood", (ctx, self.target_delimiter + choice))
                for choice in self.doc_to_choice(doc)]

    def process(self, doc: dict[str, Any], responses: list[Any]) -> dict[str, float]:
        """Per-document metrics keyed 'metric,filter' from the responses of its instances."""
        lls = np.array([r[0] for r in responses])
        lengths = np.array([float(len(c)) for c in self.doc_to_choice(doc)])
        gold = self.gold(doc)
        out = {"acc,none": float(np.argmax(lls) == gold)}
        if "acc_norm" in self.metrics:
            out["acc_norm,none"] = float(np.argmax(lls / lengths) == gold)
        return out

    def score_docs(self, docs: list[dict[str, Any]], responses: list[list[Any]]) -> list[dict[str, Any]]:
        """Metrics of every document (code tasks override this to run programs in parallel)."""
        return [self.process(doc, resp) for doc, resp in zip(docs, responses)]

    def log_fields(self, doc: dict[str, Any], responses: list[Any]) -> dict[str, Any]:
        """Extra per-sample log fields, e.g. the filtered answers of a generation task."""
        return {}

    def aggregate(self, scores: list[dict[str, Any]]) -> dict[str, Any]:
        """lm-eval's mean aggregation with the standard error of the mean ('N/A' for one document)."""
        out: dict[str, Any] = {}
        for key in scores[0] if scores else []:
            metric, _, filt = key.partition(",")
            values = [s[key] for s in scores]
            out[key] = sum(values) / len(values)
            out[f"{metric}_stderr,{filt}"] = mean_stderr(values) if len(values) > 1 else "N/A"
        return out

    def config(self, num_fewshot: int) -> dict[str, Any]:
        """The task's settings in the shape of lm-eval's results['configs'][task]."""
        return {"task": self.name, "dataset_path": portable_source(self.source), "output_type": self.output_type,
                "target_delimiter": self.target_delimiter, "fewshot_delimiter": self.fewshot_delimiter,
                "num_fewshot": num_fewshot, "fewshot_config": {"sampler": self.sampler},
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                for m in self.metrics],
                **({"generation_kwargs": self.generation_kwargs} if self.generation_kwargs else {}),
                **({"dataset_note": self.dataset_note} if self.dataset_note else {}),
                "metadata": {"version": self.version}}

    def group_of(self, doc: dict[str, Any]) -> str | None:
        """Subtask a document belongs to (MMLU subjects); None for flat tasks."""
        return None


def mean_stderr(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof 1) over sqrt(n), as lm-eval's mean_stderr."""
    mu = sum(values) / len(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (len(values) - 1)) / math.sqrt(len(values))


def _describe(err: Exception) -> str:
    if isinstance(err, KeyError):
        return f"missing field {err.args[0]!r}"
    return f"{type(err).__name__}: {err}"


def pick(doc: dict[str, Any], *names: str) -> Any:
    """The first field present among ``names`` (original vs Hugging Face spellings)."""
    for name in names:
        if name in doc:
            return doc[name]
    raise KeyError(names[0])
