"""Data with boxes: RefCOCO / RefCOCO+ / RefCOCOg (and the inverse "identify" task), Visual Genome
region descriptions and Flickr30k Entities (grounded captions, phrase -> box, box -> phrase).

Boxes reach the text as MiniGPT-v2's ``{<x1><y1><x2><y2>}`` in 0-100 coordinates
(:mod:`tinygptv.data.boxes`), normalised by the image size the annotation gives, so the same
annotation serves the image at any resolution.
"""

from __future__ import annotations

import pickle
import random
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from ..boxes import Box, format_box, format_grounded, normalize_box
from ..instructions import instruction
from ..sample import BadSample, Sample, Turn
from ..sources import ImageDir, RecordSource
from .pairs import read_json

# --------------------------------------------------------------------------------------------
# RefCOCO family
# --------------------------------------------------------------------------------------------


class _PlainUnpickler(pickle.Unpickler):
    """Loads only plain containers and scalars: a refs file needs nothing else, and refusing every
    class means a tampered file cannot run code."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a refs file holds only lists and dicts")


def load_refs(path: str | Path) -> list[dict]:
    """The refs of a ``refs(unc).p`` / ``refs(umd).p`` / ``refs(google).p`` file (the REFER API's
    pickle, written by Python 2), or of the same list saved as JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"refs file not found: {path}")
    if path.suffix == ".json":
        return read_json(path)
    with path.open("rb") as f:
        return _PlainUnpickler(f, encoding="utf-8", errors="replace").load()


class RefCOCO(RecordSource):
    """RefCOCO, RefCOCO+ and RefCOCOg in the official REFER layout.

    ``ROOT/refs({split_by}).p`` holds the refs (``image_id``, ``ann_id``, ``split``,
    ``sentences: [{"sent": ...}]``); ``ROOT/instances.json`` is COCO-style (``images`` with
    ``file_name``/``width``/``height``, ``annotations`` with ``bbox`` = ``[x, y, w, h]`` pixels).
    ``split_by`` is ``unc`` (RefCOCO, RefCOCO+), ``umd`` or ``google`` (RefCOCOg). One sample per
    referring sentence: ``[refer]`` phrase -> box, or with ``inverse=True`` ``[identify]`` box ->
    phrase (MiniGPT-v2's ``invrefcoco``).
    """

    def __init__(
        self,
        root: str | Path,
        image_dir: str | Path,
        split: str = "train",
        split_by: str = "unc",
        inverse: bool = False,
        name: str | None = None,
        refs_file: str | None = None,
        instances_file: str = "instances.json",
    ):
        root = Path(root)
        refs = load_refs(root / (refs_file or f"refs({split_by}).p"))
        instances = read_json(root / instances_file)
        images = {img["id"]: img for img in instances["images"]}
        boxes = {ann["id"]: ann.get("bbox") for ann in instances["annotations"]}
        records = []
        for ref in refs:
            if ref.get("split") != split:
                continue
            image = images.get(ref.get("image_id"), {})
            for sentence in ref.get("sentences", []):
                records.append(
                    (
                        image.get("file_name"),
                        image.get("width"),
                        image.get("height"),
                        boxes.get(ref.get("ann_id")),
                        sentence.get("sent") if isinstance(sentence, dict) else sentence,
                        ref.get("ref_id"),
                    )
                )
        default_name = root.name.lower() + ("_inverse" if inverse else "")
        super().__init__(records, name or default_name)
        self.images = ImageDir(image_dir)
        self.inverse = inverse
        self.split = split

    def build(self, record: tuple, rng: random.Random | None) -> Sample:
        file_name, width, height, bbox, phrase, ref_id = record
        if not file_name or bbox is None:
            raise BadSample(f"ref {ref_id} has no image or no annotation in instances.json")
        phrase = phrase.strip()
        if not phrase:
            raise BadSample(f"ref {ref_id} has an empty sentence")
        image = self.images.open(file_name)
        box = normalize_box(bbox, width or image.width, height or image.height, fmt="xywh")
        return _refer_sample(image, phrase, [box], self.inverse, rng, str(ref_id))


