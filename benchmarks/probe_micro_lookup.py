"""Where the micro LM looks when it finds the object a question is about.

    python benchmarks/probe_micro_lookup.py RUN_DIR [--images 100] [--split val]

``RUN_DIR`` is a ``tinygptv recipe micro --out`` folder (its ``world/``, ``tokenizer/``, ``lm/``).
The run's pretrained LM (no LoRA, no added norms: what ``probe_micro_lm.py`` scores) reads the true
scene tokens of each image of the split with two or more objects (objects in reading order, as the
Q-Former writes them), and is asked, one question per prompt in the stage-4 template:

* ``color``: "What color is the SHAPE?" (the object named by its shape alone);
* ``shape``: "What shape is the COLOR object?" (named by its colour alone);
* ``identify``: ``[identify]`` with each object's box, followed by the start of its full name,
  "the SIZE": what comes next, the colour, needs the object the box is around.

For each, every attention head's weights from each of the prompt's last ``--back`` positions are
summed over each object's seven scene tokens; a head *finds* the object when the object asked about
gets the largest sum. Prints one JSON object: per question kind, the LM's accuracy on the next word
(greedy), and the heads that find the object on at
least ``--min-share`` of the prompts (as ``"POSITION_FROM_END L<layer>H<head>"``, with the first
prompt's tokens at those positions), with that share and the mean weight on the object. For
``identify`` also the accuracy and the share whose most-attended object (last position, the last two
layers' heads summed) is the right one, split by whether another object of the scene has the same
size (``size_shared``) or not (``size_unique``): an LM that finds the object by the size word it has
just written, not by the box, is right on the second and guesses on the first.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast

    from tinygptv.config import TinyGPTVConfig, get_preset
    from tinygptv.data import shapes as world
    from tinygptv.data.boxes import format_box, normalize_box
    from tinygptv.data.encoding import IMAGE_TOKEN_ID, encode_chunks
    from tinygptv.data.instructions import instruction
    from tinygptv.data.templates import template_for_stage
    from tinygptv.model.language import build_language_model
    from tinygptv.recipes.micro import plain_language_config, pretrained_lm_file
    from tinygptv.recipes.pretrain import (
        GROUP,
        SCENE_OBJECTS,
        embed_scene_ids,
        object_parts,
        reading_order,
        scene_tokens,
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a micro recipe run folder")
    parser.add_argument("--images", type=int, default=100, help="first N images of the split")
    parser.add_argument("--split", default="val")
    parser.add_argument("--back", type=int, default=11, help="prompt positions scored, counted from the end")
    parser.add_argument("--min-share", type=float, default=0.8, help="list the heads that find the object this often")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.run / "tokenizer")
    base = args.run / "base" / "config.json"
    model_config = TinyGPTVConfig.from_dict(json.loads(base.read_text())["config"]) if base.is_file() else get_preset("tinygptv-micro")
    lm = build_language_model(plain_language_config(model_config), 0.02)
    lm.load_state_dict(load_file(str(pretrained_lm_file(args.run))))
    lm.eval()
    lm.set_attn_implementation("eager")  # attention weights
    report = args.run / "report.json"
    lm_recipe = json.loads(report.read_text())["recipe"]["lm"] if report.is_file() else {}
    if not lm_recipe.get("object_tokens", False):
        raise SystemExit(f"{args.run}: this probe reads scenes of object tokens (lm.object_tokens)")
    positions = lm_recipe.get("object_positions", False)
    parts = object_parts(tokenizer, positions)
    held_out = [tuple(p) for p in json.loads((args.run / "world" / "shapes.json").read_text())["held_out_pairs"]]
    template = template_for_stage(4)
    size = world.CANONICAL_SIZE

    def prompt(scene, task: str, question: str, written: str = "") -> tuple[list[int], int]:
        """Token ids of a one-question prompt (and ``written``, the answer's start) and where the scene starts."""
        chunks = [(template.user_format.format(template.first_content(instruction(task, None, question), 1, task)), False)]
        ids: list[int] = []
        start = -1
        for token in encode_chunks(tokenizer, chunks, num_image_tokens=1).input_ids:
            if token == IMAGE_TOKEN_ID:
                start = len(ids)
                ids.extend(scene_tokens(scene, tokenizer, list(range(SCENE_OBJECTS)), True, positions))
            else:
                ids.append(token)
        if written:
            ids.extend(tokenizer(written, add_special_tokens=False)["input_ids"])
        return ids, start

    def token_name(token: int) -> str:
        return tokenizer.convert_ids_to_tokens(token).replace("\u0120", " ") if token < len(tokenizer) else "OBJECT"

    found: dict[str, dict[str, list[tuple[bool, float]]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    right: dict[str, list[bool]] = collections.defaultdict(list)
    example: dict[str, dict[int, str]] = {}  # the tokens at the scored positions of each kind's first prompt
    background = 3  # the scene's first tokens: its background words, then the object groups
    for scene in world.load_scenes(args.run / "world", args.split)[: args.images]:
        scene = reading_order(scene)
        if len(scene.objects) < 2:
            continue
        asked = []
        for qa in world.questions(scene, 0, held_out, 1 << 10):
            if qa.kind == "color":
                asked.append(("color", "vqa", qa.question, "", qa.answer, [o.shape for o in scene.objects].index(qa.subject)))
            elif qa.kind == "shape":
                color = qa.subject.split()[0]
                asked.append(("shape", "vqa", qa.question, "", qa.answer, [o.color for o in scene.objects].index(color)))
        for k, obj in enumerate(scene.objects):
            box = format_box(normalize_box(obj.box, size, size))
            asked.append(("identify", "identify", box, f"the {obj.size}", obj.color, k))
        for kind, task, question, written, answer, target in asked:
            ids, start = prompt(scene, task, question, written)
            embeds = embed_scene_ids(lm.get_input_embeddings(), torch.tensor([ids]), parts)
            with torch.no_grad():
                out = lm(inputs_embeds=embeds, output_attentions=True, use_cache=False)
            said = tokenizer.convert_ids_to_tokens(int(out.logits[0, -1].argmax())).replace("\u0120", " ").strip()
            right[kind].append(said == answer)
            example.setdefault(kind, {back: token_name(ids[-back]) for back in range(1, args.back + 1)})
            first = start + background
            groups = [slice(first + len(GROUP) * k, first + len(GROUP) * (k + 1)) for k in range(len(scene.objects))]
            for layer, weights in enumerate(out.attentions):  # (1, heads, T, T)
                for back in range(1, args.back + 1):
                    for head in range(weights.shape[1]):
                        row = weights[0, head, -back]
                        mass = [float(row[g].sum()) for g in groups]
                        top = max(range(len(mass)), key=mass.__getitem__)
                        found[kind][f"{back} L{layer}H{head}"].append((top == target, mass[target]))
            if kind == "identify":
                last = sum(out.attentions[layer][0, :, -1].sum(0) for layer in (-2, -1))
                mass = [float(last[g].sum()) for g in groups]
                shared = sum(o.size == scene.objects[target].size for o in scene.objects) > 1
                group = "size_shared" if shared else "size_unique"
                right[f"identify/{group}"].append(said == answer)
                right[f"identify/{group}/most_attended_is_it"].append(max(range(len(mass)), key=mass.__getitem__) == target)
                right[f"identify/{group}/most_attended_same_size"].append(
                    scene.objects[max(range(len(mass)), key=mass.__getitem__)].size == scene.objects[target].size
                )

    def share(values) -> float:
        return round(100 * sum(values) / len(values), 1)

    result: dict[str, object] = {"run": str(args.run), "split": args.split, "images": args.images}
    for kind, values in sorted(right.items()):
        result[kind] = {"percent": share(values), "n": len(values)}
    for kind, heads in sorted(found.items()):
        result[f"{kind}/positions"] = example[kind]  # position from the end -> token, first prompt
        result[f"{kind}/heads_finding_it"] = {
            name: {"finds": share([v[0] for v in values]), "weight": round(sum(v[1] for v in values) / len(values), 2)}
            for name, values in sorted(heads.items(), key=lambda item: -sum(v[0] for v in item[1]) / len(item[1]))
            if sum(v[0] for v in values) / len(values) >= args.min_share
        }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
