"""How well the micro LM reads the image tokens a model's Q-Former and projections give it.

    python benchmarks/probe_micro_readout.py RUN_DIR [--model DIR] [--images 60] [--modes true snap raw lsq]

``RUN_DIR`` is a ``tinygptv recipe micro --out`` folder (its ``world/``, ``tokenizer/``, ``lm/``);
``--model`` a micro model whose ViT, Q-Former and projections make the image tokens (default
``RUN_DIR/base``, the model stage 1 starts from). The pretrained LM of the run, without
TinyGPT-V's added norms or LoRA (the LM that ``benchmarks/probe_micro_lm.py`` scores), answers the
world's ``[vqa]``, ``[refer]`` and ``[identify]`` questions about the first ``--images`` test
images (as that probe asks and scores them), reading in place of each image:

* ``true``: the scene's own token rows (the LM's ceiling, as in ``probe_micro_lm.py``);
* ``snap``: the model's image tokens, each replaced by the row of the LM's scene table nearest to
  it (largest dot product): what the Q-Former says, written exactly;
* ``raw``: the model's image tokens as they are (what the stages start from);
* ``lsq``: the Q-Former's outputs through the least-squares read-out onto the rows, fitted on
  ``--fit-images`` training images (:func:`tinygptv.recipes.pretrain.fit_readout`, the recipe's
  ``readout_images``).

The gap between ``snap`` and ``raw`` is what the LM loses to the vectors being off their rows.
Prints one JSON line per mode: accuracy (%) per task and VQA kind (as ``probe_micro_lm.py``, whose
question loop and decoding it uses), and the read-out's mean relative distance to the true rows.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
from pathlib import Path

import torch

MODES = ("true", "snap", "raw", "lsq")


def _language_model_probe():
    """``probe_micro_lm.py`` beside this script, as a module: its question loop and greedy decoding."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("probe_micro_lm", Path(__file__).with_name("probe_micro_lm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import load_file

    from tinygptv.config import TinyGPTVConfig
    from tinygptv.data.encoding import IMAGE_TOKEN_ID, encode_chunks
    from tinygptv.data.templates import template_for_stage
    from tinygptv.model.language import build_language_model
    from tinygptv.model.tinygptv import TinyGPTV
    from tinygptv.recipes.micro import plain_language_config, pretrained_lm_file
    from tinygptv.recipes.pretrain import (
        SCENE_OBJECTS,
        ImageBank,
        fit_readout,
        object_parts,
        reading_order,
        scene_table,
        scene_table_ids,
        scene_tokens,
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a micro recipe run folder")
    parser.add_argument("--model", type=Path, help="the model making the image tokens (default RUN/base)")
    parser.add_argument("--images", type=int, default=60, help="first N test images")
    parser.add_argument("--fit-images", type=int, default=1000, help="training images of the lsq read-out")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    model = TinyGPTV.from_pretrained(args.model or args.run / "base").eval()
    tokenizer = model.tokenizer
    report = json.loads((args.run / "report.json").read_text())
    settings = report["recipe"]["lm"]
    objects, positions = settings.get("object_tokens", False), settings.get("object_positions", False)
    config = TinyGPTVConfig.from_dict(json.loads((args.run / "base" / "config.json").read_text())["config"])
    lm = build_language_model(plain_language_config(config), 0.02)
    lm.load_state_dict(load_file(str(pretrained_lm_file(args.run))))
    lm.eval()
    weight = lm.get_input_embeddings().weight.detach()
    vocab = weight.shape[0]
    table = scene_table(weight, object_parts(tokenizer, positions)) if objects else weight
    held_out = [tuple(p) for p in json.loads((args.run / "world" / "shapes.json").read_text())["held_out_pairs"]]
    bank = ImageBank(args.run / "world", "test", limit=args.images)
    count = len(bank.scenes)
    scenes = [reading_order(s) for s in bank.scenes[:count]]
    order = list(range(SCENE_OBJECTS))
    truth = table[scene_table_ids(torch.tensor([scene_tokens(s, tokenizer, order, objects, positions) for s in scenes]), vocab)]

    def image_tokens(m) -> torch.Tensor:
        with torch.no_grad():
            return m.lm_proj(m.vision_proj(m.encode_queries(bank.normalized(range(count))))).float()

    tokens: dict[str, torch.Tensor] = {"true": truth}
    if {"snap", "raw"} & set(args.modes):
        tokens["raw"] = image_tokens(model)
        tokens["snap"] = table[(tokens["raw"] @ table.T).argmax(-1)]
    if "lsq" in args.modes:
        refit = copy.deepcopy(model)
        fit_readout(refit, args.run / "world", args.fit_images, 0, objects, positions)
        tokens["lsq"] = image_tokens(refit)

    template = template_for_stage(4)
    embed = lm.get_input_embeddings()
    helpers = _language_model_probe()

    def answer(image: torch.Tensor, task: str, question: str) -> str:
        chunks = [(template.user_format.format(template.first_content(question, 1, task)), False)]
        ids = encode_chunks(tokenizer, chunks, num_image_tokens=1).input_ids
        at = ids.index(IMAGE_TOKEN_ID)
        before = embed(torch.tensor([ids[:at]]))
        return helpers.greedy_answer(
            lm, tokenizer, lambda written: torch.cat([before, image[None], embed(torch.tensor([ids[at + 1 :] + written]))], dim=1)
        )

    for mode in args.modes:
        scores: dict[str, list[float]] = collections.defaultdict(list)
        for n, scene in enumerate(scenes):
            image = tokens[mode][n]
            helpers.ask_scene(lambda task, question: answer(image, task, question), scene, held_out, scores)
        distance = ((tokens[mode] - truth).norm(dim=-1) / truth.norm(dim=-1)).mean()
        result = {name: {"accuracy": round(100 * sum(v) / len(v), 1), "n": len(v)} for name, v in sorted(scores.items())}
        print(json.dumps({"mode": mode, "images": count, "relative_distance_to_rows": round(float(distance), 3), **result}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
