"""The micro recipe (tinygptv.recipes): its pieces, and a whole run at toy length."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import time

import pytest
import torch

from conftest import load_benchmark
from tinygptv.data.shapes import CANONICAL_SIZE, Scene, ShapeObject
from tinygptv.recipes.micro import ABLATIONS, LMAnneal, MicroRecipe, format_ablation, run_ablation, run_micro_recipe
from tinygptv.recipes.pretrain import (
    PATCH_LABELS,
    SCENE_LENGTH,
    DenseTargets,
    PretrainSettings,
    drill_document,
    encode_document,
    reading_order,
    scene_tokens,
)
from tinygptv.recipes.world_tokenizer import coordinate_tokens, train_world_tokenizer

TOY_STAGES = ["iters_per_epoch=2", "epochs=1", "batch_size=4", "checkpoint_every=2", "schedule.warmup_steps=1"]


def toy_recipe(**kwargs) -> MicroRecipe:
    return MicroRecipe(
        world_images=120,
        lm_documents=200,
        lm=PretrainSettings(steps=3, batch_size=4, seq_len=128),
        vision=PretrainSettings(steps=3, batch_size=4, warmup_steps=1),
        lm_anneal=LMAnneal(steps=2, warmup_steps=1),
        eval_limit=4,
        eval_batch_size=4,
        threads=1,
        **{"processes": 1, **kwargs},
    )


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "run"
    report = run_micro_recipe(out, toy_recipe(), stage_overrides=TOY_STAGES, log=lambda m: None)
    return out, report


def _scene() -> Scene:
    objects = [
        ShapeObject("star", "red", "large", (0.7, 0.3), 0.14, box=(125, 35, 188, 99)),
        ShapeObject("circle", "blue", "small", (0.2, 0.6), 0.06, box=(31, 121, 59, 149)),
    ]
    return Scene(image_id=7, split="train", background="gray", texture="plain", objects=objects)


def _tokenizer():
    from tinygptv.data.shapes import COLORS, SHAPES, SIZES

    words = [f"a {s} {c} {h} on a plain gray background ." for s in SIZES for c in COLORS for h in SHAPES]
    where = ["it is at the top left , at the bottom right , in the center"] * 4
    return train_world_tokenizer(words * 4 + where + ["a striped sand checkered slate shaded sage background"], 1024)


def test_tokenizer_writes_each_box_coordinate_as_one_token_and_decodes_exactly():
    tokenizer = _tokenizer()
    text = "[refer] the red star [/INST]{<0><37><99><100>}###"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    assert pieces[pieces.index("{") + 1 : pieces.index("{") + 5] == ["<0>", "<37>", "<99>", "<100>"]
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) <= 1024 and len(coordinate_tokens()) == 101


def test_reading_order_sorts_left_to_right_and_dense_targets_mark_the_object_patches():
    scene = _scene()
    assert [o.shape for o in reading_order(scene).objects] == ["circle", "star"]
    targets = DenseTargets(scene, grid=14, patch=16)
    none = torch.tensor(list(PATCH_LABELS.values()))
    # the patch whose centre (40, 136) lies in the circle's box: blue (2), circle (0), small (0), rank 0
    circle_patch = (136 // 16) * 14 + 40 // 16
    assert targets.labels[circle_patch].tolist() == [2, 0, 0, 0]
    assert torch.allclose(targets.boxes[circle_patch] * CANONICAL_SIZE, torch.tensor([31.0, 121, 59, 149]))
    star_patch = (72 // 16) * 14 + 152 // 16
    assert targets.labels[star_patch].tolist() == [0, 3, 1, 1]  # red, star, large, rank 1
    assert torch.equal(targets.labels[0], none) and targets.mask[0] == 0  # the top-left corner is background
    inside = int(targets.mask.sum())
    assert 0 < inside < 14 * 14


def test_scene_tokens_and_lm_documents_read_the_scene_but_never_write_it():
    tokenizer = _tokenizer()
    scene = _scene()
    ids = scene_tokens(reading_order(scene), tokenizer, [0, 1, 2, 3])
    assert len(ids) == SCENE_LENGTH == 32
    text = tokenizer.decode(ids)
    assert text.index("circle") < text.index("star") and "<14><54><26><67>" in text  # 0-100 corners
    chunks = [("[INST] <Img><ImageHere></Img> [vqa] How many objects? [/INST]", False), ("2", True)]
    tokens, labels = encode_document(tokenizer, (chunks, scene), random.Random(0))
    start = tokens.index(ids[0]) if ids[0] in tokens else None
    assert start is not None
    assert labels[start : start + SCENE_LENGTH] == [-100] * SCENE_LENGTH
    assert labels[-1] == tokens[-1] == tokenizer("2", add_special_tokens=False)["input_ids"][0]


def test_toy_recipe_runs_every_phase_and_its_model_answers(toy_run):
    from tinygptv import TinyGPTV

    out, report = toy_run
    for phase in ("world", "tokenizer", "language model", "vision", "language model anneal", "base", "package"):
        assert phase in report["phases"]
    assert set(report["accuracy"]) == {"1", "2", "3", "4"}
    for table in report["accuracy"].values():
        assert set(table) == {"test", "compositional"}
    model = TinyGPTV.from_pretrained(out / "model")
    assert not any("lora" in name for name in model.state_dict())  # merged
    answer = model.generate_greedy(["[vqa] How many objects are there?"], images=None, max_new_tokens=3)
    assert isinstance(answer[0], str)
    assert "| after stage |" in (out / "report.md").read_text()


def test_recipe_repeats_bit_for_bit(toy_run, tmp_path):
    out, _ = toy_run
    again = tmp_path / "again"
    run_micro_recipe(again, toy_recipe(), stage_overrides=TOY_STAGES, evaluate_stages=False, log=lambda m: None)

    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "model").iterdir())}

    assert digest(out) == digest(again)


def test_recipe_refuses_to_overwrite_a_run(toy_run):
    out, _ = toy_run
    with pytest.raises(ValueError, match="already holds"):
        run_micro_recipe(out, toy_recipe(), stage_overrides=TOY_STAGES, log=lambda m: None)


def test_ablation_removes_each_change_and_reports_a_stopped_run(toy_run, tmp_path):
    out, _ = toy_run
    results = run_ablation(
        out, tmp_path / "ablate", toy_recipe(), variants=["TinyGPT-V", "- LoRA"], stage_overrides=TOY_STAGES,
        evaluate_final=False, log=lambda m: None,
    )
    assert set(results["TinyGPT-V"]["stages"]) == {"1", "2", "3", "4"}
    from tinygptv import TinyGPTV

    lora_free = TinyGPTV.from_pretrained(tmp_path / "ablate" / "lora" / "base")
    assert not any("lora_" in name for name, _ in lora_free.named_parameters())
    # a guard rail that fires at once: every row stops in stage 1 with the trainer's message
    stopped = run_ablation(
        out, tmp_path / "stopped", toy_recipe(), variants=["- QK Norm"],
        stage_overrides=[*TOY_STAGES, "guard.vanishing_grad_norm=1e9", "guard.vanishing_patience=1"],
        evaluate_final=False, log=lambda m: None,
    )
    row = stopped["- QK Norm"]
    assert row["stages"] == {} and row["failure"].startswith("stage 1:")
    table = format_ablation({**results, **stopped})
    assert "| - QK Norm | stopped:" in table and table.count("\n") == 4
    assert set(ABLATIONS) >= {"- LoRA", "- input LayerNorm", "- RMSNorm", "- QK Norm"}


def test_a_drill_reads_a_fresh_scene_and_asks_every_task_about_it():
    from tinygptv.data.shapes import SHAPES, COLORS, held_out_pairs

    tokenizer = _tokenizer()
    held_out = held_out_pairs(0)
    seen_pairs = set()
    for index in range(30):
        tokens, labels = drill_document(tokenizer, index, seed=0, held_out=held_out)
        assert (tokens, labels) == drill_document(tokenizer, index, seed=0, held_out=held_out)  # deterministic
        text = tokenizer.decode(tokens)
        for task in ("[vqa]", "[refer]", "[identify]"):
            assert task in text
        # the 32 scene tokens are read, never targets; every answer (and only answers) is a target
        targets = [t for t, l in zip(tokens, labels) if l != -100]
        assert tokenizer.decode(targets).count("###") == text.count("[/INST]")
        start = next(k for k in range(len(tokens)) if labels[k] == -100 and tokenizer.decode(tokens[k : k + 1]).strip() in
                     ("gray", "sand", "slate", "sage", "plain", "striped", "checkered", "shaded", "background"))
        assert all(l == -100 for l in labels[start : start + SCENE_LENGTH])
        # each [refer] answer is the box written in the scene
        scene_text = tokenizer.decode(tokens[start : start + SCENE_LENGTH])
        for answer in text.split("[/INST]")[1:]:
            box = answer.split("###")[0]
            if box.startswith("{"):
                assert box[1:-1] in scene_text
        for c in COLORS:
            for sh in SHAPES:
                if f" {c} {sh}" in scene_text or f"{c} {sh}" in scene_text:
                    seen_pairs.add((c, sh))
    assert not seen_pairs & set(held_out)  # a drill never shows a held-out colour-shape pair


def test_recipe_in_two_processes_repeats_bit_for_bit(tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        report = run_micro_recipe(
            out, toy_recipe(processes=2), stage_overrides=TOY_STAGES, evaluate_stages=False, log=print
        )
        assert report["processes"] == 2 and "stage 4" in report["phases"]
        runs.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "model").iterdir())})
    assert runs[0] == runs[1] and "model.safetensors" in runs[0]


def test_coordinate_embeddings_start_as_a_code_of_their_value():
    from tinygptv.config import get_preset
    from tinygptv.model.language import build_language_model
    from tinygptv.recipes.micro import plain_language_config
    from tinygptv.recipes.pretrain import init_coordinate_embeddings

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    lm = build_language_model(plain_language_config(get_preset("tinygptv-micro")), 0.02)
    other = lm.get_input_embeddings().weight[5].clone()
    init_coordinate_embeddings(lm, tokenizer)
    rows = [tokenizer.convert_tokens_to_ids(f"<{k}>") for k in range(101)]
    emb = lm.get_input_embeddings().weight[rows]
    cos = torch.nn.functional.cosine_similarity
    assert cos(emb[40], emb[41], dim=0) > 0.9 > 0.5 > cos(emb[40], emb[60], dim=0)
    assert cos(emb[10], emb[11], dim=0) > cos(emb[10], emb[13], dim=0) > cos(emb[10], emb[30], dim=0)
    assert torch.allclose(emb.norm(dim=1), other.norm().expand(101), rtol=0.3)  # the random init's size
    assert torch.equal(lm.get_output_embeddings().weight[rows], emb)
    assert torch.equal(lm.get_input_embeddings().weight[5], other)  # other rows untouched


def test_coordinate_ramp_lets_a_linear_map_find_and_compare_values():
    from tinygptv.config import get_preset
    from tinygptv.model.language import build_language_model
    from tinygptv.recipes.micro import plain_language_config
    from tinygptv.recipes.pretrain import coordinate_token_ids, init_coordinate_embeddings

    tokenizer = _tokenizer()
    rows = coordinate_token_ids(tokenizer)
    codes = []
    for ramp in (0.0, 0.5):
        torch.manual_seed(0)
        lm = build_language_model(plain_language_config(get_preset("tinygptv-micro")), 0.02)
        init_coordinate_embeddings(lm, tokenizer, ramp=ramp)
        codes.append(lm.get_input_embeddings().weight[rows].detach())
    plain, ramped = codes
    scale = plain.norm(dim=1).mean()
    u, square = ramped[:, -2] / scale, ramped[:, -1] / scale
    assert torch.allclose(u, 0.5 * torch.linspace(-1, 1, 101), atol=1e-6)  # grows with the value
    assert torch.allclose(square, 0.5 * (2 * torch.linspace(-1, 1, 101) ** 2 - 1), atol=1e-6)
    # one linear read-out of a number w scores the coordinates by nearness to it: 4wu - (2u^2 - 1) peaks at u = w
    for w in (-0.8, -0.1, 0.33, 0.9):
        query = torch.zeros(ramped.shape[1])
        query[-2], query[-1] = 4 * w / 0.5, -1 / 0.5
        assert abs(int((ramped @ query).argmax()) - round((w + 1) * 50)) <= 1
    assert torch.allclose(ramped[:, :-2].norm(dim=1), scale.expand(101), rtol=1e-4)  # the sine-cosine part keeps its size


def test_object_weight_adds_a_cross_entropy_over_the_object_patches_alone():
    from tinygptv.recipes.pretrain import VisionHeads

    torch.manual_seed(0)
    targets = [DenseTargets(_scene(), grid=14, patch=16)]
    hidden = torch.randn(1, 1 + 14 * 14, 32)
    plain = VisionHeads(32, 16, 8)
    weighted = VisionHeads(32, 16, 8, object_weight=2.0)
    weighted.load_state_dict(plain.state_dict())
    base, more = plain.dense_loss(hidden, targets), weighted.dense_loss(hidden, targets)
    out = plain.dense(hidden[:, 1:]).flatten(0, 1)
    on_object = targets[0].mask > 0
    extra, start = 0.0, 0
    for k, n in enumerate(PATCH_LABELS.values()):
        extra += torch.nn.functional.cross_entropy(out[on_object, start : start + n + 1], targets[0].labels[on_object, k])
        start += n + 1
    assert torch.allclose(more, base + 2.0 * extra, atol=1e-5)
    assert more > base


def test_template_markers_and_task_tags_are_one_token_each_and_decode_exactly():
    from tinygptv.recipes.world_tokenizer import template_tokens

    from tinygptv.data.shapes import COLORS, SHAPES, SIZES

    words = [f"a {s} {c} {h} on a plain gray background ." for s in SIZES for c in COLORS for h in SHAPES]
    plain = _tokenizer()
    tokenizer = train_world_tokenizer(words * 4, 1024, template_markers=True)
    text = "[INST] <Img> a red star .</Img> [identify] Which object is at {<3><40><9><51>}? [/INST]the red star###"
    assert "[INST]" not in plain.convert_ids_to_tokens(plain(text, add_special_tokens=False)["input_ids"])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    for marker in ("[INST]", "<Img>", "</Img>", " [identify]", " [/INST]", "###"):
        assert marker in pieces, marker
    assert tokenizer.decode(ids) == text
    # a stage-3 turn: the longer marker wins over its "###" prefix
    assert "###Human:" in tokenizer.convert_ids_to_tokens(tokenizer("###Human: hi ###Assistant: ", add_special_tokens=False)["input_ids"])
    assert len(set(template_tokens())) == len(template_tokens()) and len(tokenizer) <= 1024


def test_position_cells_are_one_token_each_in_texts_and_in_object_tokens():
    from tinygptv.data.shapes import COLORS, SHAPES, SIZES
    from tinygptv.recipes.pretrain import POSITIONS, object_parts, object_words
    from tinygptv.recipes.world_tokenizer import position_tokens

    words = [f"a {s} {c} {h} on a plain gray background ." for s in SIZES for c in COLORS for h in SHAPES]
    where = ["it is at the top left , at the bottom right , at the top , in the center"] * 4
    plain = train_world_tokenizer(words * 4 + where, 1024, template_markers=True)
    cells = train_world_tokenizer(words * 4 + where, 1024, template_markers=True, position_cells=True)
    assert len(position_tokens()) == 8  # four two-word cells, after a space and at an answer's start
    def pieces(tokenizer, text):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        return tokenizer.convert_ids_to_tokens(ids)

    assert " top left" in pieces(cells, "the top left large red star")
    assert " top left" not in pieces(plain, "the top left large red star")
    assert pieces(cells, " [/INST]bottom right###") == [" [/INST]", "bottom right", "###"]
    assert " top right" in pieces(cells, "at the top right.")
    top_alone = pieces(cells, "the top large red star")
    assert pieces(plain, "the top large red star") == top_alone and not any(" " in p for p in top_alone)
    # object tokens hold one token per position cell: top left and top share no row
    kinds = object_words(positions=True)
    with_cells, with_words = object_parts(cells, positions=True), object_parts(plain, positions=True)
    assert with_cells.shape[1] == 4 and with_words.shape[1] == 5
    top_left = kinds.index(("large", "red", "star", "top", "left"))
    top = kinds.index(("large", "red", "star", "top"))
    assert set(with_cells[top_left, 3:].tolist()).isdisjoint(with_cells[top, 3:].tolist())
    assert set(with_words[top, 3:4].tolist()) <= set(with_words[top_left, 3:].tolist())
    assert len({tuple(row[3:].tolist()) for row in with_cells}) == len(POSITIONS)
    assert with_cells[top_left].tolist() == cells(" large red star top left", add_special_tokens=False)["input_ids"]


def test_short_prompt_drills_ask_the_same_questions_in_the_first_phrasing():
    from tinygptv.data.instructions import INSTRUCTIONS
    from tinygptv.data.shapes import held_out_pairs

    tokenizer = _tokenizer()
    held_out = held_out_pairs(0)
    for index in range(10):
        long_ids, long_labels = drill_document(tokenizer, index, 0, held_out)
        short_ids, short_labels = drill_document(tokenizer, index, 0, held_out, short_prompts=True)
        answers = lambda ids, labels: sorted(tokenizer.decode([t for t, l in zip(ids, labels) if l != -100]).split("###"))
        assert answers(long_ids, long_labels) == answers(short_ids, short_labels)  # same questions, same answers
        assert len(short_ids) <= len(long_ids)
        text = tokenizer.decode(short_ids)
        for task in ("refer", "identify"):
            for other in INSTRUCTIONS[task][1:]:
                assert other.split("{}")[0].strip() not in text


def _drill_scene(index, held_out):
    from tinygptv.data import shapes as world
    from tinygptv.recipes.pretrain import DRILL_IMAGE_IDS

    scene = world.generate_scene(0, DRILL_IMAGE_IDS + index, "train", held_out)
    world.measure_boxes(scene, world.render(scene))
    return scene


def _turns(tokenizer, ids, task):
    """(question, answer) of a drill's turns of ``task``."""
    turns = [t.split("[/INST]") for t in tokenizer.decode(ids).split("[INST]")[1:] if f"[{task}]" in t]
    return [(q.split(f"[{task}]")[1].strip(), a.split("###")[0]) for q, a in turns]


