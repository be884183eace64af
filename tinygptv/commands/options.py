"""Options shared by the commands that run a model (ask, chat, serve, demo, eval)."""

from __future__ import annotations

TASKS = ("vqa", "caption", "refer", "identify", "grounding", "detection")
"""The stage-4 task identifiers (``tinygptv.chat.TASKS``, repeated here to keep torch out of ``--help``)."""


def add_model_options(p) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="directory in our format or hub id (default: the built-in model)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--quantize", choices=["int8", "int4"], default=None, help="weight-only quantization of the LM")
    g.add_argument(
        "--quantize-backend", choices=["auto", "tinygptv", "bitsandbytes"], default="auto",
        help="who quantizes: tinygptv's int8/int4 CPU kernels or bitsandbytes (default auto: bitsandbytes on CUDA)",
    )  # fmt: skip
    g.add_argument("--offline", action="store_true", default=None, help="never reach the Hub; use the local cache only")
    g.add_argument("--template", default="stage4", help="prompt template (stage4, stage3, stage4-instruct)")


def add_sampling_options(p) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=128, help="at most this many new tokens (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    g.add_argument("--beams", type=int, default=1, help="beam search width")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling")


def sampling_kwargs(args) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        num_beams=args.beams,
        seed=args.seed,
    )


def load_model_from_args(args):
    from ..inference import load_model

    backend = getattr(args, "quantize_backend", "auto")
    return load_model(args.model, args.device, args.dtype, args.quantize, args.offline, quantize_backend=backend)
