"""The shapes world: deterministic, every answer true to the pixels, read back by the public-format
readers, with a held-out compositional split, and fast to make."""

import hashlib
import json
import re
from collections import Counter, deque

import numpy as np
import pytest
from PIL import Image

from tinygptv.cli import main
from tinygptv.data.boxes import normalize_box, parse_box, parse_grounded
from tinygptv.data.mixture import Mixture, MixtureLoader
from tinygptv.data.readers import (
    CCSBUAlign,
    COCOCaptions,
    Flickr30kEntities,
    LLaVAInstruct,
    RefCOCO,
    VQAv2,
    WebDatasetPairs,
)
from tinygptv.data.shapes import COLORS, SHAPES, SPLITS, load_scenes, make_shapes, shapes_sources, split_sizes

SEED = 7
N = 60


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, N, seed=SEED, image_sizes=(224, 448), shard_size=16)
    return root


# --------------------------------------------------------------------------------------------
# Ground truth re-derived from the pixels, independently of the generator
# --------------------------------------------------------------------------------------------


def components(mask):
    """4-connected components of a boolean mask, as lists of (y, x)."""
    remaining = set(zip(*np.nonzero(mask)))
    blobs = []
    while remaining:
        start = remaining.pop()
        blob, queue = [start], deque([start])
        while queue:
            y, x = queue.popleft()
            for n in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if n in remaining:
                    remaining.remove(n)
                    blob.append(n)
                    queue.append(n)
        blobs.append(blob)
    return blobs


def classify(fill, aspect):
    """Shape from fill ratio (area / box area) and box aspect (w / h)."""
    if fill > 0.95:
        return "square"
    if fill > 0.7:
        return "circle" if aspect < 1.06 else "hexagon"
    if fill > 0.45:
        return "diamond" if aspect < 0.9 else "triangle"
    return "star"


def where(box, size):
    cx, cy = (box[0] + box[2]) / 2 / size, (box[1] + box[3]) / 2 / size
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    vertical = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    return " ".join(w for w in (vertical, horizontal) if w) or "center"


