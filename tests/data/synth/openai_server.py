"""A small real OpenAI-compatible HTTP server on 127.0.0.1 that misbehaves on purpose.

It speaks ``POST /v1/chat/completions`` and ``/v1/completions`` and answers with deterministic text
(or what ``answer(body)`` returns). Before a request's success it can inject, per request content, a
fixed sequence of faults: HTTP 429, HTTP 500, a hang past the client's timeout, a dropped connection
and a malformed JSON body. Every request is logged, so tests can count what the client really did.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from phiforge.data.synth import SynthConfig
from phiforge.data.synth.loadgen import content_key, response_body

FAULTS = ("429", "500", "timeout", "drop", "malformed")
WORDS = ("energy light water cells numbers stories history friends code science learn explain example "
         "because first then finally remember simple careful idea").split()


def default_answer(body: dict[str, Any]) -> str:
    """About 80 words that depend only on the request."""
    digest = content_key(body)
    words = [WORDS[int(digest[i % 60 : i % 60 + 2], 16) % len(WORDS)] for i in range(80)]
    return "Sure! Here is the text:\n" + f"Lesson {digest[:8]}. " + " ".join(words) + "."


def fault_plan(body: dict[str, Any], rate: int = 3) -> list[str]:
    """The faults a request meets before it succeeds: 0..rate-1 of them, all kinds across requests."""
    h = int(content_key(body)[:8], 16)
    return [FAULTS[(h + k) % len(FAULTS)] for k in range(h % rate)]


class FaultyOpenAIServer:
    def __init__(self, *, faults: bool = True, answer: Callable[[dict[str, Any]], str] = default_answer,
                 hang: float = 1.5, delay: float = 0.0, fault_rate: int = 3) -> None:
        self.faults, self.answer, self.hang, self.delay, self.fault_rate = faults, answer, hang, delay, fault_rate
        self.attempts: Counter[str] = Counter()  # per content key
        self.log: list[tuple[str, str]] = []  # (content key, outcome)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length))
                server.handle(self, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FaultyOpenAIServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def outcomes(self) -> Counter[str]:
        return Counter(outcome for _, outcome in self.log)

    def successes(self) -> Counter[str]:
        return Counter(key for key, outcome in self.log if outcome == "ok")

    # ---- one request ------------------------------------------------------------------------------------
    def handle(self, h: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        key = content_key(body)
        with self.lock:
            attempt = self.attempts[key]
            self.attempts[key] += 1
        plan = fault_plan(body, self.fault_rate) if self.faults else []
        outcome = plan[attempt] if attempt < len(plan) else "ok"
        with self.lock:
            self.log.append((key, outcome))
        if outcome == "429":
            self._send(h, 429, b'{"error": {"message": "rate limited"}}', {"Retry-After": "0"})
        elif outcome == "500":
            self._send(h, 500, b'{"error": {"message": "internal error"}}')
        elif outcome == "timeout":
            time.sleep(self.hang)  # past the client's timeout; then hang up
            h.close_connection = True
        elif outcome == "drop":
            h.close_connection = True  # close without a byte of response
        elif outcome == "malformed":
            self._send(h, 200, b'{"id": "x", "choices": [{"message": ')
        else:
            time.sleep(self.delay)
            self._send(h, 200, json.dumps(self.response(body)).encode())

    def response(self, body: dict[str, Any]) -> dict[str, Any]:
        return response_body(body, self.answer(body))

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(payload)


# ---- config helpers for the synth tests ----------------------------------------------------------------------
def http_overrides(base_url: str, out: Path, n: int, *extra: str) -> list[str]:
    """A fast OpenAI-teacher run: short timeout and backoff so injected faults cost little."""
    return [f"run.out_dir={out}", f"run.num_documents={n}", "run.shard_size=8", "run.progress=false",
            "teacher.kind=openai", f"teacher.base_url={base_url}", "teacher.model=test-model",
            "teacher.timeout=0.4", "teacher.backoff=0.01", "teacher.backoff_max=0.05", *extra]


def http_config(tmp_path: Path, base_url: str, n: int, *extra: str, out: Path | None = None) -> SynthConfig:
    return SynthConfig.from_dict({}, http_overrides(base_url, out or tmp_path / "out", n, *extra))
