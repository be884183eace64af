"""``tinygptv chat [IMAGE]``: an interactive, streaming, multi-turn conversation."""

from __future__ import annotations

import sys

from .options import TASKS, add_model_options, add_sampling_options, load_model_from_args, sampling_kwargs

HELP = """commands: /image PATH  talk about another image (starts over)
          /task NAME   task identifier for the next questions (vqa, caption, refer, identify, grounding, detection, none)
          /reset       forget the conversation (keep the image)
          /quit        leave"""


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat about an image in the terminal (streaming, multi-turn)")
    p.add_argument("image", nargs="?", default=None, help="image to talk about (or /image PATH later)")
    p.add_argument("--task", choices=TASKS, default=None, help="task identifier to start with")
    p.add_argument("--draw", metavar="OUT.png", default=None, help="after each answer with boxes, save the drawing here")
    add_model_options(p)
    add_sampling_options(p)
    p.set_defaults(func=run)


def run(args, stdin=None, stdout=None) -> int:
    from ..chat import load_image

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    image = load_image(args.image) if args.image else None  # a bad image fails before the model loads
    model = load_model_from_args(args)
    conv = model.chat(args.template, **sampling_kwargs(args))
    task = args.task
    if image is not None:
        conv.add_image(image)
    print(f"TinyGPT-V chat ({model.config.name}). {HELP}", file=stdout)
    while True:
        print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # end of input
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command == "/quit":
                return 0
            if command == "/reset":
                conv.reset(keep_images=True)
                print("(conversation reset)", file=stdout)
            elif command == "/image":
                try:
                    conv.add_image(rest.strip())
                    print(f"(now talking about {rest.strip()})", file=stdout)
                except (ValueError, FileNotFoundError) as err:
                    print(f"error: {err}", file=stdout)
            elif command == "/task":
                name = rest.strip()
                if name not in ("", "none", *TASKS):
                    print(f"error: unknown task {name!r}; tasks are {', '.join(TASKS)}, none", file=stdout)
                    continue
                task = None if name in ("", "none") else name
                print(f"(task: {task or 'none'})", file=stdout)
            else:
                print(HELP, file=stdout)
            continue
        print("tinygptv> ", end="", file=stdout, flush=True)
        try:
            for piece in conv.stream(line, task=task):
                print(piece, end="", file=stdout, flush=True)
        except ValueError as err:
            print(f"error: {err}", file=stdout)
            continue
        print(file=stdout)
        if args.draw and conv.last_answer.boxes and conv.images:
            from ..visualize import draw_boxes

            draw_boxes(conv.images[0], conv.last_answer.boxes).save(args.draw)
            print(f"(boxes drawn in {args.draw})", file=stdout)
