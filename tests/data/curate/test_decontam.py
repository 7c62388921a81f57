"""Decontamination on real benchmark items planted in clean text: recall per variant, false positives."""

from __future__ import annotations

import random
import shutil

import pytest
from conftest import SHARED
from curate_corpus import benchmark_items, clean_corpus, repunctuate, research_paragraphs, small_edits, wrap

from phiforge.data.curate.decontam import BenchmarkIndex, DecontamConfig, item_parts, load_benchmarks, normalize_words
from phiforge.data.curate.executor import CurateError

BENCHMARKS = ["gsm8k", "piqa", "mmlu"]


@pytest.fixture(scope="module")
def index() -> BenchmarkIndex:
    return BenchmarkIndex.build(DecontamConfig(benchmarks=BENCHMARKS, data_dir=str(SHARED / "benchmarks")))


def test_index_uses_the_eval_loaders(index: BenchmarkIndex) -> None:
    assert index.meta["tasks"] == {"gsm8k": 1319, "piqa": 1838, "mmlu": 1531}
    assert index.meta["long_ngrams"] > 100_000 and index.meta["short_ngrams"] > 100_000
    # one normalization on both sides: case, punctuation and diacritics do not matter
    assert normalize_words("Café, NAÏVE-résumé!") == normalize_words("cafe naive resume")


def test_mmlu_answer_is_indexed_as_text_not_letter() -> None:
    from phiforge.eval.tasks import get_task

    task = get_task("mmlu", data_dir=SHARED / "benchmarks").load()
    question, answer = item_parts(task, task.docs[0])
    assert not question.endswith("Answer:") and answer not in "ABCD"
    assert answer == task.docs[0]["choices"][task.gold(task.docs[0])]


def test_planted_items_found_and_clean_text_kept(index: BenchmarkIndex) -> None:
    rng = random.Random(0)
    clean = clean_corpus(400, seed=1)
    filler = clean[:50]
    items = benchmark_items(20, seed=0)  # 20 each of GSM8K, PIQA, MMLU
    # items under 7 words cannot be indexed (the index reports how many); the rest must be found
    items = [it for it in items if len(normalize_words(it[2])) >= index.config.short_n]
    assert len(items) >= 55
    variants = {"verbatim": lambda t: t, "repunctuated": lambda t: repunctuate(t, rng),
                "small_edits": lambda t: small_edits(t, rng, 0.05)}
    recall = {}
    for name, make in variants.items():
        found = 0
        for task, doc_id, text in items:
            hit = index.match(wrap(make(text), rng, filler))
            found += hit is not None and hit[0]["task"] == task and hit[0]["doc"] == doc_id
        recall[name] = found / len(items)
    flagged = [(t[:60], index.match(t)[0]) for t in clean if index.match(t) is not None]
    prose = research_paragraphs()
    prose_flagged = [t[:60] for t in prose if index.match(t) is not None]
    print({"recall": recall, "flagged_clean": len(flagged), "clean_docs": len(clean), "prose": len(prose),
           "prose_flagged": len(prose_flagged)}, flagged)
    assert recall["verbatim"] == 1.0 and recall["repunctuated"] == 1.0
    assert recall["small_edits"] >= 0.85
    assert prose_flagged == []
    # GSM8K train / MMLU dev hold a few real near-copies of test items (checked by hand: the 'stamps'
    # problem, two shared history passages, a moral scenario, a syllogism question); nothing else is flagged
    assert len(flagged) <= 5, flagged


def test_question_only_and_generic_phrases(index: BenchmarkIndex) -> None:
    items = benchmark_items(10, seed=5)
    gsm = [t for task, _, t in items if task == "gsm8k"]
    question_only = [t.split("?")[0] + "?" for t in gsm]
    assert sum(index.match(q) is not None for q in question_only) >= 8
    # a sentence of generic math words shares short n-grams with many items but confirms none
    assert index.match("How many apples does she have left after she gives half of them to her friend at "
                       "school today and eats two more") is None


def test_missing_benchmark_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(CurateError, match=r"benchmark 'gsm8k' could not be loaded.*does not exist"):
        load_benchmarks(DecontamConfig(benchmarks=["gsm8k"], paths={"gsm8k": str(tmp_path / "nope.jsonl")}))
    with pytest.raises(CurateError, match="unknown task 'gsm9k'"):
        load_benchmarks(DecontamConfig(benchmarks=["gsm9k"], data_dir=str(SHARED / "benchmarks")))
    # "all" names the benchmarks without data and stops, unless told to skip them; then it says why
    shutil.copytree(SHARED / "benchmarks" / "piqa", tmp_path / "piqa")
    with pytest.raises(CurateError, match=r"benchmarks \[.*'gsm8k'.*\] could not be loaded.*skip_missing = true "
                                          r"to index only \['humaneval', 'piqa', 'redteam'\]"):
        load_benchmarks(DecontamConfig(benchmarks=["all"], data_dir=str(tmp_path)))
    items, skipped = load_benchmarks(DecontamConfig(benchmarks=["all"], data_dir=str(tmp_path), skip_missing=True))
    assert len(items["piqa"]) == 1838
    assert "gsm8k" in skipped and "does not exist" in skipped["gsm8k"] and "hub" in skipped["gsm8k"]
