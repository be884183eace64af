"""BLIP-2's image preprocessing, without torchvision.

LAVIS / MiniGPT-4 ``blip2_image_eval`` and ``blip2_image_train`` (ORIGINAL-NOTES, "Image
preprocessing"):

* eval: resize to ``size`` x ``size`` (bicubic), scale to [0, 1], normalise with CLIP's mean/std;
* train: ``RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(3/4, 4/3), bicubic)``, then the same.

Written with PIL + numpy because torchvision is a heavy dependency for two operations; the eval
path equals ``transformers.BlipImageProcessor`` (PIL backend) to 1e-5, which a test checks. The
random crop follows torchvision's ``RandomResizedCrop.get_params`` algorithm (10 tries at a random
area and log-uniform aspect ratio, then a centre crop at the clamped ratio).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageProcessor:
    """PIL image -> normalised (3, size, size) float tensor, as BLIP-2 prepares images."""

    image_size: int = 224
    """Output side in pixels (224 for stages 1-3, 448 for stage 4)."""
    train: bool = False
    """Random resized crop (training) instead of a plain resize (evaluation)."""
    min_scale: float = 0.5
    """Smallest crop area as a fraction of the image (BLIP-2: 0.5)."""
    max_scale: float = 1.0
    """Largest crop area as a fraction of the image."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Range of crop aspect ratios (torchvision's default)."""
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __call__(self, image: "Image", rng: random.Random | None = None, crop: bool = True) -> "torch.Tensor":
        """Process one image. ``rng`` drives the training crop (a fresh one if None); ``crop=False``
        forces the eval path, for samples whose text refers to positions in the image."""
        from PIL import Image as PILImage

        if image.mode != "RGB":
            image = image.convert("RGB")
        size = (self.image_size, self.image_size)
        if self.train and crop:
            left, top, width, height = self.crop_params(image.width, image.height, rng or random.Random())
            image = image.resize(size, PILImage.Resampling.BICUBIC, box=(left, top, left + width, top + height))
        else:
            image = image.resize(size, PILImage.Resampling.BICUBIC)
        return self.normalize(image)

    def batch(self, images: Sequence["Image"], rng: random.Random | None = None, crop: bool = True) -> "torch.Tensor":
        """Process several images into one (N, 3, size, size) tensor."""
        import torch

        if not images:
            return torch.empty(0, 3, self.image_size, self.image_size)
        return torch.stack([self(image, rng, crop) for image in images])

    def normalize(self, image: "Image") -> "torch.Tensor":
        """RGB PIL image -> (3, H, W) float32 tensor, scaled to [0, 1] and normalised."""
        import numpy as np
        import torch

        pixels = np.asarray(image, dtype=np.float32) * np.float32(1 / 255)  # (H, W, 3)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        pixels = (pixels - mean) / std
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # (3, H, W)

    def crop_params(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """``(left, top, crop_width, crop_height)`` of a random resized crop (torchvision's algorithm)."""
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * rng.uniform(self.min_scale, self.max_scale)
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, width - w), rng.randint(0, height - h), w, h
        # Fallback: the largest centred crop within the ratio range.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h


def image_processor_for(image_size: int, train: bool = False) -> ImageProcessor:
    """The BLIP-2 processor of a resolution (224 for stages 1-3, 448 for stage 4)."""
    return ImageProcessor(image_size=image_size, train=train)


__all__ = ["CLIP_MEAN", "CLIP_STD", "ImageProcessor", "image_processor_for"]
