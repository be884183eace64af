"""How much TinyGPT-V's added norms disturb a micro recipe run's pretrained language model.

    python benchmarks/probe_added_norms.py RUN_DIR [--drills 64]

``RUN_DIR`` is a ``tinygptv recipe micro --out`` folder (its ``world/``, ``tokenizer/``, ``lm/`` and
``vision/``). On ``--drills`` scene drills the language model never trained on (answers as
targets), the next-token loss and the share of answer tokens predicted right, for:

* ``plain``: the pretrained LM as it was trained (no QK LayerNorm, no post-attention RMSNorm);
* ``paper_init``: the same LM inside the assembled TinyGPT-V model, the added norms at weight 1,
  bias 0 (the paper's init);
* ``calibrated``: the added norms fitted to the LM's activations
  (:func:`tinygptv.recipes.micro.calibrate_added_norms`, the recipe's ``calibrated_norms``).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

UNSEEN_DRILLS = 900_000
"""Drill indices from here on are far beyond any the language model trained on."""


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast

    from tinygptv.model.language import build_language_model
    from tinygptv.recipes.micro import (
        MicroRecipe,
        assemble_base,
        calibration_rows,
        plain_language_config,
        pretrained_lm_file,
        world_held_out,
    )
    from tinygptv.recipes.pretrain import PretrainSettings, drill_rows, embed_scene_ids, object_parts

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a micro recipe run folder")
    parser.add_argument("--drills", type=int, default=64, help="unseen scene drills to score")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    recipe = MicroRecipe()
    report = args.run / "report.json"
    if report.is_file():  # the run's language-model settings (the drills' format)
        ran = json.loads(report.read_text())["recipe"]
        known = {f.name for f in dataclasses.fields(PretrainSettings)}
        recipe.lm = PretrainSettings(**{k: v for k, v in ran["lm"].items() if k in known})
        recipe.seed = ran.get("seed", recipe.seed)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.run / "tokenizer")
    lm_state = load_file(str(pretrained_lm_file(args.run)))
    vision_state = load_file(str(args.run / "vision" / "model.safetensors"))
    world = args.run / "world"
    unseen = range(UNSEEN_DRILLS, UNSEEN_DRILLS + args.drills)
    rows, targets, _, _ = drill_rows(tokenizer, unseen, recipe.seed, world_held_out(world), recipe.lm)
    parts = object_parts(tokenizer, recipe.lm.object_positions) if recipe.lm.object_tokens else None

    def score(lm) -> dict[str, float]:
        with torch.no_grad():
            embeds = embed_scene_ids(lm.get_input_embeddings(), rows, parts)
            logits = lm(inputs_embeds=embeds, use_cache=False).logits[:, :-1]
        wanted = targets[:, 1:]
        kept = wanted != -100
        loss = F.cross_entropy(logits[kept], wanted[kept])
        right = (logits[kept].argmax(-1) == wanted[kept]).float().mean()
        return {"loss": round(float(loss), 4), "answer_tokens_right": round(100 * float(right), 1)}

    base = assemble_base(tokenizer, lm_state, vision_state, recipe.seed)
    plain = build_language_model(plain_language_config(base.config), base.config.initializer_range)
    plain.load_state_dict(lm_state)
    plain.eval()
    calibrated = assemble_base(tokenizer, lm_state, vision_state, recipe.seed, calibration=calibration_rows(tokenizer, world, recipe))
    result = {
        "run": str(args.run),
        "drills": args.drills,
        "answer_tokens": int((targets[:, 1:] != -100).sum()),
        "plain": score(plain),
        "paper_init": score(base.lm),
        "calibrated": score(calibrated.lm),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
