"""Phi-3-small KV cache: bytes per token of phiforge's sparse-aware cache vs a dense GQA cache of the same shape.

Allocates the real cache structures (on the meta device, so any capacity fits) and reads their sizes;
then checks, on the tiny Phi-3-small layout, that the sparse cache decodes the same logits as a full
recompute. Prints JSON.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from phiforge.config.model import preset
from phiforge.model.transformer import build_model


def cache_bytes(name: str, capacities: list[int]) -> list[dict]:
    config = preset(name)
    model = build_model(config, device="meta", dtype=torch.bfloat16)
    dense_gqa = config.kv_cache_bytes_per_token(torch.bfloat16)
    rows = []
    for capacity in capacities:
        per_token = model.new_cache(1, capacity).nbytes() / capacity
        rows.append({"model": name, "capacity": capacity, "dense_gqa_bytes_per_token": dense_gqa,
                     "phiforge_bytes_per_token": round(per_token, 1), "ratio": round(per_token / dense_gqa, 4)})
    return rows


def decode_check(steps: int = 48) -> dict:
    model = build_model(preset("tiny-phi3small"), seed=1).eval()
    ids = torch.randint(0, 320, (1, 16 + steps), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)[0]
        cache = model.new_cache(1, ids.shape[1])
        start = time.perf_counter()
        got = [model(ids[:, :16], cache=cache)[0, -1]]
        for t in range(16, ids.shape[1] - 1):
            got.append(model(ids[:, t : t + 1], torch.tensor([t]), cache=cache)[0, -1])
        seconds = time.perf_counter() - start
    err = (torch.stack(got) - full[15:-1]).abs().max().item()
    return {"tiny_decode_steps": steps, "max_abs_diff_vs_recompute": err, "seconds": round(seconds, 3)}


def main() -> None:
    capacities = [int(a) for a in sys.argv[1:]] or [1024, 2048, 4096, 8192]
    print(json.dumps({"kv_cache": cache_bytes("phi-3-small-8k", capacities), "check": decode_check()}, indent=2))


if __name__ == "__main__":
    main()
