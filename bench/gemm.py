"""bf16 projections of several rows on the CPU: the route the engine installs (PackedLinear) vs PyTorch's bf16
F.linear and fp32 F.linear (MKL/oneDNN sgemm on a float32 copy of the weight), phi-1.5's shapes. JSON.

    python bench/gemm.py [--rows 1,8,32,128,512] [--repeats 3]

On an AVX2-only CPU the installed route is the native GEMV's register tiles over the plain bf16 weight
(kernels.bf16_rows_tiled); with AVX-512 it is oneDNN's packed copy or the native GEMM. Each row count reports
GFLOP/s of all four projections of a phi-1.5 block together, the ratios to both references, and the fraction of
the compute roof: fp32 FMAs at the build's widest vectors on every thread (kernels.fma_peak).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from common import best_seconds_interleaved, machine
from torch import nn

from phiforge import kernels
from phiforge.config.model import preset
from phiforge.inference.fast_paths import PackedLinear, linear_routes


def block_projections() -> list[nn.Linear]:
    """One phi-1.5 block's projections (qkv, proj, fc, proj), bf16, random, installed as the engine installs them."""
    c = preset("phi-1.5")
    shapes = [(c.hidden_size, 3 * c.hidden_size), (c.hidden_size, c.hidden_size), (c.hidden_size, c.intermediate_size),
              (c.intermediate_size, c.hidden_size)]
    torch.manual_seed(0)
    layers = [nn.Linear(k, n).to(torch.bfloat16).eval() for k, n in shapes]
    for m in layers:  # what fast_paths.install does to each Linear of a model it is given
        m.__class__ = PackedLinear
        m.pack()
    return layers


def time_rows(layers: list[nn.Linear], rows: int, repeats: int, peak: float) -> dict:
    xs = [torch.randn(rows, m.in_features, dtype=torch.bfloat16) for m in layers]
    fp32 = [(m.weight.float(), m.bias.float()) for m in layers]
    xs32 = [x.float() for x in xs]
    worst = 0.0
    with torch.inference_mode():
        for m, x in zip(layers, xs, strict=True):  # the installed route gives F.linear's result within bf16 steps
            want = F.linear(x.float(), m.weight.float(), m.bias.float())
            worst = max(worst, ((m(x).float() - want).abs() / (want.abs() + 1)).max().item())
        best = best_seconds_interleaved({
            "installed": lambda: [m(x) for m, x in zip(layers, xs, strict=True)],
            "torch_bf16": lambda: [F.linear(x, m.weight, m.bias) for m, x in zip(layers, xs, strict=True)],
            "torch_fp32": lambda: [F.linear(x, w, b) for (w, b), x in zip(fp32, xs32, strict=True)],
        }, repeats)
    flops = sum(2 * rows * m.in_features * m.out_features for m in layers)
    out = {"rows": rows, **{f"{name}_GFLOPs": round(flops / s / 1e9, 1) for name, s in best.items()},
           "max_relative_error": round(worst, 5)}
    if peak:
        out["installed_fraction_of_fma_peak"] = round(flops / best["installed"] / peak, 3)
    out["vs_torch_bf16"] = round(best["torch_bf16"] / best["installed"], 2)
    out["vs_torch_fp32"] = round(best["torch_fp32"] / best["installed"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="1,8,32,128,512")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    layers = block_projections()
    peak = kernels.fma_peak(torch.get_num_threads()) if kernels.available() else 0.0
    results = [time_rows(layers, int(rows), args.repeats, peak) for rows in args.rows.split(",")]
    print(json.dumps({"benchmark": "bf16 GEMM (phi-1.5 block projections)", **machine(),
                      "kernels": kernels.level(), "route": linear_routes(layers[0], torch.bfloat16),
                      "fma_peak_GFLOPs": round(peak / 1e9, 1), "results": results}, indent=2))
    top = max(results, key=lambda r: r["rows"])
    print(f"{top['rows']} rows: installed {top['installed_GFLOPs']} GFLOP/s, {top['vs_torch_bf16']}x torch bf16, "
          f"{top['vs_torch_fp32']}x torch fp32")


if __name__ == "__main__":
    main()