def pixel_objects(path):
    """Objects seen in an image file: colour, shape, size, pixel box (x2/y2 exclusive), position."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    size = pixels.shape[0]
    objects = []
    for color, rgb in COLORS.items():
        mask = np.all(pixels == rgb, axis=-1)
        for blob in components(mask):
            ys, xs = zip(*blob)
            box = (min(xs), min(ys), max(xs) + 1, max(ys) + 1)
            w, h = box[2] - box[0], box[3] - box[1]
            objects.append(
                {
                    "color": color,
                    "shape": classify(len(blob) / (w * h), w / h),
                    "size": "large" if max(w, h) > 40 * size / 224 else "small",
                    "box": box,
                    "position": where(box, size),
                }
            )
    return objects


@pytest.fixture(scope="module")
def truth(world):
    return {int(p.stem): pixel_objects(p) for p in sorted((world / "images" / "224").glob("*.png"))}


def matching(objects, phrase):
    """Objects a noun phrase like "the small red circle on the left" / "a star" describes."""
    words = phrase.lower().replace(",", " ").split()
    found = []
    for o in objects:
        if o["shape"] not in words:
            continue
        if any(c in words and c != o["color"] for c in COLORS):
            continue
        if any(s in words and s != o["size"] for s in ("small", "large")):
            continue
        m = re.search(r"(?:on|at|in) the (.+)$", phrase)
        if m and m.group(1) != o["position"]:
            continue
        found.append(o)
    return found


def mentioned_objects(text):
    """(colour, shape) of every "a [size] colour shape" mention in a text."""
    pattern = rf"\b(?:an?|one) (?:(?:small|large) )?({'|'.join(COLORS)}) ({'|'.join(SHAPES)})\b"
    return Counter(re.findall(pattern, text.lower()))


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_pixels_hold_one_to_four_separate_objects(world, truth):
    assert len(truth) == N
    counts = Counter(len(objs) for objs in truth.values())
    assert set(counts) <= {1, 2, 3, 4} and len(counts) >= 3
    for objs in truth.values():
        for a in objs:
            for b in objs:
                if a is not b:  # boxes do not overlap
                    assert (
                        a["box"][2] <= b["box"][0]
                        or b["box"][2] <= a["box"][0]
                        or a["box"][3] <= b["box"][1]
                        or b["box"][3] <= a["box"][1]
                    )
    # the generator's own record agrees with the pixels (colour, shape, size, exact box)
    for split in SPLITS:
        for scene in load_scenes(world, split):
            derived = sorted((o["color"], o["shape"], o["size"], o["box"]) for o in truth[scene.image_id])
            recorded = sorted((o.color, o.shape, o.size, tuple(o.box)) for o in scene.objects)
            assert derived == recorded


def test_vqa_answers_match_pixels(world, truth):
    kinds = Counter()
    for split in SPLITS:
        source = VQAv2(
            world / "vqa" / f"{split}_questions.json",
            world / "vqa" / f"{split}_annotations.json",
            world / "images" / "224",
            "{image_id:08d}.png",
        )
        for record, sample in ((source.records[i], source[i]) for i in range(len(source))):
            objs = truth[record[1]]
            q, a = sample.turns[0].user, sample.turns[0].assistant
            if q == "How many objects are there?":
                expected, kind = str(len(objs)), "count"
            elif m := re.fullmatch(r"How many (\w+) objects are there\?", q):
                expected, kind = str(sum(o["color"] == m.group(1) for o in objs)), "count"
            elif m := re.fullmatch(r"How many (\w+)s are there\?", q):
                expected, kind = str(sum(o["shape"] == m.group(1) for o in objs)), "count"
            elif m := re.fullmatch(r"What color is the (\w+)\?", q):
                (only,) = [o for o in objs if o["shape"] == m.group(1)]
                expected, kind = only["color"], "color"
            elif m := re.fullmatch(r"What shape is the (\w+) object\?", q):
                (only,) = [o for o in objs if o["color"] == m.group(1)]
                expected, kind = only["shape"], "shape"
            elif m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", q):
                present = any(o["color"] == m.group(1) and o["shape"] == m.group(2) for o in objs)
                expected, kind = "yes" if present else "no", "exist"
            elif m := re.fullmatch(r"Where is the (\w+) (\w+)\?", q):
                (only,) = matching(objs, f"{m.group(1)} {m.group(2)}")
                expected, kind = only["position"], "position"
            elif m := re.fullmatch(r"Is the (\w+) (\w+) small or large\?", q):
                (only,) = matching(objs, f"{m.group(1)} {m.group(2)}")
                expected, kind = only["size"], "size"
            else:
                raise AssertionError(f"unexpected question {q!r}")
            assert a == expected, (split, record, q)
            kinds[kind if kind != "exist" else f"exist-{a}"] += 1
    assert set(kinds) == {"count", "color", "shape", "exist-yes", "exist-no", "position", "size"}


def test_refer_and_identify_boxes_match_pixels(world, truth):
    checked = 0
    for split in SPLITS:
        refer = RefCOCO(world / "refer", world / "images" / "224", split=split, split_by="shapes")
        identify = RefCOCO(world / "refer", world / "images" / "224", split=split, split_by="shapes", inverse=True)
        for record, r, i in ((refer.records[k], refer[k], identify[k]) for k in range(len(refer))):
            image_id = int(record[0][:-4])
            phrase = r.meta["phrase"]
            (only,) = matching(truth[image_id], phrase)  # the expression picks out exactly one object
            box = normalize_box(only["box"], 224, 224)
            assert parse_box(r.turns[0].assistant) == box
            assert parse_box(i.turns[0].user) == box and i.turns[0].assistant == phrase
            checked += 1
    assert checked > N


def test_identify_full_names_pick_out_the_boxed_object(world, truth):
    """``identify_names="full"``: each answer names the object in the question's box by size,
    colour and shape when no other object of the image shares them (checked against the pixels),
    and keeps the world's phrase for the others; the questions are the same."""
    shortest = shapes_sources(world, 4, split="train")[0]["shapes_identify"]
    full = shapes_sources(world, 4, split="train", identify_names="full")[0]["shapes_identify"]
    renamed = 0
    for k, record in enumerate(full.records):
        before, after = shortest[k], full[k]
        assert after.turns[0].user == before.turns[0].user
        objects = truth[int(record[0][:-4])]
        (boxed,) = [o for o in objects if normalize_box(o["box"], 224, 224) == parse_box(after.turns[0].user)]
        name = f"{boxed['size']} {boxed['color']} {boxed['shape']}"
        if sum(f"{o['size']} {o['color']} {o['shape']}" == name for o in objects) == 1:
            assert after.turns[0].assistant == f"the {name}"
            renamed += after.turns[0].assistant != before.turns[0].assistant
        else:
            assert after.turns[0].assistant == before.turns[0].assistant
        assert matching(objects, after.turns[0].assistant) == [boxed]
    assert renamed > 10  # most shortest phrases leave out a word of the full name
    with pytest.raises(ValueError, match="identify_names"):
        shapes_sources(world, 4, identify_names="long")


