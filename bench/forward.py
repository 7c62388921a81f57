"""Prefill throughput: phiforge vs transformers on the same random weights, in one run. Prints JSON.

    python bench/forward.py [--shapes phi-1.5,phi-3-mini-4k] [--tokens 512] [--dtype bfloat16] [--repeats 2]

Both models share one copy of the weights (transformers' parameters are views of phiforge's), so a
3.8B model fits twice over in memory, and both read exactly the same numbers.
"""

from __future__ import annotations

import argparse
import json

import torch
from common import best_seconds_interleaved, machine, random_phiforge, transformers_view

from phiforge.config.model import DTYPES, preset
from phiforge.inference import fast_paths


def bench_shape(name: str, tokens: int, dtype: torch.dtype, repeats: int) -> dict:
    ours = random_phiforge(preset(name), dtype)
    reference = transformers_view(ours)
    fast_paths.install(ours, pack=False)  # the engine's routes (native RMSNorm), without the packed copies
    ids = torch.randint(0, ours.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours_logits, ref_logits = ours(ids).float(), reference(ids).logits.float()
        agree = (ours_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        best = best_seconds_interleaved({"ours": lambda: ours(ids), "ref": lambda: reference(ids).logits}, repeats)
        ours_tps, ref_tps = tokens / best["ours"], tokens / best["ref"]
    return {"shape": name, "parameters": ours.num_parameters(), "tokens": tokens, "dtype": str(dtype),
            "phiforge_tokens_per_s": round(ours_tps, 1), "transformers_tokens_per_s": round(ref_tps, 1),
            "ratio": round(ours_tps / ref_tps, 3), "argmax_agreement": round(agree, 4),
            "phiforge_gflops": round(2 * ours.num_parameters() * ours_tps / 1e9, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="phi-1.5,phi-3-mini-4k")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    results = [bench_shape(name, args.tokens, DTYPES[args.dtype], args.repeats) for name in args.shapes.split(",")]
    print(json.dumps({"benchmark": "prefill", **machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
