"""An OpenAI-compatible HTTP server over the continuous-batching Engine.

One background thread runs ``Engine.serve``: every request, from any client, becomes a row of the same
running batch as soon as a row is free. HTTP handlers (FastAPI on uvicorn) only validate, tokenize,
queue the request and wait for its tokens; streaming responses send text as it is decoded (SSE).

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``.
Errors are OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``) with 4xx codes.

From Python (tests, or the synthetic-data engine wanting a local teacher)::

    with start_server(model, tokenizer) as server:           # a thread, a free port on 127.0.0.1
        client = openai.OpenAI(base_url=server.url, api_key="unused")
    with spawn_server("smollm2-135m-instruct") as server:      # `phiforge serve` in a subprocess
        ...
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from phiforge.errors import ExternalError, PhiforgeError
from phiforge.inference.chat import ChatSession
from phiforge.inference.engine import Completion, Engine
from phiforge.inference.prompts import stop_strings
from phiforge.inference.sampling import SamplingParams


@dataclass
class ServeConfig:
    model_name: str = "phiforge"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    max_batch_size: int = 16  # rows of the running batch (KV cache rows)
    max_seq_len: int = 2048  # prompt + completion tokens per request (KV cache length)
    max_body_bytes: int = 2 * 1024 * 1024
    max_prompt_tokens: int | None = None  # default: max_seq_len - 1
    max_tokens_limit: int | None = None  # largest max_tokens accepted; default: max_seq_len - 1
    default_max_tokens: int = 512  # chat requests without max_tokens (completions default to 16, as OpenAI)
    # what one client may ask for, so that no request can starve the others or the server's memory
    max_prompts_per_request: int = 256
    max_n: int = 64
    max_request_tokens: int = 1 << 20  # prompts x n x (prompt + max_tokens) of one request
    max_queued_tokens: int = 1 << 22  # the same summed over every queued and running request (else 429)
    max_json_depth: int = 32
    # Host headers served (DNS rebinding): localhost names and the bound address; ("*",) serves any
    allowed_hosts: tuple[str, ...] | None = None

    def hosts(self) -> set[str]:
        if self.allowed_hosts is not None:
            return {h.lower() for h in self.allowed_hosts}
        return {"localhost", "127.0.0.1", "::1", self.host.lower()} - {"0.0.0.0", "::", ""}


class APIError(PhiforgeError):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ---- request bodies (OpenAI's fields; top_k, min_p, repetition_penalty as vLLM-style extensions) ---------------


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64 - 64)  # torch's range, room for n choices
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, lt=1)
    repetition_penalty: float = Field(1.0, gt=0, le=100)


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None


# ---- the generation thread -------------------------------------------------------------------------------------


@dataclass
class _Job:
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # token ids, then None when finished
    result: Completion = field(init=False)

    def __post_init__(self) -> None:
        self.result = Completion(len(self.prompt))

    @property
    def cost(self) -> int:
        return len(self.prompt) + self.params.max_new_tokens

    def post(self, event: int | str | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (forced exit): nobody is waiting any more
            pass


class Worker:
    """Runs ``Engine.serve`` in one thread; HTTP handlers ``submit`` jobs and read their events."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.inbox: queue.Queue[tuple[int, _Job]] = queue.Queue()
        self.running: dict[int, _Job] = {}
        self.peak = 0  # most jobs in flight at once (visible in /health: shows the batching)
        self.load = 0  # prompt + max_new_tokens of every job submitted and not finished
        self.cancelled = 0  # jobs whose client went away before they finished
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        self._keys = iter(range(1 << 62))
        self.thread = threading.Thread(target=self._main, name="phiforge-engine", daemon=True)
        self.thread.start()

    def submit(self, jobs: list[_Job], limit: int) -> None:
        """Queue a request's jobs, all or none: 429 when they would take the queue past ``limit`` tokens."""
        if self.stopping.is_set():
            raise APIError(503, "the server is shutting down", kind="server_error")
        for job in jobs:  # what the engine thread would raise, raised here for this request alone
            try:
                self.engine._check_fits(0, job.prompt, job.params)
            except ValueError as err:
                raise APIError(400, str(err)) from None
        cost = sum(job.cost for job in jobs)
        with self._lock:
            if self.load and self.load + cost > limit:
                raise APIError(429, f"the server has {self.load} tokens queued; this request adds {cost} "
                                    f"(at most {limit})", code="rate_limit_exceeded", kind="rate_limit_error",
                               headers={"Retry-After": "1"})
            self.load += cost
        for job in jobs:
            self.inbox.put((next(self._keys), job))

    def stop(self) -> None:
        """Finish every queued and running job, then end the thread."""
        self.stopping.set()
        self.thread.join()

    def _take(self, idle: bool) -> list[tuple[int, list[int], SamplingParams, Completion]] | None:
        self._sweep()
        new = []
        try:
            if idle:  # nothing running: wait a little for work (and notice a stop request)
                new.append(self.inbox.get(timeout=0.05))
            while True:
                new.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        if not new and idle and self.stopping.is_set():
            return None
        self.running.update(new)
        self.peak = max(self.peak, len(self.running))
        return [(key, job.prompt, job.params, job.result) for key, job in new]

    def _sweep(self) -> None:
        """Jobs whose completion the engine has finished (or dropped, cancelled): tell their handlers."""
        for key in [k for k, job in self.running.items() if job.result.finish_reason]:
            self._done(self.running.pop(key), None)

    def _done(self, job: _Job, event: str | None) -> None:
        with self._lock:
            self.load -= job.cost
            self.cancelled += job.result.finish_reason == "cancelled"
        job.post(event)

    def _main(self) -> None:
        while True:
            try:
                for key, token in self.engine.serve(self._take):
                    self.running[key].post(token)
                self._sweep()
                return
            except Exception as err:  # noqa: BLE001 - a failed step fails its jobs, not the server
                for job in self.running.values():  # requests are checked at the edge: this is the engine's fault
                    self._done(job, f"generation failed: {err}")
                self.running.clear()


