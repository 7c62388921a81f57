"""Decode and prefill speed: phiforge vs transformers (and the memory-bandwidth limit) in one run. JSON.

    python bench/decode.py                       # all parts below
    python bench/decode.py --parts single,batched --new-tokens 64

parts:
  single    phi-1.5-shaped random weights: single-stream decode in bf16, int8, int4, each beside the
            limit (weight bytes read per token / measured bandwidth) and transformers generate (bf16);
            and prefill of a 128-token prompt on the same model
  smollm    SmolLM2-135M (the embedded teacher): single stream, phiforge fp32/bf16/int8/int4 vs transformers fp32
  batched   SmolLM2-135M, 32 prompts x --batched-tokens new tokens, phiforge vs transformers generate with padding
  synth     SmolLM2-135M, --synth-prompts prompts x 256 tokens, the engine picks its batch (long: opt-in)
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import best_seconds, left_padded, machine, random_phiforge, read_bandwidth, transformers_view

from phiforge import kernels
from phiforge.checkpoint import load_pretrained
from phiforge.config import preset
from phiforge.generate import Engine, SamplingParams
from phiforge.quantize import quantize_model

TEACHER = "smollm2-135m-instruct"


def bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every weight once, but only one row of the input embedding."""
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
                if t.device.type != "meta")
    embed = model.embed.weight
    tied_and_float = model.lm_head.__class__.__name__ == "Linear" and model.config.tie_word_embeddings
    return total - (0 if tied_and_float else embed.numel() * embed.element_size())


def decode_rate(engine: Engine, prompt: list[int], tokens: int) -> float:
    """New tokens per second of decode alone (prefill timed separately and subtracted)."""
    params = SamplingParams(max_new_tokens=tokens)
    first = SamplingParams(max_new_tokens=1)
    prefill = best_seconds(lambda: engine.generate([prompt], first), repeats=2)
    total = best_seconds(lambda: engine.generate([prompt], params), repeats=2)
    return (tokens - 1) / max(total - prefill, 1e-9)


def hf_decode_rate(model: torch.nn.Module, prompt: list[int], tokens: int) -> float:
    ids = torch.tensor([prompt])

    def run(n: int) -> None:
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    with torch.inference_mode():
        prefill = best_seconds(lambda: run(1), repeats=2)
        total = best_seconds(lambda: run(tokens), repeats=2)
    return (tokens - 1) / max(total - prefill, 1e-9)


def part_single(args: argparse.Namespace, bandwidth: float) -> dict:
    model = random_phiforge(preset("phi-1.5"), torch.bfloat16)
    reference = transformers_view(model)
    prompt = list(range(100, 116))
    out = {"shape": "phi-1.5 (1.42B, random weights)", "new_tokens": args.new_tokens,
           "transformers_bf16_tokens_per_s": round(hf_decode_rate(reference, prompt, args.new_tokens), 2)}
    ids = torch.tensor([list(range(1000, 1128))])
    with torch.inference_mode():
        out["prefill_128_phiforge_tokens_per_s"] = round(128 / best_seconds(lambda: model(ids, last_only=True)), 1)
        out["prefill_128_transformers_tokens_per_s"] = round(
            128 / best_seconds(lambda: reference(ids, logits_to_keep=1).logits), 1)
    reference = None  # free it before quantizing
    for label, bits in (("bf16", None), ("int8", 8), ("int4", 4)):
        if bits:  # quantize the same (seeded) float weights afresh, not the previous quantization
            model = quantize_model(random_phiforge(preset("phi-1.5"), torch.bfloat16), bits,
                                   group_size=args.group_size, keep_stored=False)
        engine = Engine(model, max_batch_size=1)
        rate = decode_rate(engine, prompt, args.new_tokens)
        limit = bandwidth / bytes_per_token(model)
        out[label] = {"tokens_per_s": round(rate, 2), "limit_tokens_per_s": round(limit, 2),
                      "fraction_of_limit": round(rate / limit, 3), "bytes_per_token": bytes_per_token(model)}
    return out


