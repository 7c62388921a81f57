"""The OpenAI-compatible server, driven by the official `openai` client over real HTTP on 127.0.0.1.

The embedded teacher answers; every expected text comes from phiforge's own Engine (or `phiforge
generate` in a subprocess) on the same weights, so a served answer is checked token for token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

import phiforge
from phiforge.config.model import preset
from phiforge.inference.engine import Engine, SamplingParams
from phiforge.io.checkpoint import save_hf_folder
from phiforge.model.transformer import build_model
from phiforge.serve.server import RunningServer, spawn_server, start_server
from phiforge.tokenizers.tokenizer import train_bpe

KEY = "test-key"
NAME = "teacher"
MAX_SEQ = 512


@pytest.fixture(scope="module")
def server(teacher: tuple[Any, Any]) -> RunningServer:
    model, tokenizer = teacher
    with start_server(model, tokenizer, model_name=NAME, api_key=KEY, max_seq_len=MAX_SEQ) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def expected(teacher: tuple[Any, Any], prompt: list[int], max_tokens: int, stops: tuple[str, ...] = ()) -> Any:
    """What phiforge's Engine generates, greedy, for these prompt ids."""
    model, tokenizer = teacher
    params = SamplingParams(max_new_tokens=max_tokens, stop_token_ids=tuple(tokenizer.stop_token_ids),
                            stop_strings=stops)
    return Engine(model, tokenizer).generate([prompt], params)[0]


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def env() -> dict[str, str]:
    src = str(Path(phiforge.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}


# ---- the protocol ------------------------------------------------------------------------------------------------
def test_models_and_health(server: RunningServer, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [NAME]
    health = httpx.get(server.url.removesuffix("/v1") + "/health").json()
    assert health["status"] == "ok" and health["model"] == NAME
    assert server.url.startswith("http://127.0.0.1:")


def test_chat_completion_answer_and_usage(teacher: tuple[Any, Any], client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "You are a concise tutor."},
                {"role": "user", "content": "What is photosynthesis?"}]
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    ids = chat_ids(teacher[1], messages)
    want = expected(teacher, ids, 20)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 20)
    assert len(want.token_ids) == 20
    assert reply.usage.total_tokens == len(ids) + 20


def test_completion_stop_strings(teacher: tuple[Any, Any], client: openai.OpenAI) -> None:
    prompt = "The three primary colors are"
    full = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0)
    text = full.choices[0].text
    assert text == expected(teacher, teacher[1].encode(prompt), 24).text
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 24
    stop = text.split()[3]  # a word from the middle of the greedy answer
    cut = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "zzz"])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < 24


def test_streaming_equals_non_streaming(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name a planet and say one fact about it."}]
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 3, "tokens arrive as they are decoded, not in one piece"
    assert "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    stream = client.completions.create(model=NAME, prompt="Water boils at", max_tokens=12, temperature=0,
                                       stream=True, stop="\n")
    plain = client.completions.create(model=NAME, prompt="Water boils at", max_tokens=12, temperature=0, stop="\n")
    assert "".join(c.choices[0].text for c in stream) == plain.choices[0].text


def test_n_choices_with_seed_are_reproducible(client: openai.OpenAI) -> None:
    def ask() -> list[str]:
        reply = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=8, temperature=1.0,
                                          top_p=0.95, n=3, seed=7)
        assert [c.index for c in reply.choices] == [0, 1, 2]
        assert 0 < reply.usage.completion_tokens <= 3 * 8
        return [c.text for c in reply.choices]

    first = ask()
    assert first == ask()
    assert len(set(first)) > 1


def test_logprobs(teacher: tuple[Any, Any], client: openai.OpenAI) -> None:
    model, tokenizer = teacher
    messages = [{"role": "user", "content": "Say hello."}]
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.logprob == entry.top_logprobs[0].logprob <= 0
    with torch.no_grad():  # the first token's logprob, straight from the model
        first = torch.log_softmax(model(torch.tensor([chat_ids(tokenizer, messages)]))[0, -1].float(), -1).max()
    assert abs(content[0].logprob - first.item()) < 1e-4
    text = client.completions.create(model=NAME, prompt="Two plus two is", max_tokens=5, temperature=0, logprobs=2)
    lp = text.choices[0].logprobs
    assert "".join(lp.tokens) == text.choices[0].text and len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert lp.text_offset == sorted(lp.text_offset) and all(len(top) == 2 for top in lp.top_logprobs)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="Hi", max_tokens=2, logprobs=1, stream=True)


