"""``tinygptv data ...``: make the synthetic shapes world, and look at what a dataset feeds the model.

* ``tinygptv data make-shapes OUT --n N --seed S``: write the shapes world (all four stages'
  formats, four splits) to ``OUT``.
* ``tinygptv data preview``: print samples of the shapes world or of your own JSON/JSONL data as
  the model sees them (prompt, then ``=>`` the target), and check every record of a custom file.
"""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "data",
        help="make the synthetic shapes world; preview and check datasets",
        description="Data tools: generate the shapes world, preview and check datasets.",
    )
    sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")

    make = sub.add_parser(
        "make-shapes",
        help="generate the synthetic shapes world",
        description="Generate N images of 1-4 coloured shapes with captions, descriptions, VQA, "
        "referring expressions, grounded captions, conversations and text-only instructions, written in "
        "the public formats (webdataset, cc_sbu_align, VQAv2, RefCOCO, Flickr30k Entities, COCO, LLaVA, "
        "Unnatural Instructions), in train/val/test/compositional splits.",
    )
    make.add_argument("out", help="output folder")
    make.add_argument("--n", type=int, default=10000, help="number of images (default 10000)")
    make.add_argument("--seed", type=int, default=0, help="seed: the same seed writes the same world")
    make.add_argument(
        "--image-sizes",
        type=int,
        nargs="+",
        default=[224],
        help="image resolutions to write (224 always; add 448 for stage 4)",
    )
    make.add_argument("--shard-size", type=int, default=1000, help="images per webdataset shard")
    make.set_defaults(func=run_make_shapes)

    preview = sub.add_parser(
        "preview",
        help="print samples as the model sees them; check a custom data file",
        description="Print samples rendered by a template (context, then '=>' and the target). With "
        "--custom every record of the file is checked and the unusable ones are listed.",
    )
    what = preview.add_mutually_exclusive_group(required=True)
    what.add_argument("--shapes", metavar="ROOT", help="a shapes world made by make-shapes")
    what.add_argument(
        "--custom", metavar="FILE", help="your .json / .jsonl data (format: tinygptv.data.readers.custom)"
    )
    preview.add_argument("--stage", type=int, default=4, help="stage whose data and template to show (default 4)")
    preview.add_argument("--split", default="train", help="shapes split (default train)")
    preview.add_argument("--image-root", help="folder the custom file's image paths are relative to")
    preview.add_argument("--template", help="template name (default: the stage's)")
    preview.add_argument("-n", type=int, default=5, help="samples to print (default 5)")
    preview.add_argument("--seed", type=int, default=0, help="mixture seed (shapes)")
    preview.set_defaults(func=run_preview)

    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def run_make_shapes(args) -> int:
    from ..data.shapes import make_shapes

    if args.n < 4:
        raise ValueError(f"--n must be at least 4 (one image per split), got {args.n}")
    info = make_shapes(args.out, args.n, seed=args.seed, image_sizes=args.image_sizes, shard_size=args.shard_size)
    splits = ", ".join(f"{k} {v}" for k, v in info.splits.items())
    print(f"wrote {info.n} images ({splits}) to {info.root} in {info.seconds:.1f} s")
    held = ", ".join(" ".join(p) for p in info.held_out_pairs)
    print(f"held out for the compositional split: {held}")
    return 0


def run_preview(args) -> int:
    from ..data.templates import get_template, template_for_stage

    template = get_template(args.template) if args.template else template_for_stage(args.stage)
    if args.custom:
        return _preview_custom(args, template)
    from ..data.mixture import Mixture
    from ..data.sample import BadSample
    from ..data.shapes import shapes_sources

    sources, ratios = shapes_sources(args.shapes, args.stage, args.split)
    mixture = Mixture(sources, ratios, seed=args.seed)
    for draw in range(args.n):
        name, _ = mixture.locate(draw)
        try:
            sample = mixture.load(draw)
        except BadSample as err:
            print(f"--- draw {draw} ({name}): skipped: {err}")
            continue
        _print_sample(f"draw {draw} ({name}, {sample.task})", template, sample)
    return 0


def _preview_custom(args, template) -> int:
    from ..data.readers import CustomData
    from ..data.sample import BadSample

    source = CustomData(args.custom, image_root=args.image_root)
    bad = []
    shown = 0
    for index in range(len(source)):
        try:
            sample = source.get(index)
            template.chunks(sample)
        except (BadSample, ValueError) as err:
            bad.append(str(err))
            continue
        if shown < args.n:
            _print_sample(f"record {index} ({sample.task})", template, sample)
            shown += 1
    print(f"{len(source)} records, {len(source) - len(bad)} usable, {len(bad)} unusable")
    for message in bad:
        print(f"  {message}")
    return 1 if bad else 0


def _print_sample(title: str, template, sample) -> None:
    print(f"--- {title}: {len(sample.images)} image(s)")
    for text, is_target in template.chunks(sample):
        print(("=> " if is_target else "") + text)
