"""phi-4's generation techniques as composable steps over drafts.

A run's ``techniques.steps`` is a list like ``["generate", "self_revision"]``: the first step writes a
draft per document (``generate`` from the seed prompt, or ``multi_agent``), later steps transform or
filter drafts (``self_revision``, ``instruction_reversal``, ``plurality``). Each step makes one
teacher call per round for one document (awaited: many documents are in flight at once), records what it
did in the draft's ``chain``, and marks drafts it drops with a reason (kept in rejected/, never silently lost).
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import math
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from phiforge.data.synth import prompts as P
from phiforge.data.synth.seeds import Seed
from phiforge.data.synth.teachers import Request, Result, Teacher
from phiforge.errors import ConfigError
from phiforge.inference.sampling import SamplingParams

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
    sampling: SamplingParams
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


async def _ask(ctx: StepContext, d: Draft, prompt: str, step: str, sampling: SamplingParams | None = None,
               sample: int = 0) -> Result:
    """One teacher call for draft ``d``, counted on the draft; the answer comes back cleaned."""
    request = Request(prompt, request_seed(ctx.run_seed, d.index, step, sample), sampling or ctx.sampling,
                      ctx.system)
    result = await ctx.teacher.ask(request)
    d.calls += 1
    d.total_tokens += result.completion_tokens
    return replace(result, text=ctx.clean(result.text))


# ---- first steps -------------------------------------------------------------------------------------
async def generate(d: Draft, ctx: StepContext) -> None:
    """The seed prompt -> the document."""
    r = await _ask(ctx, d, d.prompt, "generate")
    d.text, d.finish_reason = r.text, r.finish_reason
    d.prompt_tokens, d.completion_tokens = r.prompt_tokens, r.completion_tokens


async def multi_agent(d: Draft, ctx: StepContext) -> None:
    """A student asks, a teacher answers, a reviewer checks; rejected answers are dropped."""
    r = await _ask(ctx, d, P.render(P.QUESTION, topic=d.seed.topic), "question")
    d.fields["question"], d.prompt_tokens = r.text, r.prompt_tokens
    if not r.text:
        d.status = "multi_agent: the student's question is empty"
        return
    r = await _ask(ctx, d, P.render(P.ANSWER, question=d.fields["question"]), "answer")
    d.fields["answer"] = r.text
    d.finish_reason, d.completion_tokens = r.finish_reason, r.completion_tokens
    r = await _ask(ctx, d, P.render(P.REVIEW, question=d.fields["question"], answer=d.fields["answer"]), "review")
    verdict = re.search(r"VERDICT:\s*(correct|incorrect)", r.text, re.IGNORECASE)
    d.chain.append({"step": "multi_agent", "question": d.fields["question"], "review": r.text})
    if verdict and verdict.group(1).lower() == "incorrect":
        d.status = "multi_agent: reviewer found the answer incorrect"
    d.text = f"Question: {d.fields['question']}\n\nAnswer: {d.fields['answer']}"


# ---- transforms ----------------------------------------------------------------------------------------
async def self_revision(d: Draft, ctx: StepContext) -> None:
    """Draft -> critique against the rubric -> revision; the draft and critique stay in the chain."""
    critique = (await _ask(ctx, d, P.render(P.CRITIQUE, rubric=ctx.rubric, draft=d.text), "critique")).text
    r = await _ask(ctx, d, P.render(P.REVISE, draft=d.text, critique=critique), "revise")
    d.chain.append({"step": "self_revision", "draft": d.text, "critique": critique, "rubric": ctx.rubric})
    d.text, d.finish_reason, d.completion_tokens = r.text, r.finish_reason, r.completion_tokens


async def instruction_reversal(d: Draft, ctx: StepContext) -> None:
    """Output -> the instruction that would produce it -> regenerate; keep pairs whose regeneration agrees
    (code: the regenerated code passes the original's tests in the sandbox; text: word-cosine similarity)."""
    code = d.seed.format == "python"
    kind = "Python code" if code else "text"
    instruction = (await _ask(ctx, d, P.render(P.REVERSE, kind=kind, output=d.text), "reverse")).text
    regenerated = (await _ask(ctx, d, instruction, "regenerate")).text
    link: dict[str, Any] = {"step": "instruction_reversal", "instruction": instruction, "regenerated": regenerated,
                            "original": d.text}
    if code:  # the sandbox blocks: off the event loop, so other documents' calls go on
        [ok] = await asyncio.to_thread(_tests_pass, [d.text], [regenerated], ctx.sandbox_timeout)
        link["check"] = "tests"
        if not ok:
            d.status = "instruction_reversal: regenerated code fails the original's tests"
    else:
        link["check"] = "similarity"
        link["similarity"] = round(similarity(d.text, regenerated), 4)
        if link["similarity"] < ctx.reversal_similarity:
            d.status = f"instruction_reversal: similarity {link['similarity']} < {ctx.reversal_similarity}"
    d.chain.append(link)
    d.fields["instruction"] = instruction
    d.text = f"{instruction}\n\n{d.text}"


async def plurality(d: Draft, ctx: StepContext) -> None:
    """Sample N answers to the question; drop it if they all agree (too easy) or no two agree (ambiguous)."""
    hot = replace(ctx.sampling, temperature=max(ctx.sampling.temperature, 0.7))
    question = d.fields.get("question", d.text)
    answers = [final_answer((await _ask(ctx, d, P.render(P.ANSWER, question=question), "plurality", sampling=hot,
                                        sample=k)).text) for k in range(ctx.plurality_samples)]
    counts = Counter(a for a in answers if a)
    top = counts.most_common(1)[0][1] if counts else 0
    d.chain.append({"step": "plurality", "answers": answers, "majority": counts.most_common(1)[0][0]
                    if counts else "", "agreement": top})
    if top == len(answers):
        d.status = "plurality: every sampled answer agrees (too easy)"
    elif top <= 1:
        d.status = "plurality: no two sampled answers agree (ambiguous)"


# ---- the seeded sources' checks -------------------------------------------------------------------------------
async def seed_check(d: Draft, ctx: StepContext) -> None:
    """Code seeds: the exercise's tests must pass on the seed's function (and on the exercise's own solution)
    in the sandbox. Q&A seeds: the solution's final answer must match the seed's."""
    if d.seed.source == "code":
        await _check_code(d, ctx)
    elif d.seed.source == "qa":
        got, want = final_answer(d.text), answer_key(d.seed.answer)
        d.chain.append({"step": "answer_match", "answer": got, "expected": want})
        if not same_answer(got, want):
            d.status = f"qa_seed: the solution's answer {got!r} does not match the seed's {want!r}"
        d.text = f"Question: {d.seed.question}\n\nSolution: {d.text}"


async def _check_code(d: Draft, ctx: StepContext) -> None:
    from phiforge.eval.sandbox import Program, SandboxLimits, run_programs

    has_blocks = "```" in d.text
    solution, tests = split_tests(code_blocks(d.text))
    solution, test_functions = pytest_functions(solution)
    tests = "\n".join(t for t in (tests, test_functions) if t)
    link: dict[str, Any] = {"step": "code_tests", "tests": tests.count("assert ")}
    d.chain.append(link)
    if not tests:
        d.status = "code_seed: the exercise has no assert tests"
        return
    programs = [Program(d.seed.code + "\n", tests + "\n")]
    if has_blocks and solution.strip():
        programs.append(Program(solution + "\n", tests + "\n"))
    # the sandbox blocks: off the event loop, so other documents' calls go on
    results = await asyncio.to_thread(run_programs, programs, SandboxLimits(timeout=ctx.sandbox_timeout))
    link.update({"seed_code": results[0].status, "sandbox": results[0].sandbox,
                 "solution": results[1].status if len(results) > 1 else "none"})
    if not results[0].passed:
        d.status = f"code_seed: the exercise's tests {results[0].status} on the seed's code"
    elif len(results) > 1 and not results[1].passed:
        d.status = f"code_seed: the exercise's own solution {results[1].status} its tests"


STEPS: dict[str, Callable[[Draft, StepContext], Awaitable[None]]] = {
    "generate": generate, "multi_agent": multi_agent, "self_revision": self_revision,
    "instruction_reversal": instruction_reversal, "plurality": plurality, "seed_check": seed_check}


def document_steps(seed: Seed, steps: list[str]) -> list[str]:
    """A topic document runs ``steps``; a seeded one (web, code, Q&A) is written from its own prompt, revised
    when ``self_revision`` is on, then checked against its seed (the other techniques need a topic question)."""
    if seed.source == "topics":
        return steps
    return ["generate", *(s for s in steps[1:] if s == "self_revision"), "seed_check"]


def check_steps(steps: list[str]) -> None:
    if not steps or steps[0] not in GENERATORS:
        raise ConfigError(f"techniques.steps = {steps}: the first step must be one of {list(GENERATORS)}")
    for step in steps[1:]:
        if step not in TRANSFORMS:
            raise ConfigError(f"techniques.steps: unknown step {step!r} after the first; expected some of "
                             f"{list(TRANSFORMS)}")


async def run_document(d: Draft, steps: list[str], ctx: StepContext) -> Draft:
    """One document through the steps in order, as a pipeline: it moves on as soon as its own answer lands
    (no barrier across documents); a step that drops it ends its run."""
    for name in document_steps(d.seed, steps):
        await STEPS[name](d, ctx)
        if d.status != "kept":
            break
    return d


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


def answer_key(answer: str) -> str:
    """A seed's answer normalized as ``final_answer`` normalizes a solution's (GSM8K's ``#### 42`` included)."""
    return final_answer("Answer: " + answer.split("####")[-1].strip())


def same_answer(got: str, want: str) -> bool:
    try:
        return math.isclose(float(got), float(want), rel_tol=1e-6)
    except ValueError:
        return bool(got) and got == want


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


def pytest_functions(code: str) -> tuple[str, str]:
    """(code without its top-level ``def test_*()`` functions, those functions followed by a call of each):
    pytest-style tests, which teachers often write, as plain asserts the sandbox judge runs."""
    try:
        module = ast.parse(code)
    except SyntaxError:
        return code, ""
    found = [n for n in module.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test")
             and not n.args.args and not n.decorator_list]
    if not found:
        return code, ""
    lines = code.splitlines()
    spans = [(n.lineno - 1, n.end_lineno or n.lineno) for n in found]
    tests = [("\n".join(lines[a:b]) + f"\n{n.name}()") for n, (a, b) in zip(found, spans)]
    kept = [line for i, line in enumerate(lines) if not any(a <= i < b for a, b in spans)]
    return "\n".join(kept), "\n".join(tests)


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
