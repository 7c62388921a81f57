"""Log-likelihood requests per second: phiforge's scorer vs lm-evaluation-harness's HFLM, same model and requests.

The requests are built once by phiforge's harness (byte-identical to lm-eval's, see tests/eval) and
answered by both: phiforge's packed context trees, and HFLM (transformers' model from the same GGUF,
length-sorted padded batches, logits cache for one-token continuations). Prints JSON.

    .venv/bin/python bench/eval.py [--piqa-docs 100] [--mmlu-subjects 3] [--hflm-batch-size 16] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"


def _requests(task: str, limit: int | None, shots: int | None) -> list[tuple[str, str]]:
    from phiforge.eval.harness import EvalConfig, _plan, load_tasks

    config = EvalConfig(tasks=[task], data_dir=str(SHARED / "benchmarks"), limit=limit, num_fewshot=shots)
    return [inst.args for t in load_tasks(config) for inst in _plan(t, config)["instances"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--piqa-docs", type=int, default=100)
    parser.add_argument("--mmlu-subjects", type=int, default=3)
    parser.add_argument("--mmlu-shots", type=int, default=2)
    parser.add_argument("--hflm-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="both sides; parity to 1e-4 is an fp32 property, bf16 shows the speed with AMX")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)

    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from phiforge.eval.scoring import LanguageModel
    from phiforge.eval.tasks.mmlu import SUBJECTS
    from phiforge.io.gguf_read import load_gguf, resolve_model_alias

    path = resolve_model_alias("smollm2-135m-instruct")
    model, tokenizer = load_gguf(path, dtype=dtype)
    ours = LanguageModel(model, tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    hflm = HFLM(pretrained=hf.eval(), tokenizer=transformers.AutoTokenizer.from_pretrained(
        path.parent, gguf_file=path.name), batch_size=args.hflm_batch_size)

    workloads = {"piqa": _requests("piqa", args.piqa_docs, None)}
    workloads[f"mmlu_{args.mmlu_shots}shot"] = [r for s in SUBJECTS[: args.mmlu_subjects]
                                                for r in _requests(f"mmlu_{s}", None, args.mmlu_shots)]
    report = {"model": f"SmolLM2-135M-Instruct {args.dtype}", "device": "cpu", "threads": args.threads,
              "hflm_batch_size": args.hflm_batch_size, "tasks": {}}
    warm = workloads["piqa"][:16]  # one-time costs (kernel selection, allocator growth) out of the timings
    ours.loglikelihood(warm)
    hflm.loglikelihood([Instance("loglikelihood", {}, r, 0) for r in warm], disable_tqdm=True)
    for name, requests in workloads.items():
        start = time.perf_counter()
        mine = ours.loglikelihood(requests)
        ours_s = time.perf_counter() - start
        start = time.perf_counter()
        theirs = hflm.loglikelihood([Instance("loglikelihood", {}, r, 0) for r in requests], disable_tqdm=True)
        hflm_s = time.perf_counter() - start
        report["tasks"][name] = {
            "requests": len(requests),
            "phiforge_req_per_s": len(requests) / ours_s, "hflm_req_per_s": len(requests) / hflm_s,
            "speedup": hflm_s / ours_s,
            "max_abs_delta_loglik": max(abs(a[0] - b[0]) for a, b in zip(mine, theirs)),
            "greedy_flag_mismatches": sum(a[1] != b[1] for a, b in zip(mine, theirs)),
        }
        print(json.dumps({name: report["tasks"][name]}), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
