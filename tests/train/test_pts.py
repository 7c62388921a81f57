"""Pivotal Token Search: intervals, the prefix-caching engine, a constructed pivot, oracles, resume, the teacher."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from chat_data import chat_tokenizer, write_jsonl
from scipy.stats import binomtest

from phiforge.config.model import preset
from phiforge.inference.engine import Engine, SamplingParams
from phiforge.model.transformer import build_model
from phiforge.train.config import TrainConfigError
from phiforge.train.pts import (
    Estimator,
    PrefixCachingEngine,
    PTSConfig,
    Query,
    _finished,
    _seed,
    arithmetic_questions,
    build_queries,
    gsm8k_oracle,
    pts,
    search_queries,
    wilson,
)

ARITHMETIC_QUERIES = "arithmetic:6"
TEACHER_SEARCH = ["sampling.max_new_tokens=64", "search.max_samples=16", "search.queries_per_batch=6",
                  "search.solutions_per_query=1"]


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    config = preset("tiny-llama").replace(vocab_size=tok.vocab_size + (-tok.vocab_size) % 64)
    model = build_model(config, seed=1)
    with torch.no_grad():  # wide weights: confident, varied next-token distributions
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    return model.eval()


def test_wilson_interval_matches_scipy() -> None:
    for k, n in [(0, 8), (3, 8), (8, 8), (17, 32), (1, 1)]:
        ref = binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert wilson(k, n, 0.95) == pytest.approx((ref.low, ref.high), abs=1e-9)


def test_prefix_caching_engine_gives_the_engines_tokens(model, tok) -> None:
    g = torch.Generator().manual_seed(0)
    stem = torch.randint(0, 500, (40,), generator=g).tolist()
    prompts = [stem[:n] for n in (40, 40, 25, 33, 40, 12)] + [torch.randint(0, 500, (9,), generator=g).tolist()]
    params = [SamplingParams(max_new_tokens=20, temperature=1.0, seed=i) for i in range(len(prompts))]
    plain = Engine(model, tok, max_batch_size=4).generate(prompts, params)
    caching = PrefixCachingEngine(model, tok, max_batch_size=4)
    shared = caching.generate(prompts, params)
    assert [c.token_ids for c in shared] == [c.token_ids for c in plain]
    assert caching.reused_tokens > 100 and caching.prefill_tokens < sum(map(len, prompts)) - 100


def search_config(tmp_path: Path, **search) -> PTSConfig:
    config = PTSConfig.from_toml("pts", [f"model.path={tmp_path}", f"data.path={tmp_path}/q.jsonl",
                                         f"run.out_dir={tmp_path}/out", "run.progress=false"])
    config.sampling = config.sampling.replace(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=10)
    for key, value in search.items():
        setattr(config.search, key, value)
    return config


def test_finds_a_constructed_pivotal_token(model, tok, tmp_path: Path) -> None:
    """Success iff the solution has token X at position J: p jumps from P(X | prefix) to 1 exactly at J."""
    query = Query("q0", {}, tok.encode("Natalia sold clips to"))
    config = search_config(tmp_path, min_prob=0.0, max_prob=1.0, min_samples=16, max_samples=48,
                           ci_half_width=0.1, solutions_per_query=1)
    sp = config.sampling
    first = Engine(model, tok).generate([query.prompt], SamplingParams(
        max_new_tokens=sp.max_new_tokens, temperature=1.0, seed=_seed(0, "q0", (), 0),
        stop_token_ids=tuple(tok.stop_token_ids)))[0].token_ids
    with torch.no_grad():  # J: a position where the sampled token was likely but far from certain
        logp = torch.log_softmax(model(torch.tensor([query.prompt + first]))[0, len(query.prompt) - 1 : -1], -1)
    probs = logp.exp()[torch.arange(len(first)), torch.tensor(first)]
    J = next(j for j in range(2, len(first)) if 0.15 < probs[j] < 0.6)
    X = first[J]

    def oracle(record: dict, texts: list[str], ids: list[list[int]]) -> list[bool]:
        return [len(s) > J and s[J] == X for s in ids]

    est = Estimator(PrefixCachingEngine(model, tok), oracle, sp, config.search, tok.stop_token_ids, 0)
    result = search_queries(est, model, [query])[0]
    assert result["status"] == "searched"
    found = {p["position"]: p for p in result["pairs"]}
    assert J in found, (J, float(probs[J]), result)
    pair = found[J]
    assert pair["chosen_ids"] == [X] and pair["rejected_ids"] != [X] and pair["p_chosen"] == 1.0
    assert pair["prompt_ids"] == query.prompt + first[:J]
    assert pair["p_rejected"] == 0.0 and abs(pair["p_prefix"] - float(probs[J])) < 0.3
    assert all(abs(p["delta"]) >= 0.2 for p in result["pairs"])


def test_oracle_errors_are_counted_with_the_record_id(model, tok, tmp_path: Path) -> None:
    model_dir = tmp_path
    write_jsonl(tmp_path / "q.jsonl", [{"id": "no-number", "question": "How many?", "answer": "many"},
                                       {"id": "fine", "question": "What is 2+2?", "answer": "#### 4"}])
    summary = pts(search_config(model_dir), model=model, tokenizer=tok, oracle=gsm8k_oracle)
    assert summary["oracle_errors"] == [{"id": "no-number", "reason": "oracle raised ValueError: answer 'many' "
                                                                       "has no numeric final answer"}]
    assert summary["status"] == {"oracle_error": 1, "too_hard": 1}  # a random model never says 4


def test_gsm8k_oracle() -> None:
    record = {"answer": "Natalia sold 48/2 = 24 clips in May.\n#### 72"}
    texts = ["She sold 72 clips.", "#### 72", "The answer is 72.0", "It is 24.", "#### 7 then 72", "$72"]
    assert gsm8k_oracle(record, texts, [[]] * len(texts)) == [True, True, True, False, False, True]


def test_resume_skips_finished_queries_and_drops_a_torn_line(model, tok, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "q.jsonl", [{"id": f"q{i}", "question": f"What is {i}+1?", "answer": str(i + 1)}
                                       for i in range(3)])
    config = search_config(tmp_path, min_prob=0.0, min_samples=4, max_samples=4, queries_per_batch=1)
    first = pts(config, model=model, tokenizer=tok, oracle=gsm8k_oracle)
    results = tmp_path / "out" / "results.jsonl"
    lines = results.read_text().splitlines()
    results.write_text(lines[0] + "\n" + lines[1][:20])  # killed while writing the second query
    assert list(_finished(results)) == ["q0"] and results.read_text() == lines[0] + "\n"
    second = pts(config, model=model, tokenizer=tok, oracle=gsm8k_oracle)
    assert results.read_text().splitlines() == lines  # redone exactly, no duplicates
    assert second["status"] == first["status"] and second["pairs"] == first["pairs"]


def test_arithmetic_questions_are_deterministic_and_correct(tok, tmp_path: Path) -> None:
    questions = arithmetic_questions(40, seed=3)
    assert questions == arithmetic_questions(40, seed=3) != arithmetic_questions(40, seed=4)
    for q in questions:
        a, b = map(int, re.findall(r"\d+", q["question"]))
        answer = a + b if " buys " in q["question"] else a - b
        assert gsm8k_oracle(q, [f"So the answer is {answer}.", f"{answer + 1}"], [[], []]) == [True, False]
    config = search_config(tmp_path)
    config.data.path = "arithmetic:5"
    queries, skipped = build_queries(config, tok)
    assert [q.id for q in queries] == [f"arithmetic-0-{i}" for i in range(5)] and not skipped
    config.data.path = "arithmetic:x"
    with pytest.raises(TrainConfigError, match="arithmetic:N"):
        build_queries(config, tok)


@pytest.mark.slow
def test_teacher_finds_pivots_on_gsm8k_style_arithmetic(teacher, tmp_path: Path) -> None:
    """Word problems the 135M teacher solves part of the time: its own solutions hold pivotal tokens."""
    model, tok = teacher
    config = PTSConfig.from_toml("pts", [f"model.path={tmp_path}", f"data.path={ARITHMETIC_QUERIES}",
                                         f"run.out_dir={tmp_path}/out", "run.progress=false"] + TEACHER_SEARCH)
    summary = pts(config, model=model, tokenizer=tok)
    print(json.dumps({k: summary[k] for k in ("status", "pairs", "pivots", "estimates", "samples", "seconds",
                                              "estimates_per_s", "reused_prefix_tokens", "prefill_tokens")}))
    assert summary["pairs"] > 0
    prompts = {q.id: q.prompt for q in build_queries(config, tok)[0]}
    for p in (json.loads(line) for line in Path(summary["pairs_file"]).read_text().splitlines()):
        assert len(p["chosen_ids"]) == len(p["rejected_ids"]) == 1 and p["chosen_ids"] != p["rejected_ids"]
        assert p["pivot_token"] in p["chosen_ids"] + p["rejected_ids"]
        assert p["p_chosen"] - p["p_rejected"] >= 0.2 and abs(p["delta"]) >= 0.2
        prompt = prompts[p["query_id"]]
        prefix = p["prompt_ids"][len(prompt):]
        assert p["prompt_ids"][: len(prompt)] == prompt and tok.decode(prefix) == p["prefix_text"]
        with torch.no_grad():  # the prefix is the teacher's own sample: each token was in its top-k (20)
            logits = model(torch.tensor([p["prompt_ids"] + [p["pivot_token"]]]))[0, len(prompt) - 1 : -1]
        ranks = (logits > logits.gather(1, torch.tensor(prefix + [p["pivot_token"]])[:, None])).sum(-1)
        assert ranks.max() < config.sampling.top_k, (p["prefix_text"], ranks.tolist())


def test_code_and_exact_oracles() -> None:
    from phiforge.train.pts import code_oracle, exact_oracle

    record = {"tests": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]}
    texts = ["```python\ndef add(a, b):\n    return a + b\n```\nDone.", "def add(a, b):\n    return a - b",
             "import os\nos.system('true')\ndef add(a, b):\n    return a + b"]
    assert code_oracle(record, texts, [[]] * 3) == [True, False, False]  # the sandbox refuses os.system
    assert exact_oracle({"answer": ["Paris", "paris, france"]}, [" Paris.\nMore text", "Lyon", "Paris, France"],
                        [[]] * 3) == [True, False, True]


def test_cli_writes_pairs_and_a_summary(tmp_path: Path, tok) -> None:
    import subprocess

    from chat_data import tiny_model_folder
    from gsm8k_corpus import PYTHON, subprocess_env

    folder = tiny_model_folder(tmp_path / "model", tok)
    write_jsonl(tmp_path / "q.jsonl", [{"id": "a", "question": "Capital of France?", "answer": "Paris"},
                                       {"id": "b", "question": "Capital of Spain?", "answer": "Madrid"}])
    cmd = [PYTHON, "-m", "phiforge.cli", "pts", "pts", f"model.path={folder}", f"data.path={tmp_path}/q.jsonl",
           "data.oracle=exact", f"run.out_dir={tmp_path}/out", "run.progress=false", "sampling.max_new_tokens=4",
           "search.min_samples=4", "search.max_samples=4", "model.device=cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["queries"] == 2 and summary["status"] == {"too_hard": 2} and summary["samples"] == 8
    assert (tmp_path / "out" / "pairs.jsonl").read_text() == ""
    bad = subprocess.run(cmd[:6] + ["data.path=missing.jsonl", "data.oracle=nope"], capture_output=True, text=True,
                         env=subprocess_env(), timeout=300)
    assert bad.returncode == 2 and "data.oracle 'nope'" in bad.stderr
