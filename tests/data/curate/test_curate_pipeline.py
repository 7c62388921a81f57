"""`phiforge curate` end to end: bad input, resume, 1 vs N workers, local vs Ray, the CLI."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED
from curate_corpus import benchmark_items, clean_corpus, mixed_corpus, wrap

from phiforge.data.curate.executor import CurateError
from phiforge.data.curate.pipeline import CurateConfig, run_curate


def write_shards(folder: Path, n_shards: int = 3) -> dict[str, list[str]]:
    """Mixed documents, planted GSM8K items and duplicates, spread over shards; returns planted ids."""
    rng = random.Random(0)
    docs = mixed_corpus(60, 12)
    filler = clean_corpus(30, seed=9)
    for k, (_, _, text) in enumerate(b for b in benchmark_items(4, seed=1) if b[0] == "gsm8k"):
        docs.append({"id": f"plant{k}", "text": wrap(text, rng, filler)})
    docs += [{"id": "dup-exact", "text": docs[0]["text"].upper()}, {"id": "dup-copy", "text": docs[1]["text"]}]
    folder.mkdir(parents=True)
    for s in range(n_shards):
        with open(folder / f"part{s}.jsonl", "w") as f:
            for d in docs[s::n_shards]:
                f.write(json.dumps(d) + "\n")
    return {"plants": [f"plant{k}" for k in range(4)], "dups": ["dup-exact", "dup-copy"]}


def config(tmp: Path, inputs: Path, **sections: dict) -> CurateConfig:
    raw = {"output": str(tmp), "input": {"paths": [str(inputs)]},
           "heuristics": {"enabled": False},
           "decontam": {"benchmarks": ["gsm8k"], "data_dir": str(SHARED / "benchmarks")}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return CurateConfig.from_dict(raw)


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "curated").glob("*.jsonl"))}


def ids(folder: Path) -> set[str]:
    return {json.loads(line)["id"] for p in (folder / "curated").glob("*.jsonl") for line in p.open()}


def test_one_and_two_workers_give_identical_output(tmp_path: Path) -> None:
    planted = write_shards(tmp_path / "in")
    one = run_curate(config(tmp_path / "w1", tmp_path / "in"))
    two = run_curate(config(tmp_path / "w2", tmp_path / "in", executor={"workers": 2}))
    assert outputs(tmp_path / "w1") == outputs(tmp_path / "w2") and outputs(tmp_path / "w1")
    kept = ids(tmp_path / "w1")
    assert not kept & set(planted["plants"] + planted["dups"])
    assert one["stages"]["dedup"]["removed"] == {"dedup_exact": 2}
    assert one["stages"]["dedup"] == {**two["stages"]["dedup"], "seconds": one["stages"]["dedup"]["seconds"]}
    report = json.loads((tmp_path / "w1" / "decontam" / "report.json").read_text())
    hits = {e["id"] for e in report["benchmarks"]["gsm8k"]["examples"]}
    # the plants, plus GSM8K *train* problems that are near-copies of test items (a known GSM8K overlap)
    assert set(planted["plants"]) <= hits and len(hits) <= 6
    assert report["benchmarks"]["gsm8k"]["documents_removed"] == len(hits)
    # removed documents are kept, with the reason, not silently dropped
    removed = [json.loads(line) for p in (tmp_path / "w1" / "decontam" / "removed").glob("*.jsonl")
               for line in p.open()]
    assert {r["id"] for r in removed} == hits and all(r["removed_by"].startswith("decontam_gsm8k (") for r in removed)


def test_bad_lines_empty_shards_and_stop_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_shards(tmp_path / "in", n_shards=2)
    with open(tmp_path / "in" / "part1.jsonl", "a") as f:
        f.write('{"id": "broken", "text": \n')
        f.write('{"id": "no-text"}\n')
        f.write('[1, 2]\n')
    (tmp_path / "in" / "empty.jsonl").write_text("")
    cfg = config(tmp_path / "out", tmp_path / "in", decontam={"enabled": False})
    stats = run_curate(cfg)
    read = stats["stages"]["read"]
    assert read["removed"] == {"malformed": 3} and read["empty_shards"] == ["empty"]
    lines = sorted(read["bad_lines"])
    assert len(lines) == 3 and all(str(tmp_path / "in" / "part1.jsonl") in m for m in lines)
    assert any("missing field 'text'" in m for m in lines) and any("malformed JSON" in m for m in lines)
    err = capsys.readouterr().err
    assert "input shard empty is empty" in err and "part1.jsonl line" in err
    bad = [json.loads(line) for line in (tmp_path / "out" / "read" / "removed" / "part1.jsonl").open()]
    assert [b["error"][:9] for b in bad] == ["malformed", "missing f", "expected "]
    stop = config(tmp_path / "stop", tmp_path / "in", input={"on_error": "stop"})
    with pytest.raises(CurateError, match=r"part1\.jsonl line \d+: malformed JSON.*on_error = 'stop'"):
        run_curate(stop)


def test_truncated_archive_surrogates_and_bad_ids_are_counted(tmp_path: Path) -> None:
    import gzip

    (tmp_path / "in").mkdir()
    good = [{"id": f"d{i}", "text": f"document number {i} about rivers and hills and the sea"} for i in range(40)]
    whole = gzip.compress("".join(json.dumps(d) + "\n" for d in good).encode())
    (tmp_path / "in" / "cut.jsonl.gz").write_bytes(whole[: len(whole) * 2 // 3])
    lines = [json.dumps({"id": "s0", "text": "fine"}), '{"id": "s1", "text": "bad \\ud800 text"}',
             '{"id": "s2", "text": "ok", "meta": {"k": "\\udfff"}}', json.dumps({"id": 7, "text": "int id"}),
             json.dumps({"id": "s0", "text": "again"}), json.dumps({"id": "s5", "text": "fine too"})]
    (tmp_path / "in" / "odd.jsonl").write_text("\n".join(lines) + "\n")
    stats = run_curate(config(tmp_path / "out", tmp_path / "in", decontam={"enabled": False},
                              dedup={"enabled": False}))
    read = stats["stages"]["read"]
    assert read["removed"] == {"malformed": 5}, read
    messages = "\n".join(read["bad_lines"])
    assert "cut.jsonl.gz line" in messages and "truncated or corrupt archive" in messages
    surrogate = "a string holds a lone surrogate"
    for line, what in ((2, surrogate), (3, surrogate), (4, "field 'id' is 7, not a non-empty string"),
                       (5, "duplicate id 's0' (first on line 1)")):
        assert f"odd.jsonl line {line}: {what}" in messages, messages
    kept = ids(tmp_path / "out")
    assert {"s0", "s5"} <= kept and not {"s1", "s2"} & kept and len(kept & {d["id"] for d in good}) > 5
    assert not list((tmp_path / "out").rglob("*.tmp")), "a temp file was left behind"
    with pytest.raises(CurateError, match=r"cut\.jsonl\.gz line \d+: truncated or corrupt archive"):
        run_curate(config(tmp_path / "stop", tmp_path / "in", input={"on_error": "stop"}))


def test_resume_redoes_only_unfinished_shards(tmp_path: Path) -> None:
    write_shards(tmp_path / "in")
    cfg = config(tmp_path / "out", tmp_path / "in", decontam={"enabled": False})
    run_curate(cfg)
    reference = outputs(tmp_path / "out")
    # a crash inside the dedup filter of part1: marker never written, a torn temp file left behind
    (tmp_path / "out" / "dedup" / ".done" / "part1.json").unlink()
    (tmp_path / "out" / "dedup" / "part1.jsonl").write_text('{"id": "torn')
    (tmp_path / "out" / "dedup" / ".part1.jsonl.tmp").write_text("garbage")
    before = (tmp_path / "out" / "dedup" / ".done" / "part0.json").stat().st_mtime_ns
    run_curate(cfg)
    assert outputs(tmp_path / "out") == reference
    assert (tmp_path / "out" / "dedup" / ".done" / "part0.json").stat().st_mtime_ns == before
    # changing what the output depends on, into the same folder, is refused
    with pytest.raises(CurateError, match=r"different settings \(dedup\)"):
        run_curate(config(tmp_path / "out", tmp_path / "in", decontam={"enabled": False}, dedup={"bands": 20}))


@pytest.mark.slow  # starting a local Ray instance takes 10-80 s here
def test_local_and_ray_give_identical_output(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="Ray is the optional extra phiforge[ray]; `make test` installs it")
    write_shards(tmp_path / "in")
    run_curate(config(tmp_path / "local", tmp_path / "in", executor={"workers": 2}))
    ray_stats = run_curate(config(tmp_path / "ray", tmp_path / "in", executor={"kind": "ray", "workers": 2}))
    assert outputs(tmp_path / "local") == outputs(tmp_path / "ray") and outputs(tmp_path / "ray")
    assert ray_stats["stages"]["decontam"]["report"]["gsm8k"]["documents_removed"] >= 4


def test_cli_with_overrides(tmp_path: Path) -> None:
    write_shards(tmp_path / "in")
    toml = tmp_path / "curate.toml"
    toml.write_text(f'output = "{tmp_path / "out"}"\n[input]\npaths = ["{tmp_path / "in"}"]\n'
                    "[decontam]\nenabled = false\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[3] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "phiforge.cli", "curate", str(toml), "heuristics.min_words=10"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats == json.loads((tmp_path / "out" / "stats.json").read_text())
    assert set(stats["stages"]) == {"read", "heuristics", "dedup"}
    assert sum(stats["stages"]["heuristics"]["removed"].values()) > 0  # the spam and chatter
    bad = subprocess.run(cmd[:5] + ["dedup.band=3"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "unknown key 'dedup.band'" in bad.stderr and "bands" in bad.stderr
