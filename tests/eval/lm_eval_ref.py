"""The reference side of the parity tests: lm-evaluation-harness's own tasks on our local files.

Each task is lm-eval's YAML (from the installed package) with only the dataset location replaced by
local JSONL files, so prompts, choices, shots and metrics are lm-eval's code, not a copy of it.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.task import ConfigurableTask  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

TASKS_DIR = Path(lm_eval.__file__).parent / "tasks"
HF_DATA = Path(__file__).parent / "data" / "hf"
YAMLS = {
    "piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
    "boolq": "super_glue/boolq/default.yaml", "social_iqa": "siqa/siqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml", "winogrande": "winogrande/default.yaml", "gsm8k": "gsm8k/gsm8k.yaml",
    "triviaqa": "triviaqa/default.yaml", "humaneval": "humaneval/humaneval.yaml", "mbpp": "mbpp/mbpp.yaml",
    "mmlu": "mmlu/default/_default_template_yaml",
}
CODE_TASKS = ("humaneval", "mbpp")


def lm_eval_task(name: str, data_files: dict[str, str], num_fewshot: int | None = None,
                 **overrides: Any) -> ConfigurableTask:
    """lm-eval's task ``name`` reading ``data_files`` (split -> local JSONL)."""
    # the code tasks' metric module downloads HF evaluate's code_eval at import: keep their functions unresolved
    cfg = load_yaml(TASKS_DIR / YAMLS[name], resolve_func=name not in CODE_TASKS)
    if name in CODE_TASKS:
        cfg["metric_list"] = [{"metric": "exact_match"}]
        cfg.pop("filter_list", None)
    for split in ("training_split", "validation_split", "test_split"):  # splits the local files lack
        if cfg.get(split) not in data_files:
            cfg[split] = None
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": data_files}, **overrides)
    task = ConfigurableTask(config=cfg)
    if num_fewshot is not None:
        task.set_config("num_fewshot", num_fewshot)
    task.set_fewshot_seed(1234)
    return task


def build(task: ConfigurableTask, limit: int | None) -> dict[int, list[Instance]]:
    """lm-eval's instances per document, in request order."""
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    per_doc: dict[int, list[Instance]] = {}
    for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
        per_doc.setdefault(inst.doc_id, []).append(inst)
    return per_doc


def accuracy(task: ConfigurableTask, per_doc: dict[int, list[Instance]], responses: list[Any]) -> dict[str, float]:
    """lm-eval's own process_results on ``responses`` (flat, in per_doc order), averaged per metric."""
    docs = list(task.eval_docs)
    it = iter(responses)
    totals: dict[str, list[float]] = {}
    for doc_id, insts in per_doc.items():
        scores = task.process_results(docs[doc_id], [next(it) for _ in insts])
        for key, value in scores.items():
            totals.setdefault(key, []).append(value)
    return {k: sum(v) / len(v) for k, v in totals.items()}


# ---- local copies of the original-format data in the layouts lm-eval reads ----------------------------------
def _write(path: Path, rows: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def piqa_files(shared: Path, out: Path) -> dict[str, str]:
    docs = [json.loads(line) for line in open(shared / "benchmarks/piqa/valid.jsonl")]
    labels = [int(x) for x in open(shared / "benchmarks/piqa/valid-labels.lst").read().split()]
    rows = [{**d, "label": lab} for d, lab in zip(docs, labels)]
    return {"validation": _write(out / "piqa_validation.jsonl", rows)}


def mmlu_files(shared: Path, out: Path, subject: str, split: str = "val") -> dict[str, str]:
    def rows(which: str) -> list[dict[str, Any]]:
        with open(shared / f"benchmarks/mmlu/{which}/{subject}_{which}.csv", newline="") as f:
            return [{"question": r[0], "subject": subject, "choices": r[1:5], "answer": "ABCD".index(r[5])}
                    for r in csv.reader(f)]
    return {"test": _write(out / f"mmlu_{subject}_test.jsonl", rows(split)),
            "dev": _write(out / f"mmlu_{subject}_dev.jsonl", rows("dev"))}


def mmlu_task(subject: str, files: dict[str, str], num_fewshot: int) -> ConfigurableTask:
    description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return lm_eval_task("mmlu", files, num_fewshot, task=f"mmlu_{subject}", description=description)


def mbpp_files(shared: Path, out: Path) -> tuple[dict[str, str], list[dict[str, Any]]]:
    records = [json.loads(line) for line in open(shared / "benchmarks/mbpp/mbpp.jsonl")]
    test = [r for r in records if 11 <= r["task_id"] <= 510]
    shots = [{**r, "is_fewshot": True} for i in (2, 3, 4) for r in records if r["task_id"] == i]
    return {"test": _write(out / "mbpp_test.jsonl", test)}, shots
