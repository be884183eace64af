"""The micro ViT's convolutional stem computed in channels-last against the default layout, side by side.

    python benchmarks/bench_conv_stem.py                 # batch 16 at 224 px, one thread, 10 rounds
    python benchmarks/bench_conv_stem.py --rounds 2 --batch 2 --image-size 64   # a quick check

Builds the micro preset's vision encoder with the recipe's stem (:data:`tinygptv.recipes.micro.CONV_STEM`)
and times one training step of it (forward, a squared-mean loss, backward; the vision phase's
encoder share of a step, each of its two processes runs batch 16 on one thread) and one forward
without gradients (what the stages and inference do with the frozen encoder), alternating the two
layouts every round so that a machine shared with other work slows both alike. ``default`` is
:class:`tinygptv.model.vision.ConvStem`'s own forward (the default layout); ``channels_last`` runs
the same parameters with the pixels and each convolution's weight in channels-last (the
parameters stay plain tensors; the gradients come back in their layout). Prints each round, the
medians and the largest difference of the two layouts' outputs as JSON.

Not in the model: the values differ from the default layout's by rounding (~5e-6), so the built-in
model, whose vision encoder was trained in the default layout, would no longer be rebuilt bit for
bit by its recipe; it waits for the next build of the vision phase.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


class _PlainStridedGrad(torch.autograd.Function):
    """The identity, whose gradient comes back in the default layout's strides (a 1x1 kernel's
    gradient from a channels-last convolution has others, which DDP's gradient buckets copy)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> torch.Tensor:
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.clone(memory_format=torch.contiguous_format)


def channels_last_forward(stem):
    """``stem``'s forward (a :class:`~tinygptv.model.vision.ConvStem`) with its convolutions in channels-last."""

    def conv(layer: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        weight = _PlainStridedGrad.apply(layer.weight).contiguous(memory_format=torch.channels_last)
        return torch.nn.functional.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.contiguous(memory_format=torch.channels_last)
        for layer in stem.layers:
            x = conv(layer, x) if isinstance(layer, torch.nn.Conv2d) else layer(x)
        return conv(stem.proj, x)

    return forward


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    from tinygptv.config import get_preset
    from tinygptv.model.vision import VisionEncoder
    from tinygptv.recipes.micro import CONV_STEM

    torch.set_num_threads(args.threads)
    config = get_preset("tinygptv-micro").replace(**{"vision.conv_stem": CONV_STEM, "vision.image_size": args.image_size})
    torch.manual_seed(0)
    encoder = VisionEncoder(config.vision)
    stem = encoder.model.embeddings.patch_embedding
    plain = stem.forward
    channels_last = channels_last_forward(stem)
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))

    def run(layout: str, train: bool) -> float:
        stem.forward = channels_last if layout == "channels_last" else plain
        start = time.perf_counter()
        if train:
            encoder.zero_grad(set_to_none=True)
            encoder(pixels).square().mean().backward()
        else:
            with torch.no_grad():
                encoder(pixels)
        return time.perf_counter() - start

    layouts = ("default", "channels_last")
    times = {(layout, train): [] for layout in layouts for train in (True, False)}

    def figures(pick) -> dict[str, float]:
        return {f"{layout}_{'train' if train else 'forward'}_s": round(pick(t), 4) for (layout, train), t in times.items()}

    for layout in layouts:  # warm-up: oneDNN picks and caches its kernels on the first call
        run(layout, True)
        run(layout, False)
    for i in range(args.rounds):
        order = layouts if i % 2 == 0 else layouts[::-1]
        for train in (True, False):
            for layout in order:
                times[layout, train].append(run(layout, train))
        print(json.dumps({"round": i, **figures(lambda t: t[-1])}))
    with torch.no_grad():
        stem.forward = plain
        reference = encoder(pixels)
        stem.forward = channels_last
        difference = (encoder(pixels) - reference).abs().max().item()
    medians = figures(statistics.median)
    medians["train_speedup"] = round(medians["default_train_s"] / medians["channels_last_train_s"], 3)
    medians["forward_speedup"] = round(medians["default_forward_s"] / medians["channels_last_forward_s"], 3)
    faster = sum(a > b for a, b in zip(times["default", True], times["channels_last", True]))
    faster = f"{faster}/{args.rounds}"
    print(json.dumps({"medians": medians, "train_rounds_channels_last_faster": faster, "max_abs_difference": difference}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
