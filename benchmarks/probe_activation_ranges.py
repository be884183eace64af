"""How the inputs of the language model's Linear layers spread: are there outlier channels?

    python benchmarks/probe_activation_ranges.py --data WORLD                  # built-in model
    python benchmarks/probe_activation_ranges.py --data WORLD --model DIR --tasks refer vqa --limit 64

Runs the float model over the first ``--limit`` questions per task of a shapes split (the
`tinygptv eval shapes` protocol, greedy answers) and records, at the input of every Linear layer of
the language model, each channel's largest magnitude over every token seen, and each token's
largest magnitude against its median one. Prints a row per layer: largest channel / median channel
(SmoothQuant's case: a few channels far above the rest, which a per-channel scale can move into
the weights before int8 rounds the activations), the five largest channels, and the median over
tokens of a token's largest / median magnitude (what a per-token 8-bit range has to cover).
"""

from __future__ import annotations

import argparse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="shapes world folder")
    p.add_argument("--model", default=None, help="model directory (default: the built-in model)")
    p.add_argument("--split", default="test", choices=["test", "compositional"])
    p.add_argument("--tasks", nargs="+", default=["refer"])
    p.add_argument("--limit", type=int, default=64, help="questions per task")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from tinygptv.eval.shapes import evaluate_shapes
    from tinygptv.inference import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model, "cpu", "fp32")
    channel_max: dict[str, torch.Tensor] = {}
    token_ratios: dict[str, list[torch.Tensor]] = {}

    def record(name: str):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().float()
            top = x.amax(dim=0)
            channel_max[name] = top if name not in channel_max else torch.maximum(channel_max[name], top)
            token_ratios.setdefault(name, []).append(x.amax(dim=1) / x.median(dim=1).values.clamp_min(1e-6))

        return hook

    handles = [
        module.register_forward_hook(record(name))
        for name, module in model.lm.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    try:
        evaluate_shapes(model, args.data, [args.split], args.tasks, limit=args.limit, batch_size=32)
    finally:
        for handle in handles:
            handle.remove()
    print(f"model: {args.model or 'built-in'}; split {args.split}; tasks {' '.join(args.tasks)}; {args.limit} questions each")
    print("| layer input | largest / median channel | five largest channels | token's largest / median (median over tokens) |")
    print("|---|---|---|---|")
    for name in sorted(channel_max):
        top = channel_max[name]
        ratio = float(top.max() / top.median().clamp_min(1e-12))
        largest = ", ".join(f"{v:.1f}" for v in top.topk(min(5, top.numel())).values.tolist())
        per_token = float(torch.cat(token_ratios[name]).median())
        print(f"| {name} | {ratio:.1f} | {largest} | {per_token:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
