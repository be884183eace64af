"""``tinygptv serve``: the OpenAI-compatible HTTP API (FastAPI + uvicorn)."""

from __future__ import annotations

import os
import sys

from .options import add_model_options, load_model_from_args

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve the model over HTTP: POST /v1/chat/completions (OpenAI Chat Completions, images "
        "as base64 data URLs, streaming), GET /v1/models, GET /health. Concurrent requests with the same "
        "sampling settings are decoded in batches. Extra request field: task (vqa, caption, refer, grounding, "
        "identify, detection); answers carry their parsed boxes in choices[0].message.boxes.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("TINYGPTV_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $TINYGPTV_API_KEY, else no auth)",
    )
    p.add_argument("--served-model-name", default=None, help="model name clients use (default: the model's name)")
    p.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="also fetch http(s) image URLs (off: the server would fetch any address a client names)",
    )
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together (1: one at a time)")
    g.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 503 (default 64)")
    g.add_argument("--batch-wait-ms", type=float, default=5.0, help="wait this long to fill a batch (default 5)")
    g.add_argument("--max-images", type=int, default=4, help="images per request (default 4)")
    g.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="pixels per image (default 4096x4096)")
    g.add_argument("--max-image-mb", type=float, default=10.0, help="encoded size per image (default 10 MB)")
    g.add_argument("--max-body-mb", type=float, default=20.0, help="request body size (default 20 MB)")
    g.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    g.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="most prompt tokens, image slots included (default: the model's context)",
    )
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_model_options(p)
    p.set_defaults(func=run)


def settings_from_args(args):
    from ..serve.settings import ServeSettings

    return ServeSettings(
        api_key=args.api_key or None,
        model_name=args.served_model_name,
        template=args.template,
        allow_remote_images=args.allow_remote_images,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_image_bytes=int(args.max_image_mb * 2**20),
        max_image_pixels=args.max_image_pixels,
        max_images=args.max_images,
        max_tokens_limit=args.max_tokens_limit,
        max_prompt_tokens=args.max_prompt_tokens,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        batch_wait_ms=args.batch_wait_ms,
    )


def run(args) -> int:
    try:
        import uvicorn

        from ..serve.api import create_app
    except ImportError as err:
        raise ValueError(f"serving needs the serve extra: pip install 'tinygptv[serve]' ({err})") from None
    settings = settings_from_args(args)
    settings.validate()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.host not in LOOPBACK and not settings.api_key:
        print(
            f"tinygptv serve: warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
            file=sys.stderr,
        )
    model = load_model_from_args(args)  # before the server starts, so a bad --model is one clear error line
    app = create_app(model, settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
