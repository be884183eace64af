"""The micro recipe's language model alone, reading each image's TRUE scene tokens.

    python benchmarks/probe_micro_lm.py RUN_DIR [--images 100] [--split test] [--jitter J] [--before-anneal]

``RUN_DIR`` is a ``tinygptv recipe micro --out`` folder (its ``world/``, ``tokenizer/`` and the LM
the stages start from: ``lm_anneal/``, or ``lm/`` in runs without that phase or with
``--before-anneal``). Each image of the split is written as its 32 scene tokens, objects in reading order (as
the Q-Former learns to write them), and the pretrained LM answers the world's ``[vqa]`` questions
and each referable object's ``[refer]`` / ``[identify]`` question, one question per prompt in the
stage-4 template, greedily; answers are scored as the benchmark scores them (exact answer, IoU >
0.5, the phrase picks out the object). This is the ceiling the whole model's language side sets:
with a perfect vision encoder and Q-Former, the model could answer no better. ``--jitter J`` moves
every box corner of the scene the LM reads (not those in the questions) by up to J box units, as a
Q-Former that writes boxes near the truth would: how much an answer needs exact boxes.

Prints one JSON object: accuracy (%) and count per task and per VQA question kind, ``refer/by_shape``
(the ``[refer]`` questions that name the object by its shape alone), ``identify/size_shared`` (the
``[identify]`` boxes around an object whose size another object of the scene shares), ``identify_chance``
(what naming a random object of the scene by size, colour and shape would score), and for colour
and shape questions answered wrongly, how many named another object's colour / shape in the scene
(a binding error: the right kind of word, from the wrong object).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import random
from pathlib import Path

import torch


def greedy_answer(lm, tokenizer, inputs_embeds, max_new_tokens: int = 20) -> str:
    """The LM's greedy answer after a prompt: ``inputs_embeds(written)`` gives the (1, T, C) input
    vectors of the prompt followed by the token ids ``written`` so far; stops at the stage-4
    template's end symbol or EOS, which the answer leaves out."""
    from tinygptv.data.templates import template_for_stage

    end_symbol = template_for_stage(4).end_symbol
    end = tokenizer(end_symbol, add_special_tokens=False)["input_ids"]
    written: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            written.append(int(lm(inputs_embeds=inputs_embeds(written), use_cache=False).logits[0, -1].argmax()))
            if written[-len(end) :] == end or written[-1] == tokenizer.eos_token_id:
                break
    return tokenizer.decode(written, skip_special_tokens=True).replace(end_symbol, "").strip()


