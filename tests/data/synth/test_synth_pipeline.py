"""phiforge synth end to end: the embedded teacher, SIGKILL and resume, the CLI's errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai_server import FaultyOpenAIServer, http_overrides

from phiforge.cli import main
from phiforge.data.synth import SynthConfig, run_synth
from phiforge.data.synth.pipeline import Planner, cleanup, document_id
from phiforge.data.synth.teachers import LocalTeacher
from phiforge.data.synth.writer import OutputError, read_records


def test_embedded_teacher_end_to_end(teacher, tmp_path: Path) -> None:  # noqa: ANN001
    model, tokenizer = teacher
    local = LocalTeacher(model, tokenizer, max_batch_size=4, name="smollm2-135m-instruct")
    config = SynthConfig.from_dict({}, [f"run.out_dir={tmp_path}", "run.num_documents=3", "run.progress=false",
                                        "sampling.max_new_tokens=16", "filter.min_words=3", "run.seed=4"])
    stats = run_synth(config, teacher=local)
    records = read_records(tmp_path) + read_records(tmp_path, rejected=True)
    assert len(records) == 3 and stats["documents"] + stats["rejected"] == 3
    planner = Planner(config)
    for record in records:
        meta = record["metadata"]
        draft = planner.draft(meta["index"])
        assert meta["prompt"] == draft.prompt and meta["topic"] == draft.seed.topic and meta["format"]
        assert record["id"] == document_id(config, draft.seed, draft.prompt, local.identity())
        assert meta["teacher"]["model"] == "smollm2-135m-instruct" and meta["sampling"]["max_new_tokens"] == 16
        assert 0 < meta["tokens"]["completion"] <= 16 and meta["tokens"]["prompt"] > 20 and record["text"]
    assert stats["completion_tokens"] == sum(r["metadata"]["tokens"]["completion"] for r in read_records(tmp_path))
    assert stats["teacher"]["kind"] == "local" and stats["tokens_per_s"] > 0


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    n = 60
    with FaultyOpenAIServer(faults=False, delay=0.05) as srv:
        reference = SynthConfig.from_dict({}, http_overrides(srv.base_url, tmp_path / "reference", n))
        run_synth(reference)
        killed = tmp_path / "killed"
        config = tmp_path / "synth.toml"
        config.write_text('[run]\nshard_size = 8\n')
        cmd = [sys.executable, "-m", "phiforge.cli", "synth", str(config),
               *http_overrides(srv.base_url, killed, n, "teacher.concurrency=2")[1:], f"run.out_dir={killed}"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and finished_documents(killed) < 20:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert 20 <= finished_documents(killed) < n  # really mid-run
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=300)
        assert done.returncode == 0, done.stderr
    resumed, expected = read_records(killed), read_records(tmp_path / "reference")
    ids = [r["id"] for r in resumed]
    assert len(ids) == len(set(ids)) == n and resumed == expected
    assert '"resumed_from": ' in done.stdout and '"resumed_from": 0' not in done.stdout


def finished_documents(out: Path, shards: range | None = None) -> int:
    """Distinct documents on disk (journaled, in sealed shards, rejected), of every output shard or of ``shards``:
    while a shard is sealed its records sit in both the shard and its journal, so lines would count them twice."""
    names = ["shard-*.jsonl"] if shards is None else [f"shard-{s:05d}.jsonl" for s in shards]
    ids = set()
    for folder in (out / "journal", out, out / "rejected"):
        for name in names:
            for file in folder.glob(name):
                ids.update(_ids(file.read_text(encoding="utf-8")))
    return len(ids)


def _ids(text: str) -> list[str]:
    """Ids of the complete lines (a journal may end in a line being written)."""
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line)["id"])
        except json.JSONDecodeError:
            pass
    return out


def test_resume_with_a_different_config_is_refused(tmp_path: Path) -> None:
    with FaultyOpenAIServer(faults=False) as srv:
        run_synth(SynthConfig.from_dict({}, http_overrides(srv.base_url, tmp_path, 4)))
        changed = SynthConfig.from_dict({}, http_overrides(srv.base_url, tmp_path, 4, "sampling.temperature=0.2"))
        with pytest.raises(OutputError, match=r"different config \(changed: \['sampling.temperature'\]\)"):
            run_synth(changed)
        again = run_synth(SynthConfig.from_dict({}, http_overrides(srv.base_url, tmp_path, 4, "teacher.timeout=9")))
        assert again["generated_this_run"] == 0 and again["documents"] + again["rejected"] == 4


def test_cli_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "synth.toml"
    config.write_text(f'[run]\nout_dir = "{tmp_path / "out"}"\nnum_documents = 2\n')
    empty = tmp_path / "topics.txt"
    empty.write_text("")
    cases = {("run.num_docs=3",): "unknown key 'run.num_docs' in [run]; valid keys: out_dir, num_documents",
             ("prompts.story=A tale of {hero}",): "prompts.story: unknown field {hero}",
             (f"seeds.topics={empty}",): "the topic list is empty",
             ("teacher.kind=openai",): "teacher.base_url is required",
             ("teacher.kind=openai", "teacher.base_url=http://127.0.0.1:9/v1", "teacher.max_retries=1",
              "teacher.backoff=0.01"): "no answer after 2 attempts; last error: ConnectError"}
    for overrides, message in cases.items():
        assert main(["synth", str(config), *overrides]) == 2
        assert message in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml: no such config file (TOML)" in capsys.readouterr().err


def test_cleanup_strips_stock_openings_and_closings() -> None:
    text = "Sure! Here's a textbook section on tides:\n\nTides rise twice a day.\n\nI hope this helps!"
    assert cleanup(text) == "Tides rise twice a day."
    assert cleanup("Here is the story:\nMia found a shell.") == "Mia found a shell."
    assert cleanup("Surely the moon pulls the sea.") == "Surely the moon pulls the sea."  # a real sentence stays
