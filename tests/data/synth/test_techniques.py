"""phi-4 techniques end to end against a scripted OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from openai_server import FaultyOpenAIServer, default_answer, http_config

from phiforge.data.synth import run_synth
from phiforge.data.synth.pipeline import cleanup
from phiforge.data.synth.techniques import check_steps, final_answer, similarity
from phiforge.data.synth.writer import read_records

CODE_DOC = ("Task: write add(a, b) for {topic}.\n```python\ndef add(a, b):\n    return a + b\n\n"
            "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n```")
MID_ANSWERS = ["42", "42", "41", "40", "42", "42"]


def kind_of(text: str) -> str:
    return ["easy", "hard", "mid", "tricky"][int(hashlib.sha1(text.encode()).hexdigest(), 16) % 4]


class Scripted:
    """Answers each technique prompt the way a test needs; counts answers per question."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def __call__(self, body: dict[str, Any]) -> str:
        prompt = body["messages"][-1]["content"]
        if prompt.startswith("Write one challenging question"):
            topic = re.search(r'about "(.*)"', prompt).group(1)
            return f"A {kind_of(topic)} question about {topic}: what is 6 times 7?"
        if prompt.startswith("Answer the question"):
            question = prompt.split("Question: ", 1)[1]
            n = self.calls[question]
            self.calls[question] += 1
            kind = question.split()[1]
            value = {"easy": "42", "hard": str(100 + n), "tricky": "42"}.get(kind, MID_ANSWERS[n % 6])
            return f"Six groups of seven make {value}.\nAnswer: {value}"
        if prompt.startswith("You are a strict reviewer"):
            return "VERDICT: incorrect, 6 times 7 is not that." if "tricky" in prompt else "VERDICT: correct."
        if prompt.startswith("Critique the following"):
            return "- lacks a worked example\n- repeats itself"
        if prompt.startswith("Rewrite the text"):
            draft = prompt.split("Text:\n", 1)[1].split("\n\nCritique:")[0]
            return "REVISED " + draft
        if prompt.startswith("Here is a piece of"):
            output = prompt.split("\n\n", 1)[1]
            verdict = "good" if int(hashlib.sha1(output.encode()).hexdigest(), 16) % 2 else "bad"
            return f"INSTRUCTION-{verdict}: {output[:40]}"
        if prompt.startswith("INSTRUCTION-"):
            good = prompt.startswith("INSTRUCTION-good")
            if "Task: write add" in prompt:
                body_line = "return a + b" if good else "return a - b"
                return f"```python\ndef add(a, b):\n    {body_line}\n\nassert add(1, 1) == 2\n```"
            return self.original(prompt) if good else "Bananas grow in warm places near the sea."
        if "Python exercise" in prompt:
            return CODE_DOC.format(topic=re.search(r'about "(.*)"', prompt).group(1))
        return default_answer(body)

    def original(self, instruction: str) -> str:
        return self.documents[instruction.split(": ", 1)[1][:20]]


def run(tmp_path: Path, steps: str, n: int, *extra: str) -> tuple[list, list]:  # noqa: ANN001
    script = Scripted()
    with FaultyOpenAIServer(faults=False, answer=script) as srv:
        script.server = srv
        run_synth(http_config(tmp_path, srv.base_url, n, f"techniques.steps={steps}", "filter.min_words=1",
                              "teacher.concurrency=2", *extra))
    return read_records(tmp_path / "out"), read_records(tmp_path / "out", rejected=True)


def test_multi_agent_then_plurality(tmp_path: Path) -> None:
    kept, rejected = run(tmp_path, '["multi_agent","plurality"]', 16)
    assert len(kept) + len(rejected) == 16
    expected = {"easy": "plurality: every sampled answer agrees (too easy)",
                "hard": "plurality: no two sampled answers agree (ambiguous)",
                "tricky": "multi_agent: reviewer found the answer incorrect", "mid": "kept"}
    seen = set()
    for record in kept + rejected:
        question = record["metadata"]["fields"]["question"]
        kind = question.split()[1]
        seen.add(kind)
        assert record.get("reason", "kept") == expected[kind], (question, record.get("reason"))
        assert record["text"].startswith(f"Question: {question}\n\nAnswer: ")
        steps = [link["step"] for link in record["metadata"]["chain"]]
        assert steps == (["multi_agent"] if kind == "tricky" else ["multi_agent", "plurality"])
    assert seen == set(expected)
    mid = next(r for r in kept)
    assert mid["metadata"]["chain"][1]["majority"] == "42" and mid["metadata"]["chain"][1]["agreement"] == 3
    assert mid["metadata"]["tokens"]["calls"] == 3 + 5


def test_self_revision_keeps_the_chain(tmp_path: Path) -> None:
    kept, rejected = run(tmp_path, '["generate","self_revision"]', 4, 'seeds.formats=["textbook"]')
    assert len(kept) == 4 and not rejected
    for record in kept:
        link = record["metadata"]["chain"][0]
        assert link["step"] == "self_revision" and link["critique"].startswith("- lacks a worked example")
        assert record["text"] == "REVISED " + link["draft"] and link["draft"].startswith("Lesson ")  # cleaned
        assert record["metadata"]["tokens"]["calls"] == 3


def test_instruction_reversal_code_runs_the_original_tests(tmp_path: Path) -> None:
    kept, rejected = run(tmp_path, '["generate","instruction_reversal"]', 6, 'seeds.formats=["python"]')
    assert len(kept) + len(rejected) == 6 and kept and rejected
    for record in kept + rejected:
        link = record["metadata"]["chain"][0]
        good = link["instruction"].startswith("INSTRUCTION-good")
        assert link["check"] == "tests" and ("reason" not in record) == good
        assert record["text"].startswith(link["instruction"] + "\n\n")
    assert {r["reason"] for r in rejected} == {"instruction_reversal: regenerated code fails the original's tests"}


def test_instruction_reversal_text_uses_similarity(tmp_path: Path) -> None:
    script_docs: dict[str, str] = {}

    class Remembering(Scripted):
        documents = script_docs

        def __call__(self, body: dict[str, Any]) -> str:
            out = super().__call__(body)
            if not body["messages"][-1]["content"].startswith(("Here is a piece", "INSTRUCTION-")):
                script_docs[cleanup(out)[:20]] = cleanup(out)
            return out

    with FaultyOpenAIServer(faults=False, answer=Remembering()) as srv:
        run_synth(http_config(tmp_path, srv.base_url, 6, 'techniques.steps=["generate","instruction_reversal"]',
                              'seeds.formats=["textbook"]', "filter.min_words=1", "teacher.concurrency=1"))
    kept, rejected = read_records(tmp_path / "out"), read_records(tmp_path / "out", rejected=True)
    assert kept and rejected and len(kept) + len(rejected) == 6
    assert all(r["metadata"]["chain"][0]["similarity"] == 1.0 for r in kept)
    for r in rejected:
        assert r["metadata"]["chain"][0]["similarity"] < 0.5 and r["reason"].startswith("instruction_reversal: sim")


def test_checks() -> None:
    assert final_answer("so 6*7 = 42.\nAnswer: 42") == "42" and final_answer("The answer is 3.50") == "3.5"
    assert final_answer("It totals 1,200 apples") == "1200" and final_answer("Answer: Paris!") == "paris"
    assert similarity("the cat sat", "the cat sat") == pytest.approx(1.0) and similarity("a b", "c d") == 0.0
    with pytest.raises(ValueError, match="the first step must be one of"):
        check_steps(["self_revision"])
    with pytest.raises(ValueError, match="unknown step 'polish'"):
        check_steps(["generate", "polish"])
