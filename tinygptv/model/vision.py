"""The frozen vision encoder: EVA-ViT-g as BLIP-2 uses it, followed by ``ln_vision``.

transformers' ``Blip2VisionModel`` is EVA-ViT-g exactly (width 1408, depth 39, MLP 6144, patch 14,
q/v bias, LayerNorm eps 1e-6, no pooling), and its ``post_layernorm`` is applied to every token,
which is what BLIP-2's separate ``ln_vision`` does. So we use it as is and only translate our config.
A model trained from scratch may put a convolutional stem in front (:class:`ConvStem`).
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


class _PlainStridedGrad(torch.autograd.Function):
    """The identity, whose gradient comes back in the default layout's strides: a channels-last
    convolution returns a 1x1 kernel's weight gradient in other strides, which DDP's gradient
    buckets would copy (with a warning) on every step."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> torch.Tensor:
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.clone(memory_format=torch.contiguous_format)


class ConvStem(torch.nn.Module):
    """A hybrid ViT's patch embedding: stride-2 3x3 convolutions (GroupNorm with one group, GELU),
    then a convolution of kernel and stride ``patch / 2**len(channels)`` to the ViT's width, so the
    token grid is the plain patch embedding's. GroupNorm, not BatchNorm: no running statistics,
    and an image's tokens do not depend on the rest of its batch.

    The convolutions run in channels-last memory (``channels_last``, on by default; the parameters
    stay plain tensors and get their gradients in their own strides): oneDNN's CPU kernels are
    faster so, a training step of the micro ViT 1.12-1.29x and a forward 1.13-1.18x
    (``benchmarks/bench_conv_stem.py``, two sessions), with the same values up to rounding (~5e-6)."""

    def __init__(self, channels: tuple[int, ...], width: int, patch_size: int, channels_last: bool = True):
        super().__init__()
        self.channels_last = channels_last
        stride = 2 ** len(channels)
        if not channels or patch_size % stride:
            raise ValueError(f"conv_stem {channels}: patch_size {patch_size} is not divisible by 2**{len(channels)}")
        layers: list[torch.nn.Module] = []
        previous = 3
        for count in channels:
            layers += [
                torch.nn.Conv2d(previous, count, 3, stride=2, padding=1),
                torch.nn.GroupNorm(1, count),
                torch.nn.GELU(),
            ]
            previous = count
        self.layers = torch.nn.Sequential(*layers)
        self.proj = torch.nn.Conv2d(previous, width, patch_size // stride, stride=patch_size // stride)

    @property
    def weight(self) -> torch.Tensor:
        # transformers' embeddings read the patch embedding's weight for the input dtype
        return self.proj.weight

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not self.channels_last:
            return self.proj(self.layers(pixel_values))
        x = pixel_values.contiguous(memory_format=torch.channels_last)
        for layer in self.layers:
            x = self._conv_channels_last(layer, x) if isinstance(layer, torch.nn.Conv2d) else layer(x)
        return self._conv_channels_last(self.proj, x)

    @staticmethod
    def _conv_channels_last(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        weight = _PlainStridedGrad.apply(conv.weight).contiguous(memory_format=torch.channels_last)
        return torch.nn.functional.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class VisionEncoder(torch.nn.Module):
    """EVA-ViT-g + ln_vision: (N, 3, H, W) pixels -> (N, 1 + H/p * W/p, width) features."""

    def __init__(self, cfg: VisionConfig, initializer_range: float = 0.02):
        super().__init__()
        self.cfg = cfg
        self.model = Blip2VisionModel(hf_vision_config(cfg, initializer_range))
        if cfg.conv_stem:
            self.model.embeddings.patch_embedding = ConvStem(tuple(cfg.conv_stem), cfg.hidden_size, cfg.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # The position table is built for cfg.image_size; another square size is interpolated
        # bicubically, as BLIP-2 / LAVIS do for 448 px.
        size = pixel_values.shape[-1]
        out = self.model(pixel_values=pixel_values, interpolate_pos_encoding=size != self.cfg.image_size)
        return out.last_hidden_state  # (N, 1 + P, width), post_layernorm == ln_vision applied
