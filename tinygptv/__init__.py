"""TinyGPT-V: an efficient multimodal LLM (EVA-ViT-g + Q-Former + Phi-2 with LoRA and norms).

Importing the package does no work: heavy modules (torch, transformers) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "TinyGPTV": ("tinygptv.model.tinygptv", "TinyGPTV"),
    "TinyGPTVConfig": ("tinygptv.config", "TinyGPTVConfig"),
    "get_preset": ("tinygptv.config", "get_preset"),
    "apply_stage": ("tinygptv.stages", "apply_stage"),
}

if TYPE_CHECKING:  # pragma: no cover
    from .config import TinyGPTVConfig, get_preset
    from .model.tinygptv import TinyGPTV
    from .stages import apply_stage


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'tinygptv' has no attribute {name!r}")


__all__ = sorted(_LAZY)
