"""CPU inference fast paths, installed by the inference engine onto a model it owns; the model stays plain PyTorch.

``install(model)`` turns modules into subclasses that add a faster route for inference on the CPU and keep the
plain one for everything else (training, gradients, CUDA, other dtypes), by swapping their class in place, as
FSDP2's fully_shard does and as quantize_model swaps whole modules. Parameters, buffers and the state dict are
untouched, so an installed model still saves and exports as before; ``remove`` restores the plain classes.

  PackedLinear     one row: the native GEMV (torch.mv where nothing is built); after pack(): oneDNN's pre-blocked
                   copy, and for 2-32 rows on AMX / AVX512-BF16 the native GEMM over its own copy; on AVX2 only,
                   any number of rows in the native GEMV's register tiles
  NativeRMSNorm    bf16 rows in one native call instead of eight ops
  NativeAttention  one query per row over a dense cache: RoPE, cache store and attention in one native call
  FastModel        one new token per row: every layer in one native call (native_decode's plan)
  QuantizedLinear  (quantize.py) picks its kernel when its codes are loaded

``paths(model)`` says which route each layer takes; the Engine logs its summary at DEBUG (logger
"phiforge.inference.fast_paths") and ``phiforge info --paths MODEL`` prints it.
"""

from __future__ import annotations

import logging
import mmap
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from phiforge import kernels
from phiforge.inference import native_decode
from phiforge.kernels import GEMM_MAX_ROWS, NATIVE_GEMV_ROWS
from phiforge.kernels.abi import Kind
from phiforge.model.transformer import Attention, CacheView, KVCache, PhiForgeModel, RMSNorm
from phiforge.quant.quantize import QuantizedLinear

log = logging.getLogger("phiforge.inference.fast_paths")
PACK_LIMIT_BYTES = 1 << 30  # models up to this many weight bytes get pre-blocked copies by default (pack)
HUGE_PAGE = 2 << 20


def _cpu_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu" \
        and not torch.is_grad_enabled()


class PackedLinear(nn.Linear):
    """nn.Linear with faster CPU inference paths for bf16, each giving F.linear's result:

    - one row (a decode step of one sequence), bound by reading the weight: the native GEMV (bias fused)
      where built, else torch.mv, which streams the weight ~1.4x faster than F.linear's GEMM here;
    - several rows, after ``pack()``: oneDNN's pre-blocked copy of the weight, ~1.4x faster than F.linear,
      which re-blocks the weight on every call (bitwise the same result);
    - 2 to 32 rows (a decode batch) on a CPU with AMX or AVX512-BF16, after ``pack()``: the native GEMM (AMX
      tiles, else vdpbf16ps register tiles) over a copy laid out as it streams it, ~1.3x faster than oneDNN's
      when the weights come from DRAM (AMX, measured; fp32 sums in another order: not bitwise F.linear's);
    - several rows on an AVX2-only CPU (no oneDNN bf16 there, and PyTorch's bf16 GEMM is slow): the native GEMV's
      register tiles over the plain weight, no copy (fp32 sums in another order).
    Packing costs copies of the weight, so the Engine packs only models that are small for the machine.
    """

    packed: torch.Tensor | None = None
    gemm_packed: torch.Tensor | None = None
    packed_version: int = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _cpu_inference(x, self.weight):
            if x.numel() == self.in_features:
                if kernels.available():
                    return kernels.bf16_gemv(x, self.weight, self.bias).view(*x.shape[:-1], self.out_features)
                y = torch.mv(self.weight, x.reshape(-1))
                return (y + self.bias if self.bias is not None else y).view(*x.shape[:-1], self.out_features)
            if self.fresh():
                if self.gemm_packed is not None and x.numel() <= GEMM_MAX_ROWS * self.in_features:
                    y = kernels.bf16_gemm(x, self.gemm_packed, self.out_features, self.bias)
                    return y.view(*x.shape[:-1], self.out_features)
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
            if kernels.bf16_rows_tiled(self.in_features):
                return kernels.bf16_gemv(x, self.weight, self.bias).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def fresh(self) -> bool:
        """Whether the packed copies are of the current weight (an update after packing makes them stale)."""
        return self.packed is not None and self.packed_version == self.weight._version

    def pack(self) -> bool:
        """Keep oneDNN's blocked copy of a bf16 CPU weight for inference; False where that is not possible."""
        if self.weight.dtype != torch.bfloat16 or self.weight.device.type != "cpu" \
                or not torch.backends.mkldnn.is_available() or not kernels.onednn_bf16():
            return False
        if self.fresh():
            return True  # every Engine and scorer asks; the copy is made once per weight version
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 128)
        if kernels.gemm_available() and kernels.gemm_fits(self.out_features, self.in_features):
            self.gemm_packed = kernels.bf16_pack(self.weight.detach())
        self.packed_version = self.weight._version
        return True


