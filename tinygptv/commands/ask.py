"""``tinygptv ask IMAGE "question"``: one answer, optionally as JSON and with boxes drawn."""

from __future__ import annotations

import json

from .options import TASKS, add_model_options, add_sampling_options, load_model_from_args, sampling_kwargs


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ask",
        help="answer one question about an image",
        description="Answer one question about an image. Grounding answers come back with their boxes "
        "in pixels of IMAGE.",
    )
    p.add_argument("image", help="image file ('-' for none: a text-only question)")
    p.add_argument("question", help="the question or instruction")
    p.add_argument("--task", choices=TASKS, default=None,
                   help="task identifier of the stage-4 template")
    p.add_argument("--json", action="store_true", help='print {"answer": ..., "boxes": [...]} on one line')
    p.add_argument("--draw", metavar="OUT.png", default=None, help="save the image with the predicted boxes drawn")
    add_model_options(p)
    add_sampling_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..chat import load_image

    image = None if args.image == "-" else load_image(args.image)
    model = load_model_from_args(args)
    answer = model.ask(image, args.question, task=args.task, template=args.template, **sampling_kwargs(args))
    if args.draw:
        if image is None:
            raise ValueError("--draw needs an image")
        from ..visualize import draw_boxes

        draw_boxes(image, answer.boxes).save(args.draw)
    if args.json:
        print(json.dumps(answer.to_dict()))
    else:
        print(answer.text)
    return 0
