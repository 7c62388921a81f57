"""PTS p-estimates per second: phiforge's batched, prefix-caching estimator vs naive per-prefix HF generate. JSON.

    python bench/pts.py                                  # 6 GSM8K test questions x 4 prefixes x 8 samples
    python bench/pts.py --questions 8 --samples 16 --max-new-tokens 96

Both sides use the embedded teacher (SmolLM2-135M-Instruct, same weights: transformers reads views of
phiforge's tensors), the same prefixes (the teacher's greedy solution cut at 0, 1/4, 1/2, 3/4), the same
sampling settings (codelion/pts: T 0.6, top-p 0.95, top-k 20) and the same GSM8K answer oracle.
  phiforge      every (prefix, sample) request in one Engine.generate call (continuous batching); a
                request copies the KV cache of the longest prefix another row holds
  transformers  what codelion/pts does: one ``generate(num_return_sequences=n)`` call per prefix
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from common import machine, transformers_view

from phiforge.inference.engine import Engine, SamplingParams
from phiforge.io.load import load_pretrained
from phiforge.train.pts import PTS_SAMPLING, Estimator, PrefixCachingEngine, Query, SearchPart, gsm8k_oracle

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "benchmarks" / "gsm8k" / "test.jsonl"


def prefixes(model, tok, questions: list[dict], max_new: int) -> list[tuple[Query, list[int]]]:  # noqa: ANN001
    queries = [Query(f"q{i}", q, tok.apply_chat_template([{"role": "user", "content": q["question"]}],
                                                          add_generation_prompt=True, tokenize=True))
               for i, q in enumerate(questions)]
    greedy = Engine(model, tok).generate([q.prompt for q in queries], SamplingParams(
        max_new_tokens=max_new, stop_token_ids=tuple(tok.stop_token_ids)))
    out = []
    for q, c in zip(queries, greedy):
        ids = [t for t in c.token_ids if t not in tok.stop_token_ids]
        out += [(q, ids[: len(ids) * k // 4]) for k in range(4)]
    return out


def run_phiforge(model, tok, wanted, sampling: SamplingParams, samples: int) -> dict:  # noqa: ANN001
    search = SearchPart(min_samples=samples, max_samples=samples, round_samples=samples)
    engine = PrefixCachingEngine(model, tok, max_batch_size=64)
    est = Estimator(engine, gsm8k_oracle, sampling, search, tok.stop_token_ids, seed=0)
    start = time.perf_counter()
    est.estimate(wanted)
    seconds = time.perf_counter() - start
    ps = [est.get(q, p).p for q, p in wanted]
    return {"seconds": seconds, "estimates_per_s": len(wanted) / seconds, "samples_per_s": est.samples / seconds,
            "prefill_tokens": engine.prefill_tokens, "reused_prefix_tokens": engine.reused_tokens,
            "mean_p": sum(ps) / len(ps)}


@torch.no_grad()
def run_naive(reference, tok, wanted, sampling: SamplingParams, samples: int) -> dict:  # noqa: ANN001
    start, generated = time.perf_counter(), 0
    ps = []
    for query, prefix in wanted:
        ids = torch.tensor([query.prompt + prefix])
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                                 max_new_tokens=sampling.max_new_tokens - len(prefix), num_return_sequences=samples,
                                 eos_token_id=tok.stop_token_ids, pad_token_id=tok.pad_token_id)
        texts = tok.decode_batch([prefix + [t for t in row[ids.shape[1]:].tolist() if t not in tok.stop_token_ids]
                                  for row in out], skip_special_tokens=True)
        ps.append(sum(gsm8k_oracle(query.record, texts, [])) / samples)
        generated += samples
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "estimates_per_s": len(wanted) / seconds, "samples_per_s": generated / seconds,
            "mean_p": sum(ps) / len(ps)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--samples", type=int, default=8, help="samples per p-estimate (both sides)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="solution budget (prefix + completion)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tok = load_pretrained("smollm2-135m-instruct", dtype=args.dtype, device="cpu")
    reference = transformers_view(model)
    questions = [json.loads(line) for line in GSM8K.read_text().splitlines()[: args.questions]]
    wanted = prefixes(model, tok, questions, args.max_new_tokens)
    sampling = SamplingParams(**{**PTS_SAMPLING, "max_new_tokens": args.max_new_tokens})
    ours = run_phiforge(model, tok, wanted, sampling, args.samples)
    naive = run_naive(reference, tok, wanted, sampling, args.samples)
    print(json.dumps({"machine": machine(), "model": "smollm2-135m-instruct", "dtype": args.dtype,
                      "prefixes": len(wanted), "samples_per_estimate": args.samples,
                      "max_new_tokens": args.max_new_tokens, "phiforge": ours, "transformers_per_prefix": naive,
                      "speedup_estimates_per_s": ours["estimates_per_s"] / naive["estimates_per_s"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