def test_color_first_drills_ask_every_colour_question_of_the_scene_before_other_kinds():
    from tinygptv.data import shapes as world
    from tinygptv.data.shapes import held_out_pairs

    tokenizer = _tokenizer()
    held_out = held_out_pairs(0)
    asked = {False: 0, True: 0}
    for index in range(20):
        scene = _drill_scene(index, held_out)
        color = {qa.question: qa.answer for qa in world.questions(scene, 0, held_out, 1 << 10) if qa.kind == "color"}
        drills = {first: drill_document(tokenizer, index, 0, held_out, short_prompts=True, color_first=first) for first in asked}
        for first, (ids, _) in drills.items():
            vqa = _turns(tokenizer, ids, "vqa")
            assert len(vqa) == 6 and any(q == "How many objects are there?" for q, _ in vqa)
            said = [(q, a) for q, a in vqa if q in color]
            assert all(color[q] == a for q, a in said)  # right answers
            asked[first] += len(said)
            if first:
                assert len(said) == min(len(color), 4)  # all of them, up to the 4 after count and existence
        # the refer and identify turns are untouched
        for task in ("refer", "identify"):
            assert sorted(_turns(tokenizer, drills[True][0], task)) == sorted(_turns(tokenizer, drills[False][0], task))
    assert asked[True] > 2 * asked[False]


