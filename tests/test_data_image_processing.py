"""BLIP-2 image preprocessing without torchvision: parity with transformers, the training crop."""

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from tinygptv.data.image_processing import CLIP_MEAN, CLIP_STD, ImageProcessor, image_processor_for


def blip_reference(size):
    """transformers' BLIP image processor with BLIP-2's settings, built locally (no download)."""
    try:  # transformers 5 names its PIL backend explicitly; older versions only have BlipImageProcessor
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil as Processor
    except ImportError:  # pragma: no cover - depends on the installed transformers
        from transformers import BlipImageProcessor as Processor
    return Processor(
        do_resize=True,
        size={"height": size, "width": size},
        resample=Image.Resampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


def random_image(rng, width, height, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (height, width, channels) if channels else (height, width)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


@pytest.mark.parametrize("size", [224, 448])
@pytest.mark.parametrize(
    "width, height, mode", [(320, 240, "RGB"), (97, 131, "RGB"), (224, 224, "RGB"), (150, 100, "L")]
)
def test_eval_matches_transformers_blip_processor(size, width, height, mode):
    rng = np.random.default_rng(width * height)
    image = random_image(rng, width, height, mode)
    expected = blip_reference(size)(image, return_tensors="pt")["pixel_values"][0]
    ours = ImageProcessor(size)(image)
    assert ours.shape == (3, size, size) and ours.dtype == torch.float32
    assert torch.allclose(ours, expected.float(), atol=1e-5, rtol=0)


def test_batch_shape_and_empty():
    proc = image_processor_for(448)
    rng = np.random.default_rng(0)
    out = proc.batch([random_image(rng, 50, 60), random_image(rng, 70, 40)])
    assert out.shape == (2, 3, 448, 448)
    assert proc.batch([]).shape == (0, 3, 448, 448)


def test_normalisation_values():
    white = Image.new("RGB", (4, 4), (255, 255, 255))
    out = ImageProcessor(4)(white)
    for c in range(3):
        assert out[c].allclose(torch.full((4, 4), (1 - CLIP_MEAN[c]) / CLIP_STD[c]), atol=1e-6)


def test_crop_params_follow_random_resized_crop_bounds():
    proc = ImageProcessor(224, train=True)
    rng = random.Random(0)
    for _ in range(2000):
        width, height = rng.randint(50, 600), rng.randint(50, 600)
        left, top, w, h = proc.crop_params(width, height, rng)
        assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
        area = w * h / (width * height)
        ratio = w / h
        # the 10 random tries fall back to a centre crop, which can be larger than max_scale
        if area <= 1.0 and not (left == (width - w) // 2 and top == (height - h) // 2):
            assert 0.5 - 0.02 <= area <= 1.0 + 1e-9
            assert 3 / 4 * 0.95 <= ratio <= 4 / 3 * 1.05


def test_crop_fallback_is_centred_within_ratio():
    proc = ImageProcessor(224, train=True, min_scale=0.99, max_scale=1.0)
    # a very wide image: no 10-try crop fits both the area and the ratio range
    left, top, w, h = proc.crop_params(1000, 10, random.Random(0))
    assert h == 10 and w == round(10 * 4 / 3) and left == (1000 - w) // 2 and top == 0


def test_train_crop_is_seeded_and_differs_from_eval():
    rng = np.random.default_rng(1)
    image = random_image(rng, 300, 200)
    proc = ImageProcessor(64, train=True)
    a = proc(image, random.Random(5))
    b = proc(image, random.Random(5))
    c = proc(image, random.Random(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # crop=False (samples whose text refers to the geometry) is exactly the eval path
    assert torch.equal(proc(image, random.Random(5), crop=False), ImageProcessor(64)(image))


def test_train_crop_of_a_known_region():
    # left half red, right half blue: a crop's mean colour tells where it came from
    pixels = np.zeros((100, 200, 3), dtype=np.uint8)
    pixels[:, :100] = (255, 0, 0)
    pixels[:, 100:] = (0, 0, 255)
    image = Image.fromarray(pixels)
    proc = ImageProcessor(32, train=True)
    for seed in range(20):
        left, _, w, _ = proc.crop_params(200, 100, random.Random(seed))
        out = proc(image, random.Random(seed))  # the same draws: the same crop
        red_fraction = (min(left + w, 100) - min(left, 100)) / w
        # channel 0 (red) normalised: (1 - mean) / std on red pixels, -mean / std on blue ones
        hi, lo = (1 - CLIP_MEAN[0]) / CLIP_STD[0], -CLIP_MEAN[0] / CLIP_STD[0]
        measured = (out[0].mean().item() - lo) / (hi - lo)
        assert math.isclose(measured, red_fraction, abs_tol=0.08)