def test_16_concurrent_clients_all_answered(teacher: tuple[Any, Any], server: RunningServer) -> None:
    topics = ["rain", "bees", "volcanoes", "the moon", "bread", "rivers", "owls", "glass", "wind", "salt",
              "trees", "ice", "copper", "sleep", "music", "maps"]
    messages = [[{"role": "user", "content": f"Tell me one fact about {t}."}] for t in topics]

    def ask(m: list[dict[str, str]]) -> Any:  # one client per thread, like 16 separate programs
        c = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=300)
        return c.chat.completions.create(model=NAME, messages=m, max_tokens=8, temperature=0)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, messages))
    model, tokenizer = teacher
    prompts = [chat_ids(tokenizer, m) for m in messages]
    params = SamplingParams(max_new_tokens=8, stop_token_ids=tuple(tokenizer.stop_token_ids))
    want = Engine(model, tokenizer).generate(prompts, params)
    for reply, w, prompt in zip(replies, want, prompts):
        assert reply.choices[0].message.content == w.text
        assert reply.usage.prompt_tokens == len(prompt)
    peak = httpx.get(server.url.removesuffix("/v1") + "/health").json()["peak_running"]
    assert peak >= 8, f"requests were not batched together (at most {peak} in flight)"


@pytest.mark.slow  # a second process loads the teacher: ~15 s quiet, minutes under load
def test_greedy_answer_equals_phiforge_generate(teacher: tuple[Any, Any], client: openai.OpenAI) -> None:
    prompt = "Alice was tired of sitting by her sister on the bank, and"
    run = subprocess.run([sys.executable, "-m", "phiforge.cli", "generate", "-m", "smollm2-135m-instruct", "-p", prompt,
                          "--max-new-tokens", "20", "--quiet-prompt"], capture_output=True, text=True, env=env(),
                         timeout=300)
    assert run.returncode == 0, run.stderr
    served = client.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0)
    assert served.choices[0].text == run.stdout and run.stdout.strip()