def test_shape_phrase_drills_name_an_object_by_its_shape_wherever_that_picks_it_out():
    from tinygptv.data.boxes import format_box, normalize_box
    from tinygptv.data import shapes as world
    from tinygptv.data.shapes import held_out_pairs

    tokenizer = _tokenizer()
    held_out = held_out_pairs(0)
    changed = 0
    for index in range(20):
        scene = _drill_scene(index, held_out)
        ids, _ = drill_document(tokenizer, index, 0, held_out, short_prompts=True, shape_phrases=True)
        plain, _ = drill_document(tokenizer, index, 0, held_out, short_prompts=True)
        boxes = {format_box(normalize_box(o.box, world.CANONICAL_SIZE, world.CANONICAL_SIZE)): o for o in scene.objects}
        for (question, box), (before, same_box) in zip(
            sorted(_turns(tokenizer, ids, "refer"), key=lambda t: t[1]), sorted(_turns(tokenizer, plain, "refer"), key=lambda t: t[1])
        ):
            assert box == same_box
            obj = boxes[box]
            if sum(o.shape == obj.shape for o in scene.objects) == 1:
                assert question.endswith(f"the {obj.shape}?")
                changed += question != before
            else:
                assert question == before
        assert _turns(tokenizer, ids, "identify") == _turns(tokenizer, plain, "identify")
    assert changed > 5


def test_target_positions_loss_equals_the_causal_lm_loss_and_its_gradients():
    from tinygptv.config import get_preset
    from tinygptv.model.language import build_language_model
    from tinygptv.recipes.micro import plain_language_config
    from tinygptv.recipes.pretrain import TargetPositionsLoss

    torch.manual_seed(0)
    lm = build_language_model(plain_language_config(get_preset("tinygptv-tiny")), 0.02)
    ids = torch.randint(3, 100, (3, 24))
    labels = ids.clone()
    labels[:, :9] = -100
    labels[1, 15:] = -100
    reference = lm(input_ids=ids, labels=labels).loss
    reference.backward()
    grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()
    loss = TargetPositionsLoss(lm)(ids, labels)
    loss.backward()
    assert torch.allclose(loss, reference, atol=1e-6)
    for name, p in lm.named_parameters():
        assert torch.allclose(p.grad, grads[name], atol=1e-6), name


def test_fresh_vision_images_are_new_scenes_drawn_by_the_world_rules(tmp_path):
    import numpy as np
    from PIL import Image

    from tinygptv.data import shapes as world
    from tinygptv.recipes.pretrain import fresh_scenes, normalize_pixels

    held_out = world.held_out_pairs(0)
    scenes, pixels = fresh_scenes(0, range(40), held_out)
    again, same = fresh_scenes(0, range(40), held_out)
    assert torch.equal(pixels, same) and [s.to_json() for s in scenes] == [s.to_json() for s in again]
    assert pixels.shape == (40, CANONICAL_SIZE, CANONICAL_SIZE, 3) and pixels.dtype == torch.uint8
    assert not {o.pair for s in scenes for o in s.objects} & set(held_out)
    for scene, image in zip(scenes[:5], pixels[:5]):  # boxes measured on the very pixels the ViT sees
        x1, y1, x2, y2 = scene.objects[0].box
        color = world.COLORS[scene.objects[0].color]
        assert (image[y1:y2, x1:x2] == torch.tensor(color)).all(-1).any()
    # normalised exactly as the image processor does it
    from tinygptv.data.image_processing import ImageProcessor

    path = tmp_path / "a.png"
    Image.fromarray(np.asarray(pixels[0])).save(path)
    expected = ImageProcessor(CANONICAL_SIZE)(Image.open(path))
    assert torch.allclose(normalize_pixels(pixels[:1])[0], expected, atol=1e-5)


@pytest.mark.parametrize("set_matching", [False, True])
def test_vision_pretraining_on_fresh_images_trains_and_repeats(toy_run, set_matching):
    import dataclasses

    from tinygptv.config import get_preset
    from tinygptv.model.tinygptv import TinyGPTV
    from tinygptv.recipes.micro import pretrain_config
    from tinygptv.recipes.pretrain import pretrain_vision
    from transformers import PreTrainedTokenizerFast

    out, _ = toy_run
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out / "tokenizer")
    settings = dataclasses.replace(toy_recipe().vision, steps=2, batch_size=2, fresh_images=True, set_matching=set_matching)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = TinyGPTV(pretrain_config(get_preset("tinygptv-micro")), tokenizer=tokenizer)
        before = model.vision.state_dict()["model.embeddings.patch_embedding.weight"].clone()
        losses = pretrain_vision(model, out / "world", settings, seed=0)
        after = model.vision.state_dict()["model.embeddings.patch_embedding.weight"]
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
        assert not torch.equal(before, after)
        runs.append((losses, after))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])


def test_full_name_drills_answer_identify_with_size_colour_and_shape():
    from tinygptv.data.shapes import held_out_pairs
    from tinygptv.eval.shapes import objects_described
    from tinygptv.recipes.pretrain import DRILL_IMAGE_IDS

    from tinygptv.data import shapes as world

    tokenizer = _tokenizer()
    held_out = held_out_pairs(0)
    checked = 0
    for index in range(20):
        ids, labels = drill_document(tokenizer, index, 0, held_out, full_names=True)
        plain_ids, plain_labels = drill_document(tokenizer, index, 0, held_out)
        scene = world.generate_scene(0, DRILL_IMAGE_IDS + index, "train", held_out)
        world.measure_boxes(scene, world.render(scene))
        turns = tokenizer.decode(ids).split("[INST]")[1:]
        for turn in turns:
            if "[identify]" not in turn:
                continue
            answer = turn.split("[/INST]")[1].split("###")[0]
            picked = objects_described(answer, scene.objects)
            assert len(picked) == 1  # still names exactly one object
            obj = scene.objects[picked[0]]
            if sum(o.describe() == obj.describe() for o in scene.objects) == 1:
                assert answer == f"the {obj.describe()}"
                checked += 1
        # everything but the identify answers is unchanged
        strip = lambda t: [turn for turn in tokenizer.decode(t).split("[INST]") if "[identify]" not in turn]
        assert strip(ids) == strip(plain_ids)
    assert checked > 20


