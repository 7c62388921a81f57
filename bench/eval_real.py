"""Real numbers: the embedded SmolLM2-135M-Instruct on full PIQA and MMLU val, phiforge vs lm-eval's HFLM.

Both sides read the same files (shared/benchmarks, rewritten for lm-eval in its Hugging Face layout) and
use lm-eval's own task definitions on the reference side. Prints and writes JSON with accuracies, the
largest per-request |Δ log-likelihood| and wall times. Slow (HFLM is the long part): run it alone.

    .venv/bin/python bench/eval_real.py --output runs/eval_real.json [--piqa-limit N] [--mmlu-shots 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "eval"))
SHARED = HERE.parents[1] / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--piqa-limit", type=int, default=None, help="phiforge: first N PIQA docs (default all)")
    parser.add_argument("--mmlu-shots", type=int, default=2)
    parser.add_argument("--hflm-piqa-limit", type=int, default=None, help="lm-eval HFLM: first N PIQA docs")
    parser.add_argument("--hflm-subjects", type=int, default=57, help="lm-eval HFLM: first N MMLU subjects")
    parser.add_argument("--hflm-batch-size", type=int, default=16)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)

    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval_ref import build, lm_eval_task, mmlu_files, mmlu_task, piqa_files

    from phiforge.eval.harness import EvalConfig, evaluate
    from phiforge.eval.tasks.mmlu import SUBJECTS
    from phiforge.io.gguf_read import load_gguf, resolve_model_alias

    path = resolve_model_alias("smollm2-135m-instruct")
    model, tokenizer = load_gguf(path, dtype=torch.float32)
    tmp = Path(tempfile.mkdtemp())
    report: dict = {"model": "SmolLM2-135M-Instruct (embedded Q4_1 GGUF, dequantized to fp32)", "dtype": "float32"}

    def ours(task: str, shots: int | None, limit: int | None) -> tuple[dict, float]:
        start = time.perf_counter()
        out = evaluate(EvalConfig(tasks=[task], data_dir=str(SHARED / "benchmarks"), limit=limit,
                                  num_fewshot=shots, log_samples=True, progress=True),
                       model=model, tokenizer=tokenizer)
        return out, time.perf_counter() - start

    piqa, piqa_s = ours("piqa", None, args.piqa_limit)
    mmlu, mmlu_s = ours("mmlu", args.mmlu_shots, None)
    report["phiforge"] = {
        "piqa": {"docs": piqa["n-samples"]["piqa"]["effective"], "seconds": piqa_s,
                 **{k: piqa["results"]["piqa"][f"{k},none"] for k in ("acc", "acc_norm", "acc_stderr")}},
        f"mmlu_val_{args.mmlu_shots}shot": {"questions": mmlu["n-samples"]["mmlu"]["effective"], "seconds": mmlu_s,
                                          "acc": mmlu["results"]["mmlu"]["acc,none"],
                                          "acc_stderr": mmlu["results"]["mmlu"]["acc_stderr,none"]}}
    print(json.dumps(report, indent=2), flush=True)

    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    hflm = HFLM(pretrained=hf.eval(), tokenizer=transformers.AutoTokenizer.from_pretrained(
        path.parent, gguf_file=path.name), batch_size=args.hflm_batch_size)

    def compare(lm_tasks: list, limit: int | None, samples: list[dict]) -> dict:
        per_task = [(t, build(t, limit)) for t in lm_tasks]
        insts = [i for _, per_doc in per_task for group in per_doc.values() for i in group]
        start = time.perf_counter()
        resps = hflm.loglikelihood(insts)
        seconds = time.perf_counter() - start
        it = iter(resps)
        accs = []
        for task, per_doc in per_task:
            docs = list(task.eval_docs)
            for doc_id, group in per_doc.items():
                accs.append(task.process_results(docs[doc_id], [next(it) for _ in group]))
        mine = samples[: len(accs)]
        my_resps = [r for s in mine for r in s["resps"]]
        metrics = [k for k in accs[0] if k in ("acc", "acc_norm")]
        return {"docs": len(accs), "requests": len(resps),
                "lm_eval_hflm": {k: sum(a[k] for a in accs) / len(accs) for k in metrics},
                "phiforge_same_docs": {k: sum(s[f"{k},none"] for s in mine) / len(mine) for k in metrics},
                "per_doc_metric_mismatches": sum(any(s[f"{k},none"] != a[k] for k in metrics)
                                                 for s, a in zip(mine, accs)),
                "max_abs_delta_loglik": max(abs(a[0] - b[0]) for a, b in zip(my_resps, resps)),
                "greedy_flag_mismatches": sum(a[1] != b[1] for a, b in zip(my_resps, resps)),
                "hflm_seconds": seconds}

    report["lm_eval_comparison"] = {
        "piqa": compare([lm_eval_task("piqa", piqa_files(SHARED, tmp))], args.hflm_piqa_limit,
                        piqa["samples"]["piqa"])}
    print(json.dumps(report["lm_eval_comparison"], indent=2), flush=True)
    subjects = SUBJECTS[: args.hflm_subjects]
    report["lm_eval_comparison"][f"mmlu_val_{args.mmlu_shots}shot"] = {
        "subjects": len(subjects),
        **compare([mmlu_task(s, mmlu_files(SHARED, tmp, s), args.mmlu_shots) for s in subjects], None,
                  mmlu["samples"]["mmlu"])}
    print(json.dumps(report, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
