"""Quality gate of weight-only quantization on a trained model: do int8 / int4 answers agree with fp32?

    python benchmarks/bench_quantize_agreement.py --data WORLD            # built-in model, shapes test split
    python benchmarks/bench_quantize_agreement.py --data WORLD --model DIR --tasks vqa refer

WORLD is a shapes world (`tinygptv data make-shapes WORLD`, or the `world/` folder of a
`tinygptv recipe micro` run). The model answers every question of the split in fp32, then with its
language model quantized to int8 and to int4 (the same greedy protocol as `tinygptv eval shapes`),
and the script prints, per mode and task, the share of answers identical to fp32 (the target is
>= 98 %), for box answers the share that name the same object (IoU >= 0.5 with fp32's box), and
each mode's own accuracy; a row ``all`` pools the tasks' questions (the gate read over the whole
split rather than per task). Add ``bf16`` to ``--modes`` to see how far the float precision alone moves
the answers, with no quantization. On a GPU (``--device cuda``) the quantized modes run through
bitsandbytes (:mod:`tinygptv.quantize_bnb`).
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="shapes world folder")
    p.add_argument("--model", default=None, help="model directory (default: the built-in model)")
    p.add_argument("--split", default="test", choices=["test", "compositional"])
    p.add_argument("--tasks", nargs="+", default=["vqa", "refer", "identify"])
    p.add_argument("--limit", type=int, default=None, help="questions per task (default: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--modes", nargs="+", default=["fp32", "int8", "int4"],
        help="the first is the reference; fp32 / bf16 / fp16 run unquantized, int8 / int4 quantize the LM",
    )  # fmt: skip
    p.add_argument("--dtype", default=None, help="float dtype of the quantized runs (default: fp32 on the CPU, bf16 on CUDA)")
    p.add_argument(
        "--quantize-backend", default="auto", choices=["auto", "tinygptv", "bitsandbytes"],
        help="auto: bitsandbytes on CUDA, tinygptv's own layers on the CPU",
    )  # fmt: skip
    args = p.parse_args(argv)

    import torch

    from tinygptv.eval.shapes import evaluate_shapes
    from tinygptv.inference import load_model

    torch.set_num_threads(args.threads)
    runs = {}
    for mode in args.modes:
        if mode in ("int8", "int4"):
            model = load_model(args.model, args.device, args.dtype, quantize=mode, quantize_backend=args.quantize_backend)
        else:
            model = load_model(args.model, args.device, mode)
        start = time.perf_counter()
        summary = evaluate_shapes(
            model, args.data, [args.split], args.tasks, limit=args.limit, batch_size=args.batch_size, return_predictions=True
        )
        runs[mode] = summary
        print(f"{mode}: {time.perf_counter() - start:.1f} s", flush=True)
        del model

    first = args.modes[0]
    reference = runs[first]["predictions"]
    print(f"\nmodel: {args.model or 'built-in'}; split {args.split}; device {args.device}; torch threads {args.threads}")
    print(f"| mode | task | n | answers identical to {first} (%) | same box as {first} (IoU >= 0.5, %) | accuracy (%) |")
    print("|---|---|---|---|---|---|")
    for mode, summary in runs.items():
        total = same_total = agree_total = 0
        for task in args.tasks:
            ids = [q for q in reference if q.split("/")[1] == task]
            same = sum(summary["predictions"][q] == reference[q] for q in ids)
            boxes = same_boxes(reference, summary["predictions"], ids)
            accuracy = summary["accuracy"][args.split][task]
            n = max(len(ids), 1)
            box_cell = "-" if boxes is None else f"{100 * boxes / n:.1f}"
            print(f"| {mode} | {task} | {len(ids)} | {100 * same / n:.1f} | {box_cell} | {accuracy:.1f} |")
            total, same_total = total + len(ids), same_total + same
            agree_total += same if boxes is None else boxes  # the same answer: its text, or for a box its object
        if len(args.tasks) > 1:
            n = max(total, 1)
            print(f"| {mode} | all | {total} | {100 * same_total / n:.1f} | {100 * agree_total / n:.1f} (*) | - |")
    if len(args.tasks) > 1:
        print("(*) all: identical text for answers that are not boxes, the same object for box answers")
    return 0


def same_boxes(reference: dict[str, str], answers: dict[str, str], ids: list[str]) -> int | None:
    """How many of ``ids`` answer with a box that picks out the reference's object (IoU >= 0.5, the
    `[refer]` benchmark's own criterion); None where the reference answers are not boxes. A box
    answer is text of four coordinates, so a coordinate one step over, which the precision of the
    float arithmetic alone can cause, makes the answer differ without changing the object it names."""
    from tinygptv.data.boxes import box_iou, parse_box

    wanted = [parse_box(reference[q]) for q in ids]
    if not ids or sum(box is not None for box in wanted) < len(ids) / 2:
        return None
    count = 0
    for q, box in zip(ids, wanted):
        other = parse_box(answers[q])
        count += box is not None and other is not None and box_iou(box, other) >= 0.5
    return count


if __name__ == "__main__":
    raise SystemExit(main())
