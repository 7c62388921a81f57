"""MMLU in lm-evaluation-harness 0.4's default format.

Per subject: the header ``The following are multiple choice questions (with answers) about {subject}.``,
the first k dev questions as shots (``first_n``), the letters " A".." D" scored, acc per subject, and the
group score weighted by subject size (which is the plain mean over all questions). phi-1.5 reports 2-shot.
Data: the release CSVs (dev/ val/ test/ folders of ``{subject}_{split}.csv``, no header) or a Hugging
Face ``cais/mmlu`` layout (files per split with question, subject, choices, answer).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from phiforge.eval.tasks.base import FewshotSampler, Task
from phiforge.eval.tasks.data import HubDataset, TaskDataError, find_file, read_records, require, split_patterns

CATEGORIES = {
    "stem": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
            "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
            "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "other": "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
             "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
    "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics high_school_psychology "
                       "human_sexuality professional_psychology public_relations security_studies sociology "
                       "us_foreign_policy",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                  "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                  "prehistory professional_law world_religions",
}
CATEGORY_OF = {subject: cat for cat, names in CATEGORIES.items() for subject in names.split()}
SUBJECTS = sorted(CATEGORY_OF)
LETTERS = ["A", "B", "C", "D"]


def _read_csv_split(task: str, folder: Path, split: str, subjects: list[str]) -> tuple[list[dict[str, Any]], str]:
    docs = []
    for subject in subjects:
        file = folder / f"{subject}_{split}.csv"
        if not file.is_file():
            raise TaskDataError(f"task {task}: {file} does not exist")
        with open(file, newline="", encoding="utf-8") as f:
            for row_no, row in enumerate(csv.reader(f), start=1):
                if len(row) != 6 or row[5] not in LETTERS:
                    raise TaskDataError(f"task {task}: {file} row {row_no}: expected question, 4 choices and an "
                                        f"answer letter A-D, got {len(row)} columns")
                docs.append({"question": row[0], "subject": subject, "choices": row[1:5],
                             "answer": LETTERS.index(row[5]), "__line__": row_no})
    return docs, str(folder)


class MMLU(Task):
    name = "mmlu"
    hub = HubDataset("cais/mmlu", "all", "test", "dev")
    metrics = ("acc",)
    sampler = "first_n"
    data_subdir = "mmlu"
    dataset_note = "test split when present, else validation"

    def __init__(self, path: str | Path | None = None, data_dir: str | Path | None = None,
                 subjects: list[str] | None = None) -> None:
        super().__init__(path, data_dir)
        self.subjects = subjects or SUBJECTS
        if subjects and len(subjects) == 1:
            self.name = f"mmlu_{subjects[0]}"

    def _load(self, root: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, str]:
        if root.is_dir() and (root / "dev").is_dir():
            split = next((s for s in ("test", "val") if (root / s).is_dir()), None)
            if split is None:
                raise TaskDataError(f"task {self.name}: {root} has dev/ but neither test/ nor val/")
            docs, source = _read_csv_split(self.name, root / split, split, self.subjects)
            shots, _ = _read_csv_split(self.name, root / "dev", "dev", self.subjects)
            return docs, shots, f"{source} + {root / 'dev'}"
        file = find_file(self.name, root, split_patterns("test", "validation"))
        shot_file = find_file(self.name, root.parent if root.is_file() else root, split_patterns("dev"))
        docs, shots = read_records(self.name, file), read_records(self.name, shot_file)
        for f, records in ((file, docs), (shot_file, shots)):
            require(self.name, f, records, ["question", "subject", "choices", "answer"])
        wanted = set(self.subjects)
        return ([d for d in docs if d["subject"] in wanted], [d for d in shots if d["subject"] in wanted],
                f"{file} + {shot_file}")

    def _from_hub(self, docs: list[dict[str, Any]], shots: list[dict[str, Any]] | None, source: str
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, str]:
        wanted = set(self.subjects)
        return [d for d in docs if d["subject"] in wanted], [d for d in shots or [] if d["subject"] in wanted], source

    def description(self, doc: dict[str, Any]) -> str:
        subject = doc["subject"].replace("_", " ")
        return f"The following are multiple choice questions (with answers) about {subject}.\n\n"

    def doc_to_text(self, doc: dict[str, Any]) -> str:
        c = doc["choices"]
        return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"

    def doc_to_choice(self, doc: dict[str, Any]) -> list[str]:
        return LETTERS

    def gold(self, doc: dict[str, Any]) -> int:
        answer = doc["answer"]
        return LETTERS.index(answer) if isinstance(answer, str) and answer in LETTERS else int(answer)

    def fewshot_sampler(self, seed: int = 0) -> FewshotSampler:
        return FewshotSampler(self.shot_docs or [], "first_n", seed)

    def shots_for(self, sampler: FewshotSampler, doc: dict[str, Any], k: int) -> list[dict[str, Any]]:
        pool = [d for d in sampler.pool if d["subject"] == doc["subject"]]
        if k > len(pool):
            raise TaskDataError(f"task {self.name}: {k} shots asked but subject {doc['subject']} has {len(pool)} "
                                f"dev questions")
        return pool[:k]

    def group_of(self, doc: dict[str, Any]) -> str | None:
        return f"mmlu_{doc['subject']}"
