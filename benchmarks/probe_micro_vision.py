"""What a micro model's ViT + Q-Former write: its 32 image tokens read back as scene tokens.

    python benchmarks/probe_micro_vision.py --data WORLD [--model DIR] [--images 200] [--split test]

``WORLD`` is the shapes world the model was trained on (``tinygptv recipe micro`` writes it to
``RUN/world``); ``--model`` a whole micro model (default: the built-in one). Each image's 32 image
tokens are read back as the scene tokens the language model was pretrained on (objects in reading
order, :func:`tinygptv.recipes.pretrain.scene_tokens`), two ways:

* ``projection``: the model's own image tokens (Q-Former, then both projections, as the LM gets
  them), each the row of the LM's scene table (its embeddings plus one row per object token) with
  the largest dot product;
* ``probe``: a linear read-out of the Q-Former's outputs fitted on ``--fit-images`` training images
  (cross-entropy against the scene table, ``--steps`` Adam steps), applied to the split's images:
  what the Q-Former's outputs hold, whatever the projections learnt to pass on.

For each, per slot kind: accuracy of the background words, of the object tokens (and of each word
an object token sums: size, colour, shape, position), of the box coordinates (exact, within 1 and 3
of 100), and per object: its box at IoU > 0.5 (the four coordinate tokens of its group) and all of
it right (object token and box). Empty groups count as objects "absent" and are scored apart.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F


def main(argv: list[str] | None = None) -> int:
    from tinygptv.data.boxes import box_iou
    from tinygptv.inference import builtin_model_dir
    from tinygptv.model.tinygptv import TinyGPTV
    from tinygptv.recipes.pretrain import (
        GROUP,
        OBJECT_ID_BASE,
        SCENE_LENGTH,
        SCENE_OBJECTS,
        ImageBank,
        coordinate_token_ids,
        object_parts,
        object_words,
        reading_order,
        scene_table,
        scene_table_ids,
        scene_tokens,
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the shapes world (RUN/world)")
    parser.add_argument("--model", default=None, help="a micro model folder (default: the built-in model)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--images", type=int, default=200, help="first N images of the split")
    parser.add_argument("--fit-images", type=int, default=2000, help="training images the probe is fitted on")
    parser.add_argument("--steps", type=int, default=400, help="Adam steps of the probe")
    parser.add_argument("--words", action="store_true", help="scenes of words in a row, not object tokens")
    parser.add_argument("--no-positions", action="store_true", help="object tokens without position words")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    model = TinyGPTV.from_pretrained(args.model or builtin_model_dir()).eval()
    tokenizer = model.tokenizer
    objects, positions = not args.words, not (args.words or args.no_positions)
    weight = model.lm.get_input_embeddings().weight.detach().float()
    vocab = weight.shape[0]
    table = scene_table(weight, object_parts(tokenizer, positions)) if objects else weight
    kinds = object_words(positions)
    coordinates = {i: v for v, i in enumerate(coordinate_token_ids(tokenizer))}
    order = list(range(SCENE_OBJECTS))

    def read(split: str, count: int):
        bank = ImageBank(args.data, split)
        count = min(count, len(bank.scenes))
        scenes = [reading_order(s) for s in bank.scenes[:count]]
        ids = scene_table_ids(torch.tensor([scene_tokens(s, tokenizer, order, objects, positions) for s in scenes]), vocab)
        queries, embeds = [], []
        with torch.no_grad():
            for start in range(0, count, 64):
                pixels = bank.normalized(range(start, min(start + 64, count)))
                q = model.encode_queries(pixels)
                queries.append(q.float())
                embeds.append(model.lm_proj(model.vision_proj(q)).float())
        return scenes, ids, torch.cat(queries), torch.cat(embeds)

    _, fit_ids, fit_queries, _ = read("train", args.fit_images)
    scenes, ids, queries, embeds = read(args.split, args.images)

    head = torch.nn.Linear(queries.shape[-1], table.shape[1])
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(args.steps):
        batch = torch.randint(0, len(fit_ids), (256,))
        logits = head(fit_queries[batch]) @ table.T
        loss = F.cross_entropy(logits.flatten(0, 1), fit_ids[batch].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predictions = {"projection": (embeds @ table.T).argmax(-1), "probe": (head(queries) @ table.T).argmax(-1)}
        fit_accuracy = float(((head(fit_queries) @ table.T).argmax(-1) == fit_ids).float().mean())

    first = SCENE_LENGTH - 1 - SCENE_OBJECTS * len(GROUP)
    word_slots = (0, 3, 4) if objects else (0, 1, 2)  # the object token / the words, in a group
    box_slots = (1, 2, 3, 4) if objects else (3, 4, 5, 6)

    def object_of(row: int) -> tuple[str, ...] | None:
        return kinds[row - vocab] if objects and row >= vocab else None

    def score(predicted: torch.Tensor) -> dict[str, float]:
        counts: dict[str, list[float]] = {}

        def add(name: str, value: bool) -> None:
            counts.setdefault(name, []).append(float(value))

        for n, scene in enumerate(scenes):
            got, want = predicted[n].tolist(), ids[n].tolist()
            for k in range(first):
                add("background", got[k] == want[k])
            add("end", got[-1] == want[-1])
            for g in range(SCENE_OBJECTS):
                span = [first + g * len(GROUP) + j for j in range(len(GROUP))]
                if g >= len(scene.objects):
                    add("absent_group", all(got[s] == want[s] for s in span))
                    continue
                token_right = all(got[span[j]] == want[span[j]] for j in word_slots)
                add("object_token", got[span[0]] == want[span[0]])
                if objects:
                    said, truth = object_of(got[span[0]]), object_of(want[span[0]])
                    for w, name in enumerate(("size", "color", "shape")):
                        add(name, said is not None and said[w] == truth[w])
                    if positions:
                        add("position", said is not None and said[3:] == truth[3:])
                values = [coordinates.get(got[span[j]]) for j in box_slots]
                truth_box = [coordinates[want[span[j]]] for j in box_slots]
                for v, t in zip(values, truth_box):
                    add("coordinate_exact", v == t)
                    add("coordinate_within_1", v is not None and abs(v - t) <= 1)
                    add("coordinate_within_3", v is not None and abs(v - t) <= 3)
                box_right = None not in values and box_iou(values, truth_box) > 0.5
                add("box_iou_0.5", box_right)
                add("object_all_right", token_right and box_right)
        return {name: round(100 * sum(v) / len(v), 1) for name, v in sorted(counts.items())}

    result = {
        "model": args.model or "built-in",
        "split": args.split,
        "images": len(scenes),
        "objects": sum(len(s.objects) for s in scenes),
        "probe_fit_accuracy": round(100 * fit_accuracy, 1),
        **{name: score(p) for name, p in predictions.items()},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
