"""Weight-only int8 and int4 quantization of Linear layers for CPU inference.

Decoding one token reads every weight of the language model once, so on a CPU its speed is set by
memory bandwidth (PLATFORM-NOTES: ~31 GB/s here, i.e. ~6 tok/s for Phi-2 in bf16). Storing weights
in 8 or 4 bits cuts the bytes read by 2x or 4x. The matmuls are PyTorch's own CPU kernels for
weight-only quantization (``aten._weight_int8pack_mm`` and ``aten._weight_int4pack_mm_for_cpu``, the
ones torchao and gpt-fast use underneath); we call them directly because torchao 0.18's wrappers
were slow in eager mode or wrong under ``torch.compile`` on this CPU (PLATFORM-NOTES). Activations
stay in the model's float dtype, so the norms TinyGPT-V adds (QK LayerNorm, post-attention RMSNorm)
are computed exactly as in the float model.

Formats (what :func:`quantize_linear_layers` stores, and what a saved quantized model holds):

* int8: symmetric per output channel, ``w = q * scale`` with ``q`` in [-127, 127].
* int4: asymmetric per group of ``group_size`` input features, ``w = (q - 8) * scale + zero`` with
  ``q`` in [0, 15], two values per byte (even input index in the low nibble). The CPU kernel's own
  packed layout is derived from it on first use and never saved, so files are portable.

Off the CPU, and for widths the CPU kernels do not take (int8: in_features not a multiple of 16;
int4: out_features not a multiple of 16), these modules dequantize and matmul: correct, not fast.
"""

from __future__ import annotations

import gc
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

QUANT_MODES = ("int8", "int4")


