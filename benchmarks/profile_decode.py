"""Where decoding time goes at real size: torch.profiler over a few decoded tokens.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/profile_decode.py --quantize int8     # or int4, bf16
    OMP_WAIT_POLICY=PASSIVE python benchmarks/profile_decode.py --cache dynamic --text-tokens 600
    python benchmarks/profile_decode.py --preset tinygptv-micro --quantize int4 --tokens 4

Builds the random-weight model as ``tinygptv bench`` does, prefills one image + 40 text tokens,
then profiles ``--tokens`` decode steps (with our KV cache, or ``--cache dynamic`` for
transformers' ``DynamicCache``) and prints the operators by self CPU time, and the share of
the step spent in the weight matmuls (what the memory-bandwidth limit bounds) against the rest.
"""

from __future__ import annotations

import argparse
import time

MATMUL_OPS = ("quantized::linear_dynamic", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu", "aten::addmm",
              "onnxruntime::MatMulNBits",
              "aten::mm", "aten::linear")


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tinygptv.bench import materialise
    from tinygptv.data.encoding import IMAGE_TOKEN_ID
    from transformers import DynamicCache

    from tinygptv.generate import SamplingParams, new_cache, stream_tokens

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tinygptv-phi2")
    p.add_argument("--quantize", default="int8", choices=["bf16", "fp32", "int8", "int4"])
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--text-tokens", type=int, default=40, help="text tokens after the image's in the prompt")
    p.add_argument("--cache", default="ours", choices=["ours", "dynamic"],
                   help="ours: tinygptv.generate.new_cache (GrowingLayer); dynamic: transformers' DynamicCache")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = materialise(args.preset, args.quantize)
    dtype = torch.bfloat16 if args.quantize == "bf16" else torch.float32
    q = model.num_image_tokens
    ids = torch.randint(10, min(1000, model.config.language.vocab_size - 10), (1, 1 + q + args.text_tokens))
    ids[0, 1 : 1 + q] = IMAGE_TOKEN_ID
    size = model.config.vision.image_size
    with torch.inference_mode():
        embeds = model.embed(ids, model.encode_images(torch.randn(1, 3, size, size, dtype=dtype)))
        lm = model.lm
        list(stream_tokens(lm, embeds, new_cache(lm), SamplingParams(max_new_tokens=2), []))  # warm-up, packing
        cache = new_cache(lm) if args.cache == "ours" else DynamicCache(config=lm.config)
        steps = stream_tokens(lm, embeds, cache, SamplingParams(max_new_tokens=args.tokens + 1), [])
        next(steps)  # prefill + first token, outside the profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            n = sum(1 for _ in steps)
            wall = time.perf_counter() - t
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    print(f"{args.preset} {args.quantize}, {args.cache} cache, context {ids.shape[1]}: {n} tokens, {n / wall:.2f} tok/s (profiled), {wall / n * 1e3:.1f} ms/token; "
          f"weight matmuls {matmul / total:.0%} of self CPU time, everything else {1 - matmul / total:.0%}")


if __name__ == "__main__":
    main()
