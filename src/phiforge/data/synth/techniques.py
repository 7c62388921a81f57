"""phi-4's generation techniques as composable steps over drafts.

A run's ``techniques.steps`` is a list like ``["generate", "self_revision"]``: the first step writes a
draft per document (``generate`` from the seed prompt, or ``multi_agent``), later steps transform or
filter drafts (``self_revision``, ``instruction_reversal``, ``plurality``). Each step batches one
teacher call per round over all drafts of a chunk, records what it did in the draft's ``chain``, and
marks drafts it drops with a reason (kept in rejected/, never silently lost).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from phiforge.data.synth import prompts as P
from phiforge.data.synth.seeds import Seed
from phiforge.data.synth.teachers import Request, Result, Sampling, Teacher

GENERATORS = ("generate", "multi_agent")
TRANSFORMS = ("self_revision", "instruction_reversal", "plurality")


@dataclass
class Draft:
    index: int
    seed: Seed
    prompt: str  # the document prompt (the first request)
    text: str = ""
    status: str = "kept"  # or the reason it was dropped
    finish_reason: str = ""
    prompt_tokens: int = 0  # of the first request
    completion_tokens: int = 0  # of the text as it stands
    calls: int = 0
    total_tokens: int = 0  # completion tokens over every call
    chain: list[dict[str, Any]] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)  # e.g. question/answer for multi-agent drafts


@dataclass
class StepContext:
    teacher: Teacher
    sampling: Sampling
    run_seed: int
    system: str = ""
    rubric: str = P.RUBRIC
    plurality_samples: int = 5
    reversal_similarity: float = 0.5
    sandbox_timeout: float = 10.0
    clean: Callable[[str], str] = str.strip  # applied to every answer (boilerplate cleanup)


Done = Callable[[Draft], None]


def request_seed(run_seed: int, index: int, *parts: Any) -> int:
    """A fixed seed per (run, document, step, round): reruns ask the teacher the same questions."""
    blob = ":".join(map(str, (run_seed, index, *parts)))
    return int(hashlib.sha256(blob.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def _ask(ctx: StepContext, drafts: list[Draft], prompts: list[str], step: str,
         on_each: Callable[[Draft, Result], None], sampling: Sampling | None = None, sample: int = 0) -> None:
    """One batched teacher call: ``prompts[i]`` for ``drafts[i]``; ``on_each`` as each answer lands."""
    requests = [Request(p, request_seed(ctx.run_seed, d.index, step, sample), sampling or ctx.sampling, ctx.system)
                for d, p in zip(drafts, prompts)]

    def landed(i: int, result: Result) -> None:
        drafts[i].calls += 1
        drafts[i].total_tokens += result.completion_tokens
        on_each(drafts[i], replace(result, text=ctx.clean(result.text)))

    ctx.teacher.generate(requests, landed)


# ---- first steps -------------------------------------------------------------------------------------
def generate(drafts: list[Draft], ctx: StepContext, done: Done) -> None:
    """The seed prompt -> the document (each draft is handed on as soon as its answer lands)."""
    def landed(d: Draft, r: Result) -> None:
        d.text, d.finish_reason = r.text, r.finish_reason
        d.prompt_tokens, d.completion_tokens = r.prompt_tokens, r.completion_tokens
        done(d)

    _ask(ctx, drafts, [d.prompt for d in drafts], "generate", landed)


def multi_agent(drafts: list[Draft], ctx: StepContext, done: Done) -> None:
    """A student asks, a teacher answers, a reviewer checks; rejected answers are dropped."""
    def asked(d: Draft, r: Result) -> None:
        d.fields["question"] = r.text
        d.prompt_tokens = r.prompt_tokens

    def answered(d: Draft, r: Result) -> None:
        d.fields["answer"] = r.text
        d.finish_reason, d.completion_tokens = r.finish_reason, r.completion_tokens

    def reviewed(d: Draft, r: Result) -> None:
        verdict = re.search(r"VERDICT:\s*(correct|incorrect)", r.text, re.IGNORECASE)
        d.chain.append({"step": "multi_agent", "question": d.fields["question"], "review": r.text})
        if verdict and verdict.group(1).lower() == "incorrect":
            d.status = "multi_agent: reviewer found the answer incorrect"
        d.text = f"Question: {d.fields['question']}\n\nAnswer: {d.fields['answer']}"
        done(d)

    _ask(ctx, drafts, [P.render(P.QUESTION, topic=d.seed.topic) for d in drafts], "question", asked)
    drafts = [d for d in drafts if d.fields.get("question")]
    _ask(ctx, drafts, [P.render(P.ANSWER, question=d.fields["question"]) for d in drafts], "answer", answered)
    _ask(ctx, drafts, [P.render(P.REVIEW, question=d.fields["question"], answer=d.fields["answer"])
                       for d in drafts], "review", reviewed)


# ---- transforms ----------------------------------------------------------------------------------------
def self_revision(drafts: list[Draft], ctx: StepContext, done: Done) -> None:
    """Draft -> critique against the rubric -> revision; the draft and critique stay in the chain."""
    critiques: dict[int, str] = {}

    def critiqued(d: Draft, r: Result) -> None:
        critiques[d.index] = r.text

    def revised(d: Draft, r: Result) -> None:
        d.chain.append({"step": "self_revision", "draft": d.text, "critique": critiques[d.index],
                        "rubric": ctx.rubric})
        d.text, d.finish_reason, d.completion_tokens = r.text, r.finish_reason, r.completion_tokens
        done(d)

    _ask(ctx, drafts, [P.render(P.CRITIQUE, rubric=ctx.rubric, draft=d.text) for d in drafts], "critique", critiqued)
    _ask(ctx, drafts, [P.render(P.REVISE, draft=d.text, critique=critiques[d.index]) for d in drafts], "revise",
         revised)


def instruction_reversal(drafts: list[Draft], ctx: StepContext, done: Done) -> None:
    """Output -> the instruction that would produce it -> regenerate; keep pairs whose regeneration agrees
    (code: the regenerated code passes the original's tests in the sandbox; text: word-cosine similarity)."""
    instructions: dict[int, str] = {}
    regenerated: dict[int, str] = {}

    def reversed_(d: Draft, r: Result) -> None:
        instructions[d.index] = r.text

    def regenerated_(d: Draft, r: Result) -> None:
        regenerated[d.index] = r.text

    kinds = ["Python code" if d.seed.format == "python" else "text" for d in drafts]
    _ask(ctx, drafts, [P.render(P.REVERSE, kind=k, output=d.text) for d, k in zip(drafts, kinds)], "reverse",
         reversed_)
    _ask(ctx, drafts, [instructions[d.index] for d in drafts], "regenerate", regenerated_)
    code = [d for d in drafts if d.seed.format == "python"]
    passed = _tests_pass([d.text for d in code], [regenerated[d.index] for d in code], ctx.sandbox_timeout)
    for d in drafts:
        link = {"step": "instruction_reversal", "instruction": instructions[d.index],
                "regenerated": regenerated[d.index], "original": d.text}
        if d.seed.format == "python":
            link["check"], ok = "tests", passed[code.index(d)]
            if not ok:
                d.status = "instruction_reversal: regenerated code fails the original's tests"
        else:
            link["check"] = "similarity"
            link["similarity"] = round(similarity(d.text, regenerated[d.index]), 4)
            if link["similarity"] < ctx.reversal_similarity:
                d.status = f"instruction_reversal: similarity {link['similarity']} < {ctx.reversal_similarity}"
        d.chain.append(link)
        d.fields["instruction"] = instructions[d.index]
        d.text = f"{instructions[d.index]}\n\n{d.text}"
        done(d)


def plurality(drafts: list[Draft], ctx: StepContext, done: Done) -> None:
    """Sample N answers to each question; drop it if they all agree (too easy) or no two agree (ambiguous)."""
    answers: dict[int, list[str]] = {d.index: [] for d in drafts}
    hot = replace(ctx.sampling, temperature=max(ctx.sampling.temperature, 0.7))
    questions = [d.fields.get("question", d.text) for d in drafts]
    for k in range(ctx.plurality_samples):
        _ask(ctx, drafts, [P.render(P.ANSWER, question=q) for q in questions], "plurality",
             lambda d, r: answers[d.index].append(final_answer(r.text)), sampling=hot, sample=k)
    for d in drafts:
        counts = Counter(a for a in answers[d.index] if a)
        top = counts.most_common(1)[0][1] if counts else 0
        d.chain.append({"step": "plurality", "answers": answers[d.index], "majority": counts.most_common(1)[0][0]
                        if counts else "", "agreement": top})
        if top == len(answers[d.index]):
            d.status = "plurality: every sampled answer agrees (too easy)"
        elif top <= 1:
            d.status = "plurality: no two sampled answers agree (ambiguous)"
        done(d)


STEPS: dict[str, Callable[[list[Draft], StepContext, Done], None]] = {
    "generate": generate, "multi_agent": multi_agent, "self_revision": self_revision,
    "instruction_reversal": instruction_reversal, "plurality": plurality}


def check_steps(steps: list[str]) -> None:
    if not steps or steps[0] not in GENERATORS:
        raise ValueError(f"techniques.steps = {steps}: the first step must be one of {list(GENERATORS)}")
    for step in steps[1:]:
        if step not in TRANSFORMS:
            raise ValueError(f"techniques.steps: unknown step {step!r} after the first; expected some of "
                             f"{list(TRANSFORMS)}")


def run_steps(drafts: list[Draft], steps: list[str], ctx: StepContext, done: Done) -> None:
    """Run the steps in order; ``done`` gets each draft once, when the last step finished it (or it was
    dropped earlier). ``filter_draft`` decides between steps whether a draft goes on."""
    live = drafts
    for n, name in enumerate(steps):
        last = n == len(steps) - 1
        survivors: list[Draft] = []

        def finished(d: Draft, last: bool = last, survivors: list[Draft] = survivors) -> None:
            if last or d.status != "kept":
                done(d)
            else:
                survivors.append(d)

        STEPS[name](live, ctx, finished)
        live = sorted(survivors, key=lambda d: d.index)


# ---- checks ---------------------------------------------------------------------------------------------
def final_answer(text: str) -> str:
    """The answer a solution ends with: after the last 'Answer:', else the last number; normalized."""
    found = re.findall(r"answer\s*(?:is)?\s*[:=]?\s*(.+)", text, re.IGNORECASE)
    candidate = found[-1] if found else ""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", (candidate or text).replace(",", ""))
    if numbers:
        value = float(numbers[-1] if not candidate else numbers[0])
        return str(int(value)) if value == int(value) else str(value)
    return re.sub(r"[^a-z0-9 ]", "", candidate.lower()).strip()


def similarity(a: str, b: str) -> float:
    """Cosine similarity of word-count vectors (0..1)."""
    ca, cb = Counter(re.findall(r"\w+", a.lower())), Counter(re.findall(r"\w+", b.lower()))
    dot = sum(ca[w] * cb[w] for w in ca.keys() & cb.keys())
    norm = math.sqrt(sum(v * v for v in ca.values())) * math.sqrt(sum(v * v for v in cb.values()))
    return dot / norm if norm else 0.0


def code_blocks(text: str) -> str:
    blocks = re.findall(r"```(?:python|py)?\s*\n(.*?)```", text, re.DOTALL)
    return "\n\n".join(blocks) if blocks else text


def split_tests(code: str) -> tuple[str, str]:
    """(code without its top-level asserts, the asserts)."""
    lines = code.splitlines()
    tests = [line for line in lines if line.startswith("assert ")]
    return "\n".join(line for line in lines if not line.startswith("assert ")), "\n".join(tests)


def _tests_pass(originals: list[str], regenerated: list[str], timeout: float) -> list[bool]:
    if not originals:
        return []
    from phiforge.eval.sandbox import Program, SandboxLimits, run_programs

    programs, runnable = [], []
    for original, new in zip(originals, regenerated):
        tests = split_tests(code_blocks(original))[1]
        runnable.append(bool(tests))
        programs.append(Program(split_tests(code_blocks(new))[0] + "\n", tests + "\n"))
    results = run_programs(programs, SandboxLimits(timeout=timeout))
    return [ok and r.passed for ok, r in zip(runnable, results)]
