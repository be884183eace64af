"""onnxruntime int4 with and without fusing the layers that share an input, side by side.

    TINYGPTV_INT4_KERNEL=onnxruntime OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_int4_fusion.py
    python benchmarks/bench_int4_fusion.py --preset tinygptv-tiny --rounds 2     # a quick check

Builds the real-size preset with random weights twice in one process, int4 on onnxruntime's
``MatMulNBits`` as ``tinygptv bench`` does: once with each Linear layer its own call, once with
q, k, v and fc1 of each decoder layer as one call (:class:`tinygptv.quantize.SharedInputGroup`).
Then it times prefill (one image's 32 tokens + 40 text tokens) and 32 decoded tokens on each, in
alternating order for ``--rounds`` rounds, so that a machine shared with other work slows both
alike, and prints each round and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tinygptv-phi2")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    os.environ.setdefault("TINYGPTV_INT4_KERNEL", "onnxruntime")

    import torch

    import tinygptv.quantize as quantize
    from tinygptv.bench import _time_stream, materialise
    from tinygptv.data.encoding import IMAGE_TOKEN_ID

    if quantize.int4_cpu_kernel() != "onnxruntime":
        print("fusion applies to onnxruntime's int4 kernel: set TINYGPTV_INT4_KERNEL=onnxruntime")
        return 2
    torch.set_num_threads(args.threads)
    fuse = quantize.fuse_shared_inputs
    quantize.fuse_shared_inputs = lambda root: 0  # pack_for_cpu looks it up in the module
    try:
        separate = materialise(args.preset, "int4")
    finally:
        quantize.fuse_shared_inputs = fuse
    fused = materialise(args.preset, "int4")
    groups = len({id(m._packed.group) for m in fused.lm.modules() if isinstance(getattr(m, "_packed", None), quantize._FusedSlice)})
    calls = sum(isinstance(m, quantize.Int4Linear) for m in separate.lm.modules())
    print(f"{args.preset}: {calls} int4 layers; fused: {groups} groups, {calls - 3 * groups} calls per token where there were {calls}")

    torch.manual_seed(0)
    q = separate.num_image_tokens
    ids = torch.randint(10, separate.config.language.vocab_size - 10, (1, 1 + q + 40))
    ids[0, 1 : 1 + q] = IMAGE_TOKEN_ID
    pixels = torch.randn(1, 3, separate.config.vision.image_size, separate.config.vision.image_size)
    results: dict[str, list[dict]] = {"separate": [], "fused": []}
    with torch.inference_mode():
        models = {name: (m, m.embed(ids, m.encode_images(pixels))) for name, m in (("separate", separate), ("fused", fused))}
        order = ["separate", "fused"]
        for r in range(args.rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                model, embeds = models[name]
                row = _time_stream(model.lm, embeds, args.new_tokens, 0.0)
                results[name].append(row)
                print(f"round {r} {name:<8} prefill {row['prefill_s']:.3f} s, decode {row['decode_tok_s']:.2f} tok/s", flush=True)
    summary = {
        name: {
            "median_prefill_s": round(statistics.median(r["prefill_s"] for r in rows), 3),
            "median_decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in rows), 2),
            "best_decode_tok_s": max(r["decode_tok_s"] for r in rows),
        }
        for name, rows in results.items()
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
