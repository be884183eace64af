"""bitsandbytes 8-bit and 4-bit language models on CUDA (``pip install 'tinygptv[cuda]'``).

On a GPU, ``load_model(..., device="cuda", quantize="int8"|"int4")`` hands the language model's
Linear layers to bitsandbytes, the library the original TinyGPT-V uses for its 8-bit mode:

* ``int8``: ``bnb.nn.Linear8bitLt``, LLM.int8() (int8 codes per output row, absmax scale; input
  columns holding an activation above :data:`INT8_THRESHOLD` run in 16 bits), as transformers'
  ``BitsAndBytesConfig(load_in_8bit=True)`` sets it up;
* ``int4``: ``bnb.nn.Linear4bit``, NF4 codes in blocks of 64 (32 for narrow layers whose width 64
  does not divide, :func:`int4_blocksize`) with double-quantized scales, matmuls
  in the model's float dtype (``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_use_double_quant=True)``).

The LM head stays in the float dtype, as transformers keeps it (``llm_int8_skip_modules``): on a
GPU its 0.26 GB in bf16 costs little and 8 bits there cost the most accuracy. Everything outside
these Linear layers (the norms TinyGPT-V adds included) runs in the model's float dtype.

Layers are quantized one at a time on their way to the GPU (the float model stays in host
memory, memory-mapped), so the GPU never holds more than the quantized model plus one float layer.
bitsandbytes also runs these layers on the CPU (its own CPU kernels), which is how the tests check
this path on machines without a GPU; on the CPU, :mod:`tinygptv.quantize`'s own kernels are faster.

A bitsandbytes model cannot be saved in our format: save the float model (bitsandbytes quantizes
while loading, in seconds) or, for a file that loads pre-quantized, our own int8 / int4 layers
(``tinygptv quantize``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

INT8_THRESHOLD = 6.0
"""LLM.int8()'s outlier threshold (bitsandbytes' and transformers' default)."""

INT4_QUANT_TYPE = "nf4"

INT4_BLOCKSIZE = 64
"""NF4 block (bitsandbytes' and transformers' default)."""


def int4_blocksize(in_features: int) -> int:
    """:data:`INT4_BLOCKSIZE`, or 32 where that divides ``in_features`` and 64 does not.

    bitsandbytes 0.50's CPU kernels (on an Intel Xeon with avx512_bf16 and AMX; not on an AVX2-only
    AMD EPYC) dequantize a 4-bit weight right only when its rows hold whole blocks: with blocks of
    64, a width-160 layer's weights came back at cosine 0.969 to the originals (its own codes and
    scales, decoded by hand: 0.996), and a micro model's last-token logits at 0.80. Blocks of 32 fit
    such rows (0.996). Real-size models (Phi-2: 2560, 10240) keep 64."""
    if in_features % INT4_BLOCKSIZE and in_features % 32 == 0:
        return 32
    return INT4_BLOCKSIZE


BNB_CPU_PACK_ROWS = 32
"""Output rows per block of bitsandbytes' repacked 4-bit CPU weights (``block_n``): with
avx512_bf16, a layer whose out_features is not a multiple of it, or whose in_features is not a
multiple of the quantization block, cannot be repacked (:func:`bnb_linear`)."""


class _DropFp16CastNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast from")


def _quiet_fp16_cast_notice() -> None:
    """LLM.int8() computes in fp16 by design, and bitsandbytes logs so on every call with bf16 or
    fp32 inputs (a warning per layer per step in a chat); drop that one message."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropFp16CastNotice) for f in logger.filters):
        logger.addFilter(_DropFp16CastNotice())


def bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def _require_bitsandbytes():
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError(
            "quantizing on CUDA uses bitsandbytes, which is not installed: pip install 'tinygptv[cuda]' "
            "(or bitsandbytes)"
        ) from e
    return bnb


def has_bnb_layers(root: nn.Module) -> bool:
    return any(type(m).__module__.startswith("bitsandbytes") for m in root.modules())


def bnb_linear(linear: nn.Linear, mode: str, device: str | torch.device, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes copy of ``linear`` on ``device`` (quantized as it moves there)."""
    bnb = _require_bitsandbytes()
    weight = linear.weight.detach().to(compute_dtype)
    if mode == "int8":
        # Int8Params quantizes only on a move from the host: a weight already on the GPU would stay
        # in 16 bits (bitsandbytes 0.50), so it goes through host memory first.
        weight = weight.cpu()
        new = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta",
        )
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    elif mode == "int4":
        new = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=compute_dtype, compress_statistics=True, quant_type=INT4_QUANT_TYPE, device="meta",
        )
        new.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, blocksize=int4_blocksize(linear.in_features), compress_statistics=True,
            quant_type=INT4_QUANT_TYPE, module=new,
        )
        if linear.in_features % new.weight.blocksize or linear.out_features % BNB_CPU_PACK_ROWS:
            # On CPUs with avx512_bf16, bitsandbytes 0.50 repacks a 4-bit weight for its fast kernel on
            # the first forward, and that repacking fails for these shapes: keep its plain CPU path.
            new.support_avx512bf16_for_cpu = False
    else:
        raise ValueError(f"unknown quantization {mode!r}; choose int8 or int4")
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
    return new.to(device)


@torch.no_grad()
def quantize_language_model_bnb(
    model, mode: str, device: str | torch.device, compute_dtype: torch.dtype | None = None
):
    """Replace the decoder layers' Linear layers of a :class:`~tinygptv.TinyGPTV` with bitsandbytes
    ones on ``device``, one at a time (the model itself may stay where it is; move it afterwards).
    LoRA must be merged first. ``compute_dtype``: the float dtype the model runs in (default: the
    dtype of its weights)."""
    from .quantize import language_model_linear_names, replace_linear_layers

    if any(".lora_" in n for n, _ in model.named_parameters()):
        raise ValueError("merge LoRA into the base weights (model.merge_lora()) before quantizing")
    compute_dtype = compute_dtype or model.lm_proj.weight.dtype
    if mode == "int8":
        _quiet_fp16_cast_notice()
    names = language_model_linear_names(model.lm, include_lm_head=False)
    replace_linear_layers(model.lm, names, lambda _, linear: bnb_linear(linear, mode, device, compute_dtype))
    model.quantization_backend = f"bitsandbytes-{mode}"
    return model
