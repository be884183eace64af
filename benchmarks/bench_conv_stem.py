"""The micro ViT's convolutional stem computed in channels-last against the default layout, side by side.

    python benchmarks/bench_conv_stem.py                 # batch 16 at 224 px, one thread, 10 rounds
    python benchmarks/bench_conv_stem.py --rounds 2 --batch 2 --image-size 64   # a quick check

Builds the micro preset's vision encoder with the recipe's stem (:data:`tinygptv.recipes.micro.CONV_STEM`)
and times one training step of it (forward, a squared-mean loss, backward; the vision phase's
encoder share of a step, each of its two processes runs batch 16 on one thread) and one forward
without gradients (what the stages and inference do with the frozen encoder), alternating the two
layouts every round so that a machine shared with other work slows both alike: ``default`` and
``channels_last`` are :class:`tinygptv.model.vision.ConvStem` with its ``channels_last`` switch off
and on (on in the model since session 26; the parameters stay plain tensors either way). Prints
each round, the medians and the largest difference of the two layouts' outputs as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


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
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))

    def run(layout: str, train: bool) -> float:
        stem.channels_last = layout == "channels_last"
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
        stem.channels_last = False
        reference = encoder(pixels)
        stem.channels_last = True
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
