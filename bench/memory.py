"""Peak resident memory of a Phi-3-mini-shaped (3.8B) int4 model generating 128 tokens. Prints JSON.

    python bench/memory.py [--shape phi-3-mini-4k] [--bits 4] [--group-size 32] [--new-tokens 128]

The phi-3 report runs 4-bit Phi-3-mini in 1.8 GB on a phone. The model is built layer by layer
(random bf16 weights quantized as they are made), so the float model never exists in memory; the
figure is this process's peak RSS, interpreter and torch included.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from torch import nn

from phiforge.config.model import preset
from phiforge.inference.engine import Engine, SamplingParams
from phiforge.model.transformer import build_model
from phiforge.quant.quantize import QuantizedLinear, _replace, quantizable


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def quantized_random_model(name: str, bits: int, group_size: int) -> nn.Module:
    model = build_model(preset(name), device="meta", dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    names = quantizable(model)
    for layer in names:
        meta = model.get_submodule(layer)
        dense = nn.Linear(meta.in_features, meta.out_features, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            dense.weight.normal_(0.0, 0.02, generator=generator)
        _replace(model, layer, QuantizedLinear.from_linear(dense, bits, group_size, keep_stored=False))
    for pname, param in list(model.named_parameters()):  # what is left: embeddings and norms
        if param.device.type == "meta":
            owner, _, attr = pname.rpartition(".")
            real = torch.empty(param.shape, dtype=param.dtype).normal_(0.0, 0.02, generator=generator)
            setattr(model.get_submodule(owner), attr, nn.Parameter(real, requires_grad=False))
    model.quantization = {"bits": bits, "group_size": group_size, "modules": names}
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="phi-3-mini-4k")
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    baseline = peak_rss_bytes()
    model = quantized_random_model(args.shape, args.bits, args.group_size)
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    built = peak_rss_bytes()
    engine = Engine(model, max_batch_size=1)
    start = time.perf_counter()
    result = engine.generate([list(range(100, 116))], SamplingParams(max_new_tokens=args.new_tokens))[0]
    seconds = time.perf_counter() - start
    print(json.dumps({"benchmark": "memory", "shape": args.shape, "bits": args.bits, "group_size": args.group_size,
                      "parameters": sum(p.numel() for p in build_model(preset(args.shape), device="meta")
                                        .parameters()),
                      "resident_weight_bytes": weights, "peak_rss_bytes": peak_rss_bytes(),
                      "peak_rss_after_build_bytes": built, "rss_before_model_bytes": baseline,
                      "new_tokens": len(result.token_ids), "tokens_per_s": round(len(result.token_ids) / seconds, 2)},
                     indent=2))


if __name__ == "__main__":
    main()
