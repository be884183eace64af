"""``tinygptv quantize SRC OUT --mode int8|int4``: save a model with quantized language-model weights,
so that loading it never needs the float weights (nor the time to quantize them)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="write a copy of a model with int8 / int4 language-model weights",
        description="Load SRC (a directory in our format, a hub id, or 'builtin'), merge LoRA, quantize the "
        "language model's Linear layers (weight-only int8, or group-wise int4 with an int8 LM head) and save "
        "it to OUT. The vision encoder stays float (it is quantized dynamically at load time on the CPU).",
    )
    p.add_argument("src", help="model directory, hub id, or 'builtin'")
    p.add_argument("out", help="output directory")
    p.add_argument("--mode", choices=["int8", "int4"], required=True)
    p.add_argument("--group-size", type=int, default=None, help="int4 group size (default 64)")
    p.add_argument(
        "--int8-share",
        type=float,
        default=None,
        help="int4: share of the decoder layers, the first ones, kept int8 (default 3/16; 0 for all-int4)",
    )
    p.add_argument("--no-lm-head", action="store_true", help="keep the LM head in float")
    p.add_argument("--dtype", default="float32", help="dtype of the float parts (default float32)")
    p.add_argument("--offline", action="store_true", default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..inference import builtin_model_dir, resolve_dtype
    from ..model.tinygptv import TinyGPTV
    from ..quantize import INT4_GROUP_SIZE, INT4_INT8_SHARE, quantize_language_model

    src = builtin_model_dir() if args.src == "builtin" else args.src
    model = TinyGPTV.from_pretrained(src, device="cpu", dtype=resolve_dtype(args.dtype, "cpu"), offline=args.offline)
    if model.config.quantization.language_model is not None:
        raise ValueError(f"{args.src} is already quantized ({model.config.quantization.language_model})")
    if model.config.lora.enabled:
        model.merge_lora()
    group_size = INT4_GROUP_SIZE if args.group_size is None else args.group_size
    share = (INT4_INT8_SHARE if args.mode == "int4" else 0.0) if args.int8_share is None else args.int8_share
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"--int8-share must lie in [0, 1], got {share}")
    quantize_language_model(model, args.mode, group_size, include_lm_head=not args.no_lm_head, int8_share=share)
    model.save_pretrained(args.out)
    print(f"wrote {args.mode} model to {args.out}")
    return 0
