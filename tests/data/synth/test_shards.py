"""N synth processes on one output folder (--shard K/N): kill -9 one mid-run, rerun it, every planned id once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_loadgen import source_env
from test_synth_pipeline import finished_documents

from phiforge.cli import main
from phiforge.data.synth import SynthConfig
from phiforge.data.synth.loadgen import LoadGenerator
from phiforge.data.synth.pipeline import Planner, document_id, parse_shard, shard_range
from phiforge.data.synth.writer import read_records

CONFIG = """[run]
num_documents = {n}
shard_size = {shard_size}
progress = false
[teacher]
kind = "openai"
base_url = "{url}"
model = "loadgen"
concurrency = 16
[sampling]
max_new_tokens = 24
[filter]
min_words = 20
"""


@pytest.mark.parametrize("n", [pytest.param(10_000, marks=pytest.mark.slow), 800])
def test_kill9_of_one_shard_process_then_a_rerun_gives_every_planned_id_once(tmp_path: Path, n: int) -> None:
    out = tmp_path / "out"
    with LoadGenerator(words=0) as server:
        config_file = tmp_path / "synth.toml"
        config_file.write_text(CONFIG.format(n=n, shard_size=n // 20, url=server.base_url))
        cmd = [sys.executable, "-m", "phiforge", "synth", str(config_file), f"run.out_dir={out}"]
        procs = [subprocess.Popen([*cmd, "--shard", f"{k}/2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=source_env()) for k in range(2)]
        config = SynthConfig.from_toml(config_file, [f"run.out_dir={out}"])
        first = shard_range(config, (0, 2))
        deadline = time.monotonic() + 600
        while finished_documents(out, first) < n // 8:
            assert procs[0].poll() is None, procs[0].stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        killed_at = finished_documents(out, first)
        assert n // 8 <= killed_at < n // 2  # really mid-run
        assert procs[1].wait(600) == 0, procs[1].stderr.read().decode()
        assert not json.loads((out / "stats" / "process-1-of-2.json").read_text()).get("complete")
        assert not (out / "stats.json").exists()  # shard 0/2 is not done: no fold yet
        rerun = subprocess.run([*cmd, "--shard", "0/2"], capture_output=True, text=True, env=source_env(), timeout=600)
        assert rerun.returncode == 0, rerun.stderr
        resumed = json.loads(rerun.stdout)
        assert resumed["resumed_from"] >= killed_at - 1 and resumed["generated_this_run"] == n // 2 - resumed[
            "resumed_from"]
    records = read_records(out) + read_records(out, rejected=True)
    planner = Planner(config)
    identity = {"kind": "openai", "model": "loadgen", "api": "chat"}
    planned = [document_id(config, d.seed, d.prompt, identity) for d in map(planner.draft, range(n))]
    assert sorted(r["metadata"]["index"] for r in records) == list(range(n))
    assert sorted(r["id"] for r in records) == sorted(planned) and len(set(planned)) == n
    merged = json.loads((out / "stats.json").read_text())  # the rerun was the last to finish: it folded
    assert merged["complete"] and merged["documents"] + merged["rejected"] == n
    assert merged["documents"] == len(read_records(out)) and set(merged["processes"]) == {"0/2", "1/2"}
    assert not list((out / "journal").iterdir())


def test_shard_ranges_tile_the_run_and_merge_stats_names_what_is_missing(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = SynthConfig.from_dict({}, ["run.num_documents=1000", "run.shard_size=64", f"run.out_dir={tmp_path}"])
    for n in (1, 2, 3, 7, 16, 40):
        ranges = [shard_range(config, (k, n)) for k in range(n)]
        assert [s for r in ranges for s in r] == list(range(16))
    assert parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)
    toml = tmp_path / "synth.toml"
    toml.write_text(f'[run]\nout_dir = "{tmp_path}"\nnum_documents = 10\nshard_size = 4\n')
    assert main(["synth", str(toml), "--merge-stats"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["complete"] is False and stats["missing_shards"] == 3 and stats["documents"] == 0
    assert main(["synth", str(toml), "--shard", "2/2"]) == 2
    assert "need 0 <= K < N" in capsys.readouterr().err