class _WeightOnlyLinear(nn.Module):
    """What the int8 and int4 layers share: reshaping, the fallback matmul, the bias."""

    in_features: int
    out_features: int
    dequantize: "Callable[[], torch.Tensor]"  # each subclass: its float (N, K) weight

    def _cpu_kernel(self, x2: torch.Tensor) -> torch.Tensor | None:
        """(M, K) -> (M, N) on the CPU kernel, or None where the kernel does not apply."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        out = self._cpu_kernel(x2) if x.device.type == "cpu" else None
        if out is None:
            out = F.linear(x2, self.dequantize().to(x.dtype))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)


class Int8Linear(_WeightOnlyLinear):
    """A Linear layer with int8 weights (per-output-channel scales) and float activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (N,)
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device)
        module.qweight.copy_(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        module.scale.copy_(scale)
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def _cpu_kernel(self, x2: torch.Tensor) -> torch.Tensor | None:
        # The kernel needs in_features % 16 == 0 (other widths crash in bf16, seen with torch 2.13).
        if self.in_features % 16:
            return None
        return torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scale.to(x2.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=8"


class Int4Linear(_WeightOnlyLinear):
    """A Linear layer with group-wise int4 weights and float activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128, device=None):
        super().__init__()
        if in_features % group_size or group_size % 2:
            raise ValueError(f"in_features {in_features} is not a multiple of the int4 group size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.empty(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("zero", torch.empty(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)
        self._packed: torch.Tensor | None = None  # the CPU kernel's layout, derived on first use

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> "Int4Linear":
        n, k = linear.out_features, linear.in_features
        w = linear.weight.detach().float().view(n, k // group_size, group_size)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (N, G)
        scale = ((hi - lo) / 15.0).clamp(min=1e-12)
        q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).view(n, k)
        module = cls(k, n, linear.bias is not None, group_size, device=w.device)
        module.qweight.copy_(q[:, 0::2] | (q[:, 1::2] << 4))
        module.scale.copy_(scale)
        module.zero.copy_(lo + 8 * scale)  # so that w = (q - 8) * scale + zero
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def unpack(self) -> torch.Tensor:
        """(N, K) int32 codes in [0, 15]."""
        q = torch.empty(self.out_features, self.in_features, dtype=torch.int32, device=self.qweight.device)
        q[:, 0::2] = (self.qweight & 0x0F).to(torch.int32)
        q[:, 1::2] = (self.qweight >> 4).to(torch.int32)
        return q

    def dequantize(self) -> torch.Tensor:
        q = self.unpack().float().view(self.out_features, -1, self.group_size)
        return ((q - 8) * self.scale[..., None] + self.zero[..., None]).view(self.out_features, self.in_features)

    def _cpu_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._packed is None:
            self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.unpack(), 1)
            self._scales_zeros = torch.stack([self.scale, self.zero], dim=-1).transpose(0, 1).contiguous()  # (G, N, 2)
        return self._packed, self._scales_zeros.to(dtype)

    def _apply(self, fn, recurse=True):
        self._packed = None  # a device or dtype move invalidates the derived layout
        return super()._apply(fn, recurse)

    def _cpu_kernel(self, x2: torch.Tensor) -> torch.Tensor | None:
        if self.out_features % 16:  # the kernel's packing needs N % 16 == 0
            return None
        packed, scales_zeros = self._cpu_weights(x2.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, scales_zeros)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=4, group_size={self.group_size}"


def int4_group_size(in_features: int, preferred: int = 128) -> int:
    """The largest group size <= ``preferred`` among 128, 64, 32 that divides ``in_features``."""
    for g in (128, 64, 32):
        if g <= preferred and in_features % g == 0:
            return g
    raise ValueError(f"no int4 group size (128, 64, 32) divides in_features={in_features}")


def language_model_linear_names(lm: nn.Module, include_lm_head: bool = True) -> list[str]:
    """Names of the Linear layers of a transformers causal LM that weight-only quantization covers:
    every decoder-layer projection, and the LM head if asked."""
    names = [n for n, m in lm.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}"]
    if include_lm_head and isinstance(getattr(lm, "lm_head", None), nn.Linear):
        names.append("lm_head")
    return names


@torch.no_grad()
def quantize_linear_layers(
    root: nn.Module, names: Iterable[str], mode: str, group_size: int = 128, head_names: Iterable[str] = ("lm_head",)
) -> nn.Module:
    """Replace the Linear layers ``names`` of ``root`` in place, one at a time.

    ``mode`` is ``"int8"`` or ``"int4"``; the LM head (``head_names``) is always int8, since 4 bits
    on the output projection costs far more accuracy than anywhere else. Garbage is collected after
    each layer: the replaced float weights linger in reference cycles otherwise, doubling the peak
    (PLATFORM-NOTES).
    """
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    heads = set(head_names)
    for name in list(names):
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear (is LoRA still unmerged?)")
        if mode == "int8" or name in heads:
            new = Int8Linear.from_linear(linear)
        else:
            new = Int4Linear.from_linear(linear, int4_group_size(linear.in_features, group_size))
        setattr(parent, child, new)
        del linear, new
        gc.collect()
    return root


def quantize_language_model(model, mode: str, group_size: int = 128, include_lm_head: bool = True):
    """Quantize the language model of a :class:`~tinygptv.TinyGPTV` in place for inference.

    LoRA must be merged first (a LoRA layer wraps its Linear, which this would otherwise skip).
    """
    if any(".lora_" in n for n, _ in model.named_parameters()):
        raise ValueError("merge LoRA into the base weights (model.merge_lora()) before quantizing")
    lm = model.lm
    quantize_linear_layers(lm, language_model_linear_names(lm, include_lm_head), mode, group_size)
    q = model.config.quantization
    q.language_model, q.group_size, q.lm_head = mode, group_size, include_lm_head  # saved with the model
    return model


def quantize_vision_dynamic(model) -> None:
    """int8 dynamic quantization (fbgemm: int8 weights, activations quantized per batch) of the
    vision encoder's and Q-Former's Linear layers, for CPU inference.

    The ViT is compute-bound (about 0.5 TFLOP per 224 px image), so on a CPU without bf16 matrix
    units int8 pays there: measured 2-3x faster than fp32 for its 257 x 1408 x 6144 matmuls on this
    machine. Applied at load time from float weights (its packed format is not a safetensors
    tensor). ``torch.ao.quantization.quantize_dynamic`` is deprecated in torch 2.x but still the
    one stock CPU path for int8 activations x int8 weights.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        for part in (model.vision, model.qformer):
            torch.ao.quantization.quantize_dynamic(part, {nn.Linear}, dtype=torch.qint8, inplace=True)
            gc.collect()
