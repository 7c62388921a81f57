"""Seeded sources: web rewrites of curate shards, code seeds checked in the sandbox, Q&A seeds checked by answer."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from openai_server import FaultyOpenAIServer, default_answer, http_config

from phiforge.data.synth import run_synth
from phiforge.data.synth.pipeline import Planner
from phiforge.data.synth.seeds import SeedError, chunk_paragraphs, load_code_seeds
from phiforge.data.synth.writer import OutputError, read_records

LONG = "\n\n".join(" ".join(f"Paragraph {p} sentence {s} talks about rivers and rain." for s in range(6))
                   for p in range(5))  # 5 paragraphs of ~330 characters
CODE = '''import math


def add(a, b):
    return a + b


def hypot(x, y):
    return math.sqrt(x * x + y * y)


def double(x):
    return 2 * x


@staticmethod
def decorated(x):
    return x
'''


def exercise(body: dict[str, Any]) -> str:
    """Exercises whose tests are right for add and hypot, wrong for nothing else; rewrites that quote the
    passage's first words; worked solutions right for 6 x 7 and wrong for the capital of France."""
    prompt = body["messages"][-1]["content"]
    if prompt.startswith("Here is a Python function"):
        name = re.search(r"def (\w+)\(", prompt).group(1)
        tests = {"add": "assert add(2, 3) == 5\nassert add(-1, 1) == 0",
                 "hypot": "assert hypot(3, 4) == 5.0\nassert hypot(0, 0) == 0.0",
                 "square": "assert square(3) == 10",
                 "double": "def test_double():\n    assert double(2) == 4\n    assert double(-1) == -2"}[name]
        solution = re.search(r"```python\n(.*?)\n```", prompt, re.DOTALL).group(1)
        if name == "hypot":  # an exercise whose own solution is wrong although its tests are right
            solution = solution.replace("x * x + y * y", "x + y")
        return (f"Task: write {name}.\n\nExplanation: step by step.\n\n```python\n{solution}\n```\n\n"
                f"```python\n{tests}\n```")
    if prompt.startswith("Here is an extract from a web page"):
        passage = prompt.split('"', 2)[1]
        return f"Rewritten: {' '.join(passage.split()[:6])} ... " + default_answer(body)
    if prompt.startswith("Solve the problem"):
        return "Six sevens are 42.\nAnswer: 42" if "6 times 7" in prompt else "It is Lyon.\nAnswer: Lyon"
    return default_answer(body)


def seeds(tmp_path: Path) -> list[str]:
    web = tmp_path / "curated"
    web.mkdir()
    (web / "shard-00000.jsonl").write_text(json.dumps({"id": "web-long", "text": LONG}) + "\n"
                                           + json.dumps({"id": "web-crumb", "text": "Home > News"}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["web-pq"], "text": ["A Parquet passage about clouds. " * 12]}),
                   web / "shard-00001.parquet")
    code = tmp_path / "code"
    code.mkdir()
    (code / "mathy.py").write_text(CODE)
    (tmp_path / "functions.jsonl").write_text(json.dumps({"id": "fn-square", "code": "def square(x):\n"
                                                                                         "    return x * x\n"}) + "\n")
    (tmp_path / "qa.jsonl").write_text(json.dumps({"id": "q1", "question": "What is 6 times 7?",
                                                   "answer": "6 * 7 = 42\n#### 42"}) + "\n"
                                       + json.dumps({"id": "q2", "question": "What is the capital of France?",
                                                     "answer": "Paris"}) + "\n")
    return [f"seeds.web_rewrites=['{web}']", "seeds.chunk_chars=700", "seeds.min_chunk_chars=100",
            f"seeds.code_seeds=['{code}', '{tmp_path / 'functions.jsonl'}']",
            f"seeds.qa_seeds=['{tmp_path / 'qa.jsonl'}']",
            "filter.min_words=1", "teacher.concurrency=2"]


