"""Benchmarks from the Hugging Face hub through `datasets`, tested offline (HF_DATASETS_OFFLINE=1, set by conftest)
with hub-layout dataset repositories built here from the shared files and read by `datasets.load_dataset(folder)`
($PHIFORGE_HUB_MIRROR); and no default that looks outside the working directory."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import SHARED
from tiny_model import save_tiny_llama

from phiforge.cli import main
from phiforge.eval.tasks import TaskDataError, get_task
from phiforge.run.pipeline import RecipeError, Runner, load_recipe

pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")
pytest.importorskip("datasets")
BENCH = SHARED / "benchmarks"


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def configs_readme(repo: Path, config: str, splits: list[str]) -> None:
    """The README front matter a hub repository uses to name a config and its splits' files."""
    files = "".join(f"  - split: {s}\n    path: {config}/{s}-*\n" for s in splits)
    (repo / "README.md").write_text(f"---\nconfigs:\n- config_name: {config}\n  data_files:\n{files}---\n")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """baber/piqa, openai/gsm8k (config main), cais/mmlu (config all; its test split: the shared val files) in
    the hub's layouts, from the shared files."""
    root = tmp_path_factory.mktemp("hub")
    docs = [json.loads(line) for line in (BENCH / "piqa" / "valid.jsonl").read_text().splitlines()]
    labels = [int(x) for x in (BENCH / "piqa" / "valid-labels.lst").read_text().split()]
    rows = [{**d, "label": lab} for d, lab in zip(docs, labels, strict=True)]
    write_parquet(root / "baber/piqa/data/validation-00000-of-00001.parquet", rows)
    write_parquet(root / "baber/piqa/data/train-00000-of-00001.parquet", rows[:100])  # stand-in: shots only
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (BENCH / "gsm8k" / f"{split}.jsonl").read_text().splitlines()]
        write_parquet(root / f"openai/gsm8k/main/{split}-00000-of-00001.parquet", rows)
    configs_readme(root / "openai/gsm8k", "main", ["train", "test"])
    for split, folder in (("test", "val"), ("dev", "dev")):
        rows = []
        for subject in ("anatomy", "astronomy"):
            with open(BENCH / "mmlu" / folder / f"{subject}_{folder}.csv", newline="") as f:
                rows += [{"question": r[0], "subject": subject, "choices": r[1:5], "answer": "ABCD".index(r[5])}
                         for r in csv.reader(f)]
        write_parquet(root / f"cais/mmlu/all/{split}-00000-of-00001.parquet", rows)
    configs_readme(root / "cais/mmlu", "all", ["test", "dev"])
    return root


@pytest.fixture
def no_local_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory without ./benchmarks, and no $PHIFORGE_BENCHMARKS."""
    monkeypatch.delenv("PHIFORGE_BENCHMARKS", raising=False)
    monkeypatch.delenv("PHIFORGE_HUB_MIRROR", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def plain(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in d.items() if k != "__line__"} for d in docs]


def test_hub_datasets_give_the_documents_of_the_local_files(hub: Path, no_local_data: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHIFORGE_HUB_MIRROR", str(hub))
    for name, n_docs in (("piqa", 1838), ("gsm8k", 1319), ("mmlu_anatomy", 14)):
        remote = get_task(name).load()
        local = get_task(name, data_dir=BENCH).load()
        assert remote.source.startswith(f"hf:{get_task(name).hub.path}") and len(remote.docs) == n_docs, name
        assert plain(remote.docs) == plain(local.docs), name
        if name == "gsm8k":
            assert plain(remote.shot_docs) == plain(local.shot_docs)
        if name == "mmlu_anatomy":  # cais/mmlu's "all" config holds every subject: the dev shots are the subject's
            assert {d["subject"] for d in remote.shot_docs} == {"anatomy"} and len(remote.shot_docs) == 5


def test_without_any_source_the_error_says_what_to_set(no_local_data: Path) -> None:
    with pytest.raises(TaskDataError) as err:
        get_task("piqa").load()
    message = str(err.value)
    assert "$PHIFORGE_BENCHMARKS is unset and there is no ./benchmarks" in message
    assert "baber/piqa" in message and "OfflineModeIsEnabled" in message and "--data piqa=PATH" in message
    # the run stops before its first stage: nothing is written
    with pytest.raises(RecipeError, match=r"\[eval\] no data for \['gsm8k', 'piqa'\]: set \$PHIFORGE_BENCHMARKS"):
        Runner(load_recipe("tiny-textbooks", [f"run.out_dir={no_local_data / 'run'}"]), progress=False)
    assert not (no_local_data / "run").exists()
    # ./benchmarks in the working directory is a source of its own
    (no_local_data / "benchmarks").symlink_to(BENCH)
    assert len(get_task("piqa").load().docs) == 1838


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory, teacher_path: Path) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_hub"), teacher_path)


def test_eval_cli_reads_piqa_from_the_hub_offline(hub: Path, no_local_data: Path, tiny_folder: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def run(out: Path) -> dict[str, Any]:
        assert main(["eval", "--model", str(tiny_folder), "--tasks", "piqa", "--limit", "20", "--output", str(out),
                     "--no-progress"]) == 0
        return json.loads(out.read_text())

    monkeypatch.setenv("PHIFORGE_HUB_MIRROR", str(hub))
    remote = run(no_local_data / "hub.json")
    monkeypatch.delenv("PHIFORGE_HUB_MIRROR")
    monkeypatch.setenv("PHIFORGE_BENCHMARKS", str(BENCH))
    local = run(no_local_data / "local.json")
    assert remote["results"]["piqa"] == local["results"]["piqa"]
    assert remote["n-samples"]["piqa"] == {"original": 1838, "effective": 20}