# ---- the app ---------------------------------------------------------------------------------------------------


class Server:
    """Validation, tokenization and response shapes; generation goes through the Worker."""

    def __init__(self, engine: Engine, config: ServeConfig) -> None:
        self.engine, self.config, self.tok = engine, config, engine.tokenizer
        self.worker: Worker | None = None
        self.max_prompt = config.max_prompt_tokens or config.max_seq_len - 1
        self.max_tokens_limit = config.max_tokens_limit or config.max_seq_len - 1

    # -- request reading --
    async def read(self, request: Request, schema: type[BaseModel]) -> Any:
        self.authorize(request)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.config.max_body_bytes:
                await self._drain(request)
                raise self._too_large()
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, f"the request body nests deeper than {self.config.max_json_depth}",
                           code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        _check_json(data, self.config.max_json_depth)
        try:
            return schema.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            if first["type"] == "extra_forbidden":
                raise APIError(400, f"Unrecognized request argument supplied: {param}", param) from None
            raise APIError(400, f"invalid value for '{param}': {first['msg']} (got {first.get('input')!r:.100})",
                           param, code="invalid_value") from None

    async def _drain(self, request: Request, limit: int = 64 * 1024 * 1024) -> None:
        """Read (and drop) the rest of a too-large body, so the client can read our 413 (up to a cap)."""
        seen = 0
        try:
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit:
                    break
        except Exception:  # noqa: BLE001 - the stream may be consumed already or the client gone
            pass

    async def screen(self, scope: dict[str, Any], receive: Any) -> JSONResponse | None:  # noqa: ANN401
        """Refusals before the app sees a request: Host, content type, declared size, the docs' key."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        name = host[1:].partition("]")[0] if host.startswith("[") else host.rpartition(":")[0] or host
        allowed = self.config.hosts()
        if "*" not in allowed and name.lower() not in allowed:
            return APIError(421, f"Host {host!r} is not served here (allowed: {', '.join(sorted(allowed))}; "
                                 "see --allowed-host)", code="host_not_allowed").response()
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if method == "POST":
            media = headers.get("content-type", "").partition(";")[0].strip().lower()
            if media != "application/json":
                return APIError(415, f"the body must be application/json, not {media or 'untyped'!r}",
                                code="unsupported_media_type").response()
            declared = headers.get("content-length")
            if declared is not None and (not declared.isdigit() or len(declared) > 18):
                return self._close(APIError(413 if declared.isdigit() else 400,
                                            f"Content-Length {declared[:40]!r} is not a size this server takes",
                                            code="body_too_large" if declared.isdigit() else "invalid_request"))
            if declared is not None and int(declared) > self.config.max_body_bytes:
                if int(declared) <= 64 * 1024 * 1024:  # a client really sending it can then read the answer
                    await _drain_receive(receive, int(declared), seconds=5.0)
                return self._close(self._too_large())
        if self.config.api_key is not None and path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
            try:
                self.authorize(Request(scope))
            except APIError as err:
                return err.response()
        return None

    @staticmethod
    def _close(err: APIError) -> JSONResponse:
        err.headers = {**(err.headers or {}), "Connection": "close"}
        return err.response()

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body exceeds {self.config.max_body_bytes} bytes", code="body_too_large")

    def authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not hmac.compare_digest(header[len("Bearer "):].encode(), key.encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    # -- turning a request into jobs --
    def check_common(self, req: _Sampling) -> None:
        if req.model is not None and req.model != self.config.model_name:
            raise APIError(404, f"The model '{req.model}' does not exist (this server serves "
                                f"'{self.config.model_name}')", "model", "model_not_found")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise APIError(400, f"{name} is not supported (use repetition_penalty)", name, "unsupported")
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias", "unsupported")
        if req.stream and _logprobs(req) is not None:
            raise APIError(400, "logprobs are not supported with stream=true", "logprobs", "unsupported")
        if isinstance(req.stop, list) and len(req.stop) > 4:
            raise APIError(400, "stop takes at most 4 strings", "stop")

    def params(self, req: _Sampling, prompt: list[int], max_tokens: int | None, default: int, choice: int,
               extra_stops: tuple[str, ...] = ()) -> SamplingParams:
        if len(prompt) > self.max_prompt:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; this server takes at most {self.max_prompt}",
                           "messages" if isinstance(req, ChatRequest) else "prompt", "context_length_exceeded")
        room = self.config.max_seq_len - len(prompt)
        if max_tokens is None:
            max_tokens = min(default, room)
        if max_tokens > self.max_tokens_limit or max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {self.config.max_seq_len} tokens. However, "
                                f"you requested {len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, "
                                f"{max_tokens} in the completion; at most {self.max_tokens_limit} completion tokens). "
                                "Please reduce the prompt or max_tokens.", "max_tokens", "context_length_exceeded")
        stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        seed = None if req.seed is None else req.seed + choice  # n choices must differ, yet be reproducible
        try:
            return SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                  top_k=req.top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                                  seed=seed, stop_token_ids=tuple(self.tok.stop_token_ids), logprobs=_logprobs(req),
                                  stop_strings=tuple(s for s in stops + extra_stops if s))
        except ValueError as err:
            raise APIError(400, str(err)) from None

    def chat_prompt(self, req: ChatRequest) -> tuple[list[int], tuple[str, ...]]:
        messages = []
        for i, m in enumerate(req.messages):
            content = m.content
            if isinstance(content, list):  # content parts: only text can be served
                if any(part.get("type") != "text" for part in content):
                    raise APIError(400, "only text content parts are supported", f"messages.{i}.content")
                content = "".join(str(part.get("text", "")) for part in content)
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
        session = ChatSession(self.engine, SamplingParams(), messages=messages)
        try:
            text = session.prompt_text()
        except Exception as err:  # noqa: BLE001 - template errors (raise_exception) are the client's
            raise APIError(400, f"the chat template rejected the messages: {err}", "messages") from None
        templated = session.templated
        ids = self.tok.encode(text, add_special_tokens=not templated)
        return ids, () if templated else stop_strings("chat")

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            prompts = [self.tok.encode(p)]
        elif p and isinstance(p[0], str):
            prompts = [self.tok.encode(s) for s in p]
        elif p and isinstance(p[0], int):
            prompts = [list(p)]
        else:
            prompts = [list(x) for x in p]
        if not prompts:
            raise APIError(400, "prompt is empty", "prompt")
        vocab = self.engine.model.config.vocab_size
        for i, ids in enumerate(prompts):
            if not ids:
                raise APIError(400, f"prompt {i} is empty", "prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt {i} holds token ids outside [0, {vocab})", "prompt")
        return prompts

    # -- logprobs of the tokens that make up the text (a final stop token is not part of it) --
    def _scored(self, job: _Job) -> list[tuple[str, float, list[tuple[str, float]]]]:
        r = job.result
        n = len(r.token_ids) - (r.finish_reason == "stop" and r.token_ids[-1] in job.params.stop_token_ids)
        return [(self.tok.decode([t]), lp, [(self.tok.decode([a]), alp) for a, alp in top])
                for t, (lp, top) in zip(r.token_ids[:n], r.logprobs[:n])]

    def chat_logprobs(self, job: _Job) -> dict[str, Any]:
        def entry(token: str, lp: float) -> dict[str, Any]:
            return {"token": token, "logprob": lp, "bytes": list(token.encode())}

        return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top]}
                            for t, lp, top in self._scored(job)]}

    def completion_logprobs(self, job: _Job, prefix: str) -> dict[str, Any]:
        scored = self._scored(job)
        offsets, at = [], len(prefix)
        for token, _, _ in scored:
            offsets.append(at)
            at += len(token)
        return {"tokens": [t for t, _, _ in scored], "token_logprobs": [lp for _, lp, _ in scored],
                "top_logprobs": [dict(top) for _, _, top in scored], "text_offset": offsets}

    def submit(self, requests: list[tuple[list[int], SamplingParams]]) -> list[_Job]:
        loop = asyncio.get_running_loop()
        jobs = [_Job(prompt, params, loop) for prompt, params in requests]
        if sum(job.cost for job in jobs) > self.config.max_request_tokens:
            raise APIError(413, f"the request asks for {sum(job.cost for job in jobs)} prompt + completion tokens "
                                f"over all its prompts and choices; at most {self.config.max_request_tokens}",
                           code="request_too_large")
        self.worker.submit(jobs, self.config.max_queued_tokens)
        return jobs

    def check_fan_out(self, prompts: int, n: int, max_tokens: int | None) -> None:
        """Caps on prompts, n and their product with max_tokens, checked before anything is tokenized."""
        c = self.config
        if prompts > c.max_prompts_per_request:
            raise APIError(413, f"{prompts} prompts in one request; at most {c.max_prompts_per_request}", "prompt",
                           "too_many_prompts")
        if n > c.max_n:
            raise APIError(400, f"n is {n}; this server takes at most {c.max_n}", "n", "invalid_value")
        if prompts * n * (max_tokens or 1) > c.max_request_tokens:
            raise APIError(413, f"{prompts} prompts x n={n} x max_tokens={max_tokens} exceeds "
                                f"{c.max_request_tokens} tokens", "n", "request_too_large")


def _check_json(data: Any, max_depth: int) -> None:  # noqa: ANN401
    """Depth and string validity of a decoded body (lone surrogates cannot be encoded, tokenized or echoed)."""
    stack = [(data, 1, "")]
    while stack:
        value, depth, where = stack.pop()
        if depth > max_depth:
            raise APIError(400, f"the request body nests deeper than {max_depth} (at {where or 'the top'})",
                           where or None, "invalid_json")
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            path = f"{where}.{key}" if where else str(key)
            for text in (key, item):
                if isinstance(text, str):
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:
                        raise APIError(400, f"'{path.encode('utf-8', 'replace').decode()}' holds a string that is "
                                            "not valid Unicode (a lone surrogate)", None, "invalid_string") from None
            if isinstance(item, (dict, list)):
                stack.append((item, depth + 1, path))


async def _drain_receive(receive: Any, size: int, seconds: float) -> None:  # noqa: ANN401
    """Read and drop up to ``size`` body bytes, for at most ``seconds`` (a client may never send them)."""
    async def drain() -> None:
        seen = 0
        while seen < size:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body"):
                return

    try:
        await asyncio.wait_for(drain(), seconds)
    except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - the client may be gone: the answer still goes out
        pass


def _cancel(jobs: list[_Job]) -> None:
    for job in jobs:
        job.result.cancelled = True


async def _finish_all(request: Request, jobs: list[_Job]) -> None:
    """Wait for every job; a client that disconnects meanwhile has its jobs cancelled (rows freed at once)."""
    waiting = asyncio.ensure_future(asyncio.gather(*(_finish(j) for j in jobs)))
    try:
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=0.2)
            if done:
                return waiting.result()
            if await request.is_disconnected():
                raise APIError(499, "the client closed the connection", code="client_closed")
    finally:
        if not waiting.done():
            _cancel(jobs)
            waiting.cancel()
            waiting.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no warning


def _logprobs(req: _Sampling) -> int | None:
    """SamplingParams.logprobs for a request: None (off) or how many alternatives to report."""
    if isinstance(req, ChatRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return getattr(req, "logprobs", None)


def _visible(engine: Engine, job: _Job) -> str:
    """Text that is safe to show so far (stop tokens and possible stop-string starts held back)."""
    r = job.result
    return r.text if r.finish_reason else engine._visible(r.token_ids, job.params)


async def _finish(job: _Job) -> None:
    while True:
        event = await job.events.get()
        if event is None:
            return
        if isinstance(event, str):
            raise APIError(500, event, kind="server_error")


def _usage(jobs: list[_Job], prompt_jobs: list[_Job]) -> dict[str, int]:
    prompt = sum(len(j.prompt) for j in prompt_jobs)
    completion = sum(len(j.result.token_ids) for j in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    """The FastAPI app; its lifespan starts the generation thread and, on shutdown, lets it finish."""
    srv = Server(engine, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        srv.worker = Worker(engine)
        yield
        await asyncio.to_thread(srv.worker.stop)

    app = FastAPI(title="phiforge", lifespan=lifespan)
    app.state.server = srv
    app.add_middleware(_Guard, server=srv)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(404)
    async def not_found(request: Request, err: Exception) -> JSONResponse:
        return APIError(404, f"no route {request.method} {request.url.path}", code="not_found").response()

    @app.exception_handler(405)
    async def not_allowed(request: Request, err: Exception) -> JSONResponse:
        return APIError(405, f"method {request.method} is not allowed on {request.url.path}").response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        worker = srv.worker
        return {"status": "ok" if worker and worker.thread.is_alive() else "stopping",
                "model": config.model_name, "running": len(worker.running) if worker else 0,
                "queued": worker.inbox.qsize() if worker else 0, "peak_running": worker.peak if worker else 0,
                "queued_tokens": worker.load if worker else 0, "cancelled": worker.cancelled if worker else 0}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        srv.authorize(request)
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "phiforge", "max_model_len": config.max_seq_len}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        req: ChatRequest = await srv.read(request, ChatRequest)
        srv.check_common(req)
        prompt, extra = srv.chat_prompt(req)
        max_tokens = req.max_completion_tokens or req.max_tokens
        srv.check_fan_out(1, req.n, max_tokens)
        jobs = srv.submit([(prompt, srv.params(req, prompt, max_tokens, config.default_max_tokens, i, extra))
                           for i in range(req.n)])
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": config.model_name}
        if req.stream:
            return _sse(_chat_chunks(engine, jobs, head, req), jobs)
        await _finish_all(request, jobs)
        choices = [{"index": i, "message": {"role": "assistant", "content": j.result.text},
                    "logprobs": srv.chat_logprobs(j) if req.logprobs else None,
                    "finish_reason": j.result.finish_reason} for i, j in enumerate(jobs)]
        return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(jobs, jobs[:1])}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req: CompletionRequest = await srv.read(request, CompletionRequest)
        srv.check_common(req)
        if req.suffix:
            raise APIError(400, "suffix is not supported", "suffix", "unsupported")
        count = len(req.prompt) if isinstance(req.prompt, list) and req.prompt and not isinstance(
            req.prompt[0], int) else 1
        srv.check_fan_out(count, req.n, req.max_tokens or 16)
        prompts = srv.completion_prompts(req)
        jobs = srv.submit([(p, srv.params(req, p, req.max_tokens, 16, i)) for p in prompts for i in range(req.n)])
        prefix = [srv.tok.decode(j.prompt) if req.echo else "" for j in jobs]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": config.model_name}
        firsts = jobs[::req.n]
        if req.stream:
            return _sse(_completion_chunks(engine, jobs, prefix, head, req, firsts), jobs)
        await _finish_all(request, jobs)
        choices = [{"index": i, "text": pre + j.result.text, "finish_reason": j.result.finish_reason,
                    "logprobs": srv.completion_logprobs(j, pre) if req.logprobs is not None else None}
                   for i, (j, pre) in enumerate(zip(jobs, prefix))]
        return {**head, "object": "text_completion", "choices": choices, "usage": _usage(jobs, firsts)}

    return app


class _Guard:
    """ASGI middleware: ``Server.screen``'s refusals, before routing (a pure ASGI layer keeps streaming and
    disconnect detection intact, which Starlette's BaseHTTPMiddleware does not)."""

    def __init__(self, app: Any, server: Server) -> None:  # noqa: ANN401
        self.app, self.server = app, server

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:  # noqa: ANN401
        if scope["type"] == "http":
            refusal = await self.server.screen(scope, receive)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- streaming -------------------------------------------------------------------------------------------------