def test_placed_name_drills_answer_identify_with_position_then_full_name():
    """``placed_names``: every ``[identify]`` answer of a drill is "the {position} {size} {colour}
    {shape}" of the boxed object (the benchmark's reader picks exactly that object from it), and
    every other turn is the drill without the option."""
    from tinygptv.data.boxes import parse_box
    from tinygptv.data.boxes import normalize_box
    from tinygptv.data.shapes import held_out_pairs
    from tinygptv.eval.shapes import objects_described
    from tinygptv.recipes.pretrain import DRILL_IMAGE_IDS

    from tinygptv.data import shapes as world

    tokenizer = _tokenizer()
    held_out = held_out_pairs(0)
    checked = 0
    for index in range(20):
        ids, _ = drill_document(tokenizer, index, 0, held_out, full_names=True, placed_names=True)
        plain_ids, _ = drill_document(tokenizer, index, 0, held_out, full_names=True)
        scene = world.generate_scene(0, DRILL_IMAGE_IDS + index, "train", held_out)
        world.measure_boxes(scene, world.render(scene))
        for turn in tokenizer.decode(ids).split("[INST]")[1:]:
            if "[identify]" not in turn:
                continue
            question, answer = turn.split("[/INST]")
            answer = answer.split("###")[0]
            box = parse_box(question)
            (boxed,) = [k for k, o in enumerate(scene.objects) if normalize_box(o.box, world.CANONICAL_SIZE, world.CANONICAL_SIZE) == box]
            obj = scene.objects[boxed]
            assert answer == f"the {obj.position()} {obj.describe()}"
            assert objects_described(answer, scene.objects) == [boxed]
            checked += 1
        strip = lambda t: [turn for turn in tokenizer.decode(t).split("[INST]") if "[identify]" not in turn]
        assert strip(ids) == strip(plain_ids)
    assert checked > 20


def test_recipe_settings_are_set_from_text_with_their_types():
    recipe = MicroRecipe()
    recipe.set("lm.drill_short_prompts", "true")
    recipe.set("lm.lr", "1e-3")
    recipe.set("vision.steps", "5")
    recipe.set("template_tokens", "yes")
    recipe.set("eval_limit", "null")
    assert recipe.lm.drill_short_prompts is True and recipe.lm.lr == 1e-3 and recipe.vision.steps == 5
    assert recipe.template_tokens is True and recipe.eval_limit is None
    recipe.set("lm_seed", "5")  # an optional setting; unset (null), the seed's
    assert recipe.lm_seed == 5 and recipe.language_seed == 5 and recipe.seed == 0
    recipe.set("lm_seed", "null")
    assert recipe.lm_seed is None and recipe.language_seed == 0
    recipe.set("lm.lr", "2")  # an int where a float is wanted
    assert recipe.lm.lr == 2.0 and isinstance(recipe.lm.lr, float)
    for key, value in [("lm.nope", "1"), ("nope", "1"), ("lm", "1"), ("lm.steps.x", "1")]:
        with pytest.raises(ValueError, match="unknown recipe setting"):
            recipe.set(key, value)
    for key, value in [("lm.steps", "many"), ("lm.drill_short_prompts", "1"), ("vision.steps", "2.5"), ("lm_seed", "two"), ("lm_seed", "1.5")]:
        with pytest.raises(ValueError, match="takes a"):
            recipe.set(key, value)


def test_set_matching_scores_the_object_groups_against_their_cheapest_assignment():
    from tinygptv.recipes.pretrain import GROUP, SCENE_OBJECTS, VisionHeads

    tokenizer = _tokenizer()
    truth = torch.tensor([scene_tokens(reading_order(_scene()), tokenizer, range(SCENE_OBJECTS))])
    embeddings = torch.randn(len(tokenizer), 8, generator=torch.Generator().manual_seed(0))
    width, start = len(GROUP), 3
    # the queries write the scene with its groups moved: query group q holds true group order[q]
    order = [2, 0, 3, 1]
    written = truth.clone()
    for q, t in enumerate(order):
        written[:, start + q * width : start + (q + 1) * width] = truth[:, start + t * width : start + (t + 1) * width]
    heads = VisionHeads(16, 16, 8, set_matching=True)
    plain = VisionHeads(16, 16, 8)
    queries = torch.randn(1, SCENE_LENGTH, 16)
    mapped = embeddings[written]
    assert torch.equal(VisionHeads.match(mapped @ embeddings.T * 20, mapped, truth, embeddings), written)
    assert torch.equal(VisionHeads.match(embeddings[truth] @ embeddings.T * 20, embeddings[truth], truth, embeddings), truth)
    # the background, the end token and each group's contents are kept; only groups move
    plain.load_state_dict(heads.state_dict())
    matched = VisionHeads.match(heads.to_lm(queries) @ embeddings.T, heads.to_lm(queries), truth, embeddings)
    assert torch.equal(matched[:, :start], truth[:, :start]) and matched[0, -1] == truth[0, -1]
    groups = lambda ids: sorted(ids[0, start : start + SCENE_OBJECTS * width].view(SCENE_OBJECTS, width).tolist())
    assert groups(matched) == groups(truth)
    # the set loss is the plain loss against the matched targets, and no more than the reading-order loss
    set_loss = heads.token_loss(queries, truth, embeddings)
    assert torch.allclose(set_loss, plain.token_loss(queries, matched, embeddings))
    assert set_loss <= plain.token_loss(queries, truth, embeddings) + 1e-6


