"""Teachers against a real HTTP server on 127.0.0.1 that injects faults, and the local batched sampler."""

from __future__ import annotations

import json
import socket
from collections import Counter
from pathlib import Path

import pytest
import torch
from openai_server import FaultyOpenAIServer, default_answer, http_config

from phiforge.data.synth import run_synth
from phiforge.data.synth.teachers import OpenAITeacher, Request, TeacherError
from phiforge.data.synth.writer import read_records
from phiforge.inference.engine import SamplingParams
from phiforge.inference.sampling import TEACHER_SAMPLING


def test_faults_are_retried_and_every_document_is_produced_once(tmp_path: Path) -> None:
    with FaultyOpenAIServer(hang=1.0) as server:
        stats = run_synth(http_config(tmp_path, server.base_url, 40, "teacher.concurrency=6"))
        records = read_records(tmp_path / "out")
        assert sorted(r["metadata"]["index"] for r in records) == list(range(40))
        assert len({r["id"] for r in records}) == 40 and stats["documents"] == 40 and stats["rejected"] == 0
        outcomes = server.outcomes()
        assert all(outcomes[kind] >= 2 for kind in ("429", "500", "timeout", "drop", "malformed")), outcomes
        assert set(server.successes().values()) == {1} and len(server.successes()) == 40  # each paid for once
        retries = stats["teacher_stats"]
        assert retries["retries_429"] == outcomes["429"] and retries["retries_5xx"] == outcomes["500"]
        assert retries["retries_timeout"] == outcomes["timeout"]
        assert retries["retries_connection"] == outcomes["drop"]
        assert retries["retries_malformed"] == outcomes["malformed"]
        assert retries["requests"] == sum(outcomes.values())
        # the boilerplate opening the server adds is cleaned; the text is the server's answer
        assert all(r["text"].startswith("Lesson ") for r in records)

        # rerun into a new folder with the same cache: nothing is paid twice, the documents are the same
        log_size = len(server.log)
        cache = f"teacher.cache_path={tmp_path / 'out' / 'cache.sqlite'}"
        again = run_synth(http_config(tmp_path, server.base_url, 40, cache, out=tmp_path / "again"))
        assert len(server.log) == log_size and again["teacher_stats"]["cache_hits"] == 40
        assert read_records(tmp_path / "again") == records


def test_completions_api_and_request_body() -> None:
    with FaultyOpenAIServer(hang=1.0) as server:
        teacher = OpenAITeacher(server.base_url, "m", api="completions", backoff=0.01, timeout=0.4)
        sampling = TEACHER_SAMPLING.replace(max_new_tokens=32, temperature=0.5, top_p=0.9, top_k=0,
                                            repetition_penalty=1.0)
        request = Request("Tell me about tides.", seed=3, sampling=sampling)
        body = teacher.body(request)
        assert body == {"model": "m", "max_tokens": 32, "temperature": 0.5, "top_p": 0.9, "seed": 3,
                        "prompt": "Tell me about tides."}  # top_k / repetition_penalty only when set
        [result] = teacher.generate([request])
        assert result.text == default_answer(body).strip() and result.finish_reason == "stop"
        assert result.completion_tokens == len(result.text.split())


def test_refused_connection_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    config = http_config(tmp_path, f"http://127.0.0.1:{port}/v1", 3, "teacher.max_retries=2")
    with pytest.raises(TeacherError, match=rf"127.0.0.1:{port}/v1/chat/completions: no answer after 3 attempts; "
                                           r"last error: ConnectError.*is the server running"):
        run_synth(config)


def test_non_json_teacher_is_retried_then_reported_and_nothing_is_lost(tmp_path: Path) -> None:
    """A teacher that answers some requests with non-JSON forever: the run fails with a clear error after
    counted retries, the documents that succeeded are kept, and a rerun against a healthy teacher
    produces exactly the missing ones."""
    with FaultyOpenAIServer(faults=False) as healthy:
        config = http_config(tmp_path, healthy.base_url, 12, "teacher.max_retries=3", "teacher.concurrency=1")

    class Broken(FaultyOpenAIServer):
        def handle(self, h, body) -> None:  # noqa: ANN001
            if "mathematics" in str(body) or self.successes().total() >= 6:
                self.log.append(("", "malformed"))
                self._send(h, 200, b"<html>502 Bad Gateway</html>")
            else:
                super().handle(h, body)

    from phiforge.data.synth.pipeline import Planner

    with Broken(faults=False) as broken:
        config.teacher.base_url = broken.base_url
        with pytest.raises(TeacherError, match=r"no answer after 4 attempts; last error: malformed response "
                                               r"\(JSONDecodeError"):
            run_synth(config)
        first = broken.successes().total()
    assert first >= 1
    journal = [line for f in (tmp_path / "out" / "journal").glob("*.jsonl") for line in f.read_text().splitlines()]
    assert len(journal) == first  # what the teacher answered is on disk
    with FaultyOpenAIServer(faults=False) as healthy:
        config.teacher.base_url = healthy.base_url
        stats = run_synth(config)
        assert healthy.successes().total() == 12 - first
    assert stats["documents"] + stats["rejected"] == 12
    assert sorted(r["metadata"]["index"] for r in read_records(tmp_path / "out")) == list(range(12))
    assert Planner(config).draft(0).prompt  # the plan is unchanged by the failure