def _sse(chunks: AsyncIterator[dict[str, Any]], jobs: list[_Job]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except APIError as err:  # headers are gone already: report in-band, as OpenAI does
            yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.kind}})}\n\n"
        finally:  # the client went away (Starlette cancels the body) or it ended: nothing keeps generating
            _cancel([j for j in jobs if not j.result.finish_reason])
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _pieces(engine: Engine, jobs: list[_Job]) -> AsyncIterator[tuple[int, str, str | None]]:
    """(choice index, new text, finish reason or None) as the jobs' tokens arrive, interleaved."""
    shown = [""] * len(jobs)
    pending = {asyncio.ensure_future(j.events.get()): i for i, j in enumerate(jobs)}
    while pending:
        done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for future in done:
            i = pending.pop(future)
            event = future.result()
            if isinstance(event, str):
                for other in pending:
                    other.cancel()
                raise APIError(500, event, kind="server_error")
            text = _visible(engine, jobs[i])
            piece = text[len(shown[i]):] if text.startswith(shown[i]) else ""
            shown[i] += piece
            if event is None:
                yield i, piece, jobs[i].result.finish_reason
            else:
                if piece:
                    yield i, piece, None
                pending[asyncio.ensure_future(jobs[i].events.get())] = i


def _wants_usage(req: _Sampling) -> bool:
    return bool(req.stream_options and req.stream_options.get("include_usage"))