def _refer_sample(image, phrase: str, boxes: list[Box], inverse: bool, rng, sample_id: str) -> Sample:
    """``[refer]`` phrase -> box(es), or ``[identify]`` box(es) -> phrase."""
    box_text = format_box(boxes)
    if inverse:
        turn, task = Turn(instruction("identify", rng, box_text), phrase), "identify"
    else:
        turn, task = Turn(instruction("refer", rng, phrase), box_text), "refer"
    return Sample(
        turns=[turn],
        images=[image],
        task=task,
        id=sample_id,
        geometry=True,
        meta={"boxes": boxes, "phrase": phrase},
    )


# --------------------------------------------------------------------------------------------
# Visual Genome
# --------------------------------------------------------------------------------------------


class VisualGenomeRegions(RecordSource):
    """Visual Genome region descriptions as ``[refer]`` (or inverse ``[identify]``) samples.

    ``region_descriptions.json`` is ``[{"id": image_id, "regions": [{"region_id", "image_id",
    "phrase", "x", "y", "width", "height"}]}]``; images are ``VG_100K/{image_id}.jpg`` or
    ``VG_100K_2/{image_id}.jpg`` under ``image_root``. Boxes are normalised by the image's size
    (``image_data.json``'s ``width``/``height`` when given, else the file's).
    """

    def __init__(
        self,
        region_file: str | Path,
        image_root: str | Path,
        image_data_file: str | Path | None = None,
        inverse: bool = False,
        name: str | None = None,
        min_size: int = 1,
    ):
        sizes: dict[Any, tuple[int, int]] = {}
        if image_data_file is not None:
            for entry in read_json(image_data_file):
                sizes[entry.get("image_id", entry.get("id"))] = (entry.get("width"), entry.get("height"))
        records = []
        for entry in read_json(region_file):
            for region in entry.get("regions", []):
                if region.get("width", 0) < min_size or region.get("height", 0) < min_size:
                    continue
                image_id = region.get("image_id", entry.get("id"))
                records.append(
                    (
                        image_id,
                        (region.get("x"), region.get("y"), region.get("width"), region.get("height")),
                        region.get("phrase"),
                        region.get("region_id"),
                    )
                )
        super().__init__(records, name or ("vg_identify" if inverse else "vg_refer"))
        root = Path(image_root)
        self.images = ImageDir([root / "VG_100K", root / "VG_100K_2", root])
        self.sizes = sizes
        self.inverse = inverse

    def build(self, record: tuple, rng: random.Random | None) -> Sample:
        image_id, bbox, phrase, region_id = record
        phrase = phrase.strip().rstrip(".")
        if not phrase:
            raise BadSample(f"region {region_id} has an empty phrase")
        image = self.images.open(f"{image_id}.jpg")
        width, height = self.sizes.get(image_id) or (image.width, image.height)
        box = normalize_box(bbox, width, height, fmt="xywh")
        return _refer_sample(image, phrase, [box], self.inverse, rng, str(region_id))


# --------------------------------------------------------------------------------------------
# Flickr30k Entities
# --------------------------------------------------------------------------------------------

_ENTITY = re.compile(r"\[/EN#(\d+)/(\S+) ([^\]]+)\]")


def parse_entity_sentence(line: str) -> tuple[str, list[tuple[str, str, int, int]]]:
    """A Flickr30k Entities sentence -> (plain text, [(entity_id, phrase, start, end)]) with
    character spans of each phrase in the plain text."""
    plain, mentions, last = [], [], 0
    length = 0
    for m in _ENTITY.finditer(line):
        before = line[last : m.start()]
        plain.append(before)
        length += len(before)
        phrase = m.group(3)
        mentions.append((m.group(1), phrase, length, length + len(phrase)))
        plain.append(phrase)
        length += len(phrase)
        last = m.end()
    plain.append(line[last:])
    return "".join(plain), mentions