def teacher_prompts(tokenizer, n: int) -> list[list[int]]:  # noqa: ANN001
    subjects = ["photosynthesis", "fractions", "gravity", "volcanoes", "the heart", "recursion", "probability",
                "the Roman empire", "magnets", "rainbows", "bacteria", "algebra", "tides", "sound", "friction",
                "supply and demand"]
    out = []
    for i in range(n):
        text = (f"Write a {'short ' if i % 2 else ''}textbook section about {subjects[i % len(subjects)]}"
                + " for curious students" * (i % 3) + ".")
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        out.append(tokenizer.encode(rendered, add_special_tokens=False))
    return out


def hf_batched(reference: torch.nn.Module, prompts: list[list[int]], tokens: int, batch: int) -> float:
    """transformers generate, left-padded batches of ``batch``: new tokens per second."""
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            ids, mask = left_padded(chunk)
            reference.generate(ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                               do_sample=False, pad_token_id=0)
    return len(prompts) * tokens / (time.perf_counter() - start)


def ours_batched(engine: Engine, prompts: list[list[int]], tokens: int) -> float:
    start = time.perf_counter()
    results = engine.generate(prompts, SamplingParams(max_new_tokens=tokens))
    return sum(len(r.token_ids) for r in results) / (time.perf_counter() - start)


def part_smollm(args: argparse.Namespace) -> dict:
    model, tokenizer = load_pretrained(TEACHER, dtype=torch.float32, device="cpu")
    reference = transformers_view(model)
    prompt = teacher_prompts(tokenizer, 1)[0]
    out = {"transformers_fp32_tokens_per_s": round(hf_decode_rate(reference, prompt, args.new_tokens), 1)}
    reference = None
    out["phiforge_fp32_tokens_per_s"] = round(decode_rate(Engine(model), prompt, args.new_tokens), 1)
    for label, bits in (("int8", 8), ("int4", 4)):
        quantized, _ = load_pretrained(TEACHER, dtype=torch.bfloat16, device="cpu")
        quantize_model(quantized, bits, group_size=args.group_size)
        out[f"phiforge_{label}_tokens_per_s"] = round(decode_rate(Engine(quantized), prompt, args.new_tokens), 1)
    return out


def part_batched(args: argparse.Namespace) -> dict:
    model, tokenizer = load_pretrained(TEACHER, dtype=torch.bfloat16, device="cpu")
    reference = transformers_view(model)
    prompts = teacher_prompts(tokenizer, 32)
    hf_rate = hf_batched(reference, prompts, args.batched_tokens, batch=32)
    ours = ours_batched(Engine(model, max_batch_size=32), prompts, args.batched_tokens)
    return {"prompts": 32, "new_tokens": args.batched_tokens, "dtype": "bfloat16",
            "phiforge_tokens_per_s": round(ours, 1), "transformers_tokens_per_s": round(hf_rate, 1),
            "ratio": round(ours / hf_rate, 2)}


def part_synth(args: argparse.Namespace) -> dict:
    model, tokenizer = load_pretrained(TEACHER, dtype=torch.bfloat16, device="cpu")
    prompts = teacher_prompts(tokenizer, args.synth_prompts)
    reference = transformers_view(model)
    hf_rate = hf_batched(reference, prompts[:64], 256, batch=32)  # a subset: the rate is what we compare
    engine = Engine(model, max_batch_size=args.synth_batch)
    ours = ours_batched(engine, prompts, 256)
    return {"prompts": len(prompts), "new_tokens": 256,
            "phiforge_batch": engine.batch_size(len(prompts), max(map(len, prompts)) + 256),
            "phiforge_tokens_per_s": round(ours, 1), "transformers_batch32_tokens_per_s": round(hf_rate, 1),
            "ratio": round(ours / hf_rate, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="single,smollm,batched")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batched-tokens", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--synth-prompts", type=int, default=512)
    parser.add_argument("--synth-batch", type=int, default=None, help="default: the engine picks")
    args = parser.parse_args()
    parts = args.parts.split(",")
    bandwidth = read_bandwidth()
    result = {"benchmark": "decode", **machine(), "read_bandwidth_GBps": round(bandwidth / 1e9, 2),
              "native_kernels": kernels.features() if kernels.available() else "off (PyTorch kernels)"}
    runners = {"single": lambda: part_single(args, bandwidth), "smollm": lambda: part_smollm(args),
               "batched": lambda: part_batched(args), "synth": lambda: part_synth(args)}
    for name in parts:
        result[name] = runners[name]()
        print(json.dumps({name: result[name]}), flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
