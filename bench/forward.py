"""Prefill throughput: phiforge vs transformers on the same random weights, in one run. Prints JSON.

    python bench/forward.py [--shapes phi-1.5,phi-3-mini-4k] [--tokens 512] [--dtype bfloat16] [--repeats 2]

Both models share one copy of the weights (transformers' parameters are views of phiforge's), so a
3.8B model fits twice over in memory, and both read exactly the same numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import transformers

from phiforge.checkpoint import hf_state_dict
from phiforge.config import DTYPES, preset
from phiforge.model import build_model


def random_models(name: str, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    config = preset(name)
    ours = build_model(config, device="meta", dtype=dtype).to_empty(device="cpu")
    if config.tie_word_embeddings:
        ours.lm_head.weight = ours.embed.weight
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(dtype) * 0.02)
    hf_config = config.to_hf_config()
    hf_config = transformers.AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    hf_config._attn_implementation = "sdpa"
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    reference.load_state_dict(hf_state_dict(ours), strict=False, assign=True)
    reference.tie_weights()
    rotary = reference.model.rotary_emb  # its buffers were made on meta: rebuild them on the CPU
    reference.model.rotary_emb = type(rotary)(config=hf_config)
    return ours.eval(), reference.eval()


def tokens_per_second(fn, ids: torch.Tensor, repeats: int) -> float:
    fn(ids)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(ids)
        best = min(best, time.perf_counter() - start)
    return ids.numel() / best


def bench_shape(name: str, tokens: int, dtype: torch.dtype, repeats: int) -> dict:
    ours, reference = random_models(name, dtype)
    ids = torch.randint(0, ours.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours_logits, ref_logits = ours(ids).float(), reference(ids).logits.float()
        agree = (ours_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        ours_tps = tokens_per_second(lambda x: ours(x), ids, repeats)
        ref_tps = tokens_per_second(lambda x: reference(x).logits, ids, repeats)
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
    print(json.dumps({"benchmark": "prefill", "machine": platform.processor() or platform.machine(),
                      "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "transformers": transformers.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
