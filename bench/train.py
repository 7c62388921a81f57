"""Training throughput: phiforge's loop vs a plain transformers loop, in one run. Prints JSON.

    python bench/train.py [--hidden-size 512 --layers 8 --heads 8 --vocab 8192] [--seq-len 512]
                          [--batch 8 --micro-batch 4] [--precision bf16] [--rounds 8] [--no-compile] [--threads N]

Both start from the same weights and read the same batches (phiforge's mixture sampler over one random
token shard), with AdamW, grad clipping 1.0, the same precision and the same global batch. transformers
runs the loop people write by hand: ``model(input_ids)``, cross-entropy, backward, clip, ``AdamW.step``.
phiforge runs ``Pretrainer.train_step``, eager and with ``run.compile = true`` (each block and the loss
through torch.compile; compilation happens in the warm-up steps, which are not timed). Timed steps
alternate between the contenders, one step each in turn, and each reports its fastest step (and the
median), so load from other processes on a shared machine hurts none of them more than the others.
"speedup" is transformers' fastest step time over phiforge's fastest (eager or compiled).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from phiforge.config.model import ModelConfig, preset
from phiforge.data.packing import write_token_folder
from phiforge.io.checkpoint import hf_state_dict
from phiforge.train.config import TrainConfig
from phiforge.train.distributed import init_distributed
from phiforge.train.metrics import flops_per_token, measure_peak_flops
from phiforge.train.pretrain import AUTOCAST, Pretrainer


def bench_model_config(args: argparse.Namespace) -> ModelConfig:
    return preset(args.preset).replace(
        name="bench", hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size, num_layers=args.layers,
        num_heads=args.heads, num_kv_heads=args.heads, head_dim=args.hidden_size // args.heads,
        vocab_size=args.vocab, max_position_embeddings=max(2048, args.seq_len))


def phiforge_trainer(args: argparse.Namespace, model_config: ModelConfig, folder: Path,
                     use_compile: bool, device: str = "cpu") -> Pretrainer:
    overrides = {k: v for k, v in vars(model_config).items() if k in (
        "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size",
        "max_position_embeddings")}
    raw = {
        "model": {"preset": args.preset, "vocab_from_tokenizer": False, **overrides},
        "data": {"seq_len": args.seq_len, "sources": [{"name": "random", "path": str(folder / "tokens")}]},
        "batch": {"global_sequences": args.batch, "micro_batch_size": args.micro_batch},
        "optim": {"lr": 2e-4, "grad_clip": 1.0},
        "run": {"out_dir": str(folder / "run"), "max_steps": 10**6, "precision": args.precision,
                "compile": use_compile, "device": device},
        "log": {"progress": False, "tensorboard": False},
    }
    trainer = Pretrainer(TrainConfig.from_dict(raw), init_distributed(device))
    trainer._build()
    return trainer


def transformers_model(model_config: ModelConfig, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    hf_config = model_config.to_hf_config()
    hf_config = transformers.AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    hf_config._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict({k: v.clone() for k, v in weights.items()}, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model.train()


class PlainLoop:
    """What a hand-written transformers training loop does per optimizer step."""

    def __init__(self, model: torch.nn.Module, micro: int, dtype: torch.dtype | None, device: str = "cpu") -> None:
        self.model, self.micro, self.dtype, self.device = model.to(device), micro, dtype, torch.device(device)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.98), eps=1e-7,
                                           weight_decay=0.1)

    def step(self, batch: np.ndarray) -> float:
        ids = torch.from_numpy(batch).to(self.device)
        accum = len(ids) // self.micro
        total = 0.0
        for m in range(accum):
            chunk = ids[m * self.micro : (m + 1) * self.micro]
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                logits = self.model(input_ids=chunk[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten())
            (loss / accum).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(total) / accum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-phi", help="layout to scale up (tiny-phi, tiny-phi3, tiny-llama)")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="global batch in sequences")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--precision", choices=list(AUTOCAST), default="bf16")
    parser.add_argument("--steps", type=int, default=4, help="distinct batches to cycle through")
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per contender (the fastest counts)")
    parser.add_argument("--no-compile", action="store_true", help="skip the run.compile=true contender")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default); one "
                        "thread is steadier on a machine shared with other jobs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_config = bench_model_config(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokens = np.random.default_rng(0).integers(0, args.vocab, size=args.seq_len * args.batch * 64 + 1)
        write_token_folder(folder / "tokens", {"random": tokens}, eos_token_id=0, vocab_size=args.vocab)
        eager = phiforge_trainer(args, model_config, folder, use_compile=False)
        model = eager.model
        contenders = {"phiforge": lambda b: eager.train_step(b)[0]}
        if not args.no_compile:
            compiled = phiforge_trainer(args, model_config, folder, use_compile=True)
            contenders["phiforge_compiled"] = lambda b: compiled.train_step(b)[0]
        reference = PlainLoop(transformers_model(model_config, hf_state_dict(model)), args.micro_batch,
                              AUTOCAST[args.precision])
        contenders["transformers"] = reference.step
        batches = [eager.mixture.next_batch(args.batch) for _ in range(args.steps + 2)]
        # two warm-up steps each (the compiled one compiles here); the first is also a correctness check
        first = {name: float(step(batches[0])) for name, step in contenders.items()}
        for step in contenders.values():
            step(batches[1])
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for round_ in range(args.rounds):  # one step per contender in turn: contention hits all alike
            batch = batches[2 + round_ % args.steps]
            for name, step in contenders.items():
                start = time.perf_counter()
                step(batch)
                times[name].append(time.perf_counter() - start)
        best = {name: min(t) for name, t in times.items()}

    tokens_per_step = args.batch * args.seq_len
    flops = flops_per_token(model_config, args.seq_len)
    peak = measure_peak_flops(torch.device("cpu"), AUTOCAST[args.precision] or torch.float32)
    result = {name: {"step_s": round(t, 4), "median_step_s": round(statistics.median(times[name]), 4),
                     "tokens_per_s": round(tokens_per_step / t, 1),
                     "mfu": round(flops * tokens_per_step / t / peak, 4), "first_step_loss": round(first[name], 5)}
              for name, t in best.items()}
    print(json.dumps({
        "bench": "train", "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "model": {"layout": args.preset, "hidden_size": args.hidden_size, "layers": args.layers,
                  "heads": args.heads, "vocab": args.vocab, "parameters": model.num_parameters()},
        "seq_len": args.seq_len, "global_batch": args.batch, "micro_batch": args.micro_batch,
        "precision": args.precision, "peak_flops": round(peak),
        "flops_per_token": flops, **result,
        "speedup": round(best["transformers"] / min(t for n, t in best.items() if n != "transformers"), 3),
        "speedup_eager": round(best["transformers"] / best["phiforge"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