def test_a_resumed_recipe_skips_finished_phases_and_writes_the_same_model(toy_run, tmp_path):
    import json
    import shutil

    done, _ = toy_run
    out = tmp_path / "killed"
    shutil.copytree(done, out)
    # as if killed during stage 3: its checkpoints are there, its weights and everything after are not
    report = json.loads((out / "report.json").read_text())
    for name in ("stage 3", "eval 3", "stage 4", "eval 4", "package"):
        del report["phases"][name]
    for key in ("stages", "accuracy"):
        report[key] = {k: v for k, v in report[key].items() if k in ("1", "2")}
    del report["total_wall_s"]
    (out / "report.json").write_text(json.dumps(report))
    (out / "stage3" / "trainable.safetensors").unlink()
    shutil.rmtree(out / "stage4")
    shutil.rmtree(out / "model")

    with pytest.raises(ValueError, match="--resume"):
        run_micro_recipe(out, toy_recipe(), stage_overrides=TOY_STAGES, log=lambda m: None)
    with pytest.raises(ValueError, match="seed"):
        run_micro_recipe(out, toy_recipe(seed=1), stage_overrides=TOY_STAGES, log=lambda m: None, resume=True)
    logged: list[str] = []
    resumed = run_micro_recipe(out, toy_recipe(), stage_overrides=TOY_STAGES, log=logged.append, resume=True)
    started = [m for m in logged if m.startswith("== ") and " done in " not in m]
    assert [m.split(" (")[0] for m in started] == ["== stage 3", "== eval 3", "== stage 4", "== eval 4", "== package"]
    assert resumed["resumed"] == 1 and set(resumed["accuracy"]) == {"1", "2", "3", "4"}

    def hashes(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    assert hashes(out / "model") == hashes(done / "model")


def test_reuse_takes_the_phases_whose_settings_match_and_reruns_the_rest(toy_run, tmp_path):
    import dataclasses
    import json

    from tinygptv.recipes.micro import reuse_phases

    done, _ = toy_run

    def started(log: list[str]) -> list[str]:
        return [m.split(" (")[0][3:] for m in log if m.startswith("== ") and " done in " not in m]

    # the same recipe: every phase before the stages is taken; the stages give the same model
    logged: list[str] = []
    same = run_micro_recipe(tmp_path / "same", toy_recipe(), stage_overrides=TOY_STAGES, evaluate_stages=False,
                            log=logged.append, reuse=done)  # fmt: skip
    assert started(logged) == ["stage 1", "stage 2", "stage 3", "stage 4", "package"]
    assert all(same["phases"][p]["reused_from"] == str(done) for p in ("world", "tokenizer", "language model", "vision", "language model anneal", "base"))
    assert same["pretrain_loss"] == json.loads((done / "report.json").read_text())["pretrain_loss"]

    def hashes(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    assert hashes(tmp_path / "same" / "model") == hashes(done / "model")

    # another vision setting: the world, tokenizer and LM are taken; vision, base and stages run
    recipe = toy_recipe()
    recipe.vision = dataclasses.replace(recipe.vision, steps=2)
    logged = []
    other = run_micro_recipe(tmp_path / "vision", recipe, stage_overrides=TOY_STAGES, evaluate_stages=False,
                             log=logged.append, reuse=done)  # fmt: skip
    assert started(logged) == ["vision", "language model anneal", "base", "stage 1", "stage 2", "stage 3", "stage 4", "package"]
    assert "reused_from" in other["phases"]["language model"] and "reused_from" not in other["phases"]["vision"]
    assert hashes(tmp_path / "vision" / "lm") == hashes(done / "lm")
    assert hashes(tmp_path / "vision" / "vision") != hashes(done / "vision")
    assert "(reused from" in (tmp_path / "vision" / "report.md").read_text()

    # another LM seed: the world and tokenizer are taken, the LM is drawn anew; no LM seed (null)
    # draws the seed's LM, and so the same model as an LM seed equal to the seed
    runs = {}
    for lm_seed in (None, 0):
        logged = []
        runs[lm_seed] = tmp_path / f"lm{lm_seed}"
        run_micro_recipe(runs[lm_seed], toy_recipe(lm_seed=lm_seed), stage_overrides=TOY_STAGES,
                         evaluate_stages=False, log=logged.append, reuse=done)  # fmt: skip
        assert started(logged)[0] == "language model"
        assert hashes(runs[lm_seed] / "tokenizer") == hashes(done / "tokenizer")
        assert hashes(runs[lm_seed] / "lm") != hashes(done / "lm")  # toy_run's LM seed is the default, 3
    assert hashes(runs[None] / "lm") == hashes(runs[0] / "lm")
    assert hashes(runs[None] / "model") == hashes(runs[0] / "model")

    # another seed changes the world: nothing is taken; an existing run is not overwritten
    assert reuse_phases(done, tmp_path / "seed", toy_recipe(seed=1)) == []
    with pytest.raises(ValueError, match="already holds a recipe run"):
        reuse_phases(done, tmp_path / "same", toy_recipe())
    with pytest.raises(ValueError, match="not both"):
        run_micro_recipe(tmp_path / "both", toy_recipe(), reuse=done, resume=True)


def test_attention_loss_rewards_looking_at_the_objects_patches():
    from tinygptv.recipes.pretrain import GROUP, SCENE_OBJECTS, VisionHeads

    scene = _scene()
    grid, patch = 14, 16
    targets = [DenseTargets(scene, grid, patch)]
    rank = targets[0].labels[:, list(PATCH_LABELS).index("rank")]
    start = SCENE_LENGTH - 1 - SCENE_OBJECTS * len(GROUP)
    uniform = torch.full((1, 2, SCENE_LENGTH, 1 + grid * grid), 1.0 / (1 + grid * grid))
    aimed = uniform.clone()
    for k in range(len(scene.objects)):  # group k's queries look at object k's patches only
        on = torch.cat([torch.zeros(1, dtype=torch.bool), rank == k]).float()
        aimed[0, :, start + k * len(GROUP) : start + (k + 1) * len(GROUP)] = on / on.sum()
    swapped = aimed.clone()  # each group looking at the other object
    swapped[0, :, start : start + len(GROUP)] = aimed[0, :, start + len(GROUP) : start + 2 * len(GROUP)]
    swapped[0, :, start + len(GROUP) : start + 2 * len(GROUP)] = aimed[0, :, start : start + len(GROUP)]
    loss = {name: VisionHeads.attention_loss(a, targets).item() for name, a in
            {"aimed": aimed, "uniform": uniform, "swapped": swapped}.items()}
    patches = [int((rank == k).sum()) for k in range(2)]
    assert loss["aimed"] == pytest.approx(sum(torch.log(torch.tensor(patches, dtype=torch.float))).item() / 2, abs=1e-4)
    assert loss["aimed"] < loss["uniform"] < loss["swapped"]


def test_vision_pretraining_with_the_attention_loss_and_soft_coordinates_trains_and_leaves_the_attention_kind(toy_run):
    import dataclasses

    from tinygptv.config import get_preset
    from tinygptv.model.tinygptv import TinyGPTV
    from tinygptv.recipes.micro import pretrain_config
    from tinygptv.recipes.pretrain import pretrain_vision
    from transformers import PreTrainedTokenizerFast

    out, _ = toy_run
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out / "tokenizer")
    torch.manual_seed(0)
    model = TinyGPTV(pretrain_config(get_preset("tinygptv-micro")), tokenizer=tokenizer)
    kind = model.qformer.model.config._attn_implementation
    before = model.qformer.query_tokens.detach().clone()
    settings = dataclasses.replace(toy_recipe().vision, steps=2, batch_size=2, attention_weight=1.0, coordinate_sigma=1.0)
    losses = pretrain_vision(model, out / "world", settings, seed=0)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(before, model.qformer.query_tokens)
    assert model.qformer.model.config._attn_implementation == kind


def test_resume_treats_settings_newer_than_the_run_as_their_defaults(tmp_path):
    import json

    from tinygptv.recipes.micro import check_resumable

    recipe = MicroRecipe()
    default = recipe.vision.attention_weight
    ran = recipe.to_dict()
    del ran["vision"]["attention_weight"]  # a run from before the setting existed: it ran as the default
    (tmp_path / "report.json").write_text(json.dumps({"recipe": ran}))
    check_resumable(tmp_path, recipe)
    recipe.set("vision.attention_weight", str(default + 0.5))
    with pytest.raises(ValueError, match=rf"vision.attention_weight: {default} \(run\) vs {default + 0.5} \(now\)"):
        check_resumable(tmp_path, recipe)

    # lm_seed came with a default (3) other than what older runs did (the seed's LM): they ran as None
    recipe = MicroRecipe()
    ran = recipe.to_dict()
    del ran["lm_seed"]
    (tmp_path / "report.json").write_text(json.dumps({"recipe": ran}))
    with pytest.raises(ValueError, match=r"lm_seed: None \(run\) vs 3 \(now\)"):
        check_resumable(tmp_path, recipe)
    recipe.set("lm_seed", "null")
    check_resumable(tmp_path, recipe)


def test_coordinate_soft_targets_spread_over_neighbouring_values_and_favour_near_misses():
    from tinygptv.recipes.pretrain import VisionHeads, coordinate_token_ids

    tokenizer = _tokenizer()
    coords = coordinate_token_ids(tokenizer)
    vocab = len(tokenizer)
    word = tokenizer(" red", add_special_tokens=False)["input_ids"][0]
    heads = VisionHeads(16, 16, 8, coordinate_ids=coords, coordinate_sigma=1.5)
    wanted = heads.targets(torch.tensor([coords[40], word, coords[0]]), vocab)
    assert wanted.shape == (3, vocab)
    assert torch.allclose(wanted.sum(-1), torch.ones(3))
    assert torch.equal(wanted[1], torch.nn.functional.one_hot(torch.tensor(word), vocab).float())
    near = wanted[0, coords]  # the distribution over the values 0..100
    assert near.argmax() == 40 and near[39] == pytest.approx(near[41].item()) and near[38] < near[39] < near[40]
    assert near[30].item() < 1e-6 and wanted[0].sum() == pytest.approx(near.sum().item())
    assert wanted[2, coords].argmax() == 0 and wanted[2, coords[3]] > 0  # the edge keeps its mass
    # a query that writes the neighbouring value costs less than one far off; one-hot scores them alike
    logits = torch.full((2, vocab), -5.0)
    logits[0, coords[41]] = logits[1, coords[80]] = 5.0
    truth = torch.tensor([coords[40], coords[40]])
    soft = torch.nn.functional.cross_entropy(logits, heads.targets(truth, vocab), reduction="none")
    hard = torch.nn.functional.cross_entropy(logits, VisionHeads(16, 16, 8).targets(truth, vocab), reduction="none")
    assert soft[0] < soft[1] - 1.0 and hard[0] == pytest.approx(hard[1].item())


@pytest.mark.parametrize("head_at_targets_only", [False, True])
def test_isolated_drill_turns_score_each_question_as_a_prompt_of_its_own(head_at_targets_only):
    """A drill row of isolated turns gives every answer token the same loss as the one-question
    prompt alone (scene, question, answer; positions from 0), and no turn sees another."""
    from tinygptv.config import get_preset
    from tinygptv.data.shapes import held_out_pairs
    from tinygptv.model.language import build_language_model
    from tinygptv.recipes.micro import plain_language_config
    from tinygptv.recipes.pretrain import TargetPositionsLoss, _CausalLMLoss, segment_mask

    tokenizer = _tokenizer()
    held_out = held_out_pairs(0)
    torch.manual_seed(0)
    lm = build_language_model(plain_language_config(get_preset("tinygptv-micro")), 0.02).eval()
    assert len(tokenizer) <= lm.config.vocab_size
    tokens, labels, positions, segments = drill_document(tokenizer, 3, 0, held_out, short_prompts=True, isolated_turns=True)
    chained, _ = drill_document(tokenizer, 3, 0, held_out, short_prompts=True)
    turns = max(segments)
    assert turns == tokenizer.decode(chained).count("[/INST]") > 3  # the same questions as the conversation
    assert segments[0] == 0 and segments == sorted(segments) and labels[: segments.index(1)] == [-100] * segments.index(1)
    shared = segments.index(1)
    assert tokenizer.decode(tokens[:shared]).count("<Img>") == 1 and "[/INST]" not in tokenizer.decode(tokens[:shared])
    ids, target = torch.tensor([tokens]), torch.tensor([labels])
    loss_module = TargetPositionsLoss(lm) if head_at_targets_only else _CausalLMLoss(lm)
    mask = segment_mask(torch.tensor([segments]))
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=mask, position_ids=torch.tensor([positions])).logits[0]
        row_loss = loss_module(ids, target, mask, torch.tensor([positions]))
    text = tokenizer.decode(tokens)
    losses = []
    for k in range(1, turns + 1):
        at = [i for i, s in enumerate(segments) if s == k]
        # the same turn as a prompt of its own: the shared beginning, then this turn's tokens
        alone = torch.tensor([tokens[:shared] + [tokens[i] for i in at]])
        assert [positions[i] for i in at] == list(range(shared, shared + len(at)))
        with torch.no_grad():
            reference = lm(input_ids=alone).logits[0, shared:]
        assert torch.allclose(logits[at], reference, atol=1e-5), k
        for i in at:
            if i + 1 < len(labels) and labels[i + 1] != -100 and segments[i + 1] == k:
                losses.append(torch.nn.functional.cross_entropy(logits[i], torch.tensor(labels[i + 1])))
    # the loss averages exactly the answer tokens of every turn, each predicted inside its own turn
    assert len(losses) == sum(1 for l in labels if l != -100)
    assert row_loss.item() == pytest.approx(torch.stack(losses).mean().item(), abs=1e-5)
    # the row writes the scene and "[INST]" once, then each question and its answer
    assert text.count("[INST]") == 1 and text.count("[/INST]") == turns