def parse_entity_boxes(path: str | Path) -> tuple[int | None, int | None, dict[str, list[tuple[int, ...]]]]:
    """A Flickr30k Entities ``Annotations/{id}.xml`` -> (width, height, {entity_id: [xyxy boxes]})."""
    root = ET.parse(path).getroot()
    size = root.find("size")
    width = int(size.findtext("width")) if size is not None and size.findtext("width") else None
    height = int(size.findtext("height")) if size is not None and size.findtext("height") else None
    boxes: dict[str, list[tuple[int, ...]]] = {}
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        if box is None:
            continue  # <nobndbox> or <scene>: the entity has no box
        coords = tuple(int(float(box.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax"))
        for name in obj.findall("name"):
            boxes.setdefault(name.text.strip(), []).append(coords)
    return width, height, boxes


class Flickr30kEntities(RecordSource):
    """Flickr30k Entities: ``ROOT/Sentences/{id}.txt`` (5 annotated captions per image),
    ``ROOT/Annotations/{id}.xml`` (boxes per entity), ``ROOT/{split}.txt`` (image ids), images
    ``{id}.jpg`` in ``image_dir``.

    ``task`` picks MiniGPT-v2's three uses of it:

    * ``grounding``: ``[grounding]`` -> the caption with each boxed phrase as ``<p>phrase</p> {box}``;
    * ``refer``: ``[refer]`` phrase -> its box(es) (MiniGPT-v2's ``CaptionToPhrase``);
    * ``identify``: ``[identify]`` box(es) -> phrase (``ObjectToPhrase``).
    """

    TASKS = ("grounding", "refer", "identify")

    def __init__(
        self,
        root: str | Path,
        image_dir: str | Path | None = None,
        split: str = "train",
        task: str = "grounding",
        name: str | None = None,
        image_ext: str = ".jpg",
    ):
        if task not in self.TASKS:
            raise ValueError(f"Flickr30kEntities task must be one of {self.TASKS}, got {task!r}")
        root = Path(root)
        split_file = root / f"{split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"split file not found: {split_file}")
        records = []
        for image_id in split_file.read_text().split():
            sentence_file = root / "Sentences" / f"{image_id}.txt"
            annotation_file = root / "Annotations" / f"{image_id}.xml"
            if not sentence_file.is_file() or not annotation_file.is_file():
                records.append((image_id, None, None, None, None))  # reported when drawn
                continue
            width, height, boxes = parse_entity_boxes(annotation_file)
            for line in sentence_file.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                if task == "grounding":
                    records.append((image_id, width, height, line.strip(), boxes))
                else:
                    _, mentions = parse_entity_sentence(line)
                    for entity, phrase, _, _ in mentions:
                        if entity in boxes:
                            records.append((image_id, width, height, phrase, boxes[entity]))
        super().__init__(records, name or f"flickr30k_{task}")
        self.images = ImageDir(image_dir if image_dir is not None else root / "flickr30k-images")
        self.task = task
        self.image_ext = image_ext

    def build(self, record: tuple, rng: random.Random | None) -> Sample:
        image_id, width, height, text, boxes = record
        if text is None:
            raise BadSample(f"image {image_id}: missing Sentences or Annotations file")
        image = self.images.open(image_id + self.image_ext)
        width, height = width or image.width, height or image.height
        if self.task == "grounding":
            caption, used = self._grounded_caption(text, boxes, width, height)
            return Sample(
                turns=[Turn(instruction("grounding", rng), caption)],
                images=[image],
                task="grounding",
                id=image_id,
                geometry=True,
                meta={"boxes": used},
            )
        normalized = [normalize_box(b, width, height) for b in boxes]
        return _refer_sample(image, text.strip(), normalized, self.task == "identify", rng, image_id)

    @staticmethod
    def _grounded_caption(line: str, boxes: dict, width: int, height: int) -> tuple[str, list[Box]]:
        """The sentence with boxed phrases tagged ``<p>phrase</p> {box}``; unboxed ones left plain."""
        used: list[Box] = []

        def tag(m: re.Match) -> str:
            entity, phrase = m.group(1), m.group(3)
            if entity not in boxes:
                return phrase
            normalized = [normalize_box(b, width, height) for b in boxes[entity]]
            used.extend(normalized)
            return format_grounded(phrase, normalized)

        text = _ENTITY.sub(tag, line)
        text = re.sub(r"\s+([.,!?])", r"\1", re.sub(r"\s+", " ", text)).strip()
        return text, used


__all__ = [
    "Flickr30kEntities",
    "RefCOCO",
    "VisualGenomeRegions",
    "load_refs",
    "parse_entity_boxes",
    "parse_entity_sentence",
]
