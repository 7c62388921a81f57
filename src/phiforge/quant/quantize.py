"""Weight-only int8 / int4 quantization of a PhiForgeModel, and its safetensors checkpoints.

  int8: symmetric, one scale per output row
  int4: asymmetric, a scale and zero per group of K
Decode reads every weight once per token, so fewer bytes per weight is more tokens per second.
On disk the packing is portable (int8 rows; two int4 codes per byte, low nibble first, plus scales
and zeros). Kernels, fastest first:
  CPU   phiforge.kernels (native GEMV on the portable layout itself, or for int8 on AVX2 its rows regrouped
        in tiles read as one stream; larger batches dequantize to bf16 and use the bf16 GEMM), else
        aten._weight_int8pack_mm / _weight_int4pack_mm_for_cpu
  CUDA  aten._weight_int8pack_mm / _weight_int4pack_mm (tile layout made at load time)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from phiforge import kernels
from phiforge.config.model import ModelConfig
from phiforge.errors import ConfigError, ModelError
from phiforge.io.atomic import atomic_write
from phiforge.io.checkpoint import (
    SINGLE_NAME,
    CheckpointError,
    Filler,
    generation_config,
    hf_state_dict,
    read_headers,
    read_tensor,
    resolve_dtype,
    safetensors_files,
    write_json,
)
from phiforge.model.transformer import PhiForgeModel


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W stored as int8 rows or int4 groups."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None
        self.kernel = "unset"
        self.tile = 0  # int8 on the native kernel: _qweight in kernels.int8_to_tiles' layout, tiles of this many rows

    # ---- building from float weights / from stored tensors -----------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int, keep_stored: bool = True) -> QuantizedLinear:
        w = linear.weight.detach().float()
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        module = cls(w.shape[1], w.shape[0], bits, group_size, bias)
        stored = quantize_int8(w) if bits == 8 else quantize_int4(w, group_size)
        module.load_stored(stored, dtype=linear.weight.dtype, keep_stored=keep_stored)
        return module

    def load_stored(self, stored: dict[str, torch.Tensor], dtype: torch.dtype, keep_stored: bool = True) -> None:
        """Install portable tensors (qweight, scales[, zeros]) and make the kernel's layout.

        ``keep_stored=False`` drops the portable int4 copy once packed (half the memory; no re-saving).
        """
        self.stored_keys = sorted(stored)
        self.dtype = torch.bfloat16  # the packed kernels' fast path, whatever the model computes in
        device = stored["qweight"].device
        for key, value in stored.items():  # scales and zeros in bf16, the dtype every kernel takes them in
            self.register_buffer(f"_{key}", value if key == "qweight" else value.to(torch.bfloat16), persistent=False)
        if device.type == "cpu" and kernels.available():  # reads the portable layout (int8: or its row tiles)
            self.kernel = "native"
            self.tile = kernels.int8_tile(self.in_features) if self.bits == 8 else 0
            if self.tile:
                self._qweight = kernels.int8_to_tiles(stored["qweight"], self.tile)
        elif self.bits == 8:
            self.register_buffer("w_int8", stored["qweight"], persistent=False)
            self.register_buffer("w_scales", stored["scales"].to(self.dtype), persistent=False)
            self.kernel = "int8pack"
        else:
            self._pack_int4(stored, device)
            if not keep_stored and self.kernel == "int4pack":
                for key in self.stored_keys:
                    delattr(self, f"_{key}")
                self.stored_keys = []

    def _pack_int4(self, stored: dict[str, torch.Tensor], device: torch.device) -> None:
        codes = unpack_nibbles(stored["qweight"]).to(torch.int32)
        scale_zero = torch.stack([stored["scales"], stored["zeros"]], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("w_scale_zero", scale_zero.to(torch.bfloat16), persistent=False)
        try:
            if device.type == "cpu":
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 8)
            else:
                packed = torch.ops.aten._convert_weight_to_int4pack(stored["qweight"], 8)
            self.register_buffer("w_int4", packed, persistent=False)
            self.kernel = "int4pack"
            probe = torch.randn(2, self.in_features, dtype=torch.bfloat16, device=device)
            if not torch.allclose(self._int4(probe).float(), probe.float() @ self.dequantized().T, rtol=0.05,
                                  atol=0.05 * float(self.dequantized().abs().max())):
                raise RuntimeError("int4 kernel disagrees with the reference")  # layout differs on this build
        except RuntimeError:  # no kernel for this shape/device: dequantize on the fly (correct, slower)
            self.kernel = "dequant"
            self.register_buffer("w_dense", self.dequantized().to(self.dtype), persistent=False)

    def stored(self) -> dict[str, torch.Tensor]:
        if not self.stored_keys:
            raise ModelError("this layer kept only its kernel layout (loaded for inference); quantize again to save")
        stored = {key: getattr(self, f"_{key}") for key in self.stored_keys}
        if self.tile:
            stored["qweight"] = kernels.int8_from_tiles(stored["qweight"], self.tile)
        return stored

    def dequantized(self) -> torch.Tensor:
        """The float weight [N, K] these codes stand for."""
        s = self.stored()
        if self.bits == 8:
            return s["qweight"].float() * s["scales"].float()[:, None]
        codes = unpack_nibbles(s["qweight"]).float().view(self.out_features, -1, self.group_size)
        w = (codes - 8) * s["scales"].float()[..., None] + s["zeros"].float()[..., None]
        return w.view(self.out_features, self.in_features)

    # ---- forward -----------------------------------------------------------------------------
    def _int4(self, x2d: torch.Tensor) -> torch.Tensor:
        aten = torch.ops.aten
        op = aten._weight_int4pack_mm_for_cpu if x2d.device.type == "cpu" else aten._weight_int4pack_mm
        return op(x2d.to(torch.bfloat16), self.w_int4, self.group_size, self.w_scale_zero)

    def _native(self, x2d: torch.Tensor) -> torch.Tensor:
        q, scales = self._qweight, self._scales
        if x2d.shape[0] <= kernels.NATIVE_GEMV_ROWS:  # bias fused, output in x's dtype
            if self.bits == 8:
                return kernels.int8_gemv(x2d, q, scales, self.bias, self.tile)
            return kernels.int4_gemv(x2d, q, scales, self._zeros, self.group_size, self.bias)
        if self.bits == 8:
            w = kernels.int8_dequant(q, scales, self.tile)
        else:
            w = kernels.int4_dequant(q, scales, self._zeros, self.group_size)
        bias = self.bias.to(torch.bfloat16) if self.bias is not None else None
        return F.linear(x2d.to(torch.bfloat16), w, bias).to(x2d.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        if self.kernel == "native":
            return self._native(x2d).view(*shape[:-1], self.out_features)
        if self.kernel == "int8pack":
            y = torch.ops.aten._weight_int8pack_mm(x2d.to(self.dtype), self.w_int8, self.w_scales)
        elif self.kernel == "int4pack":
            y = self._int4(x2d)
        else:
            y = F.linear(x2d.to(self.w_dense.dtype), self.w_dense)
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, int{self.bits}, group {self.group_size}, {self.kernel}"


def quantize_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    q = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    return {"qweight": q, "scales": scales.to(torch.bfloat16)}


def quantize_int4(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    n, k = w.shape
    if k % group_size:
        raise ModelError(f"int4: in_features {k} is not a multiple of group size {group_size}")
    groups = w.view(n, k // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scales = ((high - low) / 15).clamp(min=1e-8)
    codes = ((groups - low[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.uint8)
    zeros = low + 8 * scales  # w = (code - 8) * scale + zero, the kernels' convention
    return {"qweight": pack_nibbles(codes.view(n, k)), "scales": scales.to(torch.bfloat16),
            "zeros": zeros.to(torch.bfloat16)}


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).view(packed.shape[0], -1)


# ---- whole models ------------------------------------------------------------------------------------
def quantizable(model: PhiForgeModel, include_head: bool = True) -> list[str]:
    """Names of the Linear layers weight-only quantization replaces."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    return names + (["lm_head"] if include_head else [])