def test_language_model_probe_scores_a_runs_lm_on_true_scenes(toy_run, capsys):
    import json

    probe = load_benchmark("probe_micro_lm")
    out, _ = toy_run
    assert probe.main([str(out), "--images", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"vqa", "refer", "identify"} <= set(result) and result["images"] == 2
    assert result["vqa"]["n"] >= 4 and 0 <= result["vqa"]["accuracy"] <= 100  # two scenes, 2+ questions each
    assert sum(result[k]["n"] for k in result if k.startswith("vqa/")) == result["vqa"]["n"]
    assert result["refer"]["n"] == result["identify"]["n"] > 0


def test_object_tokens_write_each_object_as_the_sum_of_its_three_words():
    from tinygptv.config import get_preset
    from tinygptv.model.language import build_language_model
    from tinygptv.recipes.micro import plain_language_config
    from tinygptv.recipes.pretrain import (
        GROUP,
        OBJECT_ID_BASE,
        embed_scene_ids,
        object_parts,
        object_words,
        scene_table,
        scene_table_ids,
    )

    tokenizer = _tokenizer()
    scene = reading_order(_scene())
    words = scene_tokens(scene, tokenizer, [2, 0, 1, 3])
    ids = scene_tokens(scene, tokenizer, [2, 0, 1, 3], object_tokens=True)
    assert len(ids) == len(words) == SCENE_LENGTH
    assert ids[:3] == words[:3] and ids[-1] == words[-1]  # background and end as before
    width = len(GROUP)
    circle, star = (ids[3 + g * width : 3 + (g + 1) * width] for g in (2, 0))  # objects 0 and 1's groups
    circle_words = words[3 + 2 * width : 3 + 3 * width]
    assert circle[1:5] == circle_words[3:]  # the box, token for token
    assert circle[0] == circle[5] == circle[6] == OBJECT_ID_BASE + object_words().index(("small", "blue", "circle"))
    assert star[0] == OBJECT_ID_BASE + object_words().index(("large", "red", "star")) != circle[0]
    assert ids[3 + width : 3 + 2 * width] == words[3 + width : 3 + 2 * width]  # an empty group is unchanged

    torch.manual_seed(0)
    lm = build_language_model(plain_language_config(get_preset("tinygptv-micro")), 0.02)
    embedding, parts = lm.get_input_embeddings(), object_parts(tokenizer)
    rows = torch.tensor([ids, words])
    vectors = embedding_before = embed_scene_ids(embedding, rows, parts)
    expected = embedding.weight[circle_words[:3]].sum(0)  # " small" + " blue" + " circle"
    assert torch.allclose(vectors[0, 3 + 2 * width], expected) and torch.allclose(vectors[0, 3 + 2 * width + 6], expected)
    assert torch.equal(vectors[1], embedding(rows[1]))  # ordinary ids: the embedding's rows
    assert torch.equal(vectors[0, :3], embedding(rows[1, :3]))
    embedding_before.sum().backward()  # the gradient reaches the three words' rows (three object tokens each)
    assert embedding.weight.grad[circle_words[0]].abs().sum() > 0 and embedding.weight.grad[circle_words[2]].abs().sum() > 0
    # the Q-Former's target table holds the very same vectors at the mapped rows
    table = scene_table(embedding.weight.detach(), parts)
    assert table.shape[0] == embedding.weight.shape[0] + len(object_words())
    assert torch.allclose(table[scene_table_ids(rows, embedding.weight.shape[0])], vectors.detach())
    with pytest.raises(ValueError, match="object parts"):
        embed_scene_ids(embedding, rows, None)


@pytest.mark.parametrize("positions", [False, True])
def test_object_token_drills_and_documents_read_them_and_the_lm_trains_on_them(positions):
    import dataclasses

    from tinygptv.config import get_preset
    from tinygptv.data.shapes import held_out_pairs
    from tinygptv.model.language import build_language_model
    from tinygptv.recipes.micro import plain_language_config
    from tinygptv.recipes.pretrain import (
        OBJECT_ID_BASE,
        TargetPositionsLoss,
        _CausalLMLoss,
        embed_scene_ids,
        object_parts,
        pretrain_language_model,
    )

    tokenizer = _tokenizer()
    held_out = held_out_pairs(0)
    tokens, labels = drill_document(
        tokenizer, 5, 0, held_out, short_prompts=True, object_tokens=True, object_positions=positions
    )
    words, word_labels = drill_document(tokenizer, 5, 0, held_out, short_prompts=True)
    assert labels == word_labels and len(tokens) == len(words)  # the same questions and answers
    objects = [i for i, t in enumerate(tokens) if t >= OBJECT_ID_BASE]
    assert objects and all(labels[i] == -100 for i in objects)  # read, never written
    assert [t for t in tokens if t < OBJECT_ID_BASE] != [t for t in words]  # the words went into object tokens
    torch.manual_seed(0)
    lm = build_language_model(plain_language_config(get_preset("tinygptv-micro")), 0.02)
    parts = object_parts(tokenizer, positions)
    ids, target = torch.tensor([tokens]), torch.tensor([labels])
    reference = lm(inputs_embeds=embed_scene_ids(lm.get_input_embeddings(), ids, parts), labels=target).loss
    for module in (_CausalLMLoss(lm, parts), TargetPositionsLoss(lm, parts)):
        assert module(ids, target).item() == pytest.approx(reference.item(), abs=1e-5)
    # a few steps of the LM loop on object-token drills and documents: it trains, and the words' rows move
    document = ([("<Img><ImageHere></Img> [vqa] what colour is the star?", False), ("red", True)], _scene())
    settings = PretrainSettings(
        steps=2, batch_size=2, seq_len=256, drill_fraction=0.5, warmup_steps=1, object_tokens=True, object_positions=positions
    )
    star = tokenizer(" star", add_special_tokens=False)["input_ids"][0]
    before = lm.get_input_embeddings().weight[star].detach().clone()
    losses = pretrain_language_model(lm, tokenizer, [document] * 8, settings, seed=0, held_out=held_out)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(before, lm.get_input_embeddings().weight[star])
    with pytest.raises(ValueError, match="object_tokens"):
        run_micro_recipe("unused", dataclasses.replace(toy_recipe(), lm=settings))
    vision = dataclasses.replace(toy_recipe().vision, object_tokens=True)
    with pytest.raises(ValueError, match="object_positions"):
        run_micro_recipe("unused", dataclasses.replace(toy_recipe(), lm=dataclasses.replace(settings, object_positions=True), vision=vision))


@pytest.mark.parametrize("positions", [False, True])
def test_vision_pretraining_with_object_tokens_trains(toy_run, positions):
    import dataclasses

    from tinygptv.config import get_preset
    from tinygptv.model.tinygptv import TinyGPTV
    from tinygptv.recipes.micro import pretrain_config
    from tinygptv.recipes.pretrain import pretrain_vision
    from transformers import PreTrainedTokenizerFast

    out, _ = toy_run
    # the toy world's texts are too few for its tokenizer to make every position word one token
    tokenizer = _tokenizer() if positions else PreTrainedTokenizerFast.from_pretrained(out / "tokenizer")
    torch.manual_seed(0)
    model = TinyGPTV(pretrain_config(get_preset("tinygptv-micro")), tokenizer=tokenizer)
    before = model.qformer.query_tokens.detach().clone()
    settings = dataclasses.replace(
        toy_recipe().vision, steps=2, batch_size=2, object_tokens=True, object_positions=positions, set_matching=True
    )
    losses = pretrain_vision(model, out / "world", settings, seed=0)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(before, model.qformer.query_tokens)


def test_object_positions_add_where_the_object_is_to_its_object_token():
    from tinygptv.config import get_preset
    from tinygptv.model.language import build_language_model
    from tinygptv.recipes.micro import plain_language_config
    from tinygptv.recipes.pretrain import (
        GROUP,
        OBJECT_ID_BASE,
        POSITIONS,
        embed_scene_ids,
        object_parts,
        object_words,
        scene_table,
        scene_table_ids,
    )

    assert len(POSITIONS) == 9 and {"top left", "center", "bottom", "right"} <= set(POSITIONS)
    tokenizer = _tokenizer()
    scene = reading_order(_scene())  # the small blue circle (left), the large red star (top right)
    assert [o.position() for o in scene.objects] == ["left", "top right"]
    plain = scene_tokens(scene, tokenizer, [0, 1, 2, 3], object_tokens=True)
    ids = scene_tokens(scene, tokenizer, [0, 1, 2, 3], object_tokens=True, object_positions=True)
    width = len(GROUP)
    kinds = object_words(positions=True)
    assert ids[3] == OBJECT_ID_BASE + kinds.index(("small", "blue", "circle", "left"))
    assert ids[3 + width] == OBJECT_ID_BASE + kinds.index(("large", "red", "star", "top", "right"))
    assert [i for i in ids if i < OBJECT_ID_BASE] == [i for i in plain if i < OBJECT_ID_BASE]  # boxes unchanged
    parts = object_parts(tokenizer, positions=True)
    assert parts.shape == (len(kinds), 5) and (parts[kinds.index(("small", "blue", "circle", "left"))] == -1).sum() == 1
    torch.manual_seed(0)
    embedding = build_language_model(plain_language_config(get_preset("tinygptv-micro")), 0.02).get_input_embeddings()
    vectors = embed_scene_ids(embedding, torch.tensor([ids]), parts)[0]
    word = lambda w: embedding.weight[tokenizer(f" {w}", add_special_tokens=False)["input_ids"][0]]
    assert torch.allclose(vectors[3], word("small") + word("blue") + word("circle") + word("left"), atol=1e-6)
    assert torch.allclose(vectors[3 + width], word("large") + word("red") + word("star") + word("top") + word("right"), atol=1e-6)
    table = scene_table(embedding.weight.detach(), parts)
    assert torch.allclose(table[scene_table_ids(torch.tensor(ids), embedding.weight.shape[0])], vectors.detach(), atol=1e-6)


def test_factor_projection_splits_a_head_exactly_into_two_projections():
    from tinygptv.recipes.pretrain import factor_projection

    torch.manual_seed(0)
    head, first, second = torch.nn.Linear(12, 10), torch.nn.Linear(12, 20), torch.nn.Linear(20, 10)
    factor_projection(head, first, second, seed=3)
    x = torch.randn(7, 12)
    assert torch.allclose(second(first(x)), head(x), atol=1e-5)
    # first is an isometry into the wider space: lengths and angles kept, nothing collapsed
    assert torch.allclose(first.weight.T @ first.weight, torch.eye(12), atol=1e-5)
    assert torch.count_nonzero(first.bias) == 0
    with pytest.raises(ValueError, match="cannot factor"):
        factor_projection(head, torch.nn.Linear(12, 8), torch.nn.Linear(8, 10), seed=3)
    with pytest.raises(ValueError, match="does not match"):
        factor_projection(head, first, torch.nn.Linear(20, 9), seed=3)


def test_calibrated_norms_bring_the_lm_with_added_norms_closer_to_the_pretrained_lm():
    from tinygptv.model.tinygptv import TinyGPTV
    from tinygptv.recipes.micro import calibrate_added_norms

    torch.manual_seed(0)
    model = TinyGPTV("tinygptv-tiny").eval()
    lm = model.lm
    norms = [m for n, m in lm.named_modules() if n.endswith(("q_layernorm", "k_layernorm", "post_attention_norm"))]
    assert len(norms) == 3 * model.config.language.num_layers
    embeds = torch.randn(3, 9, model.config.language.hidden_size)
    mask = torch.ones(3, 9)
    mask[2, 6:] = 0  # padding is left out of the fit

    def logits(bypass: bool) -> torch.Tensor:
        hooks = [m.register_forward_hook(lambda mod, args, out: args[0]) for m in norms] if bypass else []
        with torch.no_grad():
            out = lm(inputs_embeds=embeds, use_cache=False).logits
        for hook in hooks:
            hook.remove()
        return out

    pretrained = logits(bypass=True)  # the LM as it was before the norms were added
    at_init = (logits(bypass=False) - pretrained).norm()
    fit = calibrate_added_norms(lm, embeds, mask)
    calibrated = (logits(bypass=False) - pretrained).norm()
    assert set(fit) == {n for n, m in lm.named_modules() if m in norms}
    assert all(0 < v <= 1 for v in fit.values())
    assert calibrated < 0.5 * at_init
    assert not all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)