def ask_scene(answer, scene, held_out, scores, binding=None) -> None:
    """Ask ``answer(task, question)`` the world's six ``[vqa]`` questions about ``scene`` and each
    referable object's ``[refer]`` and ``[identify]`` question, in each task's first phrasing, and
    append the benchmark's scores to ``scores[task]`` (and ``vqa/KIND``, ``identify_chance``: what
    naming a random object of the scene in full would score); ``binding`` counts colour and shape
    answers that are wrong, and those naming another object's."""
    from tinygptv.data import shapes as world
    from tinygptv.data.boxes import format_box, normalize_box
    from tinygptv.data.instructions import instruction
    from tinygptv.eval.metrics import exact_match, refer_iou
    from tinygptv.eval.shapes import objects_described

    size = world.CANONICAL_SIZE
    for qa in world.questions(scene, 0, held_out, 6):
        got = answer("vqa", instruction("vqa", None, qa.question))
        right = exact_match(got, qa.answer)
        scores["vqa"].append(right)
        scores[f"vqa/{qa.kind}"].append(right)
        if binding is not None and qa.kind in ("color", "shape") and not right:
            binding[f"{qa.kind}_wrong"] += 1
            binding[f"{qa.kind}_wrong_is_another_objects"] += got in [getattr(o, qa.kind) for o in scene.objects]
    named = [objects_described(f"the {o.describe()}", scene.objects) for o in scene.objects]
    for k, (obj, phrase) in enumerate(zip(scene.objects, world.referring_expressions(scene, 0))):
        if phrase is None:
            continue
        iou, _ = refer_iou(answer("refer", instruction("refer", None, phrase)), obj.box, size, size)
        scores["refer"].append(float(iou > 0.5))
        if phrase == f"the {obj.shape}":  # named by its shape alone
            scores["refer/by_shape"].append(float(iou > 0.5))
        said = answer("identify", instruction("identify", None, format_box(normalize_box(obj.box, size, size))))
        scores["identify"].append(float(objects_described(said, scene.objects) == [k]))
        if sum(o.size == obj.size for o in scene.objects) > 1:  # its size alone does not say which
            scores["identify/size_shared"].append(float(objects_described(said, scene.objects) == [k]))
        scores["identify_chance"].append(sum(n == [k] for n in named) / len(scene.objects))


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast

    from tinygptv.config import TinyGPTVConfig, get_preset
    from tinygptv.data import shapes as world
    from tinygptv.data.encoding import IMAGE_TOKEN_ID, encode_chunks
    from tinygptv.data.templates import template_for_stage
    from tinygptv.model.language import build_language_model
    from tinygptv.recipes.micro import plain_language_config, pretrained_lm_file
    from tinygptv.recipes.pretrain import SCENE_OBJECTS, embed_scene_ids, object_parts, reading_order, scene_tokens

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a micro recipe run folder")
    parser.add_argument("--images", type=int, default=100, help="first N images of the split")
    parser.add_argument("--split", default="test")
    parser.add_argument("--before-anneal", action="store_true", help="read lm/, the LM before its anneal phase")
    parser.add_argument(
        "--jitter",
        type=float,
        default=0.0,
        help="move each box corner of the scene the LM reads (not of the questions) by a uniform draw in "
        "[-J, J] box units (0-100): the Q-Former writes boxes near the truth, not on it",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.run / "tokenizer")
    state = load_file(str(args.run / "lm" / "model.safetensors" if args.before_anneal else pretrained_lm_file(args.run)))
    base = args.run / "base" / "config.json"  # the architecture the run built (else today's preset)
    model_config = TinyGPTVConfig.from_dict(json.loads(base.read_text())["config"]) if base.is_file() else get_preset("tinygptv-micro")
    config = plain_language_config(model_config)
    lm = build_language_model(config, 0.02)
    lm.load_state_dict(state)
    lm.eval()
    held_out = [tuple(p) for p in json.loads((args.run / "world" / "shapes.json").read_text())["held_out_pairs"]]
    report = args.run / "report.json"
    lm_recipe = json.loads(report.read_text())["recipe"]["lm"] if report.is_file() else {}
    objects, positions = lm_recipe.get("object_tokens", False), lm_recipe.get("object_positions", False)
    parts = object_parts(tokenizer, positions) if objects else None
    template = template_for_stage(4)

    def answer(scene, task: str, question: str) -> str:
        chunks = [(template.user_format.format(template.first_content(question, 1, task)), False)]
        ids: list[int] = []
        for token in encode_chunks(tokenizer, chunks, num_image_tokens=1).input_ids:
            ids.extend(scene_tokens(scene, tokenizer, list(range(SCENE_OBJECTS)), objects, positions) if token == IMAGE_TOKEN_ID else [token])
        embedding = lm.get_input_embeddings()
        return greedy_answer(lm, tokenizer, lambda written: embed_scene_ids(embedding, torch.tensor([ids + written]), parts))

    jitter = random.Random(0)

    def seen(scene):
        """The scene as the LM reads it: each box corner moved by up to ``--jitter`` box units."""
        if not args.jitter:
            return scene
        step = world.CANONICAL_SIZE / 100
        moved = []
        for obj in scene.objects:
            box = [round(v + jitter.uniform(-args.jitter, args.jitter) * step) for v in obj.box]
            box = [min(max(v, 0), world.CANONICAL_SIZE) for v in box]
            moved.append(dataclasses.replace(obj, box=tuple(box)))
        return dataclasses.replace(scene, objects=moved)

    scores: dict[str, list[float]] = collections.defaultdict(list)
    binding = collections.Counter()
    for scene in world.load_scenes(args.run / "world", args.split)[: args.images]:
        scene = reading_order(scene)
        shown = seen(scene)
        ask_scene(lambda task, question: answer(shown, task, question), scene, held_out, scores, binding)
    result = {name: {"accuracy": round(100 * sum(v) / len(v), 1), "n": len(v)} for name, v in sorted(scores.items())}
    print(json.dumps({"run": str(args.run), "split": args.split, "images": args.images, "jitter": args.jitter, **result, "binding": dict(binding)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
