"""``tinygptv bench``: inference speed and memory of a preset at real size, random weights."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measure encode time, TTFT, decode tokens/s and peak RSS at real size",
        description="Build PRESET with random weights (speed and memory do not depend on their values) in one "
        "precision, and measure image-encode time, TTFT, decode tokens/s and peak RSS; in the same run, the "
        "baseline (transformers generate on the bf16 model, in a child process) and the memory-bandwidth limit.",
    )
    p.add_argument("--preset", default="tinygptv-phi2")
    p.add_argument("--quantize", choices=["none", "fp32", "int8", "int4"], default="none",
                   help="none = bf16; fp32 = no reduced precision; int8 / int4 = weight-only LM")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens to decode (default 32)")
    p.add_argument("--text-tokens", type=int, default=40, help="text tokens after the image (default 40)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..bench import bench

    quantize = None if args.quantize == "none" else args.quantize
    result = bench(args.preset, quantize, args.new_tokens, args.text_tokens, args.threads)
    result["quantize"] = None if quantize in (None, "fp32") else quantize
    if args.json:
        print(json.dumps(result))
        return 0
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    return 0
