"""The benchmark registry: task name -> Task class, plus MMLU's per-subject names."""

from __future__ import annotations

from pathlib import Path

from phiforge.errors import EvalError
from phiforge.eval.tasks.base import Instance, Task
from phiforge.eval.tasks.code import MBPP, HumanEval
from phiforge.eval.tasks.commonsense import TASKS as COMMONSENSE
from phiforge.eval.tasks.data import TaskDataError
from phiforge.eval.tasks.gsm8k import GSM8K
from phiforge.eval.tasks.mmlu import MMLU, SUBJECTS
from phiforge.eval.tasks.perplexity import TextPerplexity
from phiforge.eval.tasks.qa import SQuAD, TriviaQA


class UnknownTaskError(EvalError):
    pass


def _registry() -> dict[str, type[Task]]:
    from phiforge.eval.redteam import RedTeam
    from phiforge.eval.safety import ToxiGenSafety

    classes = [*COMMONSENSE.values(), MMLU, GSM8K, HumanEval, MBPP, TriviaQA, SQuAD, TextPerplexity, ToxiGenSafety,
               RedTeam]
    return {cls.name: cls for cls in classes}


def task_names() -> list[str]:
    """Every task name get_task accepts (MMLU subjects as mmlu_<subject>)."""
    return sorted(_registry()) + [f"mmlu_{s}" for s in SUBJECTS]


def get_task(name: str, path: str | Path | None = None, data_dir: str | Path | None = None) -> Task:
    """A task object (data not loaded yet); unknown names fail with the list of known ones."""
    registry = _registry()
    if name in registry:
        return registry[name](path, data_dir)
    if name.startswith("mmlu_") and name[5:] in SUBJECTS:
        return MMLU(path, data_dir, subjects=[name[5:]])
    close = [n for n in registry if n.startswith(name[:3])]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UnknownTaskError(f"unknown task {name!r}{hint}; known tasks: {', '.join(sorted(registry))}, "
                           f"mmlu_<subject>")


__all__ = ["Instance", "Task", "TaskDataError", "UnknownTaskError", "get_task", "task_names"]