def quantize_model(model: PhiForgeModel, bits: int, group_size: int = 32, include_head: bool = True,
                   keep_stored: bool = True) -> PhiForgeModel:
    """Replace the model's Linear layers in place; a tied head gets its own quantized copy.

    ``keep_stored=False`` is for inference only: int4 layers keep just the kernel layout (half the memory).
    """
    if bits not in (4, 8):
        raise ConfigError(f"bits must be 4 or 8, got {bits}")
    modules = quantizable(model, include_head)
    for name in modules:
        _replace(model, name, QuantizedLinear.from_linear(model.get_submodule(name), bits, group_size, keep_stored))
    model.quantization = {"bits": bits, "group_size": group_size, "modules": modules}
    return model


def save_quantized(model: PhiForgeModel, path: str | Path) -> Path:
    """config.json (+ quantization_config) and one model.safetensors: float tensors under their Hugging
    Face keys, packed layers under ``<module>.qweight|scales|zeros``."""
    info = getattr(model, "quantization", None)
    if info is None:
        raise ModelError("model is not quantized: call quantize_model first")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in hf_state_dict(model).items()}
    for name in info["modules"]:
        for key, tensor in model.get_submodule(name).stored().items():
            tensors[f"{name}.{key}"] = tensor.detach().cpu().contiguous()
    atomic_write(folder / SINGLE_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    dtype_name = str(model.embed.weight.dtype).replace("torch.", "")
    config = {**model.config.to_hf_config(), "torch_dtype": dtype_name,
              "quantization_config": {"quant_method": "phiforge-weight-only", **info}}
    write_json(folder / "config.json", config)
    write_json(folder / "generation_config.json", generation_config(model.config))
    return folder


def load_quantized(path: str | Path, *, device: str | torch.device = "cpu",
                   dtype: torch.dtype | str | None = torch.bfloat16, keep_stored: bool = False) -> PhiForgeModel:
    """Load a folder written by save_quantized; a layer with missing codes or scales is named."""
    folder = Path(path)
    hf = json.loads((folder / "config.json").read_text())
    info = hf.get("quantization_config") or {}
    if info.get("quant_method") != "phiforge-weight-only":
        raise CheckpointError(f"{folder / 'config.json'}: quantization_config is not phiforge's ({info})")
    config = ModelConfig.from_hf_config(hf, name=folder.name)
    dtype = resolve_dtype(dtype, config)
    filler = Filler(config, dtype, device)
    modules = info["modules"]
    quant_params = {f"{name}.weight" for name in modules}
    for name in modules:  # stand-ins first, so the float allocation below skips these weights
        linear = filler.model.get_submodule(name)
        _replace(filler.model, name, QuantizedLinear(linear.in_features, linear.out_features, info["bits"],
                                                     info["group_size"], linear.bias))
    filler.allocate(device)
    entries = read_headers(safetensors_files(folder))
    packed = {k: e for k, e in entries.items()
              if k.rpartition(".")[0] in modules and k.rpartition(".")[2] in ("qweight", "scales", "zeros")}
    with open(folder / SINGLE_NAME, "rb") as handle:
        for key, entry in entries.items():
            if key not in packed and filler.check(key, entry.shape, str(entry.file)):
                filler.put(key, read_tensor(entry, handle))
        filler.filled |= {k for k, t in filler.keys.items() if t.param in quant_params}
        needed = ["qweight", "scales"] + (["zeros"] if info["bits"] == 4 else [])
        for name in modules:
            missing = [f"{name}.{k}" for k in needed if f"{name}.{k}" not in packed]
            if missing:
                raise CheckpointError(f"{folder / SINGLE_NAME}: quantized layer {name} lacks {', '.join(missing)}")
            stored = {k: read_tensor(packed[f"{name}.{k}"], handle).to(device) for k in needed}
            filler.model.get_submodule(name).load_stored(stored, dtype, keep_stored)
    model = filler.finish(str(folder))
    model.quantization = {k: info[k] for k in ("bits", "group_size", "modules")}
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)