def test_identify_placed_names_start_with_where_the_boxed_object_is(world, truth):
    """``identify_names="placed"``: each answer is the boxed object's position words (thirds of its
    box centre, seen in the pixels) and its full name, where no other object shares both, else the
    world's phrase; the questions are those of the world's own records."""
    shortest = shapes_sources(world, 4, split="train")[0]["shapes_identify"]
    placed = shapes_sources(world, 4, split="train", identify_names="placed")[0]["shapes_identify"]
    name = lambda o: f"the {o['position']} {o['size']} {o['color']} {o['shape']}"
    renamed = 0
    for k, record in enumerate(placed.records):
        before, after = shortest[k], placed[k]
        assert after.turns[0].user == before.turns[0].user
        objects = truth[int(record[0][:-4])]
        (boxed,) = [o for o in objects if normalize_box(o["box"], 224, 224) == parse_box(after.turns[0].user)]
        if [o for o in objects if name(o) == name(boxed)] == [boxed]:
            assert after.turns[0].assistant == name(boxed)
            renamed += 1
        else:
            assert after.turns[0].assistant == before.turns[0].assistant
    assert renamed > 0.9 * len(placed.records)


def test_grounded_captions_match_pixels(world, truth):
    for split in SPLITS:
        source = Flickr30kEntities(world / "grounding", world / "images" / "224", split=split, image_ext=".png")
        for sample in source.samples():
            objs = truth[int(sample.id)]
            tagged = parse_grounded(sample.turns[0].assistant)
            assert len(tagged) == len(objs)
            for phrase, boxes in tagged:
                assert len(boxes) == 1
                assert len([o for o in matching(objs, phrase) if normalize_box(o["box"], 224, 224) == boxes[0]]) == 1


def test_captions_descriptions_and_conversations_match_pixels(world, truth):
    images = world / "images" / "224"
    for split in SPLITS:
        captions = COCOCaptions(world / "captions" / f"captions_{split}.json", images)
        for record, sample in ((captions.records[i], captions[i]) for i in range(len(captions))):
            objs = truth[record[2]]
            assert mentioned_objects(sample.turns[0].assistant) == Counter((o["color"], o["shape"]) for o in objs)
        details = CCSBUAlign(world / "align" / split, image_dir=images, image_ext=".png")
        for sample in details.samples():
            objs = truth[int(sample.id)]
            text = sample.turns[0].assistant
            assert re.search(rf"\b{['one', 'two', 'three', 'four'][len(objs) - 1]} objects?\b", text)
            for o in objs:  # "A large red circle is at the top left."
                position = o["position"]
                preposition = "in" if position == "center" else "on" if position in ("left", "right") else "at"
                assert f"{o['size']} {o['color']} {o['shape']} is {preposition} the {position}." in text
        conversations = LLaVAInstruct(world / "conversations" / f"{split}.json", images)
        for sample in conversations.samples():
            objs = truth[int(sample.id)]
            assert len(sample.turns) >= 2
            assert mentioned_objects(sample.turns[0].assistant) == Counter((o["color"], o["shape"]) for o in objs)
    pairs = WebDatasetPairs(sorted((world / "pairs").glob("*.tar")))
    seen = 0
    for sample in pairs.samples():
        objs = truth[int(sample.id)]
        assert mentioned_objects(sample.turns[0].assistant) == Counter((o["color"], o["shape"]) for o in objs)
        seen += 1
    assert seen == N


def test_compositional_split_holds_out_color_shape_pairs(world, truth):
    info = json.loads((world / "shapes.json").read_text())
    held = {tuple(p) for p in info["held_out_pairs"]}
    assert len(held) == 6 and len({c for c, _ in held}) == 6 and {s for _, s in held} == set(SHAPES)
    assert info["splits"] == split_sizes(N)
    for split in SPLITS:
        for scene in load_scenes(world, split):
            pairs = {(o["color"], o["shape"]) for o in truth[scene.image_id]}
            if split == "compositional":
                assert pairs & held
            else:
                assert not pairs & held
    # no training text names a held-out pair
    train_text = (world / "vqa" / "train_questions.json").read_text() + (
        world / "captions" / "captions_train.json"
    ).read_text()
    for color, shape in held:
        assert f"{color} {shape}" not in train_text


