"""Teachers: the models that write synthetic data, behind one ``generate(requests)`` call.

- ``LocalTeacher``: any model phiforge loads (default the embedded SmolLM2-135M-Instruct), every request
  of a call pushed through one continuous-batching ``Engine`` run; each completion is handed back the
  moment its row finishes, so a killed run loses only what was still being decoded.
- ``OpenAITeacher``: any OpenAI-compatible endpoint (vLLM, TGI, phiforge serve, ...), chat or completions,
  async with bounded concurrency, timeouts and retries with exponential backoff and jitter on 429, 5xx,
  timeouts, dropped connections and malformed bodies.

Both sit behind a ``RequestCache`` (SQLite) keyed by the request's content, so a rerun never pays twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phiforge.errors import ConfigError, ExternalError, PhiforgeError
from phiforge.inference.sampling import TEACHER_KEYS, SamplingParams

OnDone = Callable[[int, "Result"], None]


class TeacherError(ExternalError):
    """A teacher that cannot answer (after retries); the message names the endpoint and the last error."""


@dataclass(frozen=True)
class Request:
    prompt: str  # the user message (chat) or the raw prompt (completions)
    seed: int
    sampling: SamplingParams  # the TEACHER_KEYS of it are sent / honoured
    system: str = ""


@dataclass
class Result:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    cached: bool = False


class RequestCache:
    """Completed requests by content hash, in SQLite (atomic commits; safe to kill at any moment).

    Commits are grouped (every ``commit_every`` seconds, and on close): a kill loses at most that much of
    the cache, whose only cost is asking again; the run's results themselves are in the synth journal.
    """

    def __init__(self, path: str | Path, commit_every: float = 1.0) -> None:
        self.path = Path(path)
        self.commit_every, self.last_commit = commit_every, time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # a cache: a power cut may lose the last entries, never corrupt
        self.db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.db.commit()

    def get(self, key: str) -> Result | None:
        row = self.db.execute("SELECT value FROM results WHERE key = ?", (key,)).fetchone()
        return Result(**json.loads(row[0])) if row else None

    def put(self, key: str, result: Result) -> None:
        value = {"text": result.text, "prompt_tokens": result.prompt_tokens,
                 "completion_tokens": result.completion_tokens, "finish_reason": result.finish_reason}
        self.db.execute("INSERT OR REPLACE INTO results VALUES (?, ?)", (key, json.dumps(value)))
        if time.monotonic() - self.last_commit >= self.commit_every:
            self.db.commit()
            self.last_commit = time.monotonic()

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    def close(self) -> None:
        self.db.commit()
        self.db.close()


class Teacher:
    """Answers requests; subclasses implement ``_ask`` (one request, awaited) and ``identity``.

    ``ask`` is what the synth pipeline awaits per document step; ``generate`` is the blocking batch call.
    Both run inside a session (``async with teacher.session()``) that owns the event-loop resources
    (the HTTP client, the local engine's batcher).
    """

    def __init__(self) -> None:
        self.cache: RequestCache | None = None
        self.stats: Counter[str] = Counter()

    def identity(self) -> dict[str, Any]:
        """What decides the output besides the request: part of the cache key and of each record."""
        raise NotImplementedError

    def key(self, request: Request) -> str:
        blob = json.dumps({"teacher": self.identity(), "prompt": request.prompt, "seed": request.seed,
                           "sampling": request.sampling.pick(TEACHER_KEYS), "system": request.system}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Teacher]:
        yield self

    async def ask(self, request: Request) -> Result:
        """One request's result: from the cache, else from the teacher (then cached)."""
        key = self.key(request) if self.cache is not None else ""
        hit = self.cache.get(key) if self.cache is not None else None
        if hit is not None:
            hit.cached = True
            self.stats["cache_hits"] += 1
            return hit
        result = await self._ask(request)
        if self.cache is not None:
            self.cache.put(key, result)
        self.stats["completion_tokens"] += result.completion_tokens
        return result

    def generate(self, requests: Sequence[Request], on_done: OnDone | None = None) -> list[Result]:
        """Answer every request; ``on_done(i, result)`` fires as each one completes."""
        results: list[Result | None] = [None] * len(requests)

        async def one(i: int) -> None:
            results[i] = await self.ask(requests[i])
            if on_done:
                on_done(i, results[i])

        async def main() -> None:
            async with self.session():
                await gather_or_cancel([one(i) for i in range(len(requests))])

        asyncio.run(main())
        return results  # type: ignore[return-value]

    async def _ask(self, request: Request) -> Result:
        raise NotImplementedError

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


async def gather_or_cancel(coroutines: Sequence[Any]) -> None:
    """Await all; a fatal error in one cancels the rest (what finished has already been handed on)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---- local: phiforge's engine -------------------------------------------------------------------------
def resolve_dtype(dtype: str, device: str = "") -> str:
    """"auto": bfloat16 on a GPU or a CPU whose bf16 projections are fast (oneDNN's AVX-512/AMX paths, or the
    native AVX2 tiles the engine installs), else float32, where PyTorch's own bf16 matmul is the slow one. The
    embedded teacher generating 32 x 48 tokens on an AVX2-only EPYC (2026-12-04): 17.9 s in bf16 on PyTorch's
    matmul, 7.2-9.6 s in fp32, 6.8 s in bf16 on the AVX2 tiles."""
    if dtype != "auto":
        return dtype
    import torch

    from phiforge import kernels

    on_gpu = device.startswith("cuda") or (not device and torch.cuda.is_available())
    return "bfloat16" if on_gpu or kernels.bf16_rows_fast() else "float32"


class LocalTeacher(Teacher):
    """A model phiforge loads, run with continuous batching (large batches: decode is weight-bandwidth bound)."""

    def __init__(self, model: Any = "smollm2-135m-instruct", tokenizer: Any = None, *, dtype: str = "auto",
                 device: str = "", max_batch_size: int = 128, chat: bool = True, name: str = "") -> None:
        super().__init__()
        from phiforge.inference.engine import Engine
        from phiforge.io.load import load_pretrained

        if isinstance(model, (str, Path)):
            name = name or str(model)
            model, tokenizer = load_pretrained(model, dtype=resolve_dtype(dtype, device), device=device or None)
        if tokenizer is None:
            raise TeacherError(f"teacher {name or 'model'}: needs a tokenizer (tokenizer.json or a GGUF)")
        self.name = name or getattr(model.config, "name", "") or "local"
        self.dtype = str(model.embed.weight.dtype).removeprefix("torch.")
        self.model, self.tokenizer = model, tokenizer
        self.chat = chat and tokenizer.chat_template is not None
        self.engine = Engine(model, tokenizer, max_batch_size=max_batch_size)

    def identity(self) -> dict[str, Any]:
        return {"kind": "local", "model": self.name, "dtype": self.dtype, "chat": self.chat}

    def encode(self, request: Request) -> list[int]:
        if not self.chat:
            return self.tokenizer.encode(request.system + request.prompt)
        messages = ([{"role": "system", "content": request.system}] if request.system else [])
        messages.append({"role": "user", "content": request.prompt})
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Teacher]:
        self._queue: list[tuple[Request, asyncio.Future[Result]]] = []
        self._wake = asyncio.Event()
        batcher = asyncio.ensure_future(self._batcher())
        try:
            yield self
        finally:
            batcher.cancel()
            await asyncio.gather(batcher, return_exceptions=True)

    async def _ask(self, request: Request) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append((request, future))
        self._wake.set()
        return await future

    async def _batcher(self) -> None:
        """Engine runs over whatever is queued when the engine is free.

        Before taking a batch it lets every runnable document step queue its request (the queue stops
        growing), so a batch is the same set of requests in the same order in every run of a config:
        the documents do not depend on timing. Results are handed back as each row finishes.
        """
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            stable = 0
            while stable < 4:
                size = len(self._queue)
                await asyncio.sleep(0)
                stable = stable + 1 if len(self._queue) == size else 0
            batch, self._queue = self._queue, []
            self._wake.clear()

            def finished(i: int, result: Result, batch: list = batch) -> None:
                loop.call_soon_threadsafe(_resolve, batch[i][1], result)

            try:
                await loop.run_in_executor(None, self._generate, [r for r, _ in batch], finished)
            except Exception as err:  # noqa: BLE001 - handed to every waiting step
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)

    def _generate(self, requests: list[Request], on_done: OnDone) -> None:
        stops = tuple(self.tokenizer.stop_token_ids)
        prompts = [self.encode(r) for r in requests]
        params = [SamplingParams(**r.sampling.pick(TEACHER_KEYS), seed=r.seed, stop_token_ids=stops)
                  for r in requests]

        def finished(i: int, completion: Any) -> None:
            tokens = len(completion.token_ids) - (completion.finish_reason == "stop")
            on_done(i, Result(completion.text.strip(), len(prompts[i]), tokens, completion.finish_reason))

        self.engine.on_finish = finished
        try:
            self.engine.generate(prompts, params)
        finally:
            self.engine.on_finish = None


# ---- HTTP: any OpenAI-compatible endpoint ---------------------------------------------------------------
class _RetryableError(PhiforgeError):
    def __init__(self, kind: str, message: str, wait: float = 0.0) -> None:
        super().__init__(message)
        self.kind, self.wait = kind, wait


class OpenAITeacher(Teacher):
    """An OpenAI-compatible server: ``POST {base_url}/chat/completions`` or ``/completions``."""

    def __init__(self, base_url: str, model: str, *, api: str = "chat", concurrency: int = 8,
                 timeout: float = 60.0, max_retries: int = 6, backoff: float = 0.5, backoff_max: float = 30.0,
                 api_key_env: str = "OPENAI_API_KEY", seed: int = 0) -> None:
        super().__init__()
        if api not in ("chat", "completions"):
            raise ConfigError(f"teacher.api = {api!r}; expected 'chat' or 'completions'")
        self.base_url, self.model, self.api = base_url.rstrip("/"), model, api
        self.url = f"{self.base_url}/{'chat/completions' if api == 'chat' else 'completions'}"
        self.concurrency, self.timeout = concurrency, timeout
        self.max_retries, self.backoff, self.backoff_max = max_retries, backoff, backoff_max
        self.api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.jitter = random.Random(seed)

    def identity(self) -> dict[str, Any]:
        return {"kind": "openai", "model": self.model, "api": self.api}  # not the URL: a moved server still hits

    def body(self, request: Request) -> dict[str, Any]:
        s = request.sampling
        body: dict[str, Any] = {"model": self.model, "max_tokens": s.max_new_tokens, "temperature": s.temperature,
                                "top_p": s.top_p, "seed": request.seed}
        if s.top_k:
            body["top_k"] = s.top_k
        if s.repetition_penalty != 1.0:
            body["repetition_penalty"] = s.repetition_penalty
        if self.api == "chat":
            system = [{"role": "system", "content": request.system}] if request.system else []
            body["messages"] = [*system, {"role": "user", "content": request.prompt}]
        else:
            body["prompt"] = request.system + request.prompt
        return body

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Teacher]:
        # aiohttp, not httpx: ~0.3 ms of client CPU per request against ~3 ms (httpcore's pool scans every
        # connection per request), which at millions of documents is most of a synth process's time
        import aiohttp

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout)
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        self._gate = asyncio.Semaphore(self.concurrency)
        # trust_env off: with it aiohttp looks proxies up in a thread per request; a teacher fleet is on the
        # cluster's own network
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as client:
            self._client = client
            yield self

    async def _ask(self, request: Request) -> Result:
        async with self._gate:
            return await self._with_retries(self._client, request)

    async def _with_retries(self, client: Any, request: Request) -> Result:
        for attempt in range(self.max_retries + 1):
            self.stats["requests"] += 1
            try:
                return await self._post(client, request)
            except _RetryableError as retry:
                self.stats[f"retries_{retry.kind}"] += 1
                if attempt == self.max_retries:
                    hint = " (is the server running?)" if retry.kind == "connection" else ""
                    raise TeacherError(f"{self.url}: no answer after {attempt + 1} attempts; last error: "
                                       f"{retry}{hint}") from None
                delay = min(self.backoff_max, self.backoff * 2**attempt)
                delay = delay / 2 + self.jitter.uniform(0, delay / 2)  # equal jitter: spread the retry storm
                await asyncio.sleep(min(self.backoff_max, max(delay, retry.wait)))
        raise AssertionError("unreachable")

    async def _post(self, client: Any, request: Request) -> Result:
        import aiohttp

        try:
            async with client.post(self.url, json=self.body(request)) as response:
                status, content = response.status, await response.read()
                retry_after = response.headers.get("retry-after")
        except asyncio.TimeoutError as err:
            raise _RetryableError("timeout", f"timed out after {self.timeout}s ({type(err).__name__})") from None
        except aiohttp.ClientConnectorError as err:  # refused, unreachable
            raise _RetryableError("connection", f"ConnectError: {err}") from None
        except (aiohttp.ClientError, OSError) as err:  # reset, dropped mid-response
            raise _RetryableError("connection", f"{type(err).__name__}: {err}") from None
        text = content[:300].decode("utf-8", "replace")
        if status == 429 or status >= 500:
            raise _RetryableError("429" if status == 429 else "5xx", f"HTTP {status}: {text[:200]}",
                                  _retry_after(retry_after))
        if status != 200:
            raise TeacherError(f"{self.url}: HTTP {status} (not retried): {text}")
        return self._parse(content)

    def _parse(self, content: bytes) -> Result:
        try:  # every field checked: any malformed answer is a retryable teacher error, never a crash
            data = json.loads(content)
            choice = data["choices"][0]
            text = choice["message"]["content"] if self.api == "chat" else choice["text"]
            if not isinstance(text, str):
                raise TypeError(f"content is {type(text).__name__}")
            usage = data.get("usage", {})
            if usage is None:
                usage = {}
            if not isinstance(usage, dict):
                raise TypeError(f"usage is {type(usage).__name__}")
            counts = [usage.get(key, 0) for key in ("prompt_tokens", "completion_tokens")]
            if not all(type(n) is int and n >= 0 for n in counts):
                raise TypeError(f"usage token counts are {counts!r:.60}, not integers >= 0")
            reason = choice.get("finish_reason") or ""
            if not isinstance(reason, str):
                raise TypeError(f"finish_reason is {type(reason).__name__}")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError) as err:
            raise _RetryableError("malformed", f"malformed response ({type(err).__name__}: {err}): {content[:120]!r}") \
                from None
        return Result(text.strip(), counts[0], counts[1], reason)


def _resolve(future: asyncio.Future[Result], result: Result) -> None:
    if not future.done():  # a step cancelled by a fatal error elsewhere no longer waits
        future.set_result(result)


def _retry_after(value: str | None) -> float:
    try:
        return float(value) if value else 0.0
    except ValueError:
        return 0.0


# ---- the [teacher] section (synth, topics and the red-team judge share it) ----
@dataclass
class TeacherSection:
    kind: str = "local"  # local | openai
    model: str = "smollm2-135m-instruct"  # local: a model phiforge loads; openai: the served model's name
    dtype: str = "auto"  # local: "auto" = bfloat16 where it computes fast (GPU, AVX-512/AMX CPUs), else float32
    device: str = ""  # local; "" = cuda when available
    max_batch_size: int = 128  # local: continuous-batching rows (bf16 GEMMs of 128 rows run ~2x faster per row than 32)
    chat: bool = True  # local: use the chat template when the tokenizer has one
    base_url: str = ""  # openai: e.g. http://127.0.0.1:8000/v1
    api: str = "chat"  # openai: chat | completions
    concurrency: int = 8
    timeout: float = 60.0
    max_retries: int = 6
    backoff: float = 0.5  # first retry delay in seconds; doubles per attempt, with jitter
    backoff_max: float = 30.0
    api_key_env: str = "OPENAI_API_KEY"
    cache: bool = True
    cache_path: str = ""  # "" = <out_dir>/cache.sqlite
    system: str = ""  # a system message for every request


def teacher_from_section(t: TeacherSection, seed: int) -> Teacher:
    """The teacher a ``[teacher]`` section describes (synth and topics share the section)."""
    if t.kind == "local":
        teacher: Teacher = LocalTeacher(t.model, dtype=t.dtype, device=t.device, max_batch_size=t.max_batch_size,
                                        chat=t.chat)
    else:
        teacher = OpenAITeacher(t.base_url, t.model, api=t.api, concurrency=t.concurrency, timeout=t.timeout,
                                max_retries=t.max_retries, backoff=t.backoff, backoff_max=t.backoff_max,
                                api_key_env=t.api_key_env, seed=seed)
    return teacher


def attach_cache(teacher: Teacher, t: TeacherSection, default: Path) -> None:
    """The section's request cache (``teacher.cache_path``, else ``default``), unless off or already set."""
    if t.cache and teacher.cache is None:
        teacher.cache = RequestCache(t.cache_path or default)