def test_pretrained_projections_and_calibrated_norms_start_stage_one(toy_run, tmp_path):
    from safetensors.torch import load_file

    out, _ = toy_run
    recipe = toy_recipe()
    recipe.vision.pretrained_projections = True
    run = tmp_path / "projections"
    run_micro_recipe(run, recipe, stage_overrides=TOY_STAGES, evaluate_stages=False, log=lambda m: None)
    vision = load_file(str(run / "vision" / "model.safetensors"))
    base = load_file(str(run / "base" / "model.safetensors"))
    fresh = load_file(str(out / "base" / "model.safetensors"))
    names = ("vision_proj.weight", "vision_proj.bias", "lm_proj.weight", "lm_proj.bias")
    key = {n: next(k for k in base if k.endswith(n)) for n in names}
    for name in names:
        assert torch.equal(base[key[name]], vision[name])  # the base starts from the vision phase's head
        assert not torch.equal(base[key[name]], fresh[key[name]]) or name == "vision_proj.bias"
    first = vision["vision_proj.weight"]
    assert torch.allclose(first.T @ first, torch.eye(first.shape[1]), atol=1e-5)
    calibrated = [k for k in base if k.endswith(("q_layernorm.weight", "post_attention_norm.weight"))]
    assert calibrated and not any(torch.equal(base[k], torch.ones_like(base[k])) for k in calibrated)  # not 1 / 0


