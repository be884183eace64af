"""``tinygptv info PRESET``: the architecture and parameter counts per part and per stage."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "info",
        help="print a preset's architecture and parameter counts",
        description="Print a preset's architecture and its parameter counts per part, total, and "
        "trainable per stage. The model is built on the meta device: no memory, no download.",
    )
    p.add_argument("preset", help="preset name, e.g. tinygptv-phi2 (see --list)", nargs="?")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--list", action="store_true", help="list the preset names and exit")
    p.set_defaults(func=run)


def parameter_counts(config) -> dict:
    """Counts per part for ``config``; LoRA is counted only under ``trainable``."""
    import torch

    from ..model.tinygptv import TinyGPTV
    from ..stages import STAGES, trainable_parameter_names

    with torch.device("meta"):
        model = TinyGPTV(config)
    sizes = {name: p.numel() for name, p in model.named_parameters()}

    def part(prefixes: tuple[str, ...]) -> int:
        return sum(n for name, n in sizes.items() if name.startswith(prefixes) and ".lora_" not in name)

    counts = {
        "vision": part(("vision.",)),
        "qformer": part(("qformer.",)),
        "projection": part(("vision_proj.", "lm_proj.")),
        "language_model": part(("language_model.",)),
    }
    counts["total"] = sum(counts.values())
    counts["trainable"] = {
        str(k): sum(sizes[n] for n in trainable_parameter_names(model, stage)) for k, stage in STAGES.items()
    }
    return counts


def describe(config) -> str:
    v, q, lang, lora = config.vision, config.qformer, config.language, config.lora
    tokens = (v.image_size // v.patch_size) ** 2 + 1
    lines = [
        f"{config.name}",
        f"  vision     ViT {v.num_layers} layers x {v.hidden_size} wide, {v.num_heads} heads, MLP "
        f"{v.intermediate_size}, patch {v.patch_size}, {v.image_size} px -> {tokens} tokens, + ln_vision",
        f"  qformer    {q.num_layers} layers x {q.hidden_size}, cross-attention every "
        f"{q.cross_attention_frequency}, {q.num_query_tokens} query tokens",
        f"  projection {q.hidden_size} -> {config.projection_hidden_size} -> {lang.hidden_size}",
        f"  language   {lang.arch}: {lang.num_layers} layers x {lang.hidden_size}, {lang.num_heads} heads, "
        f"MLP {lang.intermediate_size}, vocab {lang.vocab_size}, context {lang.max_position_embeddings}",
        f"  TinyGPT-V  qk_norm={lang.qk_norm} post_attention_rmsnorm={lang.post_attention_rmsnorm} "
        f"train_input_layernorm={config.train_input_layernorm} "
        + (f"LoRA r={lora.r} alpha={lora.alpha} dropout={lora.dropout}" if lora.enabled else "LoRA off"),
    ]
    return "\n".join(lines)


def run(args) -> int:
    from ..config import PRESETS, get_preset

    if args.list or not args.preset:
        print("\n".join(sorted(PRESETS)))
        return 0
    config = get_preset(args.preset)
    counts = parameter_counts(config)
    if args.json:
        print(json.dumps(counts))
        return 0
    print(describe(config))
    print("\nparameters")
    for key in ("vision", "qformer", "projection", "language_model", "total"):
        print(f"  {key:<15}{counts[key]:>16,}")
    print("trainable per stage (LoRA included from stage 2)")
    for stage, n in counts["trainable"].items():
        print(f"  stage {stage:<9}{n:>16,}")
    return 0
