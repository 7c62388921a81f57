"""Published phi numbers (shared/research/eval.md §3), shown beside ours in the results table.

Values are fractions (0.734 = 73.4 %). Only the phi-1.5 rows were measured with lm-evaluation-harness
(zero-shot, MMLU 2-shot); phi-2 (as quoted on the Phi-3 card) and phi-3 used a Microsoft-internal
pipeline, phi-4 OpenAI simple-evals, phi-1.5's GSM8K is "via coding" and its SQuAD prompt is unknown:
those cells are context, not targets. Cells marked unverified were recalled from the PDF, not checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TASK_ORDER = ("winogrande", "arc_easy", "arc_challenge", "boolq", "social_iqa", "piqa", "hellaswag", "mmlu",
              "openbookqa", "squad", "gsm8k", "humaneval", "mbpp", "triviaqa")


@dataclass(frozen=True)
class Published:
    source: str
    setting: str
    scores: dict[str, float]
    unverified: frozenset[str] = field(default_factory=frozenset)
    lm_eval_comparable: frozenset[str] = field(default_factory=frozenset)


def _row(values: str) -> dict[str, float]:
    return {task: float(v) for task, v in zip(TASK_ORDER, values.split()) if v != "-"}


_PHI15_LEH = frozenset(TASK_ORDER[:9])
PUBLISHED: dict[str, Published] = {
    "phi-1.5": Published("arXiv 2309.05463 Tables 2-4", "LM-Eval zero-shot; MMLU 2-shot; GSM8K via coding",
                         _row(".734 .756 .444 .758 .526 .766 .476 .376 .372 .72 .402 .341 .377"),
                         lm_eval_comparable=_PHI15_LEH),
    "phi-1.5-web": Published("arXiv 2309.05463 Tables 2-4", "as phi-1.5",
                             _row(".740 .761 .449 .728 .530 .770 .484 .379 .360 .74 .446 .414 .435"),
                             unverified=frozenset({"boolq", "hellaswag", "openbookqa"}),
                             lm_eval_comparable=_PHI15_LEH),
    "phi-1.5-web-only": Published("arXiv 2309.05463 Tables 2-4", "as phi-1.5 (GSM8K: below 3%)",
                                  _row(".604 .666 .329 .632 .414 .743 .478 .309 .274 - - .172 .273"),
                                  unverified=frozenset({"piqa", "hellaswag", "mmlu", "openbookqa"}),
                                  lm_eval_comparable=_PHI15_LEH),
    "phi-2": Published("Phi-3-mini-128k-instruct card (Apr 2024), phi-2 column",
                       "Microsoft internal pipeline; MMLU 5-shot, GSM8K 8-shot CoT, MBPP 3-shot",
                       _row(".547 .885 .759 - .683 .602 .536 .563 .736 - .611 .470 .606 .452")),
    "phi-3-mini-4k-instruct": Published("Azure/azureml-assets evaluation.md", "Microsoft internal pipeline",
                                        _row("- - .863 - - - .753 .709 - - .857 .573 .698 .614")),
    "phi-3-small-8k-instruct": Published("Azure/azureml-assets evaluation.md", "Microsoft internal pipeline",
                                         _row("- .970 .907 - - - .770 .757 - - .896 .610 .717 .581")),
    "phi-3-medium-4k-instruct": Published("Azure/azureml-assets evaluation.md", "Microsoft internal pipeline",
                                          _row("- .977 .916 - - - .824 .780 - - .910 .622 .752 .739")),
    "phi-4": Published("arXiv 2412.08905 Table 1", "OpenAI simple-evals, temperature 0.5",
                       {"mmlu": 0.848, "humaneval": 0.826}),
}


def published_score(model: str, task: str) -> float | None:
    entry = PUBLISHED.get(model)
    return None if entry is None else entry.scores.get(task)