MALFORMED = [  # well-formed JSON, wrong fields: each must be a counted retry, never a crash
    lambda r: {**r, "usage": {**r["usage"], "prompt_tokens": None}},
    lambda r: {**r, "usage": "lots"},
    lambda r: {**r, "choices": [{**r["choices"][0], "finish_reason": 3}]},
    lambda r: {**r, "choices": [None]},
    lambda r: [r],
]


def test_malformed_fields_are_retried_teacher_errors(tmp_path: Path) -> None:
    class Odd(FaultyOpenAIServer):
        def handle(self, h, body) -> None:  # noqa: ANN001
            with self.lock:
                attempt = self.attempts[str(body)]
                self.attempts[str(body)] += 1
            if attempt < len(MALFORMED):
                self.log.append(("", "malformed"))
                self._send(h, 200, json.dumps(MALFORMED[attempt](self.response(body))).encode())
            else:
                self.log.append((str(body), "ok"))
                self._send(h, 200, json.dumps(self.response(body)).encode())

    with Odd(faults=False) as server:
        config = http_config(tmp_path, server.base_url, 3, f"teacher.max_retries={len(MALFORMED)}",
                             "teacher.backoff=0.01", "teacher.backoff_max=0.02")
        stats = run_synth(config)
        assert server.outcomes()["malformed"] == 3 * len(MALFORMED)
    assert stats["teacher_stats"]["retries_malformed"] == 3 * len(MALFORMED), stats["teacher_stats"]
    assert stats["documents"] + stats["rejected"] == 3
    with Odd(faults=False) as server:
        config = http_config(tmp_path / "b", server.base_url, 1, "teacher.max_retries=0")
        with pytest.raises(TeacherError, match=r"last error: malformed response \(TypeError: usage token counts"):
            run_synth(config)


def test_client_errors_are_not_retried(tmp_path: Path) -> None:
    class Rejecting(FaultyOpenAIServer):
        def handle(self, h, body) -> None:  # noqa: ANN001
            self.log.append(("", "400"))
            self._send(h, 400, b'{"error": {"message": "unknown parameter top_k"}}')

    with Rejecting() as srv:
        with pytest.raises(TeacherError, match=r"HTTP 400 \(not retried\).*unknown parameter top_k"):
            run_synth(http_config(tmp_path, srv.base_url, 2))
        assert srv.outcomes()["400"] <= 2  # one attempt per request at most, no retries


# ---- the local engine's batched sampler ----------------------------------------------------------------------
def test_batched_draw_matches_the_filtered_distribution() -> None:
    from phiforge.inference.engine import draw

    logits = torch.log(torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
    cases = {SamplingParams(temperature=1.0, top_k=3): [0.5, 0.3125, 0.1875, 0, 0, 0],
             SamplingParams(temperature=1.0, top_p=0.6): [0.4 / 0.65, 0.25 / 0.65, 0, 0, 0, 0],
             SamplingParams(temperature=1.0, min_p=0.3): [0.5, 0.3125, 0.1875, 0, 0, 0]}  # keeps p >= 0.12
    n = 4000
    for params, expected in cases.items():
        generators = [torch.Generator().manual_seed(i) for i in range(n)]
        tokens = draw(logits.expand(n, -1).clone(), [params] * n, generators)
        freq = torch.bincount(tokens, minlength=6).float() / n
        assert torch.allclose(freq, torch.tensor(expected), atol=0.03), (params, freq)


def test_batched_draw_depends_only_on_the_rows_own_generator() -> None:
    from phiforge.inference.engine import draw

    torch.manual_seed(0)
    logits = torch.randn(5, 1000)
    params = [SamplingParams(temperature=0.8, top_k=k, top_p=p) for k, p in
              ((50, 0.95), (0, 0.9), (10, 1.0), (0, 1.0), (1, 1.0))]
    batched = draw(logits, params, [torch.Generator().manual_seed(s) for s in range(5)])
    alone = [int(draw(logits[i : i + 1], [params[i]], [torch.Generator().manual_seed(i)])[0]) for i in range(5)]
    assert batched.tolist() == alone
    assert alone[4] == int(logits[4].argmax())  # top_k=1 is greedy


def test_local_teacher_streams_each_result_as_its_row_finishes(teacher) -> None:  # noqa: ANN001
    from phiforge.data.synth.teachers import LocalTeacher

    model, tokenizer = teacher
    local = LocalTeacher(model, tokenizer, max_batch_size=2, name="smollm2-135m-instruct")
    sampling = TEACHER_SAMPLING.replace(max_new_tokens=8, temperature=0.7)
    requests = [Request(f"Name a color number {i}.", seed=i, sampling=sampling) for i in range(3)]
    order: list[int] = []
    results = local.generate(requests, lambda i, r: order.append(i))
    assert sorted(order) == [0, 1, 2] and all(0 < r.completion_tokens <= 8 and r.text for r in results)
    assert results[0].prompt_tokens == len(local.encode(requests[0]))
    again = local.generate(requests[:1])  # same seed, alone: same text
    assert again[0].text == results[0].text
    assert Counter(local.identity()) == Counter({"kind": "local", "model": "smollm2-135m-instruct",
                                                 "dtype": "float32", "chat": True})
