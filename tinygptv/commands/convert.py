"""``tinygptv convert``: public TinyGPT-V weights -> one directory in our format, with a report.

Typical use, from the authors' release (ORIGINAL-NOTES, "Checkpoints as released"):

    tinygptv convert --language microsoft/phi-2 --eva-vit eva_vit_g.pth \\
        --blip2-lavis blip2_pretrained_flant5xxl.pth --stage-checkpoint TinyGPT-V_for_Stage4.pth \\
        --out tinygptv-stage4

The report says which tensor came from which file, what was initialised by design and what each
file held that TinyGPT-V does not use; any tensor that does not fit stops the conversion.
"""

from __future__ import annotations

DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="assemble a model from public weights (Phi-2, BLIP-2 / LAVIS, MiniGPT-4, stage checkpoint)",
        description="Assemble a TinyGPT-V model from the public ingredients and write it in our format "
        "(config.json + safetensors + tokenizer). Paths may be local or Hugging Face Hub ids "
        "(files: hf://owner/repo/path). Prints what was loaded from where.",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--preset", help="model preset (default: tinygptv-phi2, or tinygptv-phi2-448 for --stage 4)")
    p.add_argument("--config", help="a TinyGPT-V config JSON instead of a preset")
    p.add_argument("--language", required=True, help="Phi-2 / Phi-1.5 / TinyLlama: a Hugging Face directory or hub id")
    p.add_argument("--blip2", help="vision side from a Hugging Face BLIP-2 directory or hub id")
    p.add_argument("--eva-vit", help="LAVIS eva_vit_g.pth (the ViT)")
    p.add_argument("--blip2-lavis", help="LAVIS blip2_pretrained_flant5xxl.pth (ln_vision, Q-Former, query tokens)")
    p.add_argument("--minigpt4", help="pretrained_minigpt4*.pth: starts the first projection (paper, stage 1)")
    p.add_argument("--stage-checkpoint", help="the authors' TinyGPT-V_for_Stage{1,2,3,4}.pth")
    p.add_argument(
        "--stage", type=int, choices=(1, 2, 3, 4), help="the stage the model is for (default: from the file name)"
    )
    p.add_argument(
        "--trainable-only",
        action="store_true",
        help="write only the trainable tensors, referring to the ingredients for the rest",
    )
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written weights (default float32)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument(
        "--sha256",
        action="append",
        default=[],
        metavar="NAME=HEX",
        help="expected sha256 of a file ingredient (eva_vit, blip2_lavis, minigpt4, stage_checkpoint); repeatable",
    )
    p.add_argument("--offline", action="store_true", help="use only the Hugging Face cache (like HF_HUB_OFFLINE=1)")
    p.set_defaults(func=run)


def _config(args):
    from ..config import TinyGPTVConfig, get_preset

    if args.config and args.preset:
        raise ValueError("give --preset or --config, not both")
    if args.config:
        return TinyGPTVConfig.from_json(args.config)
    if args.preset:
        return get_preset(args.preset)
    from pathlib import Path

    from ..model.weights import stage_from_filename

    stage = args.stage or (stage_from_filename(Path(args.stage_checkpoint)) if args.stage_checkpoint else None)
    return get_preset("tinygptv-phi2-448" if stage == 4 else "tinygptv-phi2")  # stage 4 trains at 448 px


def _sha256(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, digest = pair.partition("=")
        if not sep or not digest:
            raise ValueError(f"--sha256 expects NAME=HEX, got {pair!r}")
        out[name.replace("-", "_")] = digest
    return out


def run(args) -> int:
    import torch

    from ..model.tinygptv import TinyGPTV
    from ..model.weights import Ingredients

    config = _config(args)
    ingredients = Ingredients(
        language=args.language,
        blip2=args.blip2,
        eva_vit=args.eva_vit,
        blip2_lavis=args.blip2_lavis,
        minigpt4=args.minigpt4,
        stage_checkpoint=args.stage_checkpoint,
        stage=args.stage,
        sha256=_sha256(args.sha256),
    )
    model = TinyGPTV.from_ingredients(
        config, ingredients, dtype=getattr(torch, args.dtype), offline=args.offline or None
    )
    print(f"{config.name}: assembled from public weights")
    print(model.load_report.summary())
    base = ingredients.frozen_only() if args.trainable_only else None
    out = model.save_pretrained(
        args.out, trainable_only=args.trainable_only, base=base, max_shard_size=args.max_shard_size
    )
    kind = "trainable-only (frozen parts referenced)" if args.trainable_only else "full"
    print(f"wrote {kind} weights to {out}")
    return 0
