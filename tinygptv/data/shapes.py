"""The shapes world: a procedurally generated visual world that exercises the whole data pipeline.

None of the paper's datasets can be downloaded everywhere, so the project ships a world a CPU can
learn from: images of 1-4 non-overlapping flat shapes (circle, square, triangle, star, diamond,
hexagon) in 8 colours and 2 sizes on plain or lightly textured backgrounds, with every kind of
text the four stages train on, written to disk **in the public formats the real readers read**:

==================  ======================================  ===============================
folder              format (reader)                         stage / task
==================  ======================================  ===============================
``pairs/``          webdataset shards (WebDatasetPairs)     1-2 captions
``align/{split}/``  cc_sbu_align (CCSBUAlign)               3 detailed descriptions
``vqa/``            VQAv2 questions + annotations (VQAv2)   4 ``[vqa]``
``refer/``          RefCOCO refs + instances (RefCOCO)      4 ``[refer]``, ``[identify]``
``grounding/``      Flickr30k Entities (Flickr30kEntities)  4 ``[grounding]``
``captions/``       COCO captions (COCOCaptions)            4 ``[caption]``
``conversations/``  LLaVA conversations (LLaVAInstruct)     4 multi-turn
``text/``           Unnatural Instructions jsonl            4 text-only
``images/{size}/``  ``{image_id:08d}.png``                  the images (224 px; 448 on request)
``scenes/``         ``{split}.jsonl`` ground truth          evaluation
==================  ======================================  ===============================

Splits: ``train``, ``val``, ``test`` and ``compositional``, whose images each hold at least one
colour-shape pair that never appears in the other splits (held out by seed). Everything is a
pure function of ``(seed, image_id)``: the same seed writes the same bytes.

Annotations use 224-px coordinates; the 448-px images are the same scenes drawn at twice the
scale, so normalised (0-100) boxes hold for both. Shapes are drawn without anti-aliasing in
palette colours that no background comes near, so every answer can be checked from the pixels
(the tests do).
"""

from __future__ import annotations

import io
import json
import math
import pickle
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .sources import stable_hash

if TYPE_CHECKING:
    from PIL.Image import Image

    from .sources import Source

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
SIZES = ("small", "large")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "sand": (190, 176, 146),
    "slate": (96, 112, 128),
    "sage": (146, 164, 146),
}
TEXTURES = ("plain", "stripes", "checks", "gradient")
TEXTURE_AMPLITUDE = 14
"""Largest brightness offset of a texture; backgrounds stay far from every palette colour."""
CANONICAL_SIZE = 224
"""Resolution of the annotation coordinates."""
SPLITS = ("train", "val", "test", "compositional")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
PLURALS = {s: s + ("es" if s.endswith("x") else "s") for s in SHAPES}

# Radii as fractions of the image side; their ranges keep small and large apart in the pixels.
_RADIUS = {"small": (0.055, 0.075), "large": (0.12, 0.16)}
_GAP = 6 / CANONICAL_SIZE  # minimum gap between object boxes
_MARGIN = 4 / CANONICAL_SIZE  # minimum gap to the image border


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------


@dataclass
class ShapeObject:
    """One drawn object; ``box`` is measured from the pixels of the 224-px image."""

    shape: str
    color: str
    size: str
    center: tuple[float, float]
    """Centre as fractions of the image side."""
    radius: float
    """Circumscribed radius as a fraction of the image side."""
    box: tuple[int, int, int, int] = (0, 0, 0, 0)
    """Pixel box ``(x1, y1, x2, y2)`` in the 224-px image, ``x2``/``y2`` exclusive."""

    @property
    def pair(self) -> tuple[str, str]:
        return (self.color, self.shape)

    def describe(self, with_size: bool = True) -> str:
        return f"{self.size} {self.color} {self.shape}" if with_size else f"{self.color} {self.shape}"

    def position(self) -> str:
        """Position word(s) of the box centre: ``left``/``right``/``top``/``bottom``/``center``,
        or two of them (``top left``), by thirds of the image."""
        return position_word(self.box, CANONICAL_SIZE)


def position_word(box: Sequence[float], image_size: float) -> str:
    """Where a pixel box's centre lies, by thirds: ``top left``, ``left``, ``center``, ..."""
    cx = (box[0] + box[2]) / 2 / image_size
    cy = (box[1] + box[3]) / 2 / image_size
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    vertical = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    return " ".join(w for w in (vertical, horizontal) if w) or "center"


@dataclass
class Scene:
    """One image's ground truth."""

    image_id: int
    split: str
    background: str
    texture: str
    objects: list[ShapeObject] = field(default_factory=list)

    @property
    def file_name(self) -> str:
        return f"{self.image_id:08d}.png"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Scene":
        objects = [
            ShapeObject(o["shape"], o["color"], o["size"], tuple(o["center"]), o["radius"], tuple(o["box"]))
            for o in data["objects"]
        ]
        return cls(data["image_id"], data["split"], data["background"], data["texture"], objects)


