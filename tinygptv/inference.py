"""Loading a model for inference: the built-in default, a local directory or a hub id, on a device,
in a dtype, optionally quantized.

The built-in model (the micro TinyGPT-V trained on the synthetic shapes world, a few MB) ships
inside the package under ``tinygptv/assets/``; every command uses it when no model is named.
"""

from __future__ import annotations

from pathlib import Path

BUILTIN_NAME = "tinygptv-micro-shapes"
"""Name of the built-in model (``--model builtin`` names it explicitly)."""

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


def builtin_model_dir() -> Path:
    """Directory of the built-in model inside the installed package."""
    from importlib.resources import files

    path = Path(str(files("tinygptv") / "assets" / BUILTIN_NAME))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the built-in model is missing from this installation ({path}); rebuild it with "
            "`python scripts/build_builtin_model.py` or name a model with --model"
        )
    return path


def resolve_dtype(name: str | None, device: str):
    """A torch dtype from a name; ``None`` picks bf16 on CUDA and fp32 elsewhere."""
    import torch

    if name is None:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(sorted(set(DTYPES)))}")
    return getattr(torch, DTYPES[name])


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


QUANT_BACKENDS = ("auto", "tinygptv", "bitsandbytes")


def resolve_quant_backend(backend: str | None, device) -> str:
    """``"tinygptv"`` or ``"bitsandbytes"``; ``"auto"`` / None: bitsandbytes on CUDA, ours elsewhere."""
    if backend in (None, "auto"):
        return "bitsandbytes" if str(device or "cpu").startswith("cuda") else "tinygptv"
    if backend not in QUANT_BACKENDS:
        raise ValueError(f"unknown quantization backend {backend!r}; choose one of {', '.join(QUANT_BACKENDS)}")
    return backend


def apply_bnb_quantization(net, quantize: str, device) -> None:
    """Quantize a float model's language model with bitsandbytes onto ``device``, one layer at a
    time (LoRA merged first), then move the rest of the model there (:mod:`tinygptv.quantize_bnb`)."""
    from .quantize import QUANT_MODES, release_freed_memory
    from .quantize_bnb import quantize_language_model_bnb

    if quantize not in QUANT_MODES:
        raise ValueError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANT_MODES)}")
    if net.config.lora.enabled:
        net.merge_lora()
    quantize_language_model_bnb(net, quantize, device)
    net.to(device)
    release_freed_memory()


def apply_quantization(net, quantize: str | None, source: str = "the model") -> None:
    """Quantize a loaded model's language model in place (``None``: leave it as saved). LoRA is
    merged first; a model saved quantized must be asked for in its own mode (or ``None``).

    On the CPU in fp32 (an inference-only setup: its dynamically quantized vision encoder cannot be
    saved) a quantized model also gets: int8 dynamic quantization of the vision encoder and
    Q-Former; in int4 mode its first decoder layers int8 (:data:`tinygptv.quantize.INT4_INT8_SHARE`);
    the token embedding table in bf16; and every layer packed for its CPU kernel up front.
    """
    import torch

    from .quantize import (
        INT4_INT8_SHARE,
        QUANT_MODES,
        pack_for_cpu,
        quantize_language_model,
        quantize_vision_dynamic,
        store_token_embedding_in_bf16,
    )

    if quantize is not None and quantize not in QUANT_MODES:
        raise ValueError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANT_MODES)}")
    saved_mode = net.config.quantization.language_model
    if quantize is not None and saved_mode is not None and quantize != saved_mode:
        raise ValueError(f"{source} holds {saved_mode} weights; it cannot be loaded as {quantize}")
    weight = net.lm_proj.weight
    cpu_fp32 = weight.device.type == "cpu" and weight.dtype == torch.float32
    if quantize is not None and saved_mode is None:
        if net.config.lora.enabled:
            net.merge_lora()
        quantize_language_model(net, quantize, int8_share=INT4_INT8_SHARE if cpu_fp32 else 0.0)
    if (quantize or saved_mode) and cpu_fp32:
        store_token_embedding_in_bf16(net.lm)
        pack_for_cpu(net.lm)
        quantize_vision_dynamic(net)


def load_model(
    model: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    offline: bool | None = None,
    quantize_backend: str = "auto",
):
    """A :class:`~tinygptv.TinyGPTV` ready for inference.

    ``model``: None or ``"builtin"`` for the built-in model, else a directory in our format or a
    hub id. ``quantize``: None, ``"int8"`` or ``"int4"`` (weight-only, language model; LoRA is
    merged first). A directory saved quantized (``tinygptv quantize``) loads as it is, without
    re-quantizing. Quantized models on the CPU in fp32 also get int8 dynamic quantization of the
    vision encoder and Q-Former, where int8 pays (see :func:`tinygptv.quantize.quantize_vision_dynamic`).
    On CUDA, ``quantize`` uses bitsandbytes (:mod:`tinygptv.quantize_bnb`; ``quantize_backend``
    chooses explicitly).
    """
    import torch

    from .model.tinygptv import TinyGPTV
    from .quantize import QUANT_MODES

    if quantize is not None and quantize not in QUANT_MODES:
        raise ValueError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANT_MODES)}")
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    source = builtin_model_dir() if model in (None, "builtin") else model
    net = TinyGPTV.from_pretrained(
        source, device=device, dtype=torch_dtype, offline=offline, quantize=quantize, quantize_backend=quantize_backend
    )
    return net.eval()
