"""Run by torchrun from test_distributed.py: FSDP2 properties checked inside real ranks (CPU, gloo).

    torchrun --nproc_per_node 2 tests/train/dist_checks.py OUT_DIR HF_FOLDER TOKENIZER TOKENS

Each rank writes OUT_DIR/rank-<r>.json with what it measured; the test asserts on those numbers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from phiforge.config.model import preset
from phiforge.io.checkpoint import load_hf_folder
from phiforge.model.transformer import build_model, local_rows
from phiforge.train import TrainConfig
from phiforge.train.distributed import ShardPlan, init_distributed, materialise, shard_model, unwrap
from phiforge.train.pretrain import Pretrainer


def meta_init_matches_one_process(env, name: str, plan: ShardPlan) -> dict:
    """Built on meta, sharded, materialised: the gathered weights equal build_model's, bit for bit."""
    config = preset(name)
    model = materialise(shard_model(build_model(config, device="meta"), env, plan), env.device, seed=7)
    want = build_model(config, seed=7).state_dict()
    local = sum(local_rows(p)[0].numel() for p in model.parameters())
    exact = all(torch.equal(p.full_tensor(), want[n]) for n, p in model.named_parameters())
    return {"exact": exact, "local_fraction": local / sum(p.numel() for p in model.parameters()),
            "tied": bool(config.tie_word_embeddings and model.lm_head.weight is model.embed.weight)}


def train_config(out: Path, tokenizer: str, tokens: str, *extra: str) -> TrainConfig:
    return TrainConfig.from_toml("tiny", [
        f"data.tokenizer={tokenizer}", f"data.sources.text.path={tokens}", f"run.out_dir={out}",
        "run.max_steps=1", "batch.global_sequences=12", "log.progress=false", "log.tensorboard=false",
        "data.val_fraction=0", *extra])


def sharded_init_from(env, out: Path, hf: str, tokenizer: str, tokens: str) -> dict:
    """model.init_from an HF folder under fsdp: each rank reads its rows; logits equal a 1-process load."""
    config = train_config(out / "init-from", tokenizer, tokens, "distributed.strategy=fsdp",
                          f"model.init_from={hf}")
    trainer = Pretrainer(config, env)
    model = trainer.new_model(hf, trainable=False)
    local = sum(local_rows(p)[0].numel() for p in model.parameters())
    ids = torch.arange(40).remainder(model.config.vocab_size)[None].repeat(2, 1)
    with torch.no_grad():
        got = model(ids)
        want = load_hf_folder(hf, dtype=torch.float32)(ids)
    return {"max_logit_diff": (got - want).abs().max().item(),
            "local_numel": local,
            "total_numel": sum(p.numel() for p in model.parameters())}


def collectives_per_step(env, out: Path, tokenizer: str, tokens: str, strategy: str, micro: int,
                         precision: str) -> dict:
    """Count gradient reductions (FSDP reduce-scatters, DDP bucket all-reduces) over one optimizer step of
    12 sequences (6 per rank) cut into micro-batches of ``micro``, and the dtypes they ran in."""
    config = train_config(out / f"{strategy}-{micro}-{precision}", tokenizer, tokens,
                          f"distributed.strategy={strategy}", f"batch.micro_batch_size={micro}",
                          f"run.precision={precision}")
    trainer = Pretrainer(config, env)
    trainer._build()
    calls: list[str] = []
    if strategy == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):  # noqa: ANN001, ANN202 (DDP checks the real annotation, not a string)
            calls.append(str(bucket.buffer().dtype))
            return allreduce_hook(state, bucket)

        trainer.model.register_comm_hook(None, hook)
    else:
        real = dist.reduce_scatter_single

        def counted(*args: object, **kwargs: object) -> object:
            calls.append(str(kwargs["input"].dtype))
            return real(*args, **kwargs)

        dist.reduce_scatter_single = counted
    gathered: list[str] = []
    linear = unwrap(trainer.model).blocks[0].mlp.fc
    handle = linear.register_forward_pre_hook(lambda m, a: gathered.append(str(m.weight.dtype)))
    batch = trainer.mixture.next_batch(12, env.rank, env.world_size)
    try:
        trainer.train_step(batch)
    finally:
        if strategy != "ddp":
            dist.reduce_scatter_single = real
        handle.remove()
    master = {str(p.dtype) for p in trainer.optimizer.param_groups[0]["params"]}
    moments = {str(v.dtype) for s in trainer.optimizer.state.values() for k, v in s.items() if k != "step"}
    return {"reductions": len(calls), "reduce_dtypes": sorted(set(calls)), "compute_dtypes": sorted(set(gathered)),
            "master_dtypes": sorted(master), "moment_dtypes": sorted(moments)}


def main() -> None:
    out, hf, tokenizer, tokens = (Path(sys.argv[1]), *sys.argv[2:5])
    env = init_distributed("cpu")
    fsdp = ShardPlan("fsdp")
    report = {
        "meta_init": {name: meta_init_matches_one_process(env, name, fsdp) for name in ("tiny-phi", "tiny-phi4-mini")},
        "meta_init_hsdp": meta_init_matches_one_process(env, "tiny-phi3", ShardPlan("hsdp", shard_size=1)),
        "init_from": sharded_init_from(env, out, hf, tokenizer, tokens),
    }
    for strategy, precision in (("fsdp", "bf16"), ("ddp", "fp32")):
        for micro in (6, 2):
            report[f"{strategy}-micro{micro}"] = collectives_per_step(env, out, tokenizer, tokens, strategy,
                                                                      micro, precision)
    (out / f"rank-{env.rank}.json").write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
