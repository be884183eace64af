"""Referring expression comprehension: RefCOCO, RefCOCO+ (val, testA, testB) and RefCOCOg (val,
test), from the official REFER files.

Each referring sentence is one question (its ``sent_id`` is the question id), asked as the
authors did (``eval_ref.py``): ``[refer] give me the location of {sentence}``, greedy, 20 new
tokens. The first box in the answer (``{<x1><y1><x2><y2>}``, 0-100 of the image's width and
height) is scaled to pixels of the image as ``instances.json`` sizes it and compared with the
annotated box; it is right when the IoU is above the threshold (``iou > 0.5``, strictly, as the
authors count; ``--iou-threshold`` changes it and the result records it). An answer without a box
is wrong. Unlike the original, each split reads its own refs (their script opened one annotation
file for every split) and every sentence counts once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..data.readers.grounding import load_refs
from ..data.readers.pairs import read_json
from .metrics import IOU_THRESHOLD, refer_iou
from .runner import Item, PerItemBenchmark, Protocol, find_dir, find_file, image_path

REFER_PROMPT = "give me the location of {sentence}"

DATASETS = {
    # name: (folder, refs file, splits)
    "refcoco": ("refcoco", "refs(unc).p", ("val", "testA", "testB")),
    "refcoco+": ("refcoco+", "refs(unc).p", ("val", "testA", "testB")),
    "refcocog": ("refcocog", "refs(umd).p", ("val", "test")),
}


def read_refer_items(
    root: Path,
    refs_file: str,
    split: str,
    image_folders: Sequence[Path],
    prompt: str,
    group: str = "",
) -> list[Item]:
    """One item per referring sentence of ``split`` in ``root/refs_file`` + ``root/instances.json``;
    the target is the annotated box in pixels ``(x1, y1, x2, y2)``."""
    refs = load_refs(find_file(root, [refs_file], f"refs file {refs_file}"))
    instances = read_json(find_file(root, ["instances.json"], "instances.json"))
    images = {image["id"]: image for image in instances["images"]}
    boxes = {ann["id"]: ann["bbox"] for ann in instances["annotations"]}
    items = []
    for ref in refs:
        if ref.get("split") != split:
            continue
        image = images[ref["image_id"]]
        x, y, w, h = boxes[ref["ann_id"]]
        for sentence in ref["sentences"]:
            text = (sentence["sent"] if isinstance(sentence, dict) else str(sentence)).strip()
            items.append(
                Item(
                    question_id=sentence.get("sent_id") if isinstance(sentence, dict) else f"{ref['ref_id']}",
                    image=image_path(image_folders, image["file_name"]),
                    text=prompt.format(sentence=text),
                    target=(x, y, x + w, y + h),
                    task="refer",
                    group=group,
                    meta={"width": image["width"], "height": image["height"], "ref_id": ref.get("ref_id")},
                )
            )
    return items


class RefCOCO(PerItemBenchmark):
    """RefCOCO / RefCOCO+ / RefCOCOg in the REFER layout: ``{dataset}/refs(unc).p`` (RefCOCOg:
    ``refs(umd).p``) and ``{dataset}/instances.json``, COCO ``train2014`` images. Without
    ``--split``, every split of the dataset is run; metrics give each split (``accuracy_val``, ...)
    and their union (``accuracy``)."""

    primary = "accuracy"

    def __init__(self, name: str, protocol: Protocol):
        super().__init__(protocol)
        self.name = name
        self.folder, self.refs_file, self.splits = DATASETS[name]
        self.title = {"refcoco": "RefCOCO", "refcoco+": "RefCOCO+", "refcocog": "RefCOCOg"}[name]
        self.default_split = None

    @property
    def iou_threshold(self) -> float:
        return float(self.protocol.settings["iou_threshold"])

    def load(self, data: Path, split: str | None, images: Path | None = None) -> list[Item]:
        root = data / self.folder if (data / self.folder).is_dir() else data
        folders = find_dir(data, ["train2014", "images/train2014", "images/mscoco/images/train2014", "images"], images)
        splits = [split] if split is not None else list(self.splits)
        items = []
        for name in splits:
            items.extend(read_refer_items(root, self.refs_file, name, folders, self.protocol.prompt, group=name))
        return items

    def score(self, item: Item, prediction: dict[str, Any]) -> dict[str, Any]:
        iou, box = refer_iou(prediction["answer"], item.target, item.meta["width"], item.meta["height"])
        return {"score": float(iou > self.iou_threshold), "iou": round(iou, 4), "box": box}


def refcoco(name: str = "refcoco", iou_threshold: float = IOU_THRESHOLD) -> RefCOCO:
    return RefCOCO(
        name,
        Protocol(
            prompt=REFER_PROMPT, task="refer", settings={"iou_threshold": iou_threshold, "iou_rule": "iou > threshold"}
        ),
    )


__all__ = ["DATASETS", "RefCOCO", "read_refer_items", "refcoco"]
