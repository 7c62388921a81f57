"""The harness: bad input names task/file/record before any model work; results JSON, table and CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import SHARED
from tiny_model import save_tiny_llama

from phiforge.cli import main
from phiforge.eval.harness import EvalConfig, evaluate, format_table
from phiforge.eval.tasks import TaskDataError, UnknownTaskError

HF = Path(__file__).parent / "data" / "hf"
BENCH = str(SHARED / "benchmarks")


def _fail(config: EvalConfig) -> str:
    """evaluate() must fail on data alone: the model given is a sentinel that would break if used."""
    with pytest.raises((TaskDataError, UnknownTaskError, ValueError)) as err:
        evaluate(config, model=object(), tokenizer=object())
    return str(err.value)


def test_unknown_task_names_the_task() -> None:
    message = _fail(EvalConfig(tasks=["piqa", "hellaswagg"], data_dir=BENCH))
    assert "'hellaswagg'" in message and "did you mean hellaswag" in message


def test_missing_data_names_task_and_path(tmp_path: Path) -> None:
    message = _fail(EvalConfig(tasks=["arc_easy"], data={"arc_easy": str(tmp_path / "nope.jsonl")}))
    assert "task arc_easy" in message and "nope.jsonl" in message
    message = _fail(EvalConfig(tasks=["boolq"], data_dir=str(tmp_path)))
    assert "task boolq" in message and "--data boolq=PATH" in message
    (tmp_path / "empty").mkdir()
    message = _fail(EvalConfig(tasks=["hellaswag"], data={"hellaswag": str(tmp_path / "empty")}))
    assert "task hellaswag" in message and "no data file" in message and "validation.jsonl" in message


def test_record_without_field_names_file_and_line(tmp_path: Path) -> None:
    rows = [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}, {"goal": "g2", "sol1": "a", "label": 1}]
    path = tmp_path / "validation.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    message = _fail(EvalConfig(tasks=["piqa"], data={"piqa": str(path)}))
    assert message == (f"task piqa: {path} line 2: missing field 'sol2' (each record needs goal, sol1, sol2, "
                       "label)")


def test_bad_record_values_name_the_record(tmp_path: Path) -> None:
    path = tmp_path / "test.jsonl"
    row = {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}
    path.write_text("\n" + json.dumps(row) + "\n")
    message = _fail(EvalConfig(tasks=["arc_easy"], data={"arc_easy": str(path)}))
    assert f"task arc_easy: {path} line 2: ValueError" in message
    path.write_text('{"question": "q", oops}\n')
    message = _fail(EvalConfig(tasks=["arc_easy"], data={"arc_easy": str(path)}))
    assert f"task arc_easy: {path} line 1: malformed JSON" in message
    lst = tmp_path / "piqa"
    lst.mkdir()
    (lst / "valid.jsonl").write_text(json.dumps({"goal": "g", "sol1": "a", "sol2": "b"}) + "\n")
    (lst / "valid-labels.lst").write_text("0\n1\n")
    assert "has 2 labels for 1 records" in _fail(EvalConfig(tasks=["piqa"], data={"piqa": str(lst)}))
    assert "not being run" in _fail(EvalConfig(tasks=["piqa"], data={"boolq": str(lst)}, data_dir=BENCH))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory, teacher_path: Path) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_cli"), teacher_path)


def test_cli_writes_lm_eval_shaped_results(tiny_folder: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "results.json"
    code = main(["eval", "--model", str(tiny_folder), "--tasks", "piqa,boolq,mmlu_anatomy,gsm8k", "--limit", "3",
                 "--data", f"boolq={HF / 'boolq'}", "--data-dir", BENCH, "--output", str(out), "--log-samples",
                 "--no-progress", "--num-fewshot", "1"])
    assert code == 0
    results = json.loads(out.read_text())
    for key in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config", "samples"):
        assert key in results, key
    piqa = results["results"]["piqa"]
    assert set(piqa) == {"alias", "acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"}
    assert results["n-samples"]["piqa"] == {"original": 1838, "effective": 3}
    assert results["n-shot"] == {"piqa": 1, "boolq": 1, "mmlu_anatomy": 1, "gsm8k": 1}
    assert set(results["results"]["gsm8k"]) >= {"exact_match,strict-match", "exact_match,flexible-extract"}
    sample = results["samples"]["gsm8k"][0]
    assert set(sample["filtered_resps"]) == {"strict-match", "flexible-extract"}
    assert len(results["samples"]["piqa"][0]["resps"]) == 2
    table = capsys.readouterr().out
    assert "|piqa|1.0|none|1|acc|" in table and "0.7660" in table  # phi-1.5's published PIQA beside ours


def test_table_shows_mmlu_groups_and_published_columns() -> None:
    results = {"results": {"mmlu": {"alias": "mmlu", "acc,none": 0.25, "acc_stderr,none": 0.01},
                           "mmlu_stem": {"alias": "mmlu_stem", "acc,none": 0.2, "acc_stderr,none": 0.02},
                           "mmlu_anatomy": {"alias": " - anatomy", "acc,none": 0.3, "acc_stderr,none": 0.1}},
               "group_subtasks": {"mmlu": ["mmlu_stem"], "mmlu_stem": ["mmlu_anatomy"]},
               "versions": {"mmlu": 1.0}, "n-shot": {"mmlu": 2}}
    table = format_table(results, published=["phi-1.5", "phi-4"])
    assert "|mmlu|1.0|none|2|acc|0.2500|±|0.0100|0.3760|0.8480|" in table
    assert "mmlu_stem" in table and "anatomy" not in table
    assert "anatomy" in format_table(results, published=[], subtasks=True)