def test_448_images_show_the_same_scenes(world, truth):
    for image_id in range(0, N, 7):
        big = pixel_objects(world / "images" / "448" / f"{image_id:08d}.png")
        small = truth[image_id]
        assert sorted((o["color"], o["shape"], o["size"]) for o in big) == sorted(
            (o["color"], o["shape"], o["size"]) for o in small
        )
        for o in small:
            (twin,) = [
                b
                for b in big
                if b["color"] == o["color"] and all(abs(b["box"][k] - 2 * o["box"][k]) <= 3 for k in range(4))
            ]
            assert normalize_box(twin["box"], 448, 448) == pytest.approx(normalize_box(o["box"], 224, 224), abs=1)


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_generation_is_deterministic(tmp_path):
    a, b, c = (make_shapes(tmp_path / name, 12, seed=seed) for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert a.counts == b.counts


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_each_stage_loads_through_the_mixture(world, stage):
    from tinygptv.data.batching import Collator
    from tinygptv.data.image_processing import ImageProcessor
    from tinygptv.data.templates import template_for_stage
    from tinygptv.testing import word_tokenizer

    sources, ratios = shapes_sources(world, stage, split="train")
    assert all(s.geometry for s in sources.values())  # positions and counts: no random crops
    size = 448 if stage == 4 else 224
    collator = Collator(
        word_tokenizer(), template_for_stage(stage), ImageProcessor(size, train=True), 4, max_length=512
    )
    loader = MixtureLoader(Mixture(sources, ratios, seed=0), collator, batch_size=8)
    batch = loader.next_batch()
    assert batch["pixel_values"].shape[1:] == (3, size, size)
    assert loader.stats.total_skipped == 0
    if stage == 4:
        names = Counter(Mixture(sources, ratios, seed=0).locate(g)[0] for g in range(2000))
        assert set(names) == set(sources)


def test_streamed_pairs_are_the_same_with_workers(world):
    """webdataset shards are streamed; workers skipping each other's draws agree with one process,
    also when the parent process holds an open reader of the same shards (it stays the parent's)."""
    shards = sorted((world / "pairs").glob("*.tar"))  # 60 images in shards of 16

    def pairs():  # a small shuffle buffer: the reader holds a shard open rather than all of it in memory
        return [WebDatasetPairs(shards, shuffle_buffer=2)]

    expected = [Mixture(pairs(), seed=5).load(g).id for g in range(1, 31)]
    mixture = Mixture(pairs(), seed=5)
    mixture.load(0)  # the parent now reads a shard through an open file
    multi = MixtureLoader(mixture, batch_size=5, num_workers=2, start_step=1)
    try:
        got = [s.id for _ in range(6) for s in multi.next_batch()]
    finally:
        multi.close()
    assert got == expected


def test_split_sizes_and_errors(tmp_path):
    assert split_sizes(10000) == {"train": 8000, "val": 500, "test": 500, "compositional": 1000}
    assert sum(split_sizes(7).values()) == 7 and min(split_sizes(7).values()) >= 1
    with pytest.raises(ValueError):
        split_sizes(3)
    with pytest.raises(FileNotFoundError, match="not a shapes world"):
        shapes_sources(tmp_path, 4)


def test_cli_make_shapes_and_preview(tmp_path, capsys):
    assert main(["data", "make-shapes", str(tmp_path / "w"), "--n", "8", "--seed", "2"]) == 0
    assert "wrote 8 images" in capsys.readouterr().out
    assert (tmp_path / "w" / "shapes.json").is_file()
    assert main(["data", "preview", "--shapes", str(tmp_path / "w"), "--stage", "3", "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("###Human: <Img><ImageHere></Img>") == 2 and "=> " in out
    assert main(["data", "make-shapes", str(tmp_path / "x"), "--n", "2"]) == 2  # a user error, one line
    assert "at least 4" in capsys.readouterr().err


def test_cli_preview_checks_custom_data(tmp_path, capsys):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    records = [
        {"image": "a.png", "task": "vqa", "question": "What is it?", "answer": "black"},
        {"image": "missing.png", "question": "?", "answer": "x"},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert main(["data", "preview", "--custom", str(tmp_path / "d.jsonl")]) == 1
    out = capsys.readouterr().out
    assert "[INST] <Img><ImageHere></Img> [vqa] What is it? [/INST]" in out and "=> black###" in out
    assert "2 records, 1 usable, 1 unusable" in out and "missing image" in out
