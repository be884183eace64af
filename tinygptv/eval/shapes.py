"""The synthetic shapes world (``tinygptv data make-shapes``): accuracy per task and split.

Five tasks, read from the world's files in their public formats, asked with the first phrasing of
each task's instructions (:mod:`tinygptv.data.instructions`, what the readers give without a
random draw) under the stage-4 template and the task's identifier, greedy:

========== =============================================== ==========================================
task       question (files)                                right when
========== =============================================== ==========================================
vqa        ``vqa/{split}_questions.json`` + annotations    exact match after VQA normalisation
refer      ``refer/refs(shapes).p`` + ``instances.json``   the answer's box has IoU > 0.5
identify   the same refs, box -> phrase                     the phrase picks out that object alone
caption    ``captions/captions_{split}.json``              F1 of the colour-shape pairs named
grounding  ``grounding/{split}.txt``                       F1 of named boxes (right pair, IoU > 0.5)
========== =============================================== ==========================================

``identify``: the shape, colours, sizes and position words of the answer must match exactly one
object of the scene, the one in the box ("the star" is wrong when there are two stars).
``caption``: the colour-shape pairs the caption names, against the scene's objects (as multisets).
``grounding``: each ``<p>phrase</p> {box}`` of the answer is a prediction; it is right when an
unmatched object of the same colour and shape lies under the box at IoU > 0.5; the score is the F1
of predictions against objects. Ground truth comes from ``scenes/{split}.jsonl``.

Splits: ``test`` and ``compositional`` (colour-shape pairs never seen in training). Question ids
are ``{split}/{task}/{id}`` with the id of the task's file (question, sentence, annotation or image id).

For training scripts: :func:`evaluate_shapes` runs a model on a world and returns the accuracy
per split and task; :func:`format_shapes_table` prints it.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..data.boxes import box_iou, format_box, normalize_box, parse_grounded
from ..data.instructions import INSTRUCTIONS
from ..data.readers.pairs import read_json
from ..data.shapes import CANONICAL_SIZE, COLORS, SHAPES, SIZES, load_scenes
from .metrics import IOU_THRESHOLD, exact_match, normalize_answer, refer_iou
from .refer import read_refer_items
from .runner import Item, PerItemBenchmark, Protocol, find_file, percent, predict_items, run_protocol

if TYPE_CHECKING:
    from ..data.shapes import Scene, ShapeObject
    from ..model.tinygptv import TinyGPTV

SHAPES_TASKS = ("vqa", "refer", "identify", "caption", "grounding")
SHAPES_SPLITS = ("test", "compositional")
MAX_NEW_TOKENS = {"vqa": 20, "refer": 20, "identify": 20, "caption": 40, "grounding": 160}
"""Answer lengths: 20 for short answers (the paper's limit); captions and grounded captions of up
to four objects with their boxes need more."""
POSITIONS = ("top", "bottom", "left", "right", "center")


def _prompt(task: str) -> str:
    return INSTRUCTIONS[task][0]


class Shapes(PerItemBenchmark):
    name = "shapes"
    title = "shapes world"
    splits = ("test", "compositional", "val")
    default_split = None

    def __init__(self, protocol: Protocol, tasks: Sequence[str] = SHAPES_TASKS, image_size: int | None = None):
        super().__init__(protocol)
        unknown = [t for t in tasks if t not in SHAPES_TASKS]
        if unknown:
            raise ValueError(f"unknown shapes task(s) {unknown}; tasks are {', '.join(SHAPES_TASKS)}")
        self.tasks = tuple(tasks)
        self.image_size = image_size

    def image_dir(self, data: Path) -> Path:
        """``images/{model's size}`` when the world has it (448 for a stage-4 model), else 224."""
        if self.image_size is not None and (data / "images" / str(self.image_size)).is_dir():
            return data / "images" / str(self.image_size)
        return data / "images" / str(CANONICAL_SIZE)

    def load(self, data: Path, split: str | None, images: Path | None = None) -> list[Item]:
        find_file(data, ["shapes.json"], "a shapes world (shapes.json; make one with `tinygptv data make-shapes`)")
        folder = images or self.image_dir(data)
        items: list[Item] = []
        for name in [split] if split is not None else SHAPES_SPLITS:
            scenes = {scene.image_id: scene for scene in load_scenes(data, name)}
            for task in self.tasks:
                loaded = getattr(self, f"_load_{task}")(data, name, folder, scenes)
                for item in loaded:
                    item.question_id = f"{name}/{task}/{item.question_id}"
                    item.group = f"{name}/{task}"
                    item.task = task
                    item.max_new_tokens = MAX_NEW_TOKENS[task]
                items.extend(loaded)
        return items

    # --- one loader per task ----------------------------------------------------------------------
    def _load_vqa(self, data: Path, split: str, folder: Path, scenes) -> list[Item]:
        questions = read_json(data / "vqa" / f"{split}_questions.json")["questions"]
        answers = {a["question_id"]: a for a in read_json(data / "vqa" / f"{split}_annotations.json")["annotations"]}
        return [
            Item(
                question_id=q["question_id"],
                image=folder / f"{q['image_id']:08d}.png",
                text=_prompt("vqa").format(q["question"]),
                target=[answers[q["question_id"]]["multiple_choice_answer"]],
                meta={"kind": answers[q["question_id"]].get("question_type")},
            )
            for q in questions
        ]

    def _load_refer(self, data: Path, split: str, folder: Path, scenes) -> list[Item]:
        prompt = _prompt("refer").replace("{}", "{sentence}")
        return read_refer_items(data / "refer", "refs(shapes).p", split, [folder], prompt)

    def _load_identify(self, data: Path, split: str, folder: Path, scenes) -> list[Item]:
        items = []
        for item in self._load_refer(data, split, folder, scenes):
            scene = scenes[int(Path(item.image).stem)]
            x1, y1, x2, y2 = item.target
            target = next(k for k, o in enumerate(scene.objects) if tuple(o.box) == (x1, y1, x2, y2))
            box = normalize_box(item.target, item.meta["width"], item.meta["height"])
            item.text = _prompt("identify").format(format_box(box))
            item.target = target
            item.meta["scene"] = scene
            items.append(item)
        return items

    def _load_caption(self, data: Path, split: str, folder: Path, scenes) -> list[Item]:
        images = read_json(data / "captions" / f"captions_{split}.json")["images"]
        return [
            Item(question_id=i["id"], image=folder / i["file_name"], text=_prompt("caption"), target=scenes[i["id"]])
            for i in images
        ]

    def _load_grounding(self, data: Path, split: str, folder: Path, scenes) -> list[Item]:
        keys = (data / "grounding" / f"{split}.txt").read_text().split()
        return [
            Item(question_id=int(k), image=folder / f"{k}.png", text=_prompt("grounding"), target=scenes[int(k)])
            for k in keys
        ]

    # --- scoring ----------------------------------------------------------------------------------
    def score(self, item: Item, prediction: dict[str, Any]) -> dict[str, Any]:
        answer = prediction["answer"]
        if item.task == "vqa":
            return {"score": exact_match(answer, item.target)}
        if item.task == "refer":
            iou, box = refer_iou(answer, item.target, item.meta["width"], item.meta["height"])
            return {"score": float(iou > self.protocol.settings["iou_threshold"]), "iou": round(iou, 4), "box": box}
        if item.task == "identify":
            scene = item.meta["scene"]
            picked = objects_described(answer, scene.objects)
            return {"score": float(picked == [item.target]), "picked": picked}
        if item.task == "caption":
            return {"score": caption_f1(answer, item.target)}
        return {"score": grounding_f1(answer, item.target, self.protocol.settings["iou_threshold"])}

    def metrics(self, items: Sequence[Item], records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """``accuracy`` over everything, and ``accuracy_{split}/{task}`` and ``n_{split}/{task}``."""
        metrics: dict[str, Any] = {"accuracy": percent(r["score"] for r in records)}
        for group in dict.fromkeys(item.group for item in items):
            scores = [r["score"] for i, r in zip(items, records) if i.group == group]
            metrics[f"accuracy_{group}"] = percent(scores)
            metrics[f"n_{group}"] = len(scores)
        return metrics


# --- reading answers about scenes -------------------------------------------------------------------

_PLURAL = {shape + ("es" if shape.endswith("x") else "s"): shape for shape in SHAPES}


def _words(text: str) -> list[str]:
    return [_PLURAL.get(w, w) for w in re.findall(r"[a-z0-9]+", normalize_answer(text))]


def objects_described(answer: str, objects: Sequence["ShapeObject"]) -> list[int]:
    """Indices of the objects that fit every shape, colour, size and position word of ``answer``;
    an answer naming no shape, or several, describes none."""
    words = _words(answer)
    shapes = {w for w in words if w in SHAPES}
    if len(shapes) != 1:
        return []
    colors = {w for w in words if w in COLORS}
    sizes = {w for w in words if w in SIZES}
    positions = {w for w in words if w in POSITIONS}
    return [
        k
        for k, o in enumerate(objects)
        if {o.shape} == shapes
        and colors <= {o.color}
        and sizes <= {o.size}
        and (not positions or positions == set(o.position().split()))
    ]


def named_pairs(text: str) -> Counter:
    """The (colour, shape) pairs a text names: "a small red star and two blue circles" ->
    {(red, star): 1, (blue, circle): 2}."""
    words = _words(text)
    counts = {"1": 1, "2": 2, "3": 3, "4": 4, "5": 5}
    pairs: Counter = Counter()
    for k, word in enumerate(words):
        if word not in SHAPES:
            continue
        j = k - 1
        if j >= 0 and words[j] in SIZES:
            j -= 1
        if j >= 0 and words[j] in COLORS:
            color = words[j]
            j -= 1
            if j >= 0 and words[j] in SIZES:
                j -= 1
            pairs[(color, word)] += counts.get(words[j], 1) if j >= 0 else 1
    return pairs


def caption_f1(answer: str, scene: "Scene") -> float:
    """F1 of the colour-shape pairs the caption names against the scene's objects (multisets)."""
    named = named_pairs(answer)
    truth = Counter(o.pair for o in scene.objects)
    hits = sum((named & truth).values())
    total = sum(named.values()) + sum(truth.values())
    return 2 * hits / total if total else 0.0


def grounding_f1(answer: str, scene: "Scene", iou_threshold: float = IOU_THRESHOLD) -> float:
    """F1 of the answer's grounded phrases: a ``<p>phrase</p> {box}`` is right when it names the
    colour and shape of a not yet matched object whose box it covers at IoU > ``iou_threshold``."""
    predictions = []
    for phrase, boxes in parse_grounded(answer):
        pairs = list(named_pairs(phrase))
        for box in boxes:
            predictions.append((pairs[0] if len(pairs) == 1 else None, box))
    truth = [(o.pair, normalize_box(o.box, CANONICAL_SIZE, CANONICAL_SIZE)) for o in scene.objects]
    matched: set[int] = set()
    hits = 0
    for pair, box in predictions:
        for k, (true_pair, true_box) in enumerate(truth):
            if k not in matched and pair == true_pair and box_iou(box, true_box) > iou_threshold:
                matched.add(k)
                hits += 1
                break
    total = len(predictions) + len(truth)
    return 2 * hits / total if total else 0.0


# --- the entry point for training scripts ------------------------------------------------------------


def shapes(
    tasks: Sequence[str] = SHAPES_TASKS, image_size: int | None = None, iou_threshold: float = IOU_THRESHOLD
) -> Shapes:
    protocol = Protocol(
        prompt="first instruction phrasing per task: " + "; ".join(f"{t}: {_prompt(t)}" for t in tasks),
        task=None,
        max_new_tokens=MAX_NEW_TOKENS["vqa"],
        settings={"iou_threshold": iou_threshold, "max_new_tokens_per_task": {t: MAX_NEW_TOKENS[t] for t in tasks}},
    )
    return Shapes(protocol, tasks, image_size)


def evaluate_shapes(
    model: "TinyGPTV",
    data_dir: str | Path,
    splits: Sequence[str] = SHAPES_SPLITS,
    tasks: Sequence[str] = SHAPES_TASKS,
    limit: int | None = None,
    batch_size: int = 8,
    template: str = "stage4",
    progress: bool = False,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Run ``model`` on the shapes world at ``data_dir``; ``limit`` takes the first N questions of
    each split and task. Returns ``{"accuracy": {split: {task: percent}}, "n": {split: {task: count}},
    "overall": percent, "metrics": {...}}`` (and ``"predictions": {question_id: answer}`` with
    ``return_predictions``); nothing is written to disk."""
    benchmark = shapes(tasks, image_size=model.config.vision.image_size)
    items: list[Item] = []
    for split in splits:
        items.extend(benchmark.load(Path(data_dir), benchmark.resolve_split(split)))
    items = benchmark.select(items, limit)
    protocol = run_protocol(benchmark, model, template)
    was_training = model.training
    model.eval()
    try:
        predictions = predict_items(benchmark, model, items, protocol, batch_size, progress)
    finally:
        model.train(was_training)
    _, metrics = benchmark.evaluate(items, predictions)
    summary = shapes_summary(metrics, splits, tasks)
    if return_predictions:
        summary["predictions"] = {item.question_id: p["answer"] for item, p in zip(items, predictions)}
    return summary


def shapes_summary(
    metrics: dict[str, Any], splits: Sequence[str] = SHAPES_SPLITS, tasks: Sequence[str] = SHAPES_TASKS
) -> dict[str, Any]:
    """Per split and task, from a shapes run's metrics: accuracy (percent) and number of questions."""
    return {
        "accuracy": {s: {t: metrics.get(f"accuracy_{s}/{t}") for t in tasks} for s in splits},
        "n": {s: {t: metrics.get(f"n_{s}/{t}", 0) for t in tasks} for s in splits},
        "overall": metrics["accuracy"],
        "metrics": metrics,
    }


def format_shapes_table(summary: dict[str, Any]) -> str:
    """A markdown table: one row per task, one column per split (accuracy %, and n)."""
    splits = list(summary["accuracy"])
    tasks = list(next(iter(summary["accuracy"].values()))) if splits else []
    lines = ["| task | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for task in tasks:
        cells = []
        for split in splits:
            value, n = summary["accuracy"][split][task], summary["n"][split][task]
            cells.append("-" if value is None else f"{value:.1f} (n={n})")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "MAX_NEW_TOKENS",
    "SHAPES_SPLITS",
    "SHAPES_TASKS",
    "Shapes",
    "caption_f1",
    "evaluate_shapes",
    "format_shapes_table",
    "grounding_f1",
    "named_pairs",
    "objects_described",
    "shapes",
    "shapes_summary",
]
