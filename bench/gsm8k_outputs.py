"""Regenerate tests/eval/data/gsm8k_teacher_outputs.jsonl: the embedded teacher's real GSM8K answers.

The first N test questions, lm-eval's 5-shot prompt, greedy, lm-eval's stop sequences; the parity
test runs phiforge's and lm-eval's answer extraction on these outputs. ~1 min per question on 2 cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from phiforge.eval.harness import EvalConfig, _plan, load_tasks
from phiforge.eval.scoring import LanguageModel
from phiforge.io.load import load_pretrained

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=12)
    parser.add_argument("--data-dir", default=str(HERE.parents[1] / "shared" / "benchmarks"))
    parser.add_argument("--output", default=str(HERE.parent / "tests/eval/data/gsm8k_teacher_outputs.jsonl"))
    args = parser.parse_args()
    config = EvalConfig(tasks=["gsm8k"], limit=args.limit, data_dir=args.data_dir)
    plan = _plan(load_tasks(config)[0], config)
    model, tokenizer = load_pretrained("smollm2-135m-instruct", dtype="float32")
    lm = LanguageModel(model, tokenizer, show_progress=True)
    outputs = lm.generate_until([inst.args for inst in plan["instances"]])
    with open(args.output, "w") as f:
        for doc, text in zip(plan["docs"], outputs):
            f.write(json.dumps({"question": doc["question"], "answer": doc["answer"], "response": text}) + "\n")
    print(f"wrote {len(outputs)} outputs to {args.output}")


if __name__ == "__main__":
    main()
