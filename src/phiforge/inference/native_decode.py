"""One decode step of one sequence through every layer in a single native call (kernels' pf_decode_step).

A small or quantized model on the CPU spends more time dispatching ~40 tensor ops per layer from Python
than reading its weights: SmolLM2-135M in int4 reads ~70 MB per token, ~3 ms, but its Python path takes
~20 ms. So for the common single-stream case (one row, one new token, CPU, bf16 or fp32 activations) the
model hands its layers to C, described once per (model, cache) as ctypes structs that point at the live
tensors. Anything unusual (block-sparse or qk-normed layers, GeGELU, training) keeps the model's own path.
The engine's model calls it (fast_paths.FastModel); the model (model/transformer.py) knows nothing of it.
"""

from __future__ import annotations

import contextlib
import ctypes
import weakref
from typing import TYPE_CHECKING

import torch

from phiforge import kernels
from phiforge.errors import PhiforgeError
from phiforge.kernels import STEP_MAX_ROWS
from phiforge.kernels.abi import Act, Kind, Layer, Linear, Model

if TYPE_CHECKING:
    from phiforge.model.transformer import KVCache, PhiForgeModel

# pf_decode_step's activation codes
ACTIVATIONS = {"gelu_new": Act.GELU_TANH, "gelu_pytorch_tanh": Act.GELU_TANH, "silu": Act.SILU, "gelu": Act.GELU_ERF}


def supported(model: PhiForgeModel) -> bool:
    """Whether the model's blocks are ones pf_decode_step implements (checked once per plan)."""
    c = model.config
    return (c.hidden_act in ACTIVATIONS and not c.qkv_grouped and not c.qk_layernorm
            and c.blocksparse_block_size is None and (c.gated_mlp == (c.hidden_act == "silu")))


class DecodePlan:
    """The C description of a model's layers over one KVCache.

    It holds every tensor it points at (no pointer can dangle) and is rebuilt for each new cache: an
    Engine makes one cache per generate call, so weights replaced between calls are picked up.
    A model id check guards a cache passed to another model.
    """

    def __init__(self, model: PhiForgeModel, cache: KVCache, dtype: torch.dtype) -> None:
        c = model.config
        self.model_id, self.dtype = id(model), dtype  # no reference to the cache: it keys the plan weakly
        self._keep: list[torch.Tensor] = []
        self.model = Model(c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.rotary_dim,
                            c.intermediate_size, int(c.norm != "layernorm"), ACTIVATIONS[c.hidden_act],
                            int(c.parallel_residual), int(c.gated_mlp), int(dtype == torch.bfloat16), c.norm_eps,
                            c.attn_scale or c.head_dim**-0.5, *cache.k[0].stride()[:3])
        self.max_rows = STEP_MAX_ROWS  # lowered by _linear to what every projection serves well
        self.layers = (Layer * c.num_layers)()
        for layer, block, k, v in zip(self.layers, model.blocks, cache.k, cache.v, strict=True):
            layer.norm1_w, layer.norm1_b = self._norm(block.norm_1)
            if block.norm_2 is not None:
                layer.norm2_w, layer.norm2_b = self._norm(block.norm_2)
            layer.qkv, layer.proj = self._linear(block.attn.qkv), self._linear(block.attn.proj)
            layer.fc, layer.down = self._linear(block.mlp.fc), self._linear(block.mlp.proj)
            layer.k_cache, layer.v_cache = self._ptr(k, dtype), self._ptr(v, dtype)

    def _ptr(self, t: torch.Tensor | None, dtype: torch.dtype, convert: bool = False) -> int | None:
        """Address of t's data, which must be contiguous in ``dtype`` (or is converted, a private copy)."""
        if t is None:
            return None
        t = t.detach()
        if convert:
            t = t.to(dtype).contiguous()
        if t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
            raise UnsupportedError(f"a {t.dtype} tensor on {t.device} where contiguous {dtype} on the CPU is needed")
        self._keep.append(t)
        return t.data_ptr()

    def _norm(self, norm: torch.nn.Module) -> tuple[int | None, int | None]:
        bias = getattr(norm, "bias", None)
        if isinstance(norm, torch.nn.LayerNorm) and (bias is None or norm.weight is None):
            raise UnsupportedError("a LayerNorm without weight and bias")
        return self._ptr(norm.weight, self.dtype), self._ptr(bias, self.dtype)

    def _linear(self, m: torch.nn.Module) -> Linear:
        bias = self._ptr(m.bias, self.dtype, convert=True)
        if getattr(m, "kernel", None) == "native":  # a QuantizedLinear on its portable layout, bf16 scales/zeros
            self.max_rows = min(self.max_rows, kernels.NATIVE_GEMV_ROWS)
            codes = self._ptr(m._qweight, torch.int8 if m.bits == 8 else torch.uint8)
            zeros = self._ptr(m._zeros, torch.bfloat16) if m.bits == 4 else None
            return Linear(Kind.INT8 if m.bits == 8 else Kind.INT4, m.out_features, m.in_features, m.group_size,
                          m.tile, codes, self._ptr(m._scales, torch.bfloat16), zeros, bias, None)
        if isinstance(m, torch.nn.Linear):
            packed = getattr(m, "gemm_packed", None)
            if packed is not None and m.packed_version == m.weight._version:  # batches on the native GEMM
                packed = self._ptr(packed, torch.int16)
            else:  # fp32, or a bf16 weight without its packed copy: the GEMV, fast for one row only unless it tiles
                packed = None
                if not (self.dtype == torch.bfloat16 and kernels.bf16_rows_tiled(m.in_features)):
                    self.max_rows = 1
            kind = Kind.BF16 if self.dtype == torch.bfloat16 else Kind.F32
            return Linear(kind, m.out_features, m.in_features, 0, 0, self._ptr(m.weight, self.dtype), None, None,
                          bias, packed)
        raise UnsupportedError(f"no native path for {type(m).__name__}")

    def step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, first_row: int, lo: torch.Tensor,
             hi: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, hidden] of one new token per row after every layer (B <= max_rows); row b's keys
        and values go to position hi[b] - 1 of cache row first_row + b; it attends keys lo[b] <= t < hi[b]."""
        x = x.to(self.dtype, memory_format=torch.contiguous_format, copy=True)  # the kernel writes in place
        kernels.decode_step(ctypes.byref(self.model), self.layers, x, cos.to(self.dtype), sin.to(self.dtype),
                            first_row, lo, hi)
        return x


class UnsupportedError(PhiforgeError):
    """The model or cache has something pf_decode_step does not implement."""


# per live cache: (model id, dtype, plan or None); a "no" is remembered too, or every step would rebuild it
_PLANS: weakref.WeakKeyDictionary[KVCache, tuple[int, torch.dtype, DecodePlan | None]] = weakref.WeakKeyDictionary()


def plan_for(model: PhiForgeModel, cache: KVCache, dtype: torch.dtype) -> DecodePlan | None:
    """The model's plan for this cache (built on first use), or None where the native step does not apply.

    Plans live beside their cache, not on the model: a model stays deep-copyable and picklable, and a plan
    (with the cache tensors it holds) goes when its cache goes."""
    known = _PLANS.get(cache)
    if known is not None and known[:2] == (id(model), dtype):
        return known[2]
    plan = None
    if (kernels.available() and supported(model) and dtype in (torch.bfloat16, torch.float32)
            and all(k is not None and k.dtype == dtype for k in cache.k)):
        with contextlib.suppress(UnsupportedError):
            plan = DecodePlan(model, cache, dtype)
    _PLANS[cache] = (id(model), dtype, plan)
    return plan
