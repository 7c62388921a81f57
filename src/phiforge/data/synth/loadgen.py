"""A load generator: an OpenAI-compatible HTTP server on 127.0.0.1 that answers instantly.

    phiforge loadgen --port 8000 [--words 64] [--fault-429 0.01 --fault-500 0.01 --fault-timeout 0.001 ...]
    python -m phiforge.data.synth.loadgen --port 0      # prints "loadgen: listening on http://127.0.0.1:PORT/v1"

It answers ``POST /v1/chat/completions`` and ``/v1/completions`` with deterministic text that depends only
on the request body, ``max_tokens`` words long (or ``--words``), with an OpenAI-shaped ``usage`` block;
``GET /v1/models``, ``/health`` and ``/stats`` (outcome counts) are there too. Faults are injected at given
rates: HTTP 429 (with Retry-After), HTTP 500, a hang past the client's timeout, a connection dropped
without a byte, a malformed body; whether attempt k of a request meets a fault is a hash of (body, k), so
a run's fault pattern is reproducible.

It stands in for a vLLM/SGLang fleet **only to measure phiforge's own overhead** (planning, HTTP client,
retries, journal, shards, stats) at millions of documents: it does no inference, so its docs/s say nothing
about a real teacher's. One asyncio process with a minimal HTTP/1.1 (keep-alive) parser, so it costs the
client machine little.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from phiforge.errors import ConfigError, ExternalError

FAULTS = ("429", "500", "timeout", "drop", "malformed")
WORDS = ("energy light water cells numbers stories history friends code science learn explain example because "
         "first then finally remember simple careful idea plants motion force heat sound shapes maps rivers "
         "stars atoms music rhythm reason proof angle graph").split()


def content_key(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def deterministic_text(body: dict[str, Any], words: int) -> str:
    """``words`` words that depend only on the request body."""
    rng = random.Random(content_key(body))
    return " ".join(rng.choices(WORDS, k=max(1, words))) + "."


def response_body(body: dict[str, Any], text: str, finish_reason: str = "stop") -> dict[str, Any]:
    """The OpenAI-shaped answer to a chat or completions request (``messages`` decides which)."""
    prompt = body.get("prompt") or " ".join(str(m.get("content", "")) for m in body.get("messages", []))
    usage = {"prompt_tokens": len(str(prompt).split()), "completion_tokens": len(text.split())}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    if "messages" in body:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": finish_reason}
        return {"id": "chatcmpl-loadgen", "object": "chat.completion", "model": body.get("model"),
                "choices": [choice], "usage": usage}
    return {"id": "cmpl-loadgen", "object": "text_completion", "model": body.get("model"),
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason}], "usage": usage}


@dataclass
class Faults:
    """Per-attempt fault rates (each in [0, 1], summing to at most 1) and the hang of a timeout fault."""

    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_timeout: float = 0.0
    rate_drop: float = 0.0
    rate_malformed: float = 0.0
    hang: float = 5.0

    def __post_init__(self) -> None:
        rates = self.rates()
        if any(not 0 <= r <= 1 for r in rates) or sum(rates) > 1:
            raise ConfigError(f"fault rates {rates} must each be in [0, 1] and sum to at most 1")

    def rates(self) -> list[float]:
        return [self.rate_429, self.rate_500, self.rate_timeout, self.rate_drop, self.rate_malformed]

    def pick(self, key: str, attempt: int) -> str:
        """The outcome of attempt ``attempt`` of the request with content ``key``: a fault kind or "ok"."""
        u = int(hashlib.blake2b(f"{key}:{attempt}".encode(), digest_size=8).hexdigest(), 16) / 2**64
        for kind, rate in zip(FAULTS, self.rates()):
            if u < rate:
                return kind
            u -= rate
        return "ok"


@dataclass
class LoadGenerator:
    """The server; ``start()`` runs it on a background thread (tests), ``serve_forever()`` in this one."""

    host: str = "127.0.0.1"
    port: int = 0
    words: int = 0  # 0: each answer is max_tokens words long
    faults: Faults = field(default_factory=Faults)
    outcomes: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.attempts: Counter[str] = Counter()  # per content key (bounded by the requests a run makes)
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.track = any(self.faults.rates())  # only a faulty server needs per-request attempt counts

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    # ---- lifecycle ------------------------------------------------------------------------------------------
    async def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._connection, self.host, self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()

    async def _main(self, announce: bool) -> None:
        await self._start()
        if announce:
            print(f"loadgen: listening on {self.base_url}", flush=True)
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    def serve_forever(self, announce: bool = True) -> None:
        try:
            asyncio.run(self._main(announce))
        except (KeyboardInterrupt, asyncio.CancelledError):
            pass

    def start(self) -> LoadGenerator:
        self._thread = threading.Thread(target=self.serve_forever, args=(False,), daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise ExternalError("loadgen: the server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
            for task in asyncio.all_tasks(self._loop):
                self._loop.call_soon_threadsafe(task.cancel)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- HTTP/1.1 ---------------------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path = (lines[0].split(" ") + ["", ""])[:2]
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                payload = await reader.readexactly(int(headers.get("content-length", 0) or 0))
                if not await self._respond(writer, method, path, payload):
                    break
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _respond(self, writer: asyncio.StreamWriter, method: str, path: str, payload: bytes) -> bool:
        """Answer one request; False to hang up (the drop and timeout faults)."""
        path = path.split("?")[0].rstrip("/")
        if method == "GET":
            if path in ("/health", "/v1/health"):
                return self._send(writer, 200, b'{"status": "ok"}')
            if path == "/stats":
                return self._send(writer, 200, json.dumps(dict(self.outcomes)).encode())
            if path == "/v1/models":
                return self._send(writer, 200, b'{"object": "list", "data": [{"id": "loadgen", "object": "model"}]}')
            return self._send(writer, 404, b'{"error": {"message": "not found"}}')
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions"):
            return self._send(writer, 404, b'{"error": {"message": "not found"}}')
        try:
            body = json.loads(payload)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError as err:
            return self._send(writer, 400, json.dumps({"error": {"message": f"bad JSON body: {err}"}}).encode())
        outcome = "ok"
        if self.track:
            key = content_key(body)
            outcome = self.faults.pick(key, self.attempts[key])
            self.attempts[key] += 1
        self.outcomes[outcome] += 1
        if outcome == "429":
            return self._send(writer, 429, b'{"error": {"message": "rate limited"}}', b"Retry-After: 0\r\n")
        if outcome == "500":
            return self._send(writer, 500, b'{"error": {"message": "internal error"}}')
        if outcome == "timeout":
            await asyncio.sleep(self.faults.hang)
            return False
        if outcome == "drop":
            return False
        if outcome == "malformed":
            return self._send(writer, 200, b'{"id": "x", "choices": [{"message": ')
        words = self.words or int(body.get("max_tokens") or 16)
        text = deterministic_text(body, words)
        finish = "length" if not self.words and words == int(body.get("max_tokens") or 16) else "stop"
        return self._send(writer, 200, json.dumps(response_body(body, text, finish)).encode())

    @staticmethod
    def _send(writer: asyncio.StreamWriter, status: int, payload: bytes, extra: bytes = b"") -> bool:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests",
                  500: "Internal Server Error"}[status]
        writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
                     % (status, reason.encode(), len(payload), extra) + payload)
        return True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed when ready)")
    p.add_argument("--words", type=int, default=0, help="words per answer (default: the request's max_tokens)")
    for kind in FAULTS:
        p.add_argument(f"--fault-{kind}", type=float, default=0.0, metavar="RATE",
                       help=f"share of attempts that meet a {kind} fault")
    p.add_argument("--hang", type=float, default=5.0, help="seconds a timeout fault hangs before hanging up")


def from_args(args: argparse.Namespace) -> LoadGenerator:
    faults = Faults(args.fault_429, args.fault_500, args.fault_timeout, args.fault_drop, args.fault_malformed,
                    args.hang)
    return LoadGenerator(args.host, args.port, args.words, faults)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phiforge loadgen", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        server = from_args(args)
    except ValueError as err:
        print(f"phiforge loadgen: error: {err}", file=sys.stderr)
        return 2
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
