"""Task definitions against lm-evaluation-harness's own pieces: filters, metrics, preprocessing, windows."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import SHARED
from lm_eval_ref import TASKS_DIR, lm_eval_task

from phiforge.eval.scoring import rolling_windows
from phiforge.eval.tasks import get_task
from phiforge.eval.tasks.gsm8k import GSM8K, extract_answers

DATA = Path(__file__).parent / "data"
TEACHER_OUTPUTS = DATA / "gsm8k_teacher_outputs.jsonl"
EDGE_CASES = [
    "The answer is 1,234.\n#### 1,234", "She pays $18.00 in total.", "#### -5\n#### 7", "no digits here",
    "It is 3.5 then 0.25.", "#### 72.", "Result: $1,000,000 and 12", " 18 ", "####18", "#### 4.0 so 4",
]


def _lm_eval_filters() -> dict[str, tuple]:
    """lm-eval's gsm8k filter settings, read from its YAML, as RegexFilter objects."""
    from lm_eval.filters.extraction import RegexFilter
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(TASKS_DIR / "gsm8k/gsm8k.yaml")
    filters = {}
    for entry in cfg["filter_list"]:
        regex = entry["filter"][0]
        filters[entry["name"]] = RegexFilter(regex["regex_pattern"], regex.get("group_select", 0))
    return filters, cfg["metric_list"][0]


def test_gsm8k_extraction_matches_lm_eval_on_teacher_outputs() -> None:
    """Real SmolLM2 generations (bench/gsm8k_outputs.py) plus edge cases: same extracted answers and scores."""
    from lm_eval.api.metrics import exact_match_hf_evaluate

    rows = [json.loads(line) for line in open(TEACHER_OUTPUTS)]
    rows += [{"answer": "It costs 1234.\n#### 1234", "response": text} for text in EDGE_CASES]
    filters, metric = _lm_eval_filters()
    settings = {k: metric[k] for k in ("regexes_to_ignore", "ignore_case", "ignore_punctuation")}
    task = GSM8K()
    for row in rows:
        ours = extract_answers(row["response"])
        scores = task.process({"answer": row["answer"]}, [row["response"]])
        for name, f in filters.items():
            theirs = f.apply([[row["response"]]], [{}])[0][0]
            assert ours[name] == theirs, (name, row["response"])
            expected = exact_match_hf_evaluate([theirs], [row["answer"]], **settings)["exact_match"]
            assert scores[f"exact_match,{name}"] == expected


def test_hellaswag_preprocessing_matches_lm_eval() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("hs_utils", TASKS_DIR / "hellaswag/utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from phiforge.eval.tasks.commonsense import hellaswag_preprocess

    for text in ["[header] How to x [title] Pick.  [step] Go.", "  plain  text ", "a [b] c [title] d"]:
        assert hellaswag_preprocess(text) == module.preprocess(text)


def test_rolling_windows_match_lm_eval() -> None:
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    rng = random.Random(0)
    for n, max_len in [(1, 8), (7, 8), (8, 8), (9, 8), (50, 8), (100, 33)]:
        tokens = [rng.randrange(1000) for _ in range(n)]
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 999, max_len, 1)]
        assert rolling_windows(tokens, 999, max_len) == theirs


def test_triviaqa_and_squad_scoring() -> None:
    lm_task = lm_eval_task("triviaqa", {"validation": str(DATA / "hf/triviaqa/validation.jsonl")})
    ours = get_task("triviaqa", DATA / "hf/triviaqa").load()
    for doc, lm_doc in zip(ours.docs, lm_task.eval_docs):
        for answer in [" Sunset Boulevard", "sunset blvd", "David Seville!", " paris", "London", ""]:
            expected = lm_task.process_results(lm_doc, [answer.strip()])["exact_match"]
            assert ours.process(doc, [answer])["exact_match,remove_whitespace"] == expected
    squad = get_task("squad", DATA / "hf/squad").load()
    doc = squad.docs[0]
    assert squad.process(doc, [" The Denver Broncos."])["exact_match,none"] == 1.0
    assert squad.process(doc, ["Carolina Panthers"]) == {"exact_match,none": 0.0, "f1,none": 0.0}
    assert squad.doc_to_text(doc).startswith("Title: Super_Bowl_50\n\nBackground: Super Bowl 50")


def test_original_formats_load_with_expected_counts() -> None:
    data_dir = SHARED / "benchmarks"
    counts = {"piqa": (1838, None), "mmlu": (1531, 285), "gsm8k": (1319, 7473), "mbpp": (500, 3),
              "toxigen_safety": (6514, None), "humaneval": (164, None)}
    for name, (docs, shots) in counts.items():
        task = get_task(name, data_dir=data_dir).load()
        assert len(task.docs) == docs, name
        assert (None if task.shot_docs is None else len(task.shot_docs)) == shots, name
    piqa = get_task("piqa", data_dir=data_dir).load()
    first = "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert piqa.doc_to_text(piqa.docs[0]) == first
    mbpp = get_task("mbpp", data_dir=data_dir).load()
    assert [d["task_id"] for d in mbpp.shot_docs] == [2, 3, 4]


def test_perplexity_task_reports_bits_per_byte(tmp_path: Path, teacher: tuple) -> None:
    from phiforge.eval.harness import EvalConfig, evaluate

    text = "The cat sat on the mat. It was a sunny day, and the cat was happy.\n"
    (tmp_path / "doc.txt").write_text(text)
    results = evaluate(EvalConfig(tasks=["perplexity"], data={"perplexity": str(tmp_path / "doc.txt")},
                                  progress=False, log_samples=True), model=teacher[0], tokenizer=teacher[1])
    r = results["results"]["perplexity"]
    ll = results["samples"]["perplexity"][0]["resps"][0]
    assert r["bits_per_byte,none"] == pytest.approx(-ll / len(text.encode()) / 0.6931471805599453)
    assert 0 < r["bits_per_byte,none"] < 4 and r["word_perplexity,none"] > 1
