"""Memoised outputs of the frozen image encoder, for training stages that see each image many times.

In all four TinyGPT-V stages the ViT and the Q-Former are frozen and in eval mode, so an image's
32 query outputs are a pure function of its pixels. Where training images are not randomly
augmented (the shapes world trains on whole images, since its texts state positions and counts),
each image is encoded once and then looked up: :class:`ImageFeatureCache` keys the Q-Former
outputs by a digest of the normalised pixels. With random crops nearly every view is new, so the
cache only costs memory there; it is off unless a config turns it on (``image_feature_cache``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Callable

import torch


class ImageFeatureCache:
    """Up to ``max_images`` Q-Former outputs (Q, width), least recently used dropped first."""

    def __init__(self, max_images: int):
        if max_images < 1:
            raise ValueError(f"an image feature cache needs room for at least one image, got {max_images}")
        self.max_images = max_images
        self._store: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    @staticmethod
    def key(pixels: torch.Tensor) -> bytes:
        """A digest of one image's pixels (its dtype and shape included)."""
        data = pixels.detach().to("cpu").contiguous()
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{data.dtype}{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())  # raw bytes: any dtype, bf16 included
        return digest.digest()

    def __call__(self, pixel_values: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The outputs of ``encode`` for the images (N, 3, S, S): cached ones looked up, the others
        encoded in one batch (without autograd) and stored."""
        keys = [self.key(image) for image in pixel_values]
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)  # an image twice in one batch is encoded once
        missing = [i for k, i in first.items() if k not in self._store]
        if missing:
            with torch.no_grad():
                fresh = encode(pixel_values[missing])
            for i, features in zip(missing, fresh):
                self._store[keys[i]] = features.detach().clone()
                if len(self._store) > self.max_images:
                    self._store.popitem(last=False)
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)  # repeats within a batch count as hits
        out = []
        for i, k in enumerate(keys):
            if k in self._store:
                self._store.move_to_end(k)
                out.append(self._store[k])
            else:  # evicted within this very batch (a batch larger than the cache)
                with torch.no_grad():
                    out.append(encode(pixel_values[i : i + 1])[0])
        return torch.stack(out)


__all__ = ["ImageFeatureCache"]
