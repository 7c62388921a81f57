"""Serving throughput: `phiforge serve` under 1, 8 and 32 concurrent OpenAI clients, vs the bare Engine. JSON.

    python bench/serve.py                                   # the embedded teacher, bf16
    python bench/serve.py --clients 1,8,32 --max-tokens 32 --requests-per-client 2

The server is `phiforge serve` in a child process (so the clients' Python threads do not share its GIL).
Each client is a thread with its own `openai` client sending chat requests back to back (greedy, no stop
strings; the chat template's end-of-turn token may stop a reply early: tokens are counted from `usage`).
The reference, in the same run, is the Engine generating the same prompts in-process with the same
batch size, from a worker thread as the server runs it (on this 2-core machine under load, torch ran
several times faster from a non-main thread than from the main one): the ratio is what HTTP, JSON,
tokenization and the admission loop cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import torch
from common import machine

from phiforge.inference.engine import Engine, SamplingParams
from phiforge.io.load import load_pretrained
from phiforge.serve.server import spawn_server

TOPICS = ["rain", "bees", "volcanoes", "the moon", "bread", "rivers", "owls", "glass", "wind", "salt", "trees",
          "ice", "copper", "sleep", "music", "maps"]


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write two sentences about {TOPICS[i % len(TOPICS)]} (request {i})."}]


def run_clients(url: str, name: str, clients: int, per_client: int, max_tokens: int) -> dict:
    def client_loop(c: int) -> list[tuple[float, int]]:
        client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
        out = []
        for k in range(per_client):
            start = time.perf_counter()
            reply = client.chat.completions.create(model=name, messages=messages(c * per_client + k),
                                                   max_tokens=max_tokens, temperature=0)
            out.append((time.perf_counter() - start, reply.usage.completion_tokens))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for part in pool.map(client_loop, range(clients)) for r in part]
    seconds = time.perf_counter() - start
    tokens = sum(t for _, t in results)
    return {"requests": len(results), "seconds": round(seconds, 2), "requests_per_s": round(len(results) / seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1), "completion_tokens": tokens,
            "latency_p50_s": round(statistics.median(s for s, _ in results), 2)}


def run_engine(model: torch.nn.Module, tokenizer, clients: int, requests: int, max_tokens: int) -> dict:  # noqa: ANN001
    prompts = [tokenizer.apply_chat_template(messages(i), add_generation_prompt=True, tokenize=True)
               for i in range(requests)]
    params = SamplingParams(max_new_tokens=max_tokens, stop_token_ids=tuple(tokenizer.stop_token_ids))
    engine = Engine(model, tokenizer, max_batch_size=clients)
    with ThreadPoolExecutor(1) as thread:
        start = time.perf_counter()
        done = thread.submit(engine.generate, prompts, params).result()
        seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in done)
    return {"seconds": round(seconds, 2), "requests_per_s": round(requests / seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1), "completion_tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    model, tokenizer = load_pretrained(args.model, dtype=args.dtype, device="cpu")
    levels = [int(c) for c in args.clients.split(",")]
    report = {"machine": machine(), "model": args.model, "dtype": args.dtype, "max_tokens": args.max_tokens,
              "requests_per_client": args.requests_per_client, "results": []}
    options = ["--served-model-name", "bench", "--dtype", args.dtype, "--device", "cpu",
               "--max-batch-size", str(max(levels)), "--max-seq-len", "512"]
    with spawn_server(args.model, *options) as server:
        run_clients(server.url, "bench", 2, 1, 4)  # warm-up
        for clients in levels:
            served = run_clients(server.url, "bench", clients, args.requests_per_client, args.max_tokens)
            engine = run_engine(model, tokenizer, clients, served["requests"], args.max_tokens)
            report["results"].append({"clients": clients, "server": served, "engine_in_process": engine,
                                      "server_vs_engine_tokens_per_s": round(served["tokens_per_s"]
                                                                             / engine["tokens_per_s"], 3)})
            print(json.dumps(report["results"][-1]), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