def held_out_pairs(seed: int) -> list[tuple[str, str]]:
    """The colour-shape pairs of the compositional split: one per shape, six different colours."""
    colors = list(COLORS)
    random.Random(stable_hash(seed, "held-out")).shuffle(colors)
    return [(colors[k], shape) for k, shape in enumerate(SHAPES)]


def split_sizes(n: int) -> dict[str, int]:
    """Images per split: 5 % val, 5 % test, 10 % compositional (at least one each), the rest train."""
    if n < 4:
        raise ValueError(f"the shapes world needs at least 4 images (one per split), got {n}")
    val = test = max(1, round(0.05 * n))
    compositional = max(1, round(0.10 * n))
    return {"train": n - val - test - compositional, "val": val, "test": test, "compositional": compositional}


def split_of(image_id: int, sizes: dict[str, int]) -> str:
    """Split of an image id: ids run through train, val, test, compositional in that order."""
    start = 0
    for split in SPLITS:
        if image_id < start + sizes[split]:
            return split
        start += sizes[split]
    raise ValueError(f"image id {image_id} is beyond the {start} images of the world")


def generate_scene(seed: int, image_id: int, split: str, held_out: Sequence[tuple[str, str]]) -> Scene:
    """Place 1-4 objects without overlap. Outside the compositional split no object is a held-out
    colour-shape pair; inside it, the first object is one."""
    rng = random.Random(stable_hash(seed, "scene", image_id))
    held = set(held_out)
    allowed = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in held]
    scene = Scene(image_id, split, rng.choice(list(BACKGROUNDS)), rng.choice(TEXTURES))
    wanted = rng.randint(1, 4)
    for k in range(wanted):
        if split == "compositional" and k == 0:
            color, shape = held_out[rng.randrange(len(held_out))]
        elif split == "compositional":
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        else:
            color, shape = rng.choice(allowed)
        size = rng.choice(SIZES)
        radius = rng.uniform(*_RADIUS[size])
        for _ in range(50):
            lo, hi = radius + _MARGIN, 1 - radius - _MARGIN
            center = (rng.uniform(lo, hi), rng.uniform(lo, hi))
            if all(_apart(center, radius, o.center, o.radius) for o in scene.objects):
                scene.objects.append(ShapeObject(shape, color, size, center, radius))
                break
    return scene