def test_vision_probe_reads_a_models_image_tokens_back_as_scene_tokens(toy_run, capsys):
    import json

    probe = load_benchmark("probe_micro_vision")
    out, _ = toy_run
    args = ["--data", str(out / "world"), "--model", str(out / "model"), "--images", "3", "--fit-images", "8"]
    assert probe.main([*args, "--steps", "3", "--words"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 3 and result["objects"] >= 3
    for readout in ("projection", "probe"):
        scores = result[readout]
        assert {"background", "object_token", "box_iou_0.5", "coordinate_within_3"} <= set(scores)
        assert all(0 <= v <= 100 for v in scores.values())
        assert scores["coordinate_exact"] <= scores["coordinate_within_1"] <= scores["coordinate_within_3"]


def test_added_norms_probe_scores_the_plain_the_paper_init_and_the_calibrated_lm(toy_run, capsys):
    import json

    probe = load_benchmark("probe_added_norms")
    out, _ = toy_run
    assert probe.main([str(out), "--drills", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["answer_tokens"] > 0
    losses = {k: result[k]["loss"] for k in ("plain", "paper_init", "calibrated")}
    assert all(v > 0 for v in losses.values())
    assert losses["paper_init"] != losses["plain"]  # the added norms at 1 / 0 change the LM


_PARENT_SCRIPT = """
import os, sys, time
import multiprocessing as mp

def worker(parent):
    from tinygptv.recipes.micro import exit_with_parent
    exit_with_parent(parent)
    print(os.getpid(), flush=True)
    time.sleep(120)

if __name__ == "__main__":
    child = mp.get_context("spawn").Process(target=worker, args=(os.getpid(),))
    child.start()
    child.join()
"""


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a dead child nobody has reaped yet)."""
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_recipe_worker_ends_when_its_parent_is_killed(tmp_path):
    # a recipe runs its phases in spawned workers; SIGKILL of the command must not leave them training
    script = tmp_path / "parent.py"
    script.write_text(_PARENT_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert _running(child)
        time.sleep(0.5)
        assert _running(child)  # it waits for its parent, as a worker would
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(child), "the worker outlived its killed parent"
    finally:
        parent.kill()


def test_readout_fit_is_the_least_squares_map_from_queries_to_scene_rows(toy_run, tmp_path):
    from tinygptv import TinyGPTV
    from tinygptv.recipes.pretrain import SCENE_OBJECTS, ImageBank, fit_readout

    out, plain = toy_run
    assert "readout_error" not in plain  # off by default
    # the recipe's base phase refits the projections when asked, and nothing before it changes
    refit = tmp_path / "refit"
    report = run_micro_recipe(
        refit, toy_recipe(readout_images=40), stage_overrides=TOY_STAGES, evaluate_stages=False, log=lambda m: None, reuse=out
    )
    taken = [name for name, phase in report["phases"].items() if phase.get("reused_from")]
    assert taken == ["world", "tokenizer", "language model", "vision", "language model anneal"]
    assert 0 < report["readout_error"] < 1
    before = TinyGPTV.from_pretrained(out / "base").state_dict()
    after = TinyGPTV.from_pretrained(refit / "base").state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(k.startswith(("vision_proj.", "lm_proj.")) for k in changed), changed
    model = TinyGPTV.from_pretrained(out / "base").eval()
    bank = ImageBank(out / "world", "train")
    images = 20
    order = list(range(SCENE_OBJECTS))
    weight = model.lm.get_input_embeddings().weight.detach().double()
    rows = [scene_tokens(reading_order(s), model.tokenizer, order) for s in bank.scenes[:images]]  # the toy's word scenes
    wanted = weight[torch.tensor(rows).flatten()]
    with torch.no_grad():
        queries = model.encode_queries(bank.normalized(range(images))).flatten(0, 1)

        def error() -> float:
            mapped = model.lm_proj(model.vision_proj(queries)).double()
            return float(((mapped - wanted) ** 2).sum())

        torch.nn.init.normal_(model.lm_proj.weight, std=0.5)  # a read-out far off the rows
        before = error()
        fit_readout(model, out / "world", images, seed=0)
        after = error()
        x = torch.cat([queries.double(), torch.ones(len(queries), 1, dtype=torch.float64)], dim=1)
        best = torch.linalg.lstsq(x, wanted).solution
        floor = float(((x @ best - wanted) ** 2).sum())
    assert after < 0.05 * before
    # the least-squares optimum (up to the small ridge and float32 weights), through both projections
    # (the float32 factors cost 0.1 % over the float64 floor on an AMD EPYC, 0.21 % on an Intel Xeon)
    assert floor <= after < 1.005 * floor


def test_readout_probe_reads_true_scenes_as_the_language_model_probe_does(toy_run, capsys, tmp_path):
    import json

    from tinygptv import TinyGPTV

    out, _ = toy_run
    model = TinyGPTV.from_pretrained(out / "base")
    with torch.no_grad():
        torch.nn.init.normal_(model.lm_proj.weight, std=0.5)  # projections far off the rows
    model.save_pretrained(tmp_path / "off")
    lm_probe, readout_probe = load_benchmark("probe_micro_lm"), load_benchmark("probe_micro_readout")
    assert lm_probe.main([str(out), "--images", "3"]) == 0
    alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert readout_probe.main([str(out), "--model", str(tmp_path / "off"), "--images", "3", "--fit-images", "60"]) == 0
    modes = {r["mode"]: r for r in map(json.loads, capsys.readouterr().out.strip().splitlines())}
    assert set(modes) == {"true", "snap", "raw", "lsq"}
    for task in ("vqa", "refer", "identify"):  # the same LM on the same scene vectors: the same answers
        assert modes["true"][task] == alone[task]
        assert all(modes[m][task]["n"] == alone[task]["n"] for m in modes)
    assert modes["true"]["relative_distance_to_rows"] == 0
    assert modes["raw"]["relative_distance_to_rows"] > 0
    # the least-squares read-out is nearer the rows than the scrambled projections
    assert modes["lsq"]["relative_distance_to_rows"] < modes["raw"]["relative_distance_to_rows"]


def test_language_model_probe_jitter_moves_only_the_scene_boxes(toy_run, capsys):
    import json

    probe = load_benchmark("probe_micro_lm")
    out, _ = toy_run
    results = []
    for jitter in ("0", "30"):
        assert probe.main([str(out), "--images", "3", "--jitter", jitter]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    plain, moved = results
    assert moved["jitter"] == 30.0 and plain["jitter"] == 0.0
    assert all(moved[t]["n"] == plain[t]["n"] for t in ("vqa", "refer", "identify"))  # the same questions


def test_lm_anneal_trains_all_but_the_embeddings_and_reuse_keeps_the_vision_phase(toy_run, tmp_path):
    import dataclasses

    from safetensors.torch import load_file

    from tinygptv.recipes.micro import pretrained_lm_file

    out, report = toy_run
    plain, annealed = load_file(str(out / "lm" / "model.safetensors")), load_file(str(out / "lm_anneal" / "model.safetensors"))
    assert pretrained_lm_file(out) == out / "lm_anneal" / "model.safetensors"
    embeddings = "model.embed_tokens.weight"
    assert torch.equal(plain[embeddings], annealed[embeddings])  # what the Q-Former writes into
    moved = [k for k in plain if k != embeddings and not torch.equal(plain[k], annealed[k])]
    assert "lm_head.weight" in moved and any(".mlp." in k for k in moved)
    assert "language model anneal" in report["pretrain_loss"]
    base = load_file(str(out / "base" / "model.safetensors"))  # the stages start from the annealed LM
    head = [k for k in base if k.endswith("lm_head.weight")]
    assert len(head) == 1 and torch.equal(base[head[0]], annealed["lm_head.weight"])

    # another anneal: world, tokenizer, LM and vision are taken; the anneal and everything after run
    recipe = toy_recipe()
    recipe.lm_anneal = dataclasses.replace(recipe.lm_anneal, steps=0)
    logged: list[str] = []
    other = run_micro_recipe(tmp_path / "none", recipe, stage_overrides=TOY_STAGES, evaluate_stages=False,
                             log=logged.append, reuse=out)  # fmt: skip
    started = [m.split(" (")[0][3:] for m in logged if m.startswith("== ") and " done in " not in m]
    assert started[:2] == ["language model anneal", "base"]
    assert all("reused_from" in other["phases"][p] for p in ("world", "tokenizer", "language model", "vision"))
    unannealed = load_file(str(tmp_path / "none" / "lm_anneal" / "model.safetensors"))
    assert all(torch.equal(unannealed[k], plain[k]) for k in plain)  # 0 steps: the LM as it was
    assert "language model anneal" not in other["pretrain_loss"]


def test_stage_overrides_reach_their_own_stage_and_bad_ones_fail_before_any_phase(tmp_path):
    from tinygptv.recipes.micro import default_configs_dir, stage_config, stage_overrides_for

    overrides = ["epochs=1", "stage4.iters_per_epoch=3", "stage2.schedule.warmup_steps=2"]
    assert stage_overrides_for(4, overrides) == ["epochs=1", "iters_per_epoch=3"]
    assert stage_overrides_for(2, overrides) == ["epochs=1", "schedule.warmup_steps=2"]
    assert stage_overrides_for(1, overrides) == ["epochs=1"]
    with pytest.raises(ValueError, match="no stage 7"):
        stage_overrides_for(1, ["stage7.epochs=1"])
    configs, out = default_configs_dir(), tmp_path / "run"
    configs_of = {n: stage_config(configs, n, out, out / "world", out / "base", MicroRecipe(), overrides) for n in (3, 4)}
    assert configs_of[4].iters_per_epoch == 3
    assert configs_of[3].iters_per_epoch == stage_config(configs, 3, out, out / "world", out / "base", MicroRecipe()).iters_per_epoch != 3
    # a setting no stage config has stops the run before the world is made
    with pytest.raises(ValueError, match="no_such_setting"):
        run_micro_recipe(out, toy_recipe(), stage_overrides=[*TOY_STAGES, "stage4.no_such_setting=1"], log=lambda m: None)
    assert not (out / "world").exists() and not (out / "report.json").exists()