class NativeRMSNorm(RMSNorm):
    """RMSNorm of bf16 rows in one native call (transformers' op order, as RMSNorm.forward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _cpu_inference(x, self.weight) and kernels.available():
            return kernels.rms_norm_bf16(x, self.weight, self.eps)
        return super().forward(x)


class NativeAttention(Attention):
    """Attention whose decode steps (one query per row, CPU, dense cache of q's dtype) run natively: the kernel
    reads each key once for all query heads of its group (SDPA's CPU kernel re-reads it per head)."""

    def attend(self, qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mask: torch.Tensor | None, cache: CacheView | None) -> torch.Tensor:
        if cache is None or qk.shape[2] != 1 or not self.native_decode(qk.device, qk.dtype, cache.cache, cache.layer):
            return super().attend(qk, v, cos, sin, mask, cache)
        c = self.config
        q, k = qk.split((c.num_heads, c.num_kv_heads), dim=1)
        k_cache, v_cache = cache.cache.layer(cache.layer, cache.rows)
        lo, hi = cache.cache.key_bounds(cache.positions, c.sliding_window)
        scale = c.attn_scale or c.head_dim**-0.5
        return kernels.decode_attention(q, k, v, k_cache, v_cache, lo, hi, scale, cos, sin)

    def native_decode(self, device: torch.device, dtype: torch.dtype, cache: KVCache, layer: int) -> bool:
        dense = cache.k[layer]
        return (device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and not self.training
                and not self.config.is_sparse_layer(layer) and dense is not None and dense.dtype == dtype
                and kernels.available())


class FastModel(PhiForgeModel):
    """A model whose one-token-per-row steps on the CPU run every layer in one native call where it can."""

    def run_blocks(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                   attn_mask: torch.Tensor | None, cache: KVCache | None, cache_rows: slice) -> torch.Tensor:
        B, T, _ = x.shape
        plan = self.decode_plan(x.device, x.dtype, cache) if cache is not None and T == 1 else None
        if plan is None or B > plan.max_rows:
            return super().run_blocks(x, cos, sin, positions, attn_mask, cache, cache_rows)
        lo, hi = cache.key_bounds(positions, self.config.sliding_window)
        first_row = range(cache.batch_size)[cache_rows][0]
        return plan.step(x.view(B, -1), cos, sin, first_row, lo, hi).view(B, 1, -1)

    def decode_plan(self, device: torch.device, dtype: torch.dtype, cache: KVCache) -> native_decode.DecodePlan | None:
        """The native whole-step plan for inference on the CPU (PHIFORGE_NATIVE=0 or anything unusual: None)."""
        if self.training or torch.is_grad_enabled() or device.type != "cpu":
            return None
        return native_decode.plan_for(self, cache, dtype)


SWAPS: dict[type, type] = {nn.Linear: PackedLinear, RMSNorm: NativeRMSNorm, Attention: NativeAttention,
                           PhiForgeModel: FastModel}
PLAIN = {fast: plain for plain, fast in SWAPS.items()}


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _huge_page_copy(t: torch.Tensor) -> torch.Tensor:
    """t's values in private anonymous memory advised for 2 MB pages, 2 MB aligned (the mapping lives as long as
    the tensor: torch.frombuffer keeps it)."""
    nbytes = t.numel() * t.element_size()
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(region, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    out = raw[start : start + nbytes].view(t.dtype).view(t.shape)
    out.copy_(t.detach())
    return out


def huge_page_weights(model: nn.Module) -> int:
    """Move a CPU model's large parameters and buffers into memory advised for transparent 2 MB pages, in place
    (values, names and Parameter objects unchanged); the bytes moved. A decode step streams every weight, and
    PyTorch's allocations get 4 KB pages where THP is in "madvise" mode (the default of many distributions): a
    TLB miss every 4 KB. bf16 GEMV over phi-1.5 shapes on the AVX2 EPYC: 30.4 -> 33.0 GB/s. Off Linux, or with
    PHIFORGE_HUGE_PAGES=0, nothing moves."""
    if not hasattr(mmap, "MADV_HUGEPAGE") or os.environ.get("PHIFORGE_HUGE_PAGES", "1") == "0":
        return 0
    moved = 0
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                # moved before: its memory is still the copy made then (a later .data = ... moves it again)
                if t is None or t.device.type != "cpu" or getattr(t, "_pf_huge_pages", None) == t.data_ptr() \
                        or t.numel() * t.element_size() < HUGE_PAGE or not t.is_contiguous():
                    continue
                copy = _huge_page_copy(t)
                if isinstance(t, nn.Parameter):  # the same object (tied weights, optimizers) on the new memory
                    t.data = copy
                else:
                    table[name] = t = copy
                t._pf_huge_pages = t.data_ptr()
                moved += copy.numel() * copy.element_size()
    return moved


def install(model: PhiForgeModel, pack: bool | None = None) -> int:
    """Install the CPU fast paths on a model's modules (in place; idempotent); bytes of packed copies added.
    Large weights move to memory advised for 2 MB pages first (huge_page_weights).

    ``pack=None`` packs bf16 weights only for a model of at most PACK_LIMIT_BYTES: the copies double or
    triple them. A model off the CPU is left as it is (every fast path is a CPU one)."""
    if model.embed.weight.device.type != "cpu":
        return 0
    huge_page_weights(model)
    for module in model.modules():
        fast = SWAPS.get(type(module))
        if fast is not None:
            module.__class__ = fast
    if pack is None:
        pack = weight_bytes(model) <= PACK_LIMIT_BYTES
    if not pack:
        return 0
    return sum(m.weight.numel() * m.weight.element_size() * (1 + (m.gemm_packed is not None))
               for m in model.modules() if isinstance(m, PackedLinear) and m.pack())


def remove(model: nn.Module) -> None:
    """The plain modules back (packed copies dropped): what training and export expect."""
    for module in model.modules():
        plain = PLAIN.get(type(module))
        if plain is not None:
            for name in ("packed", "gemm_packed", "packed_version"):
                module.__dict__.pop(name, None)
            module.__class__ = plain


# ---- which route each layer takes ---------------------------------------------------------------------------
COLUMNS = ("one_row", "batch", "prefill")  # a single-stream decode step, a decode batch (2-32 rows), a prompt


def linear_routes(m: nn.Module, dtype: torch.dtype) -> dict[str, str]:
    """The route a linear layer's forward takes for one row, a decode batch and a prefill (COLUMNS)."""
    if isinstance(m, QuantizedLinear):
        kind = Kind.INT8 if m.bits == 8 else Kind.INT4
        arithmetic = kernels.gemv_path(kind, m.in_features, m.group_size) if m.kernel == "native" else ""
        arithmetic += f", tiles of {m.tile} rows" if m.tile else ""
        name = {"native": f"native int{m.bits} GEMV ({arithmetic})", "int8pack": "aten int8pack_mm",
                "int4pack": "aten int4pack_mm", "dequant": "dequantized F.linear"}[m.kernel]
        more = "dequantize + F.linear" if m.kernel == "native" else name
        return {"one_row": name, "batch": f"{name} (<= {NATIVE_GEMV_ROWS} rows), else {more}"
                if m.kernel == "native" else name, "prefill": more}
    plain = {c: "F.linear" for c in COLUMNS}
    if not isinstance(m, PackedLinear) or dtype != torch.bfloat16 or m.weight.dtype != torch.bfloat16:
        return plain
    one = (f"native GEMV ({kernels.level()}, {kernels.gemv_path(Kind.BF16, m.in_features)})" if kernels.available()
           else "torch.mv")
    if not m.fresh():
        if kernels.bf16_rows_tiled(m.in_features):
            tiles = f"native GEMM ({kernels.level()} tiles)"
            return {"one_row": one, "batch": tiles, "prefill": tiles}
        return {**plain, "one_row": one}
    gemm = (f"native GEMM ({kernels.gemm_path(m.out_features, m.in_features)})" if m.gemm_packed is not None
            else "oneDNN packed")
    return {"one_row": one, "batch": gemm, "prefill": "oneDNN packed"}


def _norm_paths(m: nn.Module, dtype: torch.dtype) -> dict[str, str]:
    if isinstance(m, NativeRMSNorm) and dtype == torch.bfloat16 == m.weight.dtype and kernels.available():
        route = "native RMSNorm"
    else:
        route = f"torch {type(m).__name__.removeprefix('Native')}"
    return dict.fromkeys(COLUMNS, route)


def _attention_paths(m: Attention, layer: int, device: torch.device, dtype: torch.dtype, cache: KVCache
                     ) -> dict[str, str]:
    prefill = "SDPA, block-sparse mask" if m.config.is_sparse_layer(layer) else "SDPA"
    native = isinstance(m, NativeAttention) and m.native_decode(device, dtype, cache, layer)
    decode = "native decode_attention (RoPE, cache store)" if native else prefill
    return {"one_row": decode, "batch": decode, "prefill": prefill}


def paths(model: PhiForgeModel) -> dict[str, Any]:
    """Which route the engine's forward takes in each module, for a decode step of one row, a decode batch and
    a prompt, in the model's own dtype (what the Engine feeds it); JSON-ready."""
    dtype, device = model.embed.weight.dtype, model.embed.weight.device
    cache = model.new_cache(2, 16)  # the real plan over a small cache: the same decision as a generate call's
    plan, training = None, model.training
    if isinstance(model, FastModel):
        with torch.inference_mode():
            plan = model.eval().decode_plan(device, dtype, cache)
        model.train(training)
    rows: list[dict[str, Any]] = []
    step = "native whole step (pf_decode_step)" if plan is not None else None
    rows.append({"module": "(every block)", "type": "decode step",
                 "one_row": step or "layer by layer",
                 "batch": f"native whole step, <= {plan.max_rows} rows" if plan is not None and plan.max_rows > 1
                 else "layer by layer", "prefill": "layer by layer"})
    for name, m in model.named_modules():
        layer = int(name.split(".")[1]) if name.startswith("blocks.") else -1
        if isinstance(m, (nn.Linear, QuantizedLinear)):
            kind, route = f"{type(m).__name__} {m.out_features}x{m.in_features}", linear_routes(m, dtype)
        elif isinstance(m, (RMSNorm, nn.LayerNorm)):
            kind, route = type(m).__name__, _norm_paths(m, dtype)
        elif isinstance(m, Attention):
            kind, route = type(m).__name__, _attention_paths(m, layer, device, dtype, cache)
        else:
            continue
        rows.append({"module": name, "type": kind, **route})
    return {"model": model.config.name, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
            "installed": isinstance(model, FastModel), "kernels": kernels.level(),
            "weight_bytes": weight_bytes(model), "modules": rows}


def _layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out, start = [], layers[0]
    for a, b in zip(layers, [*layers[1:], None]):
        if b != a + 1:
            out.append(f"{start}-{a}" if a != start else f"{a}")
            start = b
    return ",".join(out)


def grouped(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's rows with layers that take the same routes folded: blocks.0-11.attn.qkv."""
    groups: dict[tuple, list[int]] = {}
    order: list[tuple] = []
    for row in report["modules"]:
        parts = row["module"].split(".")
        layer = int(parts[1]) if parts[0] == "blocks" and len(parts) > 1 else None
        pattern = ".".join([parts[0], "{}", *parts[2:]]) if layer is not None else row["module"]
        key = (pattern, row["type"], *(row[c] for c in COLUMNS))
        if key not in groups:
            groups[key], _ = [], order.append(key)
        if layer is not None:
            groups[key].append(layer)
    return [{"module": k[0].format(_layer_ranges(groups[k])) if groups[k] else k[0], "type": k[1],
             **dict(zip(COLUMNS, k[2:]))} for k in order]


def format_paths(report: dict[str, Any]) -> str:
    header = (f"{report['model']}: {report['dtype']} on {report['device']}, native kernels: "
              f"{report['kernels'] or 'off (PyTorch kernels)'}, fast paths "
              f"{'installed' if report['installed'] else 'not installed'}")
    table = [("module", "type", "decode, 1 row", "decode batch", "prefill")]
    table += [(r["module"], r["type"], *(r[c] for c in COLUMNS)) for r in grouped(report)]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    note = "(a decode step taken whole skips the per-layer routes below; they run where it runs layer by layer)"
    return "\n".join([header, note, *lines])


def summary(report: dict[str, Any]) -> str:
    """One line: how many modules take each route (the Engine's debug log line)."""
    counts: dict[str, int] = {}
    for row in report["modules"][1:]:
        key = f"{row['type'].split()[0]}: {row['one_row']} / {row['batch']} / {row['prefill']}"
        counts[key] = counts.get(key, 0) + 1
    step = report["modules"][0]
    routes = "; ".join(f"{n}x {k}" for k, n in counts.items())
    return f"{report['model']} ({report['dtype']}, kernels {report['kernels']}): decode step {step['one_row']} " \
           f"/ batch {step['batch']}; {routes}"
