"""bench/gpu.py on the CPU (--device cpu --quick, tiny models): every check runs and its numbers are sane.

On a CUDA machine the same script is the GPU check; here it proves the code paths (device moves, quantized
layers against dequantized weights, the three training loops, Engine vs generate) before anyone has a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # compiles the tiny trainer's blocks (~1 min on 2 busy cores)
def test_gpu_check_runs_on_the_cpu_with_tiny_models(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    for name, check in r["logits"].items():  # bf16 against fp32: rounding, not a different model
        assert check["mean_abs_err_over_std"] < 0.05, name
    for bits in ("int8", "int4"):  # the quantized layers compute what their dequantized weights say
        assert r["quant"][bits]["max_abs_err_over_std"] < 0.05, bits
        assert r["quant"][bits]["one_token_max_abs_err_over_std"] < 0.05, bits
    train = r["train"]
    losses = [train[k]["first_step_loss"] for k in ("phiforge", "phiforge_compiled", "transformers")]
    assert max(losses) - min(losses) < 2e-2  # same weights, same batch, bf16 autocast in all three
    assert all(train[k]["tokens_per_s"] > 0 and 0 < train[k]["mfu_measured_peak"] < 1.5 for k in
               ("phiforge", "phiforge_compiled", "transformers"))
    assert r["decode"]["engine_tokens_per_s"] > 0 and r["decode"]["transformers_tokens_per_s"] > 0