async def _chat_chunks(engine: Engine, jobs: list[_Job], head: dict[str, Any],
                       req: ChatRequest) -> AsyncIterator[dict[str, Any]]:
    head = {**head, "object": "chat.completion.chunk"}
    usage = {"usage": None} if _wants_usage(req) else {}
    for i in range(len(jobs)):
        yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}], **usage}
    async for i, piece, reason in _pieces(engine, jobs):
        delta = {"content": piece} if piece else {}
        yield {**head, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}], **usage}
    if usage:
        yield {**head, "choices": [], "usage": _usage(jobs, jobs[:1])}


async def _completion_chunks(engine: Engine, jobs: list[_Job], prefix: list[str], head: dict[str, Any],
                             req: CompletionRequest, firsts: list[_Job]) -> AsyncIterator[dict[str, Any]]:
    head = {**head, "object": "text_completion"}
    usage = {"usage": None} if _wants_usage(req) else {}
    for i, pre in enumerate(prefix):
        if pre:
            yield {**head, "choices": [{"index": i, "text": pre, "logprobs": None, "finish_reason": None}], **usage}
    async for i, piece, reason in _pieces(engine, jobs):
        yield {**head, "choices": [{"index": i, "text": piece, "logprobs": None, "finish_reason": reason}], **usage}
    if usage:
        yield {**head, "choices": [], "usage": _usage(jobs, firsts)}


