"""Decode speed with transformers' DynamicCache against our GrowingLayer cache, side by side,
and prefill with the LM head over every prompt position against the last one only.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_kv_cache.py                  # int8 Phi-2, 10 rounds
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_kv_cache.py --text-tokens 40 600
    python benchmarks/bench_kv_cache.py --preset tinygptv-tiny --rounds 2        # a quick check

Builds the real-size preset with random weights once (``--quantize``, int8 by default, as
``tinygptv bench`` does), then times prefill (one image's 32 tokens + ``--text-tokens`` text tokens)
and ``--new-tokens`` decoded tokens through our KV-cached loop
(:func:`tinygptv.generate.stream_tokens`) with each cache, alternating the order every round so
that a machine shared with other work slows both alike. ``dynamic`` is transformers'
``DynamicCache`` (a ``torch.cat`` of every layer's keys and values per token); ``growing`` is
:func:`tinygptv.kv_cache.growing_cache` (appends into preallocated room). Both must decode the same
tokens (checked, greedy). Then it times the prefill alone, alternating, with logits for every
position (what ``lm(inputs_embeds=...)`` computes by default) and for the last one only
(``logits_to_keep=1``, what the loop asks for). It prints each round and the medians as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tinygptv-phi2")
    p.add_argument("--quantize", default="int8", choices=["fp32", "bf16", "int8", "int4"])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--text-tokens", type=int, nargs="+", default=[40])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch
    from transformers import DynamicCache

    from tinygptv.bench import materialise
    from tinygptv.data.encoding import IMAGE_TOKEN_ID
    from tinygptv.generate import SamplingParams, stream_tokens
    from tinygptv.kv_cache import growing_cache
    from tinygptv.model.language import cache_argument

    torch.set_num_threads(args.threads)
    model = materialise(args.preset, args.quantize)
    lm = model.lm
    caches = {"dynamic": lambda: DynamicCache(config=lm.config), "growing": lambda: growing_cache(lm.config)}

    def timed(make, embeds):
        stream = stream_tokens(lm, embeds, make(), SamplingParams(max_new_tokens=args.new_tokens), [])
        t = time.perf_counter()
        tokens = [next(stream)]
        first = time.perf_counter()
        tokens += list(stream)
        end = time.perf_counter()
        return tokens, {"prefill_s": first - t, "decode_tok_s": (len(tokens) - 1) / (end - first)}

    summary = {}
    q = model.num_image_tokens
    pixels = torch.randn(1, 3, model.config.vision.image_size, model.config.vision.image_size)
    with torch.inference_mode():
        image = model.encode_images(pixels)
        for text in args.text_tokens:
            torch.manual_seed(0)
            ids = torch.randint(10, model.config.language.vocab_size - 10, (1, 1 + q + text))
            ids[0, 1 : 1 + q] = IMAGE_TOKEN_ID
            embeds = model.embed(ids, image)
            for make in caches.values():  # warm-up: packs quantized weights, first calls of each shape
                list(stream_tokens(lm, embeds, make(), SamplingParams(max_new_tokens=3), []))
            rows: dict[str, list[dict]] = {name: [] for name in caches}
            tokens = {}
            order = list(caches)
            for r in range(args.rounds):
                for name in order if r % 2 == 0 else order[::-1]:
                    tokens[name], row = timed(caches[name], embeds)
                    rows[name].append(row)
                    print(f"context {ids.shape[1]:>5}  round {r} {name:<8} prefill {row['prefill_s']:.3f} s, "
                          f"decode {row['decode_tok_s']:.2f} tok/s", flush=True)
            if tokens["dynamic"] != tokens["growing"]:
                print("the two caches decoded different tokens")
                return 1
            summary[ids.shape[1]] = {
                name: {
                    "median_prefill_s": round(statistics.median(r["prefill_s"] for r in rs), 3),
                    "median_decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in rs), 2),
                    "growing_faster_rounds": None,
                }
                for name, rs in rows.items()
            }
            wins = sum(g["decode_tok_s"] > d["decode_tok_s"] for g, d in zip(rows["growing"], rows["dynamic"]))
            summary[ids.shape[1]]["growing"]["growing_faster_rounds"] = f"{wins} of {args.rounds}"
            del summary[ids.shape[1]]["dynamic"]["growing_faster_rounds"]
            prefill: dict[int, list[float]] = {0: [], 1: []}
            for r in range(args.rounds):
                for keep in (0, 1) if r % 2 == 0 else (1, 0):
                    t = time.perf_counter()
                    lm(inputs_embeds=embeds, use_cache=True, logits_to_keep=keep, **cache_argument(lm, caches["growing"]()))
                    prefill[keep].append(time.perf_counter() - t)
            summary[ids.shape[1]]["prefill_all_logits_s"] = round(statistics.median(prefill[0]), 3)
            summary[ids.shape[1]]["prefill_last_logits_s"] = round(statistics.median(prefill[1]), 3)
            print(f"context {ids.shape[1]:>5}  prefill, logits of every position {summary[ids.shape[1]]['prefill_all_logits_s']} s, "
                  f"of the last {summary[ids.shape[1]]['prefill_last_logits_s']} s (medians)", flush=True)
    print(json.dumps({"preset": args.preset, "quantize": args.quantize, "new_tokens": args.new_tokens, "contexts": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
