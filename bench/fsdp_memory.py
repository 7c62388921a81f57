"""Peak memory per rank of FSDP2 (meta init + ZeRO-3) against one process: a ~350M phi, seq 1024, 2 steps.

    python bench/fsdp_memory.py [--nproc 4] [--steps 2] [--layers 20] [--out DIR]

Runs the real trainer (``Pretrainer``: meta-device build, sharding, seeded init, AdamW, activation
checkpointing) twice on the same global batch of 4 sequences: once in one process (4 micro-batches of
1) and once under ``torchrun --nproc_per_node 4`` on gloo/CPU (1 sequence per rank, distributed.strategy
= fsdp). Each process reports its peak RSS (getrusage, so the init is included: building the whole fp32
model before sharding would show up here) and the global mean loss of each step. Prints JSON with
``ratio`` = largest per-rank peak / single-process peak and ``max_loss_diff`` between the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
# a vocabulary of 8192 (not phi-1.5's 51200) keeps ~350M parameters mostly in blocks, so the 2 steps fit a
# shared 2-core CPU; a large vocabulary adds its head's gathered weight, gradient and logits to each rank
VOCAB = 8192
SEQ = 1024
GLOBAL = 4


def overrides(data: Path, out: Path, steps: int, layers: int) -> list[str]:
    return ["model.preset=phi-1.5", "model.vocab_from_tokenizer=false", f"model.vocab_size={VOCAB}",
            "model.hidden_size=1024", "model.intermediate_size=4096", f"model.num_layers={layers}",
            "model.num_heads=16", "model.num_kv_heads=16", "model.head_dim=64", f"model.max_position_embeddings={SEQ}",
            f"data.sources.text.path={data}", f"data.seq_len={SEQ}", "data.val_fraction=0", "data.tokenizer=",
            f"batch.global_sequences={GLOBAL}", "batch.micro_batch_size=1", f"run.max_steps={steps}",
            f"run.out_dir={out}", "run.activation_checkpointing=true", "run.device=cpu",
            "distributed.strategy=fsdp", "log.progress=false", "log.tensorboard=false", "log.peak_flops=1e12"]


def worker(data: Path, out: Path, steps: int, layers: int) -> None:
    """One process of a run: build, train ``steps`` steps, write peak RSS and per-step global losses."""
    import torch

    from phiforge.train import TrainConfig
    from phiforge.train.distributed import all_reduce_sum, init_distributed, shutdown
    from phiforge.train.pretrain import Pretrainer

    env = init_distributed("cpu")
    trainer = Pretrainer(TrainConfig.from_toml("tiny", overrides(data, out, steps, layers)), env)
    tick = time.perf_counter()
    trainer._build()
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    losses = []
    for _ in range(steps):
        loss, _ = trainer.train_step(trainer.mixture.next_batch(GLOBAL, env.rank, env.world_size))
        losses.append(all_reduce_sum(loss.detach().clone(), env).item() / env.world_size)
    from phiforge.model.transformer import local_rows

    params = sum(local_rows(p)[0].numel() for p in trainer.model.parameters())
    report = {"rank": env.rank, "world_size": env.world_size, "peak_rss_bytes": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_rss_after_init_bytes": built, "losses": losses,
        "seconds": time.perf_counter() - tick, "local_parameters": params, "threads": torch.get_num_threads()}
    (out / f"rank-{env.rank}.json").write_text(json.dumps(report))
    shutdown(env)


def launch(cmd: list[str], out: Path, threads: int, ranks: int, reuse: bool) -> list[dict]:
    found = sorted(out.glob("rank-*.json"))
    if reuse and len(found) == ranks:  # a run that finished before (the other one failed): not rerun
        return [json.loads(p.read_text()) for p in found]
    out.mkdir(parents=True, exist_ok=True)
    for stale in found:
        stale.unlink()
    # both runs: glibc serves every allocation of 64 KiB or more (all tensors that matter) by mmap and
    # returns it on free, so peak RSS tracks the live tensors. With its default (a threshold that climbs to
    # 32 MB), FSDP's gathered 16 MB weights cycle through the brk heap, which then holds GBs of freed slack
    # (measured: 2.7 GB [heap] in a rank whose shards + grads + AdamW state are 1.4 GB)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(threads), "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (out / "stderr.txt").write_text(done.stderr)
    if done.returncode:
        errors = [line for line in done.stderr.splitlines() if "Error" in line or "error" in line]
        sys.exit(f"{' '.join(cmd)} failed ({out / 'stderr.txt'}):\n" + "\n".join(errors[:20]))
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--layers", type=int, default=26, help="26 blocks of d=1024: 345M parameters")
    parser.add_argument("--out", type=Path, default=Path("/tmp/phiforge-fsdp-memory"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank of the FSDP run")
    parser.add_argument("--single-threads", type=int, default=4, help="torch threads of the single process")
    parser.add_argument("--reuse", action="store_true", help="keep a run whose rank files are already in --out")
    parser.add_argument("--worker", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(Path(args.worker[0]), Path(args.worker[1]), args.steps, args.layers)

    from phiforge.data.packing import write_token_folder
    from phiforge.model.transformer import build_model

    sys.path.insert(0, str(HERE))
    from common import machine

    data = args.out / "tokens"
    rng = np.random.default_rng(0)
    write_token_folder(data, {"random": rng.integers(0, VOCAB, size=GLOBAL * args.steps * (SEQ + 1) * 4)},
                       eos_token_id=0, vocab_size=VOCAB)
    me = [sys.executable, str(Path(__file__).resolve()), "--steps", str(args.steps), "--layers", str(args.layers)]
    # one thread per rank (4 ranks on a small CPU would oversubscribe it otherwise); the single process gets
    # --single-threads so that it is not 4x slower in wall time (threads add a few MB of RSS, not GB)
    single = launch([*me, "--worker", str(data), str(args.out / "single")], args.out / "single",
                    args.single_threads, 1, args.reuse)
    # torchrun runs its script with this interpreter itself: the script path, not the interpreter, goes first
    ranks = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(args.nproc), *me[1:], "--worker", str(data), str(args.out / "fsdp")], args.out / "fsdp",
                   args.threads, args.nproc, args.reuse)
    from phiforge.train import TrainConfig
    from phiforge.train.pretrain import resolve_model_config

    config = resolve_model_config(TrainConfig.from_toml("tiny", overrides(data, args.out, args.steps, args.layers)))
    peak = max(r["peak_rss_bytes"] for r in ranks)
    diff = max(abs(a - b) for a, b in zip(single[0]["losses"], ranks[0]["losses"]))
    print(json.dumps({
        "machine": machine(), "parameters": build_model(config, device="meta").num_parameters(),
        "vocab_size": VOCAB, "layers": args.layers, "hidden_size": 1024, "seq_len": SEQ,
        "global_sequences": GLOBAL, "steps": args.steps, "activation_checkpointing": True,
        "threads": {"single": args.single_threads, "per_rank": args.threads},
        "malloc_mmap_threshold": 65536,
        "single": {"peak_rss_gb": single[0]["peak_rss_bytes"] / 1e9,
                   "peak_rss_after_init_gb": single[0]["peak_rss_after_init_bytes"] / 1e9,
                   "losses": single[0]["losses"], "seconds": single[0]["seconds"]},
        "fsdp": {"nproc": args.nproc, "peak_rss_gb_per_rank": [r["peak_rss_bytes"] / 1e9 for r in ranks],
                 "peak_rss_after_init_gb_per_rank": [r["peak_rss_after_init_bytes"] / 1e9 for r in ranks],
                 "losses": ranks[0]["losses"], "seconds": ranks[0]["seconds"]},
        "ratio": peak / single[0]["peak_rss_bytes"], "max_loss_diff": diff}, indent=1))


if __name__ == "__main__":
    main()
