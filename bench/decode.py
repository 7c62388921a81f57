"""Decode and prefill speed: phiforge vs transformers (and the memory-bandwidth limit) in one run. JSON.

    python bench/decode.py                       # all parts below
    python bench/decode.py --parts single,batched --new-tokens 64

parts:
  single    phi-1.5-shaped random weights: single-stream decode in bf16, int8, int4, each beside the
            limit (weight bytes read per token / measured bandwidth: the run's probe, and a quick read right
            before and after that measurement, "adjacent") and transformers generate (bf16);
            and prefill of a 128-token prompt on the same model
  smollm    SmolLM2-135M (the embedded teacher): single stream, phiforge fp32/bf16/int8/int4 vs transformers fp32
  batched   SmolLM2-135M, 32 prompts x --batched-tokens new tokens, phiforge vs transformers generate with padding
  synth     SmolLM2-135M, --synth-prompts prompts x 256 tokens, the engine picks its batch (long: opt-in)

With --llama-cpp BUILD_DIR (a llama.cpp build's bin/, e.g. cmake -B build -DGGML_NATIVE=ON && cmake --build build
--target llama-bench llama-batched-bench llama-quantize, ~15 minutes on 2 cores) the same run also times llama.cpp
on GGUFs of the same shapes: phiforge exports F16 (export_gguf), llama-quantize makes Q8_0 and Q4_0 from it, and
llama-bench / llama-batched-bench time them (top-level "llama_cpp", ratios in "vs_llama_cpp"). Without it the
part is skipped. The GGUFs are cached in --gguf-dir.

    python bench/decode.py --parts single,smollm,batched --llama-cpp "$PHIFORGE_LLAMA_CPP"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import torch
from common import (
    adjacent_bandwidth,
    best_seconds,
    left_padded,
    limit,
    machine,
    random_phiforge,
    read_bandwidth,
    transformers_view,
)

from phiforge import kernels
from phiforge.config.model import preset
from phiforge.inference.engine import Engine, SamplingParams
from phiforge.io.load import load_pretrained
from phiforge.quant.quantize import quantize_model

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
    prefill = best_seconds(lambda: engine.generate([prompt], first), repeats=3)
    total = best_seconds(lambda: engine.generate([prompt], params), repeats=3)
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
    # 8 prompt tokens: the quantized prefill stays on the GEMV (more rows dequantize every weight, a noisy ~1 s
    # that decode_rate would subtract from another noisy ~1 s)
    prompt = list(range(100, 108))
    out = {"shape": "phi-1.5 (1.42B, random weights)", "new_tokens": args.new_tokens,
           "transformers_bf16_tokens_per_s": round(hf_decode_rate(reference, prompt, args.new_tokens), 2)}
    ids = torch.tensor([list(range(1000, 1128))])
    with torch.inference_mode():
        out["prefill_128_transformers_tokens_per_s"] = round(
            128 / best_seconds(lambda: reference(ids, logits_to_keep=1).logits), 1)
        Engine(model, max_batch_size=1)  # installs the engine's fast paths on the model: its prefill route
        out["prefill_128_phiforge_tokens_per_s"] = round(128 / best_seconds(lambda: model(ids, last_only=True)), 1)
    reference = None  # free it before quantizing
    rates = {}
    for label, bits in (("bf16", None), ("int8", 8), ("int4", 4)):
        if bits:  # quantize the same (seeded) float weights afresh, not the previous quantization
            model = quantize_model(random_phiforge(preset("phi-1.5"), torch.bfloat16), bits,
                                   group_size=args.group_size, keep_stored=False)
        engine = Engine(model, max_batch_size=1)
        before = adjacent_bandwidth()
        rate = decode_rate(engine, prompt, args.new_tokens)
        rates[label] = (rate, bytes_per_token(model), max(before, adjacent_bandwidth()))
        engine = model = None
    for label, (rate, size, adjacent) in rates.items():
        moved = rate * size
        out[label] = {"tokens_per_s": round(rate, 2), "bytes_per_token": size, "GBps": round(moved / 1e9, 2),
                      "adjacent_probe_GBps": round(adjacent / 1e9, 2),
                      "fraction_of_adjacent_limit": round(moved / limit(adjacent, [moved]), 3)}
    set_limit(out, bandwidth, [rate * size for rate, size, _ in rates.values()], "phiforge (above the probe)")
    return out


def set_limit(single: dict, probe: float, observed_bytes_per_s: list[float], source: str) -> None:
    """The limit the fractions are taken of: the probe, or what an engine moved if that was more (so no fraction
    exceeds 1); called again once llama.cpp has run, with the bytes its F16 decode moved."""
    top = limit(probe, observed_bytes_per_s)
    if top > probe:
        single["limit_from"] = source
    elif "limit_from" not in single:
        single["limit_from"] = "probe"
    single["limit_GBps"] = round(top / 1e9, 2)
    for label in ("bf16", "int8", "int4"):
        row = single[label]
        row["limit_tokens_per_s"] = round(top / row["bytes_per_token"], 2)
        row["fraction_of_limit"] = round(row["tokens_per_s"] * row["bytes_per_token"] / top, 3)


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


def _llama_gguf(args: argparse.Namespace, name: str, make_model) -> dict[str, Path]:  # noqa: ANN001
    """F16 (phiforge's export) and Q8_0 / Q4_0 (llama-quantize from it) of one model, cached in --gguf-dir."""
    from phiforge.io import gguf_write

    folder = Path(args.gguf_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    files = {q: folder / f"{name}-{q}.gguf" for q in ("f16", "q8_0", "q4_0")}
    if not files["f16"].exists():
        model, tokenizer = make_model()
        # llama.cpp refuses tokenizer.ggml.pre = "gpt2" (what the export writes for a byte-level BPE until issue
        # 21's fix): SmolLM2's pre-tokenizer is "smollm" there. Only the tokenizer metadata changes; llama-bench
        # times random tokens, so the weights and shapes are what matter.
        original = getattr(gguf_write, "_byte_level_pre", None)
        if original is not None:
            gguf_write._byte_level_pre = lambda spec: "smollm" if original(spec) == "gpt2" else original(spec)
        try:
            gguf_write.export_gguf(model, tokenizer, files["f16"], quant="f16", name=name)
        finally:
            if original is not None:
                gguf_write._byte_level_pre = original
        model = None
    for q in ("q8_0", "q4_0"):
        if not files[q].exists():
            tmp = files[q].with_suffix(".tmp")
            subprocess.run([str(Path(args.llama_cpp) / "llama-quantize"), str(files["f16"]), str(tmp), q.upper(),
                            str(torch.get_num_threads())], check=True, capture_output=True)
            os.replace(tmp, files[q])
    return files


def _llama_bench(args: argparse.Namespace, gguf: Path, prompt: int, gen: int) -> dict[str, float]:
    """llama-bench's mean tokens/s of each test (pp<prompt>, tg<gen>) on this many threads."""
    cmd = [str(Path(args.llama_cpp) / "llama-bench"), "-m", str(gguf), "-p", str(prompt), "-n", str(gen),
           "-r", "3", "-t", str(torch.get_num_threads()), "-o", "json"]
    runs = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return {("pp" if r["n_prompt"] else "tg"): float(r["avg_ts"]) for r in runs}


def _llama_batched(args: argparse.Namespace, gguf: Path, parallel: int, prompt: int, gen: int) -> dict[str, float]:
    cmd = [str(Path(args.llama_cpp) / "llama-batched-bench"), "-m", str(gguf), "-c", str(parallel * (prompt + gen)),
           "-b", "2048", "-ub", "512", "-npp", str(prompt), "-ntg", str(gen), "-npl", str(parallel),
           "-t", str(torch.get_num_threads()), "--output-format", "jsonl"]
    lines = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()
    row = json.loads(next(line for line in lines if line.startswith("{") and '"speed_tg"' in line))
    return {"new_tokens_per_s": parallel * gen / row["t"], "speed_tg": row["speed_tg"]}


def part_llama_cpp(args: argparse.Namespace) -> dict:
    """llama.cpp on the same shapes as the single, smollm and batched parts (same threads, same run)."""
    if not (Path(args.llama_cpp) / "llama-bench").exists():
        return {"skipped": f"no llama-bench in {args.llama_cpp}"}

    def phi15():  # noqa: ANN202  the single part's model, the teacher's tokenizer (49152 of 51200 ids, padded)
        return random_phiforge(preset("phi-1.5"), torch.bfloat16), load_pretrained(TEACHER, device="cpu")[1]

    def smollm():  # noqa: ANN202
        return load_pretrained(TEACHER, dtype=torch.float32, device="cpu")

    out: dict = {"build": str(args.llama_cpp), "threads": torch.get_num_threads(),
                 "gguf": "F16 written by phiforge's export_gguf, Q8_0/Q4_0 made from it by llama-quantize; "
                         "tokenizer.ggml.pre written as 'smollm' (llama.cpp refuses 'gpt2')"}
    files = _llama_gguf(args, "phi-1.5-random", phi15)
    for q in ("f16", "q8_0", "q4_0"):
        rates = _llama_bench(args, files[q], 128 if q == "f16" else 0, args.new_tokens)
        out[f"{q}_tokens_per_s"] = round(rates["tg"], 2)
        if "pp" in rates:
            out["prefill_128_f16_tokens_per_s"] = round(rates["pp"], 1)
    files = _llama_gguf(args, "smollm2-135m", smollm)
    for q in ("f16", "q8_0", "q4_0"):
        out[f"smollm2_{q}_tokens_per_s"] = round(_llama_bench(args, files[q], 0, args.new_tokens)["tg"], 1)
    batched = _llama_batched(args, files["f16"], 32, 32, args.batched_tokens)
    out["smollm2_batched32_f16_tokens_per_s"] = round(batched["new_tokens_per_s"], 1)
    out["smollm2_batched32_f16_speed_tg"] = round(batched["speed_tg"], 1)
    return out


def versus_llama_cpp(result: dict) -> dict:
    """phiforge / llama.cpp for each pair of the same shape and (nearest) precision measured in this run."""
    ll, pairs = result["llama_cpp"], {}
    single, smollm, batched = result.get("single", {}), result.get("smollm", {}), result.get("batched", {})
    for ours, theirs in (("bf16", "f16"), ("int8", "q8_0"), ("int4", "q4_0")):
        if ours in single:
            pairs[f"phi15_{ours}_vs_{theirs}"] = single[ours]["tokens_per_s"] / ll[f"{theirs}_tokens_per_s"]
        if f"phiforge_{ours}_tokens_per_s" in smollm:
            pairs[f"smollm2_{ours}_vs_{theirs}"] = (smollm[f"phiforge_{ours}_tokens_per_s"]
                                                    / ll[f"smollm2_{theirs}_tokens_per_s"])
    if "prefill_128_phiforge_tokens_per_s" in single:
        pairs["phi15_prefill_128_bf16_vs_f16"] = (single["prefill_128_phiforge_tokens_per_s"]
                                                  / ll["prefill_128_f16_tokens_per_s"])
    if "phiforge_tokens_per_s" in batched:
        pairs["smollm2_batched32_bf16_vs_f16"] = (batched["phiforge_tokens_per_s"]
                                                  / ll["smollm2_batched32_f16_tokens_per_s"])
    return {name: round(value, 2) for name, value in pairs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="single,smollm,batched")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batched-tokens", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--synth-prompts", type=int, default=512)
    parser.add_argument("--synth-batch", type=int, default=None, help="default: the engine picks")
    parser.add_argument("--llama-cpp", default=None, metavar="BUILD_DIR",
                        help="llama.cpp's bin/ (llama-bench, llama-batched-bench, llama-quantize); default: skipped")
    parser.add_argument("--gguf-dir", default="~/.cache/phiforge/bench-gguf", help="where the GGUFs are cached")
    args = parser.parse_args()
    parts = [part for part in args.parts.split(",") if part]
    probe = read_bandwidth()
    result = {"benchmark": "decode", **machine(), "read_bandwidth_GBps": round(probe["best"] / 1e9, 2),
              "bandwidth_probe_GBps": {name: round(rate / 1e9, 2) for name, rate in probe.items()},
              "native_kernels": kernels.features() if kernels.available() else "off (PyTorch kernels)"}
    runners = {"single": lambda: part_single(args, probe["best"]), "smollm": lambda: part_smollm(args),
               "batched": lambda: part_batched(args), "synth": lambda: part_synth(args)}
    for name in parts:
        result[name] = runners[name]()
        print(json.dumps({name: result[name]}), flush=True)
    if args.llama_cpp:
        result["llama_cpp"] = part_llama_cpp(args)
        print(json.dumps({"llama_cpp": result["llama_cpp"]}), flush=True)
        if "skipped" not in result["llama_cpp"]:
            result["vs_llama_cpp"] = versus_llama_cpp(result)
            single = result.get("single")
            if single and "f16_tokens_per_s" in result["llama_cpp"]:  # F16 reads the bf16 model's bytes
                f16 = result["llama_cpp"]["f16_tokens_per_s"] * single["bf16"]["bytes_per_token"]
                set_limit(single, single["limit_GBps"] * 1e9, [f16], "llama.cpp F16 (above the probe)")
    else:
        result["llama_cpp"] = {"skipped": "no --llama-cpp BUILD_DIR"}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