# ---- bad requests: OpenAI-style 4xx, and the server keeps serving -----------------------------------------------
BAD = [
    ("malformed JSON", b'{"model": "teacher", "prompt": ', 400, "invalid_json"),
    ("wrong type", b'{"prompt": "hi", "max_tokens": "lots"}', 400, "invalid_value"),
    ("wrong type in a list", b'{"prompt": "hi", "stop": [1, 2]}', 400, "invalid_value"),
    ("unknown field", b'{"prompt": "hi", "best_of_the_best": 3}', 400, None),
    ("not an object", b'["hi"]', 400, "invalid_json"),
    ("10 MB body", b'{"prompt": "' + b"a" * (10 * 1024 * 1024) + b'"}', 413, "body_too_large"),
    ("max_tokens beyond the context", b'{"prompt": "hi", "max_tokens": 100000}', 400, "context_length_exceeded"),
    ("temperature out of range", b'{"prompt": "hi", "temperature": 7}', 400, "invalid_value"),
    ("unknown model", b'{"model": "gpt-9", "prompt": "hi"}', 404, "model_not_found"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_request_gets_openai_error(server: RunningServer, client: openai.OpenAI, case: tuple) -> None:
    _, body, status, code = case
    response = httpx.post(f"{server.url}/completions", content=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["code"] == code
    assert client.completions.create(model=NAME, prompt="Hi", max_tokens=2, temperature=0).choices[0].text


def test_prompt_longer_than_the_context(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "word " * MAX_SEQ}])
    assert err.value.body["code"] == "context_length_exceeded"


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_missing_or_wrong_api_key(server: RunningServer, client: openai.OpenAI, key: str | None) -> None:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    response = httpx.post(f"{server.url}/chat/completions", headers=headers, timeout=60,
                          json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    if key is not None:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url, api_key=key, max_retries=0).models.list()
    assert client.models.list().data


# ---- shutdown ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny Llama with a trained BPE tokenizer, saved as a model folder (fast to load)."""
    folder = tmp_path_factory.mktemp("tiny-serve")
    texts = [line for line in Path(phiforge.__file__).read_text().splitlines()] * 50 + ["a b c d e f g"] * 50
    tokenizer = train_bpe(texts, 320, chat_format="phi3")
    model = build_model(preset("tiny-llama"), seed=3)
    save_hf_folder(model, folder)
    tokenizer.save(folder)
    return folder


def test_graceful_shutdown_finishes_in_flight_requests(tiny_folder: Path) -> None:
    from phiforge.io.load import load_pretrained

    model, tokenizer = load_pretrained(tiny_folder, device="cpu")
    running = start_server(model, tokenizer, model_name="tiny")
    client = openai.OpenAI(base_url=running.url, api_key="none", max_retries=0)
    stream = client.completions.create(model="tiny", prompt="a b c", max_tokens=300, temperature=0.8, seed=1,
                                       stream=True, stream_options={"include_usage": True})
    first = next(iter(stream))
    stopper = threading.Thread(target=running.stop)
    stopper.start()  # shutdown begins while the request is mid-stream
    rest = list(stream)
    stopper.join(60)
    assert not stopper.is_alive() and not running.thread.is_alive()
    tokens = rest[-1].usage.completion_tokens
    assert first.choices and tokens > 1 and rest[-2].choices[0].finish_reason == ("length" if tokens == 300 else "stop")
    with pytest.raises(openai.APIConnectionError):
        client.models.list()


def test_cli_serve_subprocess_and_sigterm(tiny_folder: Path) -> None:
    """`phiforge serve` in a child process (how another stage would start a teacher), stopped with SIGTERM."""
    with spawn_server(str(tiny_folder), "--served-model-name", "tiny", "--max-seq-len", "256", env=env()) as child:
        assert child.url.startswith("http://127.0.0.1:")
        client = openai.OpenAI(base_url=child.url, api_key="none", max_retries=0)
        replies = []
        worker = threading.Thread(target=lambda: replies.append(
            client.completions.create(model="tiny", prompt="a b", max_tokens=200, temperature=0)))
        worker.start()
        while httpx.get(child.url.removesuffix("/v1") + "/health").json()["running"] == 0 and worker.is_alive():
            time.sleep(0.01)
        code = child.stop()
        worker.join(60)
    assert code in (0, -15)  # uvicorn re-raises the SIGTERM it handled once the shutdown is done
    assert replies and replies[0].choices[0].finish_reason in ("length", "stop") and replies[0].choices[0].text


# ---- hostile clients: each refusal stays with its request, 8 other clients are answered meanwhile ---------------
def _rss_kb(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {k: int(line.split()[1]) for line in status.splitlines() for k in ("VmRSS", "VmHWM") if line.startswith(k)}


def _raw(url: str, head: str, body: bytes = b"", wait: float = 10.0) -> tuple[str, float]:
    """Send a hand-made request on a socket; the status line and how long the answer took."""
    import socket
    from urllib.parse import urlparse

    where = urlparse(url)
    start = time.monotonic()
    with socket.create_connection((where.hostname, where.port), timeout=wait) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        answer = sock.recv(4096).decode(errors="replace")
    return answer.split("\r\n", 1)[0], time.monotonic() - start


def test_hostile_requests_leave_eight_other_clients_answered(tiny_folder: Path) -> None:
    from phiforge.io.load import load_pretrained

    model, tokenizer = load_pretrained(tiny_folder, device="cpu")
    prompts = [f"a b {w} c" for w in "defghijk"]
    params = SamplingParams(max_new_tokens=40, stop_token_ids=tuple(tokenizer.stop_token_ids))
    want = [c.text for c in Engine(model, tokenizer).generate([tokenizer.encode(p) for p in prompts], params)]
    with spawn_server(str(tiny_folder), "--served-model-name", "tiny", "--max-seq-len", "256", env=env()) as child:
        base, pid = child.url.removesuffix("/v1"), child.process.pid
        post = {"Content-Type": "application/json"}
        before = _rss_kb(pid)

        def polite(prompt: str) -> list[str]:
            c = openai.OpenAI(base_url=child.url, api_key="none", max_retries=0, timeout=300)
            return [c.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0).choices[0].text
                    for _ in range(3)]

        fan_out = json.dumps({"model": "tiny", "prompt": ["a b"] * 20000, "n": 64, "max_tokens": 16})
        hostile = [
            ("seed 2**70", {"json": {"prompt": "a b", "seed": 2**70, "temperature": 1}}, 400),
            ("seed + n past 64 bits", {"json": {"prompt": "a b", "seed": 2**64 - 2, "n": 3, "temperature": 1}}, 400),
            ("NaN temperature", {"content": b'{"prompt": "a b", "temperature": NaN}', "headers": post}, 400),
            ("infinite penalty", {"content": b'{"prompt": "a b", "repetition_penalty": 1e999}', "headers": post}, 400),
            ("JSON 10,000 deep", {"content": b'{"prompt": ' + b"[" * 10000 + b"]" * 10000 + b"}", "headers": post},
             400),
            ("JSON 40 deep", {"content": b'{"stream_options": ' + b'{"a": ' * 40 + b"1" + b"}" * 41, "headers": post},
             400),
            ("lone surrogate in the prompt", {"content": b'{"prompt": "a \\ud800 b"}', "headers": post}, 400),
            ("lone surrogate in the model", {"content": b'{"model": "\\ud800", "prompt": "a"}', "headers": post}, 400),
            ("20,000 prompts x n=64", {"content": fan_out.encode(), "headers": post}, 413),
            ("n=64 x max_tokens", {"json": {"prompt": ["a"] * 256, "n": 64, "max_tokens": 200}}, 413),
            ("text/plain", {"content": b'{"prompt": "a b"}', "headers": {"Content-Type": "text/plain"}}, 415),
            ("foreign Host", {"json": {"prompt": "a b"}, "headers": {"Host": "evil.example:80"}}, 421),
        ]
        with ThreadPoolExecutor(8) as pool:
            answers = [pool.submit(polite, p) for p in prompts]
            for name, kwargs, status in hostile:
                response = httpx.post(f"{child.url}/completions", timeout=60, **kwargs)
                assert response.status_code == status, (name, response.text)
                assert response.json()["error"]["message"], name
            line, seconds = _raw(child.url, "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                 "Content-Type: application/json\r\nContent-Length: 99999999999999999999", b'{"a"')
            assert " 413 " in line and seconds < 5, (line, seconds)
            chat = {"model": "tiny", "messages": [{"role": "user", "content": "x\ud800"}]}
            bad_chat = httpx.post(f"{child.url}/chat/completions", timeout=60, headers=post,
                                  content=json.dumps(chat).encode())
            assert bad_chat.status_code == 400 and bad_chat.json()["error"]["code"] == "invalid_string"
            for answer, expected_text in zip(answers, want):
                assert answer.result() == [expected_text] * 3
        after = _rss_kb(pid)
        print(f"\nserver RSS: before {before}, after the hostile requests {after} (kB)")
        assert after["VmHWM"] - before["VmHWM"] < 300 * 1024, (before, after)
        health = httpx.get(f"{base}/health").json()
        assert health["status"] == "ok" and health["running"] == 0 and health["queued_tokens"] == 0

        # a client that goes away: streaming and not, its rows are freed at once
        stream = httpx.Client(timeout=60).stream("POST", f"{child.url}/completions", json={
            "prompt": "a b", "max_tokens": 250, "n": 4, "temperature": 1, "stream": True})
        with stream as response:
            next(response.iter_lines())
        try:  # a non-streaming client that gives up; on a quiet machine the tiny model may finish first
            httpx.post(f"{child.url}/completions", json={"prompt": "a b", "max_tokens": 250, "n": 4,
                                                         "temperature": 1}, timeout=0.5)
        except httpx.TimeoutException:
            pass
        deadline = time.monotonic() + 10
        while (health := httpx.get(f"{base}/health").json())["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        # a tiny random model may sample its end token on some rows first: those finish rather than cancel
        assert health["running"] == 0 and health["cancelled"] >= 1, health
        assert polite(prompts[0]) == [want[0]] * 3


def test_queued_tokens_cap_gives_429_with_retry_after(tiny_folder: Path) -> None:
    from phiforge.io.load import load_pretrained

    model, tokenizer = load_pretrained(tiny_folder, device="cpu")
    params = SamplingParams(max_new_tokens=250, stop_token_ids=tuple(tokenizer.stop_token_ids))
    candidates = [[t, t + 1] for t in range(5, 300, 7)]  # a greedy prompt that runs to length: a long-lived job
    long_lived = next(p for p, c in zip(candidates, Engine(model, tokenizer).generate(candidates, params))
                      if c.finish_reason == "length")
    with start_server(model, tokenizer, model_name="tiny", max_seq_len=256, max_queued_tokens=700,
                      max_request_tokens=600, api_key=KEY, max_batch_size=1) as running:
        auth = {"Authorization": f"Bearer {KEY}"}
        too_big = httpx.post(f"{running.url}/completions", headers=auth, timeout=60,
                             json={"prompt": ["a b"] * 3, "max_tokens": 250})
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
        with httpx.Client(timeout=60).stream("POST", f"{running.url}/completions", headers=auth, json={
                "prompt": long_lived, "max_tokens": 250, "n": 2, "temperature": 0, "stream": True}) as first:
            lines = first.iter_lines()  # held: a dropped iterator closes the response (a disconnect)
            next(lines)
            busy = httpx.post(f"{running.url}/completions", headers=auth, timeout=60,
                              json={"prompt": "a b", "max_tokens": 250})
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1", busy.text
        deadline = time.monotonic() + 10
        while httpx.get(running.url.removesuffix("/v1") + "/health").json()["queued_tokens"] and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        again = httpx.post(f"{running.url}/completions", headers=auth, timeout=60,
                           json={"prompt": "a b", "max_tokens": 8})
        assert again.status_code == 200, again.text
        docs = httpx.get(running.url.removesuffix("/v1") + "/docs")
        assert docs.status_code == 401 and httpx.get(running.url.removesuffix("/v1") + "/openapi.json",
                                                     headers=auth).status_code == 200
