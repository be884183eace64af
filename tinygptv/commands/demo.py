"""``tinygptv demo``: the web demo (Gradio) in the browser."""

from __future__ import annotations

from .options import add_model_options, load_model_from_args


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="chat about images in a web page (Gradio)",
        description="A web page: upload an image, chat with streaming answers, task buttons (caption, VQA, "
        "refer, grounding, identify), predicted boxes drawn on the image with their phrases.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="initial answer length limit (default 128)")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        from ..serve.demo import create_demo, launch_demo
    except ImportError as err:
        raise ValueError(f"the demo needs the serve extra: pip install 'tinygptv[serve]' ({err})") from None
    model = load_model_from_args(args)
    demo = create_demo(model, template=args.template, max_new_tokens=args.max_new_tokens)
    launch_demo(demo, host=args.host, port=args.port)
    return 0