# ---- running it ------------------------------------------------------------------------------------------------


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 = a free port), so the URL is known before uvicorn starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/v1"


def _uvicorn(engine: Engine, config: ServeConfig) -> uvicorn.Server:
    app = create_app(engine, config)
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_keep_alive=30))


def serve_forever(engine: Engine, config: ServeConfig) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests are finished before it returns."""
    sock = _listen(config.host, config.port)
    print(f"phiforge serve: {config.model_name} ready at {_url(sock)}", flush=True)
    _uvicorn(engine, config).run(sockets=[sock])


@dataclass
class RunningServer:
    """A server in a thread of this process; ``url`` is the OpenAI base URL (ends in /v1)."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        """Graceful: stop accepting, finish in-flight requests, stop the generation thread."""
        self.server.should_exit = True
        self.thread.join()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(model: Any, tokenizer: Any, *, config: ServeConfig | None = None,  # noqa: ANN401
                 timeout: float = 60.0, **overrides: Any) -> RunningServer:
    """Serve ``model`` from a background thread (default: 127.0.0.1, a free port); returns when it accepts."""
    config = config or ServeConfig(**{"port": 0, **overrides})
    engine = Engine(model, tokenizer, max_batch_size=config.max_batch_size, max_seq_len=config.max_seq_len)
    config.max_seq_len = engine.max_seq_len  # never more than the model's context
    sock = _listen(config.host, config.port)
    server = _uvicorn(engine, config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="phiforge-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ExternalError("the phiforge server did not start")
        time.sleep(0.01)
    return RunningServer(_url(sock), server, thread)


@dataclass
class ServerProcess:
    """``phiforge serve`` in a child process; ``stop`` sends SIGTERM (graceful) and waits."""

    url: str
    process: subprocess.Popen

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn_server(model: str, *args: str, timeout: float = 300.0, env: dict[str, str] | None = None) -> ServerProcess:
    """Start ``python -m phiforge.cli serve -m MODEL --port 0 ARGS...`` and wait until it is ready."""
    command = [sys.executable, "-m", "phiforge.cli", "serve", "-m", model, "--port", "0", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env or dict(os.environ))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            raise ExternalError(f"phiforge serve exited with code {process.returncode} before it was ready")
        match = re.search(r"ready at (\S+)", line)
        if match:
            return ServerProcess(match.group(1), process)
    process.kill()
    raise ExternalError(f"phiforge serve was not ready within {timeout:.0f} s")
