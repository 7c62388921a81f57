"""The load generator: a real HTTP server on 127.0.0.1, driven by the real OpenAI teacher client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import phiforge
from phiforge.data.synth.loadgen import Faults, LoadGenerator, content_key
from phiforge.data.synth.teachers import OpenAITeacher, Request
from phiforge.inference.sampling import TEACHER_SAMPLING


def test_answers_have_the_requested_length_and_are_deterministic() -> None:
    with LoadGenerator() as server:
        teacher = OpenAITeacher(server.base_url, "m", timeout=5)
        requests = [Request(f"prompt {i}", seed=i, sampling=TEACHER_SAMPLING.replace(max_new_tokens=5 + i))
                    for i in range(6)]
        first = teacher.generate(requests)
        again = OpenAITeacher(server.base_url, "m", api="chat").generate(requests)
        assert [r.text for r in first] == [r.text for r in again]
        assert [r.completion_tokens for r in first] == [5 + i for i in range(6)]
        assert all(r.finish_reason == "length" for r in first) and len({r.text for r in first}) == 6
        completions = OpenAITeacher(server.base_url, "m", api="completions").generate(requests[:1])
        assert completions[0].completion_tokens == 5
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/stats") as resp:
            assert json.loads(resp.read()) == {"ok": 13}


def test_injected_faults_at_their_rates_are_retried_by_the_client() -> None:
    faults = Faults(rate_429=0.1, rate_500=0.1, rate_timeout=0.05, rate_drop=0.1, rate_malformed=0.05, hang=1.5)
    n = 200
    with LoadGenerator(faults=faults) as server:
        teacher = OpenAITeacher(server.base_url, "m", timeout=0.75, backoff=0.001, backoff_max=0.01, max_retries=10,
                                concurrency=32)
        eight = TEACHER_SAMPLING.replace(max_new_tokens=8)
        results = teacher.generate([Request(f"p{i}", seed=i, sampling=eight) for i in range(n)])
        assert len(results) == n and all(r.completion_tokens == 8 for r in results)
        seen = server.outcomes
        # >= n: on a loaded machine an answer may come after the client's timeout, and is asked again
        assert seen["ok"] >= n and all(seen[k] > 0 for k in ("429", "500", "timeout", "drop", "malformed")), seen
        attempts = sum(seen.values())
        assert 0.25 < 1 - n / attempts < 0.55  # ~40% of attempts fail
        assert teacher.stats["requests"] == attempts
    # the same body meets the same faults on every server: reproducible runs
    picks = [Faults(rate_500=0.5).pick(content_key({"a": 1}), k) for k in range(16)]
    assert picks == [Faults(rate_500=0.5).pick(content_key({"a": 1}), k) for k in range(16)]
    assert set(picks) == {"ok", "500"}


def source_env() -> dict[str, str]:
    """This checkout's phiforge for a child process (pytest's pythonpath does not reach it)."""
    src = os.path.dirname(os.path.dirname(phiforge.__file__))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def test_cli_entry_announces_its_port() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "phiforge", "loadgen", "--port", "0", "--words", "3"],
                            stdout=subprocess.PIPE, text=True, env=source_env())
    try:
        line = proc.stdout.readline()
        assert line.startswith("loadgen: listening on http://127.0.0.1:")
        url = line.split()[-1]
        [result] = OpenAITeacher(url, "m").generate(
            [Request("hi", seed=0, sampling=TEACHER_SAMPLING.replace(max_new_tokens=50))])
        assert result.completion_tokens == 3 and result.finish_reason == "stop"
    finally:
        proc.kill()
        proc.wait()