def test_web_code_and_qa_seeds_end_to_end(tmp_path: Path) -> None:
    extra = seeds(tmp_path)
    with FaultyOpenAIServer(faults=False, answer=exercise) as srv:
        config = http_config(tmp_path, srv.base_url, 2, *extra)
        stats = run_synth(config)
        again = run_synth(config)
        (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
        with pytest.raises(OutputError, match=r"changed: \['plan.qa', 'plan.sha256'\]"):
            run_synth(http_config(tmp_path, srv.base_url, 2, *extra))
    kept, rejected = read_records(tmp_path / "out"), read_records(tmp_path / "out", rejected=True)
    records = sorted(kept + rejected, key=lambda r: r["metadata"]["index"])
    chunks = chunk_paragraphs(LONG, 700, 100)
    assert len(chunks) == 3 and all(len(c) <= 700 for c in chunks)
    web = [r for r in records if r["metadata"].get("source") == "web"]
    code = {r["metadata"]["topic"]: r for r in records if r["metadata"].get("source") == "code"}
    qa = {r["metadata"]["seed_id"]: r for r in records if r["metadata"].get("source") == "qa"}
    # 2 topic documents, 3 chunks of the long passage + 1 Parquet passage (the crumb is too short), 4 functions
    # (the decorated one is skipped), 2 questions
    assert len(records) == 2 + 4 + 4 + 2 == stats["documents"] + stats["rejected"]
    assert [r["metadata"]["index"] for r in records] == list(range(12)) and again["generated_this_run"] == 0
    # web rewrites: linked to their source passage and chunk, forms in turn, the chunk in the prompt
    assert [(r["metadata"]["passage_id"], r["metadata"]["seed_id"]) for r in web] == \
        [("web-long", "web-long#0"), ("web-long", "web-long#1"), ("web-long", "web-long#2"), ("web-pq", "web-pq#0")]
    assert [r["metadata"]["format"] for r in web] == ["rewrite_textbook", "rewrite_exercises", "rewrite_qa",
                                                       "rewrite_textbook"]
    for r, chunk in zip(web, chunks):
        assert chunk in r["metadata"]["prompt"] and r["text"].startswith("Rewritten: " + " ".join(chunk.split()[:6]))
    assert all(r["metadata"]["area"] == "web" for r in web) and stats["per_area"]["web"] == 4
    # code: tests run in the sandbox on the seed's function and on the exercise's own solution
    assert set(code) == {"add", "hypot", "square", "double"}
    assert "reason" not in code["double"]  # pytest-style test functions are run too
    assert code["double"]["metadata"]["chain"][-1]["seed_code"] == "passed"
    assert code["add"]["metadata"]["chain"][-1] == {"step": "code_tests", "tests": 2, "seed_code": "passed",
                                                    "solution": "passed", "sandbox": "bubblewrap"}
    assert "reason" not in code["add"] and code["add"]["metadata"]["seed_id"] == "mathy.py:add"
    assert code["hypot"]["reason"] == "code_seed: the exercise's own solution failed its tests"
    assert code["square"]["reason"] == "code_seed: the exercise's tests failed on the seed's code"
    assert "import math" in code["hypot"]["metadata"]["prompt"]  # the module's imports travel with a function
    # Q&A: the solution's final answer must match the seed's (GSM8K's "#### 42" understood)
    assert "reason" not in qa["q1"] and qa["q1"]["text"].startswith("Question: What is 6 times 7?\n\nSolution: ")
    assert qa["q2"]["reason"] == "qa_seed: the solution's answer 'lyon' does not match the seed's 'paris'"
    assert Counter(r["metadata"]["format"] for r in records)["qa_solution"] == 2


def test_chunking_keeps_paragraphs_and_words() -> None:
    text = "Short intro.\n\n" + "A sentence that goes on. " * 80 + "\n\n" + "x" * 30 + "\n\nTail paragraph here."
    chunks = chunk_paragraphs(text, 400, 50)
    assert all(len(c) <= 400 for c in chunks)
    assert " ".join(" ".join(c.split()) for c in chunks) == " ".join(text.split())  # nothing lost or reordered
    assert chunks[0].startswith("Short intro.\n\nA sentence")  # paragraph boundaries are kept inside a chunk
    assert chunk_paragraphs("Home > News", 400, 50) == []  # too little to rewrite


def test_bad_seed_files_name_the_record(tmp_path: Path) -> None:
    bad = tmp_path / "qa.jsonl"
    bad.write_text(json.dumps({"question": "Why?"}) + "\n")
    with pytest.raises(SeedError, match=r"seeds.qa_seeds: .*qa.jsonl line 1: expected a non-empty string field "
                                        r"'answer'"):
        Planner(http_config(tmp_path, "http://127.0.0.1:9", 1, f"seeds.qa_seeds=['{bad}']"))
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    with pytest.raises(SeedError, match=r"broken.py: not valid Python"):
        load_code_seeds([str(broken)])
    with pytest.raises(SeedError, match=r"seeds.web_rewrites: input.paths: .*nothing\*: no such file"):
        Planner(http_config(tmp_path, "http://127.0.0.1:9", 1, f"seeds.web_rewrites=['{tmp_path}/nothing*']"))
    with pytest.raises(ValueError, match="run.num_documents is 0 and no seeds"):
        http_config(tmp_path, "http://127.0.0.1:9", 0)


def test_web_rewrites_are_decontaminated_by_curate(tmp_path: Path) -> None:
    """A rewrite that carries a GSM8K test item out of its web passage is removed by curate's decontamination,
    like any synth output; the clean rewrites pass and keep their link to the source passage."""
    from conftest import SHARED

    from phiforge.data.curate.pipeline import CurateConfig, run_curate
    from phiforge.data.synth.seeds import BUILTIN_SEEDS

    item = json.loads((SHARED / "benchmarks" / "gsm8k" / "test.jsonl").read_text().splitlines()[3])
    clean = [json.loads(line) for line in (BUILTIN_SEEDS / "web.jsonl").read_text().splitlines()[:2]]
    leak = {"id": "leaky-page", "text": "A maths forum post.\n\n" + f"{item['question']} {item['answer']}"}
    web = tmp_path / "web.jsonl"
    web.write_text("".join(json.dumps(r) + "\n" for r in [*clean, leak]))

    def rewrite(body: dict[str, Any]) -> str:  # a teacher that copies its passage (the worst case)
        return "Rewritten: " + body["messages"][-1]["content"].split('"', 2)[1]

    with FaultyOpenAIServer(faults=False, answer=rewrite) as srv:
        run_synth(http_config(tmp_path, srv.base_url, 0, f"seeds.web_rewrites=['{web}']", "seeds.chunk_chars=4000",
                              "filter.min_words=1"))
    stats = run_curate(CurateConfig.from_dict({
        "output": str(tmp_path / "curated"), "input": {"paths": [str(tmp_path / "out" / "shard-*.jsonl")]},
        "heuristics": {"enabled": False},
        "decontam": {"benchmarks": ["gsm8k"], "data_dir": str(SHARED / "benchmarks")}}))
    kept = [json.loads(line) for p in (tmp_path / "curated" / "curated").glob("*.jsonl") for line in p.open()]
    removed = [json.loads(line) for p in (tmp_path / "curated" / "decontam" / "removed").glob("*.jsonl")
               for line in p.open()]
    assert sorted(r["metadata"]["passage_id"] for r in kept) == sorted(r["id"] for r in clean)
    assert [r["metadata"]["passage_id"] for r in removed] == ["leaky-page"]
    assert removed[0]["removed_by"].startswith("decontam_gsm8k (")
    assert stats["stages"]["decontam"]["report"]["gsm8k"]["documents_removed"] == 1


@pytest.mark.slow
def test_embedded_teacher_on_the_built_in_seeds(tmp_path: Path) -> None:
    """SmolLM2-135M on builtin:web.jsonl, builtin:functions.py and builtin:qa.jsonl: every seed becomes a record
    (kept or rejected with its check's reason); the code checks ran in the sandbox."""
    from phiforge.data.synth import SynthConfig

    stats = run_synth(SynthConfig.from_dict({}, [
        f"run.out_dir={tmp_path}", "run.num_documents=0", "run.progress=false", "sampling.max_new_tokens=160",
        "seeds.web_rewrites=['builtin:web.jsonl']", "seeds.code_seeds=['builtin:functions.py']",
        "seeds.qa_seeds=['builtin:qa.jsonl']", "seeds.chunk_chars=400"]))
    records = read_records(tmp_path) + read_records(tmp_path, rejected=True)
    assert len(records) == stats["documents"] + stats["rejected"] == 7 + 8 + 8
    by_source = Counter(r["metadata"]["source"] for r in records)
    assert by_source == {"web": 7, "code": 8, "qa": 8}
    code = [r for r in records if r["metadata"]["source"] == "code"]
    assert all(r["metadata"]["chain"][-1]["step"] == "code_tests" for r in code)
    assert all(r.get("reason", "").startswith("code_seed: ") for r in code if "reason" in r)
