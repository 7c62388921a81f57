"""Synthetic-data throughput with the embedded teacher: phiforge's local teacher vs a transformers loop. JSON.

    python bench/synth.py                                   # 128 prompts x 128 new tokens, bf16
    python bench/synth.py --prompts 256 --new-tokens 256 --batch 128 --hf-batch 32

Both sides get the same real synth prompts (the default config's first N documents, chat-templated),
sample with the synth defaults (temperature 0.7, top-k 50, top-p 0.95) and decode exactly
--new-tokens per prompt (no early stop), in bfloat16 on the same weights:
  phiforge      the local teacher's engine: continuous batching, --batch rows, batched sampling
  transformers  model.generate on left-padded batches of --hf-batch prompts (sdpa attention)
  pipeline      (with --pipeline) the whole `phiforge synth` path into a temp folder: writer, cache, stats
The machine's load average is reported: on a shared machine, rerun when it is quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from common import left_padded, machine, transformers_view

from phiforge.data.synth import SynthConfig, run_synth
from phiforge.data.synth.pipeline import Planner
from phiforge.data.synth.teachers import LocalTeacher, Request
from phiforge.inference.engine import Engine, SamplingParams
from phiforge.inference.sampling import TEACHER_SAMPLING
from phiforge.io.load import load_pretrained

TEACHER = "smollm2-135m-instruct"
SAMPLING = {"temperature": 0.7, "top_k": 50, "top_p": 0.95}


def synth_prompts(local: LocalTeacher, n: int) -> list[list[int]]:
    planner = Planner(SynthConfig.from_dict({}))
    return [local.encode(Request(planner.draft(i).prompt, seed=i, sampling=TEACHER_SAMPLING)) for i in range(n)]


def ours(engine: Engine, prompts: list[list[int]], tokens: int) -> dict:
    params = [SamplingParams(max_new_tokens=tokens, seed=i, **SAMPLING) for i in range(len(prompts))]
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    new = sum(len(r.token_ids) for r in results)
    return {"tokens": new, "seconds": round(seconds, 2), "tokens_per_s": round(new / seconds, 1)}


def theirs(reference: torch.nn.Module, prompts: list[list[int]], tokens: int, batch: int) -> dict:
    start, new = time.perf_counter(), 0
    torch.manual_seed(0)
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            ids, mask = left_padded(chunk)
            width = ids.shape[1]
            out = reference.generate(ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                                     do_sample=True, pad_token_id=0, **SAMPLING)
            new += (out.shape[1] - width) * len(chunk)
    seconds = time.perf_counter() - start
    return {"tokens": new, "seconds": round(seconds, 2), "tokens_per_s": round(new / seconds, 1)}


def pipeline(local: LocalTeacher, n: int, tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        config = SynthConfig.from_dict({}, [f"run.out_dir={out}", f"run.num_documents={n}", "run.progress=false",
                                            f"sampling.max_new_tokens={tokens}", "teacher.cache=false"])
        stats = run_synth(config, teacher=local)
    return {"documents": stats["documents"] + stats["rejected"], "tokens": stats["new_completion_tokens"],
            "seconds": stats["seconds"], "tokens_per_s": stats["tokens_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=128, help="phiforge engine rows (the synth default)")
    parser.add_argument("--hf-batch", type=int, default=32, help="transformers batch (the issue's reference: 32)")
    parser.add_argument("--pipeline", action="store_true", help="also time the whole phiforge synth path")
    args = parser.parse_args()
    model, tokenizer = load_pretrained(TEACHER, dtype=torch.bfloat16, device="cpu")
    local = LocalTeacher(model, tokenizer, max_batch_size=args.batch, name=TEACHER)
    prompts = synth_prompts(local, args.prompts)
    result = {"benchmark": "synth", **machine(), "load_average_before": os.getloadavg()[0], "teacher": TEACHER,
              "dtype": "bfloat16", "prompts": len(prompts), "new_tokens": args.new_tokens, "sampling": SAMPLING,
              "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1)}
    engine = Engine(model, tokenizer, max_batch_size=args.batch)
    ours(engine, prompts[:4], 4)  # warm-up
    result["phiforge"] = {"batch": args.batch, **ours(engine, prompts, args.new_tokens)}
    print(json.dumps({"phiforge": result["phiforge"]}), flush=True)
    reference = transformers_view(model)
    theirs(reference, prompts[:4], 4, 4)  # warm-up
    hf = theirs(reference, prompts, args.new_tokens, args.hf_batch)
    result["transformers_generate"] = {"batch": args.hf_batch, **hf}
    print(json.dumps({"transformers_generate": result["transformers_generate"]}), flush=True)
    result["ratio"] = round(result["phiforge"]["tokens_per_s"] / result["transformers_generate"]["tokens_per_s"], 2)
    if args.pipeline:
        result["pipeline"] = pipeline(local, args.prompts, args.new_tokens)
    result["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
