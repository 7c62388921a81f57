"""One-GPU check of phiforge's CUDA paths, in under 8 minutes on one H100/H200. Prints JSON (and --out FILE).

    python bench/gpu.py [--device cuda] [--out gpu.json] [--skip train,decode]
    python bench/gpu.py --device cpu --quick          # tiny models: the same code paths, checked on a CPU

1. logits: random phi (phi-1.5 shapes) and phi3 (phi-3-mini shapes, 4 layers each so the fp32 CPU
   reference is quick) in bf16 on the device against fp32 on the CPU: error relative to the logits'
   spread, and how often the top-1 token agrees.
2. quant: int8 and int4 (group 32) layers on the device against the same model with each layer's weight
   replaced by its dequantized float weight: what the quantized kernels add beyond the rounding itself.
3. train: a ~1B phi (phi-1.5 shapes, 16 layers, seq 2048, bf16 autocast, global batch 8 in micro-batches
   of 4) in phiforge's trainer, eager and with run.compile, beside a plain transformers loop on the same
   weights and batches: fastest step's tokens/s and MFU (6N + attention FLOPs per token over the peak
   FLOP/s, measured with a bf16 matmul on this device, and over the datasheet's dense bf16 peak when the
   device is a known one). Target: MFU >= 45% compiled on an H100/H200.
4. decode: the Engine's batched greedy decode (16 prompts, 128 new tokens, bf16) against transformers'
   generate with the same weights: generated tokens/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, random_phiforge, transformers_view  # noqa: E402

from phiforge.config.model import preset  # noqa: E402

# dense bf16 FLOP/s without sparsity, from the vendors' datasheets (SXM parts)
DATASHEET_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def logits_check(device: torch.device, quick: bool) -> dict:
    """bf16 on ``device`` vs fp32 on the CPU, same random weights and tokens."""
    out = {}
    for name in (("tiny-phi", "tiny-phi3") if quick else ("phi-1.5", "phi-3-mini-4k")):
        config = preset(name).replace(num_layers=min(preset(name).num_layers, 4))
        reference = random_phiforge(config, torch.float32, seed=1)
        ids = torch.randint(0, config.vocab_size, (2, 64 if quick else 256), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = reference(ids)
            fast = random_phiforge(config, torch.float32, seed=1).to(device=device, dtype=torch.bfloat16)
            got = fast(ids.to(device)).float().cpu()
        err = (got - want).abs()
        out[name] = {"layers": config.num_layers, "max_abs_err_over_std": (err.max() / want.std()).item(),
                     "mean_abs_err_over_std": (err.mean() / want.std()).item(),
                     "top1_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item()}
        del fast
    return out


def quant_check(device: torch.device, quick: bool) -> dict:
    """Quantized layers on ``device`` vs the dequantized float weights in plain Linear layers (bf16 both)."""
    from phiforge.quant.quantize import QuantizedLinear, quantize_model

    config = preset("tiny-phi3" if quick else "phi-3-mini-4k")
    config = config.replace(num_layers=min(config.num_layers, 4))
    out = {}
    ids = torch.randint(0, config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0)).to(device)
    for bits in (8, 4):
        model = random_phiforge(config, torch.bfloat16, seed=2).to(device)
        quantize_model(model, bits=bits, group_size=32)
        dense = random_phiforge(config, torch.bfloat16, seed=2).to(device)
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, QuantizedLinear):
                    dense.get_submodule(name).weight.copy_(module.dequantized().to(torch.bfloat16))
            if config.tie_word_embeddings:  # the quantized head has its own copy; the dense one shares
                dense.lm_head.weight = torch.nn.Parameter(model.lm_head.dequantized().to(torch.bfloat16))
            got, want = model(ids).float(), dense(ids).float()
            # one token per row (decode's shape, M = batch) goes through other kernels than a prompt's
            step = model(ids[:, :1]).float()
            step_want = dense(ids[:, :1]).float()
        out[f"int{bits}"] = {
            "max_abs_err_over_std": ((got - want).abs().max() / want.std()).item(),
            "top1_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
            "one_token_max_abs_err_over_std": ((step - step_want).abs().max() / step_want.std()).item()}
        del model, dense
    return out


def train_check(device: torch.device, quick: bool) -> dict:
    """Tokens/s and MFU: phiforge eager, phiforge compiled, and a plain transformers loop."""
    from train import PlainLoop, phiforge_trainer, transformers_model

    from phiforge.data.packing import write_token_folder
    from phiforge.io.checkpoint import hf_state_dict
    from phiforge.train.metrics import flops_per_token, measure_peak_flops

    if quick:
        args = argparse.Namespace(preset="tiny-phi", seq_len=64, batch=4, micro_batch=2, precision="bf16")
        config = preset("tiny-phi").replace(name="bench", max_position_embeddings=256)
    else:
        args = argparse.Namespace(preset="phi-1.5", seq_len=2048, batch=8, micro_batch=4, precision="bf16")
        config = preset("phi-1.5").replace(name="bench", num_layers=16)
    rounds = 2 if quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=args.seq_len * args.batch * 16 + 1)
        write_token_folder(folder / "tokens", {"random": tokens}, eos_token_id=0, vocab_size=config.vocab_size)
        results: dict[str, dict] = {}
        batches = None
        parameters = 0
        for name in ("phiforge", "phiforge_compiled", "transformers"):
            trainer = phiforge_trainer(args, config, folder / name, name == "phiforge_compiled", str(device)) \
                if name != "transformers" else None
            if trainer is not None:
                parameters = trainer.model.num_parameters()
                step = lambda b, t=trainer: float(t.train_step(b)[0])  # noqa: E731 (float(): waits for the GPU)
                batches = batches or [trainer.mixture.next_batch(args.batch) for _ in range(4)]
                weights = hf_state_dict(trainer.model) if name == "phiforge" else None
                if weights is not None:
                    weights = {k: v.detach().cpu().clone() for k, v in weights.items()}
            else:
                loop = PlainLoop(transformers_model(config, weights), args.micro_batch, torch.bfloat16, str(device))
                step = loop.step
            first = step(batches[0])
            step(batches[1])  # the compiled one compiles in these two warm-up steps
            times = []
            for r in range(rounds):
                sync(device)
                tick = time.perf_counter()
                step(batches[r % len(batches)])
                times.append(time.perf_counter() - tick)
            results[name] = {"first_step_loss": first, "step_s": min(times)}
            del trainer, step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    flops = flops_per_token(config, args.seq_len)
    peak = measure_peak_flops(device, torch.bfloat16)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    sheet = next((v for k, v in DATASHEET_BF16.items() if k in name), None)
    for r in results.values():
        r["tokens_per_s"] = args.batch * args.seq_len / r["step_s"]
        r["mfu_measured_peak"] = flops * r["tokens_per_s"] / peak
        r["mfu_datasheet_peak"] = flops * r["tokens_per_s"] / sheet if sheet else None
    return {"parameters": parameters, "seq_len": args.seq_len, "global_batch": args.batch,
            "micro_batch": args.micro_batch, "flops_per_token": flops, "measured_peak_flops": peak,
            "datasheet_peak_flops": sheet, **results}


def decode_check(device: torch.device, quick: bool) -> dict:
    """Generated tokens/s of 16 greedy prompts: the Engine against transformers' generate, same weights."""
    from common import left_padded

    from phiforge.inference.engine import Engine, SamplingParams

    config = preset("tiny-phi3" if quick else "phi-1.5")
    new = 16 if quick else 128
    model = random_phiforge(config, torch.bfloat16, seed=3).to(device)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, config.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(16, 64, (16,), generator=g)]
    engine = Engine(model, max_batch_size=len(prompts))
    params = SamplingParams(max_new_tokens=new)  # no stop ids: every prompt generates ``new`` tokens
    engine.generate(prompts[:2], SamplingParams(max_new_tokens=4))  # warm-up
    sync(device)
    tick = time.perf_counter()
    done = engine.generate(prompts, params)
    sync(device)
    ours = time.perf_counter() - tick
    generated = sum(len(c.token_ids) for c in done)
    hf = transformers_view(model).to(device)
    ids, mask = left_padded(prompts)
    ids, mask = ids.to(device), mask.to(device)
    kwargs = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}
    hf.generate(input_ids=ids[:2], attention_mask=mask[:2], max_new_tokens=4, do_sample=False, pad_token_id=0)
    sync(device)
    tick = time.perf_counter()
    hf.generate(input_ids=ids, attention_mask=mask, **kwargs)
    sync(device)
    theirs = time.perf_counter() - tick
    return {"model": config.name, "prompts": len(prompts), "new_tokens": new,
            "engine_tokens_per_s": generated / ours, "transformers_tokens_per_s": len(prompts) * new / theirs,
            "speedup": (generated / ours) / (len(prompts) * new / theirs)}


CHECKS = {"logits": logits_check, "quant": quant_check, "train": train_check, "decode": decode_check}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny models (with --device cpu: a smoke test)")
    parser.add_argument("--skip", default="", help="comma-separated checks to leave out: " + ",".join(CHECKS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --device cpu --quick for the CPU smoke test")
    report: dict = {"bench": "gpu", "machine": machine(), "device": str(device), "quick": args.quick,
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    skip = set(filter(None, args.skip.split(",")))
    for name, check in CHECKS.items():
        if name in skip:
            continue
        tick = time.perf_counter()
        report[name] = check(device, args.quick)
        report[name]["seconds"] = time.perf_counter() - tick
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return report


if __name__ == "__main__":
    main()