def _apart(c1: tuple[float, float], r1: float, c2: tuple[float, float], r2: float) -> bool:
    # Boxes (squares of side 2r around the centre) separated along at least one axis.
    reach = r1 + r2 + _GAP
    return abs(c1[0] - c2[0]) >= reach or abs(c1[1] - c2[1]) >= reach


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` centred at ``(cx, cy)`` with circumscribed radius ``r`` (pixels).
    Circles are drawn as ellipses; their "polygon" is the bounding square."""

    def ring(count: int, start_deg: float, radii: Sequence[float]) -> list[tuple[float, float]]:
        points = []
        for k in range(count):
            angle = math.radians(start_deg + 360 * k / count)
            rr = radii[k % len(radii)]
            points.append((cx + rr * math.cos(angle), cy + rr * math.sin(angle)))
        return points

    if shape in ("circle", "square"):
        half = r if shape == "circle" else r * 0.85
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "triangle":
        return ring(3, -90, [r])
    if shape == "star":
        return ring(10, -90, [r, 0.45 * r])
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "hexagon":
        return ring(6, 0, [r])
    raise ValueError(f"unknown shape {shape!r}; shapes are {SHAPES}")


_BACKGROUND_CACHE: dict[tuple[str, str, int], Any] = {}


def _background(name: str, texture: str, size: int):
    import numpy as np

    key = (name, texture, size)
    if key not in _BACKGROUND_CACHE:
        base = np.array(BACKGROUNDS[name], dtype=np.int16)
        y, x = np.mgrid[0:size, 0:size]
        cell = max(1, size // 14)
        if texture == "plain":
            offset = np.zeros((size, size))
        elif texture == "stripes":
            offset = (y // cell % 2) * TEXTURE_AMPLITUDE
        elif texture == "checks":
            offset = ((x // cell + y // cell) % 2) * TEXTURE_AMPLITUDE
        elif texture == "gradient":
            offset = np.floor(x / size * TEXTURE_AMPLITUDE)
        else:
            raise ValueError(f"unknown texture {texture!r}")
        pixels = np.clip(base[None, None, :] + offset[..., None].astype(np.int16), 0, 255).astype(np.uint8)
        _BACKGROUND_CACHE[key] = pixels
    return _BACKGROUND_CACHE[key]


def render(scene: Scene, size: int = CANONICAL_SIZE) -> "Image":
    """Draw ``scene`` at ``size`` pixels (no anti-aliasing: every object pixel is its palette colour)."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    image = PILImage.fromarray(_background(scene.background, scene.texture, size))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy, r = obj.center[0] * size, obj.center[1] * size, obj.radius * size
        points = shape_polygon(obj.shape, cx, cy, r)
        if obj.shape == "circle":
            draw.ellipse((points[0], points[2]), fill=COLORS[obj.color])
        else:
            draw.polygon(points, fill=COLORS[obj.color])
    return image


def measure_boxes(scene: Scene, image: "Image") -> None:
    """Set each object's ``box`` to the tight box of its pixels in ``image`` (the 224-px render).

    Objects are apart by more than the search margin, so the window around one holds no other."""
    import numpy as np

    pixels = np.asarray(image)
    size = pixels.shape[0]
    for obj in scene.objects:
        cx, cy, r = obj.center[0] * size, obj.center[1] * size, obj.radius * size
        x0, y0 = max(0, int(cx - r) - 2), max(0, int(cy - r) - 2)
        x1, y1 = min(size, int(cx + r) + 3), min(size, int(cy + r) + 3)
        mask = np.all(pixels[y0:y1, x0:x1] == COLORS[obj.color], axis=-1)
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            raise RuntimeError(f"image {scene.image_id}: object {obj.describe()} left no pixels")
        obj.box = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)


# --------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------


def _rng(seed: int, scene: Scene, purpose: str) -> random.Random:
    return random.Random(stable_hash(seed, purpose, scene.image_id))


def _listing(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _where(position: str) -> str:
    """``top left`` -> ``at the top left``; ``left`` -> ``on the left``; ``center`` -> ``in the center``."""
    if position == "center":
        return "in the center"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"at the {position}"


def _count_phrase(n: int, noun: str) -> str:
    return f"{NUMBER_WORDS[n]} {noun}" + ("" if n == 1 else "s")


def _background_phrase(scene: Scene) -> str:
    kind = {"plain": "plain", "stripes": "striped", "checks": "checkered", "gradient": "shaded"}[scene.texture]
    return f"a {kind} {scene.background} background"


def short_captions(scene: Scene, seed: int) -> list[str]:
    """Two short captions (stages 1-2 pairs, ``[caption]``), differently phrased."""
    rng = _rng(seed, scene, "caption")
    things = [_article(o.describe(with_size=rng.random() < 0.6)) for o in scene.objects]
    n = len(scene.objects)
    styles = [
        _listing(things),
        f"{_listing(things)} on {_background_phrase(scene)}",
        f"an image of {_listing(things)}",
        f"{_count_phrase(n, 'object')}: {_listing(things)}",
        f"a picture with {_listing(things)}",
    ]
    rng.shuffle(styles)
    return styles[:2]


def detailed_description(scene: Scene, seed: int) -> str:
    """A few sentences naming every object with its size, colour, shape and position (stage 3)."""
    rng = _rng(seed, scene, "detail")
    n = len(scene.objects)
    objects, background = _count_phrase(n, "object"), _background_phrase(scene)
    opening = rng.choice(
        [
            f"The image shows {objects} on {background}.",
            f"There {'is' if n == 1 else 'are'} {objects} in this picture, on {background}.",
        ]
    )
    sentences = [opening]
    for obj in sorted(scene.objects, key=lambda o: (o.box[1], o.box[0])):
        thing = _article(obj.describe()).capitalize()
        sentences.append(f"{thing} is {_where(obj.position())}.")
    shape_counts = _counts(o.shape for o in scene.objects)
    repeated = [s for s, c in shape_counts.items() if c > 1]
    if repeated:
        sentences.append(" ".join(f"There are {_count_phrase(shape_counts[s], s)}." for s in repeated))
    return " ".join(sentences)


def _counts(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


@dataclass
class QA:
    question: str
    answer: str
    kind: str
    """``count``, ``color``, ``shape``, ``exist``, ``position`` or ``size``."""
    subject: str
    """What the question is about, singular (``object``, ``red object``, ``star``, ``red star``)."""

    def full_answer(self) -> str:
        """The answer as a sentence (for conversations)."""
        if self.kind == "count":
            n = int(self.answer)
            if n == 0:
                return f"There are no {self.subject}s."
            return f"There {'is' if n == 1 else 'are'} {_count_phrase(n, self.subject)}."
        if self.kind == "shape":
            return f"The {self.subject} is a {self.answer}."
        if self.kind == "position":
            return f"The {self.subject} is {_where(self.answer)}."
        if self.kind == "exist":
            return (
                f"Yes, there is {_article(self.subject)}."
                if self.answer == "yes"
                else f"No, there is no {self.subject}."
            )
        return f"The {self.subject} is {self.answer}."  # color, size


def questions(scene: Scene, seed: int, held_out: Sequence[tuple[str, str]], max_questions: int = 4) -> list[QA]:
    """Short-answer questions about ``scene`` (``[vqa]``), each answerable from the pixels: always
    the object count and a yes/no existence question (yes and no equally likely), then others."""
    rng = _rng(seed, scene, "vqa")
    objs = scene.objects
    shape_counts = _counts(o.shape for o in objs)
    color_counts = _counts(o.color for o in objs)
    pair_counts = _counts(f"{o.color} {o.shape}" for o in objs)
    count_all = QA("How many objects are there?", str(len(objs)), "count", "object")
    if rng.random() < 0.5:
        obj = rng.choice(objs)
        exist = QA(f"Is there {_article(obj.describe(False))}?", "yes", "exist", obj.describe(False))
    else:  # an absent pair, never a held-out one outside the compositional split
        excluded = set() if scene.split == "compositional" else set(held_out)
        absent = [(c, s) for c in COLORS for s in SHAPES if f"{c} {s}" not in pair_counts and (c, s) not in excluded]
        c, s = rng.choice(absent)
        exist = QA(f"Is there {_article(f'{c} {s}')}?", "no", "exist", f"{c} {s}")
    others: list[QA] = []
    shape = rng.choice(SHAPES)
    others.append(QA(f"How many {PLURALS[shape]} are there?", str(shape_counts.get(shape, 0)), "count", shape))
    color = rng.choice(list(COLORS))
    others.append(
        QA(f"How many {color} objects are there?", str(color_counts.get(color, 0)), "count", f"{color} object")
    )
    for obj in objs:
        if shape_counts[obj.shape] == 1:
            others.append(QA(f"What color is the {obj.shape}?", obj.color, "color", obj.shape))
        if color_counts[obj.color] == 1:
            others.append(QA(f"What shape is the {obj.color} object?", obj.shape, "shape", f"{obj.color} object"))
        if pair_counts[f"{obj.color} {obj.shape}"] == 1:
            pair = obj.describe(False)
            others.append(QA(f"Where is the {pair}?", obj.position(), "position", pair))
            others.append(QA(f"Is the {pair} small or large?", obj.size, "size", pair))
    rng.shuffle(others)
    return [count_all, exist, *others[: max(0, max_questions - 2)]]


def referring_expressions(scene: Scene, seed: int) -> list[str | None]:
    """For each object, a phrase that picks it out alone (None when none does)."""
    rng = _rng(seed, scene, "refer")
    objs = scene.objects
    result: list[str | None] = []
    for obj in objs:
        options = []
        if sum(o.shape == obj.shape for o in objs) == 1:
            options.append(f"the {obj.shape}")
        if sum(o.pair == obj.pair for o in objs) == 1:
            options.append(f"the {obj.color} {obj.shape}")
        if sum(o.pair == obj.pair and o.size == obj.size for o in objs) == 1:
            options.append(f"the {obj.size} {obj.color} {obj.shape}")
        same = [o for o in objs if o.pair == obj.pair]
        if len(same) > 1 and sum(o.position() == obj.position() for o in same) == 1:
            options.append(f"the {obj.color} {obj.shape} {_where(obj.position())}")
        result.append(rng.choice(options) if options else None)
    return result


def grounded_sentence(scene: Scene, seed: int) -> str:
    """A Flickr30k-Entities-annotated caption: every object a ``[/EN#k/shape phrase]`` entity."""
    rng = _rng(seed, scene, "grounding")
    mentions = [f"[/EN#{k + 1}/shape {_article(o.describe())}]" for k, o in enumerate(scene.objects)]
    verb = "is" if len(mentions) == 1 else "are"
    return rng.choice(
        [
            f"{_listing(mentions)} {verb} on {_background_phrase(scene)} .",
            f"this image shows {_listing(mentions)} .",
        ]
    )


def conversation(scene: Scene, seed: int, qas: Sequence[QA]) -> list[tuple[str, str]]:
    """2-4 turns: what is in the image, then questions answered in full sentences."""
    rng = _rng(seed, scene, "conversation")
    things = [_article(o.describe()) for o in scene.objects]
    n = len(scene.objects)
    opener = rng.choice(
        ["What objects are in this picture?", "What do you see in this image?", "Describe the objects in the image."]
    )
    turns = [(opener, f"There {'is' if n == 1 else 'are'} {_count_phrase(n, 'object')}: {_listing(things)}.")]
    for qa in list(qas)[: rng.randint(1, 3)]:
        turns.append((qa.question, qa.full_answer()))
    return turns


def text_instruction(seed: int, index: int) -> tuple[str, str]:
    """A text-only instruction and its answer (stage 4's Unnatural-Instructions slot)."""
    rng = random.Random(stable_hash(seed, "text", index))
    kind = rng.randrange(5)
    if kind == 0:
        colors = rng.sample(list(COLORS), 3)
        return f"List these colors in alphabetical order: {', '.join(colors)}.", ", ".join(sorted(colors))
    if kind == 1:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"What is {a} plus {b}?", str(a + b)
    if kind == 2:
        words = [rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(SIZES)]
        rng.shuffle(words)
        return f"Which of these words is a shape: {', '.join(words)}?", next(w for w in words if w in SHAPES)
    if kind == 3:
        shape = rng.choice(SHAPES)
        return f"Write the plural of {shape}.", PLURALS[shape]
    word, times = rng.choice(SHAPES + tuple(COLORS)), rng.randint(2, 4)
    return f"Repeat the word {word} {NUMBER_WORDS[times]} times.", " ".join([word] * times)


# --------------------------------------------------------------------------------------------
# Writing the world
# --------------------------------------------------------------------------------------------


@dataclass
class ShapesInfo:
    """What :func:`make_shapes` wrote (also saved as ``shapes.json``)."""

    root: str
    seed: int
    n: int
    image_sizes: list[int]
    splits: dict[str, int]
    held_out_pairs: list[list[str]]
    counts: dict[str, int]
    seconds: float


def make_shapes(
    out: str | Path,
    n: int,
    seed: int = 0,
    image_sizes: Sequence[int] = (CANONICAL_SIZE,),
    shard_size: int = 1000,
) -> ShapesInfo:
    """Generate ``n`` images with all their annotations under ``out`` (see the module docstring)."""
    start = time.perf_counter()
    if CANONICAL_SIZE not in image_sizes:
        image_sizes = (CANONICAL_SIZE, *image_sizes)
    out = Path(out)
    sizes = split_sizes(n)
    held_out = held_out_pairs(seed)
    for size in image_sizes:
        (out / "images" / str(size)).mkdir(parents=True, exist_ok=True)
    writer = _Writer(out, seed, sizes, held_out, shard_size)
    for image_id in range(n):
        split = split_of(image_id, sizes)
        scene = generate_scene(seed, image_id, split, held_out)
        image = render(scene, CANONICAL_SIZE)
        measure_boxes(scene, image)
        png = _png(image)
        (out / "images" / str(CANONICAL_SIZE) / scene.file_name).write_bytes(png)
        for size in image_sizes:
            if size != CANONICAL_SIZE:
                (out / "images" / str(size) / scene.file_name).write_bytes(_png(render(scene, size)))
        writer.add(scene, png)
    counts = writer.finish()
    info = ShapesInfo(
        root=str(out),
        seed=seed,
        n=n,
        image_sizes=sorted(image_sizes),
        splits=sizes,
        held_out_pairs=[list(p) for p in held_out],
        counts=counts,
        seconds=round(time.perf_counter() - start, 3),
    )
    meta = asdict(info)
    meta.pop("root")
    meta.pop("seconds")  # shapes.json is identical for identical inputs
    (out / "shapes.json").write_text(json.dumps(meta, indent=2) + "\n")
    return info


def _png(image: "Image") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # level 1: 3x faster than the default, ~same size here
    return buffer.getvalue()


class _Writer:
    """Accumulates every format's records while scenes are generated, then writes the files."""

    def __init__(self, out: Path, seed: int, sizes: dict[str, int], held_out, shard_size: int):
        self.out, self.seed, self.held_out, self.shard_size = out, seed, held_out, shard_size
        self.per_split: dict[str, dict[str, list]] = {
            split: {
                k: [] for k in ("scenes", "align", "questions", "annotations", "captions", "images", "conversations")
            }
            for split in SPLITS
        }
        self.refs: list[dict] = []
        self.ref_images: list[dict] = []
        self.ref_annotations: list[dict] = []
        self.grounding_ids: dict[str, list[str]] = {split: [] for split in SPLITS}
        self.shard_buffers: dict[str, list] = {split: [] for split in SPLITS}
        self.shard_counts: dict[str, int] = {split: 0 for split in SPLITS}
        self.sizes = sizes
        for folder in (
            "pairs",
            "vqa",
            "refer",
            "grounding/Sentences",
            "grounding/Annotations",
            "captions",
            "conversations",
            "text",
            "scenes",
        ):
            (out / folder).mkdir(parents=True, exist_ok=True)

    def add(self, scene: Scene, png: bytes) -> None:
        split, seed, image_id = scene.split, self.seed, scene.image_id
        records = self.per_split[split]
        key = f"{image_id:08d}"
        records["scenes"].append(scene.to_json())
        captions = short_captions(scene, seed)
        # stages 1-2: webdataset pairs
        self.shard_buffers[split].append((key, png, captions[0]))
        if len(self.shard_buffers[split]) >= self.shard_size:
            self._flush_shard(split)
        # stage 3: cc_sbu_align
        records["align"].append({"image_id": key, "caption": detailed_description(scene, seed)})
        # [caption]: COCO captions
        image_entry = {"id": image_id, "file_name": scene.file_name, "width": CANONICAL_SIZE, "height": CANONICAL_SIZE}
        records["images"].append(image_entry)
        for k, caption in enumerate(captions):
            records["captions"].append({"id": image_id * 10 + k, "image_id": image_id, "caption": caption})
        # [vqa]: VQAv2
        qas = questions(scene, seed, self.held_out)
        for k, qa in enumerate(qas):
            question_id = image_id * 10 + k
            records["questions"].append({"image_id": image_id, "question": qa.question, "question_id": question_id})
            records["annotations"].append(
                {
                    "question_id": question_id,
                    "image_id": image_id,
                    "question_type": qa.kind,
                    "answer_type": "yes/no" if qa.kind == "exist" else "number" if qa.kind == "count" else "other",
                    "multiple_choice_answer": qa.answer,
                    "answers": [
                        {"answer": qa.answer, "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)
                    ],
                }
            )
        # [refer] / [identify]: RefCOCO
        self.ref_images.append(image_entry)
        for k, (obj, phrase) in enumerate(zip(scene.objects, referring_expressions(scene, seed))):
            ann_id = image_id * 10 + k
            x1, y1, x2, y2 = obj.box
            self.ref_annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "category_id": SHAPES.index(obj.shape) + 1,
                    "iscrowd": 0,
                }
            )
            if phrase is not None:
                self.refs.append(
                    {
                        "ref_id": ann_id,
                        "ann_id": ann_id,
                        "image_id": image_id,
                        "split": split,
                        "category_id": SHAPES.index(obj.shape) + 1,
                        "file_name": scene.file_name,
                        "sentences": [{"sent": phrase, "raw": phrase, "tokens": phrase.split(), "sent_id": ann_id}],
                        "sent_ids": [ann_id],
                    }
                )
        # [grounding]: Flickr30k Entities
        (self.out / "grounding" / "Sentences" / f"{key}.txt").write_text(grounded_sentence(scene, seed) + "\n")
        (self.out / "grounding" / "Annotations" / f"{key}.xml").write_text(_entities_xml(scene))
        self.grounding_ids[split].append(key)
        # multi-turn: LLaVA conversations
        turns = conversation(scene, seed, qas[1:])
        messages = []
        for k, (user, answer) in enumerate(turns):
            messages.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + user})
            messages.append({"from": "gpt", "value": answer})
        records["conversations"].append({"id": key, "image": scene.file_name, "conversations": messages})

    def _flush_shard(self, split: str) -> None:
        import webdataset as wds

        buffer = self.shard_buffers[split]
        if not buffer:
            return
        path = self.out / "pairs" / f"{split}-{self.shard_counts[split]:05d}.tar"
        with wds.TarWriter(str(path), mtime=0) as sink:  # a fixed mtime: the same seed writes the same bytes
            for key, png, caption in buffer:
                meta = {
                    "key": key,
                    "caption": caption,
                    "width": CANONICAL_SIZE,
                    "height": CANONICAL_SIZE,
                    "status": "success",
                }
                sink.write({"__key__": key, "png": png, "txt": caption, "json": meta})
        self.shard_counts[split] += 1
        buffer.clear()

    def finish(self) -> dict[str, int]:
        out = self.out
        counts: dict[str, int] = {}
        for split in SPLITS:
            self._flush_shard(split)
            records = self.per_split[split]
            _dump(out / "scenes" / f"{split}.jsonl", records["scenes"], lines=True)
            align_dir = out / "align" / split
            align_dir.mkdir(parents=True, exist_ok=True)
            _dump(align_dir / "filter_cap.json", {"annotations": records["align"]})
            _dump(
                out / "vqa" / f"{split}_questions.json",
                {
                    "task_type": "Open-Ended",
                    "data_type": "shapes",
                    "data_subtype": split,
                    "questions": records["questions"],
                },
            )
            _dump(
                out / "vqa" / f"{split}_annotations.json",
                {"data_type": "shapes", "data_subtype": split, "annotations": records["annotations"]},
            )
            _dump(
                out / "captions" / f"captions_{split}.json",
                {"images": records["images"], "annotations": records["captions"]},
            )
            _dump(out / "conversations" / f"{split}.json", records["conversations"])
            (out / "grounding" / f"{split}.txt").write_text("".join(k + "\n" for k in self.grounding_ids[split]))
            n_text = max(1, self.sizes[split] // 10)
            offset = {"train": 0, "val": 1, "test": 2, "compositional": 3}[split] * 10**7
            lines = []
            for index in range(n_text):
                text, answer = text_instruction(self.seed, offset + index)
                lines.append(
                    {
                        "instruction": text,
                        "instances": [
                            {"instruction_with_input": text, "input": "", "constraints": None, "output": answer}
                        ],
                    }
                )
            _dump(out / "text" / f"{split}.jsonl", lines, lines=True)
            counts[f"{split}/images"] = self.sizes[split]
            counts[f"{split}/questions"] = len(records["questions"])
            counts[f"{split}/conversations"] = len(records["conversations"])
            counts[f"{split}/text"] = n_text
            counts[f"{split}/refs"] = sum(r["split"] == split for r in self.refs)
        with (out / "refer" / "refs(shapes).p").open("wb") as f:
            pickle.dump(self.refs, f, protocol=2)  # the REFER API's format
        categories = [{"id": k + 1, "name": s, "supercategory": "shape"} for k, s in enumerate(SHAPES)]
        _dump(
            out / "refer" / "instances.json",
            {"images": self.ref_images, "annotations": self.ref_annotations, "categories": categories},
        )
        return counts


def _dump(path: Path, data: Any, lines: bool = False) -> None:
    if lines:
        path.write_text("".join(json.dumps(item) + "\n" for item in data))
    else:
        path.write_text(json.dumps(data))


def _entities_xml(scene: Scene) -> str:
    objects = "".join(
        f"<object><name>{k + 1}</name><bndbox><xmin>{o.box[0]}</xmin><ymin>{o.box[1]}</ymin>"
        f"<xmax>{o.box[2]}</xmax><ymax>{o.box[3]}</ymax></bndbox></object>"
        for k, o in enumerate(scene.objects)
    )
    return (
        f"<annotation><filename>{scene.file_name}</filename><size><width>{CANONICAL_SIZE}</width>"
        f"<height>{CANONICAL_SIZE}</height><depth>3</depth></size>{objects}</annotation>\n"
    )


# --------------------------------------------------------------------------------------------
# Reading the world back, per stage
# --------------------------------------------------------------------------------------------

STAGE4_RATIOS = {
    "shapes_vqa": 30.0,
    "shapes_refer": 15.0,
    "shapes_identify": 10.0,
    "shapes_grounding": 10.0,
    "shapes_caption": 10.0,
    "shapes_conversation": 20.0,
    "shapes_text": 5.0,
}
"""Stage-4 sample ratios of the shapes world (the paper weighs its sets in the same spirit)."""


IDENTIFY_NAMES = ("shortest", "full", "placed")
"""How a stage-4 ``[identify]`` sample names its object (:func:`shapes_sources`)."""


def shapes_sources(
    root: str | Path,
    stage: int,
    split: str = "train",
    image_size: int | None = None,
    identify_names: str = "shortest",
) -> tuple[dict[str, "Source"], dict[str, float]]:
    """The sources of a stage over a generated world, read by the public-format readers, and their
    ratios: ready for :class:`~tinygptv.data.mixture.Mixture`.

    ``image_size`` picks the image folder (default: 448 for stage 4 when generated, else 224).
    ``identify_names``: what a stage-4 ``[identify]`` sample answers: ``shortest``, the world's
    referring phrase (the shortest that picks the object out: "the star" when there is one star),
    or ``full``, the object's size, colour and shape ("the large red star") wherever those pick it
    out alone, else the world's phrase (:func:`full_name_records`). Both are right answers (the
    benchmark accepts any phrase that describes that object alone); a full name is the object's own
    words, where the shortest phrase depends on every other object of the scene. ``placed``: the
    object's position, then its full name ("the top left large red star", :func:`placed_name`):
    the position words follow from the question's box alone, and once written they pick the object
    out in all but a few scenes, so the words after them are read off that object.
    """
    if identify_names not in IDENTIFY_NAMES:
        raise ValueError(f"unknown identify_names {identify_names!r}; known: {', '.join(IDENTIFY_NAMES)}")
    from .readers import (
        CCSBUAlign,
        COCOCaptions,
        Flickr30kEntities,
        LLaVAInstruct,
        RefCOCO,
        UnnaturalInstructions,
        VQAv2,
        WebDatasetPairs,
    )

    root = Path(root)
    if not (root / "shapes.json").is_file():
        raise FileNotFoundError(
            f"{root} is not a shapes world (no shapes.json); make one with `tinygptv data make-shapes`"
        )
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")
    if image_size is None:
        image_size = 448 if stage == 4 and (root / "images" / "448").is_dir() else CANONICAL_SIZE
    images = root / "images" / str(image_size)
    if not images.is_dir():
        raise FileNotFoundError(f"no {image_size}-px images in {root}; generate them with --image-sizes {image_size}")
    if stage in (1, 2):
        shards = sorted((root / "pairs").glob(f"{split}-*.tar"))
        sources = {"shapes_pairs": WebDatasetPairs(shards, name="shapes_pairs")}
        return _whole_images(sources), {"shapes_pairs": 1.0}
    if stage == 3:
        source = CCSBUAlign(root / "align" / split, name="shapes_detail", image_dir=images, image_ext=".png")
        return _whole_images({"shapes_detail": source}), {"shapes_detail": 1.0}
    if stage != 4:
        raise ValueError(f"unknown stage {stage!r}; stages are 1, 2, 3, 4")
    pattern = "{image_id:08d}.png"
    sources: dict[str, Source] = {
        "shapes_vqa": VQAv2(
            root / "vqa" / f"{split}_questions.json",
            root / "vqa" / f"{split}_annotations.json",
            images,
            pattern,
            name="shapes_vqa",
        ),
        "shapes_refer": RefCOCO(root / "refer", images, split=split, split_by="shapes", name="shapes_refer"),
        "shapes_identify": RefCOCO(
            root / "refer", images, split=split, split_by="shapes", inverse=True, name="shapes_identify"
        ),
        "shapes_grounding": Flickr30kEntities(
            root / "grounding", images, split=split, image_ext=".png", name="shapes_grounding"
        ),
        "shapes_caption": COCOCaptions(root / "captions" / f"captions_{split}.json", images, name="shapes_caption"),
        "shapes_conversation": LLaVAInstruct(
            root / "conversations" / f"{split}.json", images, name="shapes_conversation"
        ),
        "shapes_text": UnnaturalInstructions(root / "text" / f"{split}.jsonl", name="shapes_text"),
    }
    if identify_names != "shortest":
        identify = sources["shapes_identify"]
        identify.records = full_name_records(identify.records, load_scenes(root, split), placed=identify_names == "placed")
    _whole_images(sources)
    return sources, dict(STAGE4_RATIOS)


def full_name_records(records: Sequence[tuple], scenes: Sequence[Scene], placed: bool = False) -> list[tuple]:
    """The shapes world's RefCOCO records (``(file_name, width, height, bbox, phrase, ref_id)``,
    ``ref_id`` = image id * 10 + the object's index in its scene) with each phrase replaced by the
    object's full name, "the {size} {colour} {shape}", where no other object of its scene has the
    same one (``placed``: :func:`placed_name`, its position first); a phrase for an object that
    no such name picks out stays as the world wrote it."""
    name = placed_name if placed else unique_full_name
    by_id = {scene.image_id: scene for scene in scenes}
    renamed = []
    for record in records:
        *head, phrase, ref_id = record
        scene = by_id.get(int(ref_id) // 10)
        if scene is None:
            raise ValueError(f"ref {ref_id} names image {int(ref_id) // 10}, which has no scene in this split")
        renamed.append((*head, name(scene, scene.objects[int(ref_id) % 10]) or phrase, ref_id))
    return renamed


def unique_full_name(scene: Scene, obj: ShapeObject) -> str | None:
    """"the {size} {colour} {shape}" of ``obj`` when no other object of ``scene`` has the same,
    else None (then only a phrase with its position picks it out)."""
    name = obj.describe()
    return f"the {name}" if sum(other.describe() == name for other in scene.objects) == 1 else None


def placed_name(scene: Scene, obj: ShapeObject) -> str | None:
    """"the {position} {size} {colour} {shape}" of ``obj`` ("the top left large red star") when no
    other object of ``scene`` has the same, else None."""
    where = obj.position()
    same = [o for o in scene.objects if o.describe() == obj.describe() and o.position() == where]
    return f"the {where} {obj.describe()}" if len(same) == 1 else None


def _whole_images(sources: dict[str, "Source"]) -> dict[str, "Source"]:
    # Every text of this world states counts, positions or the full set of objects, which a random
    # crop would falsify: train on whole images (``Sample.geometry``).
    for source in sources.values():
        source.geometry = True
    return sources


def load_scenes(root: str | Path, split: str) -> list[Scene]:
    """The ground-truth scenes of a split (``scenes/{split}.jsonl``)."""
    path = Path(root) / "scenes" / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no scenes file {path}")
    return [Scene.from_json(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


__all__ = [
    "BACKGROUNDS",
    "CANONICAL_SIZE",
    "COLORS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "STAGE4_RATIOS",
    "QA",
    "Scene",
    "ShapeObject",
    "ShapesInfo",
    "conversation",
    "detailed_description",
    "full_name_records",
    "generate_scene",
    "grounded_sentence",
    "held_out_pairs",
    "load_scenes",
    "make_shapes",
    "measure_boxes",
    "position_word",
    "questions",
    "referring_expressions",
    "render",
    "shapes_sources",
    "short_captions",
    "split_sizes",
    "text_instruction",
    "unique_full_name",
]
