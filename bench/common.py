"""Shared by the benchmarks: random-weight models that phiforge and transformers read in common."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import transformers

from phiforge.config.model import ModelConfig
from phiforge.io.checkpoint import hf_state_dict
from phiforge.model.transformer import PhiForgeModel, build_model


def random_phiforge(config: ModelConfig, dtype: torch.dtype, seed: int = 0) -> PhiForgeModel:
    """N(0, 0.02) weights, made without a second float32 copy (a 3.8B model stays near 7.6 GB in bf16)."""
    model = build_model(config, device="meta", dtype=dtype).to_empty(device="cpu")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def transformers_view(model: PhiForgeModel) -> torch.nn.Module:
    """The same weights inside the matching transformers class: its parameters are views of ours."""
    hf = model.config.to_hf_config()
    hf_config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    hf_config._attn_implementation = "sdpa"
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=model.embed.weight.dtype)
    reference.load_state_dict(hf_state_dict(model), strict=False, assign=True)
    reference.tie_weights()
    rotary = reference.model.rotary_emb  # its buffers were made on meta: rebuild them on the CPU
    reference.model.rotary_emb = type(rotary)(config=hf_config)
    return reference.eval()


def best_seconds(fn: Callable[[], object], repeats: int = 2, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def best_seconds_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 3) -> dict[str, float]:
    """Best time of each candidate, runs alternating so a busy neighbour slows them alike."""
    for fn in fns.values():
        fn()  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def read_bandwidth(gigabytes: float = 0.5) -> dict[str, float]:
    """Bytes/s of streaming reads over ``gigabytes``: the decode speed limit's denominator, best of several methods.

    The native probe (kernels.read_bandwidth: the widest loads the build has, plainly, with software prefetch or
    non-temporal, on 4 KB or 2 MB pages, on 1 and on all threads) and, for comparison, PyTorch's float32 and
    bfloat16 sums. Returns each method's rate and ``"best"``. A bench's limit is the larger of this and the
    best rate an engine reached in the same run (``limit``), so no fraction of it exceeds 1."""
    from phiforge import kernels
    from phiforge.kernels.abi import Read

    nbytes, threads = int(gigabytes * 1e9), torch.get_num_threads()
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.ones(nbytes // dtype.itemsize, dtype=dtype)
        rates[f"torch_sum_{dtype}".replace("torch.", "")] = nbytes / best_seconds(x.sum, repeats=3)
        del x
    if kernels.available():
        for method in Read:
            for huge in (False, True):
                for n in sorted({1, threads}):
                    name = f"native_{method.name.lower()}{'_2mb_pages' if huge else ''}_{n}t"
                    rates[name] = kernels.read_bandwidth(nbytes, method, huge, n, repeats=3)
    rates["best"] = max(rates.values())
    return rates


def adjacent_bandwidth(gigabytes: float = 1.0) -> float:
    """One quick streaming read (the native probe's plain method on 2 MB pages, all threads; else a torch sum):
    taken right before and after a measurement, it is that moment's limit on a machine whose neighbours move its
    bandwidth by 2x within minutes."""
    from phiforge import kernels
    from phiforge.kernels.abi import Read

    nbytes = int(gigabytes * 1e9)
    if kernels.available():
        return kernels.read_bandwidth(nbytes, Read.PLAIN, True, torch.get_num_threads(), repeats=2)
    x = torch.ones(nbytes // 4)
    return nbytes / best_seconds(x.sum, repeats=2)


def limit(probe: float, observed_bytes_per_s: list[float]) -> float:
    """The bandwidth a fraction is taken of: the probe's, or what an engine moved if that was more."""
    return max([probe, *observed_bytes_per_s])


def machine() -> dict:
    import platform

    from phiforge import kernels

    return {"processor": platform.processor() or platform.machine(), "cpu": kernels.cpu()[0],
            "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and attention mask of prompts left-padded to one width, as a transformers generate loop feeds them."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask
