"""The frozen vision encoder: EVA-ViT-g as BLIP-2 uses it, followed by ``ln_vision``.

transformers' ``Blip2VisionModel`` is EVA-ViT-g exactly (width 1408, depth 39, MLP 6144, patch 14,
q/v bias, LayerNorm eps 1e-6, no pooling), and its ``post_layernorm`` is applied to every token,
which is what BLIP-2's separate ``ln_vision`` does. So we use it as is and only translate our config.
"""

from __future__ import annotations

import torch
from transformers import Blip2VisionConfig, Blip2VisionModel

from ..config import VisionConfig


def hf_vision_config(cfg: VisionConfig, initializer_range: float = 0.02) -> Blip2VisionConfig:
    return Blip2VisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act="gelu",
        layer_norm_eps=cfg.layer_norm_eps,
        qkv_bias=cfg.qkv_bias,
        # Blip2VisionConfig defaults to 1e-10, which leaves random-weight models degenerate.
        initializer_range=initializer_range,
    )


class VisionEncoder(torch.nn.Module):
    """EVA-ViT-g + ln_vision: (N, 3, H, W) pixels -> (N, 1 + H/p * W/p, width) features."""

    def __init__(self, cfg: VisionConfig, initializer_range: float = 0.02):
        super().__init__()
        self.cfg = cfg
        self.model = Blip2VisionModel(hf_vision_config(cfg, initializer_range))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # The position table is built for cfg.image_size; another square size is interpolated
        # bicubically, as BLIP-2 / LAVIS do for 448 px.
        size = pixel_values.shape[-1]
        out = self.model(pixel_values=pixel_values, interpolate_pos_encoding=size != self.cfg.image_size)
        return out.last_hidden_state  # (N, 1 + P, width), post_layernorm == ln_vision applied
