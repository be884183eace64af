"""Your own data, no code needed: a simple JSON / JSONL format.

A ``.json`` file holds a list of samples; a ``.jsonl`` file holds one sample per line. A sample::

    {
      "image": "photos/cat.jpg",
      "task": "vqa",
      "conversations": [
        {"user": "What animal is this?", "assistant": "A cat."},
        {"user": "Where is it?", "assistant": "On the sofa, at {box:cat}."}
      ],
      "boxes": {"cat": [120, 40, 380, 310]}
    }

Fields:

``image``
    Path of the image, relative to ``image_root`` (default: the annotation file's folder); a list of
    paths for several images; absent or ``null`` for a text-only sample. Images go before the first
    user text, unless the texts place them with ``<ImageHere>`` (one per image, in order).
``conversations`` (or ``turns``)
    One or more ``{"user": ..., "assistant": ...}`` turns; only the assistant's words are learned.
    LLaVA's ``[{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]`` is accepted too.
    For one turn, ``"question"`` + ``"answer"`` at the top level is a shorthand.
``task`` (optional)
    ``vqa``, ``caption``, ``refer``, ``grounding``, ``identify`` or ``detection`` add MiniGPT-v2's
    ``[task]`` identifier in the stage-4 template; any other name (default ``conversation``) adds none.
``boxes`` (optional)
    Named boxes in pixels of the (first) image, ``[x1, y1, x2, y2]``, or ``[x, y, w, h]`` with
    ``"box_format": "xywh"``. ``{box:NAME}`` in any text becomes the model's box text
    ``{<x1><y1><x2><y2>}`` (0-100), computed from the image's size.

Records that break these rules are skipped and counted (``tinygptv data preview`` lists them).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from ..boxes import format_box, normalize_box
from ..encoding import IMAGE_PLACEHOLDER
from ..sample import BadSample, Sample, Turn
from ..sources import ImageDir, RecordSource
from .conversation import conversation_turns

_BOX_REF = re.compile(r"\{box:([^{}]+)\}")
GEOMETRY_TASKS = ("refer", "grounding", "identify", "detection")


def read_records(path: str | Path) -> list[Any]:
    """Records of a ``.json`` list or a ``.jsonl`` file; an unparsable line becomes a :class:`BadSample`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix == ".jsonl":
        records: list[Any] = []
        with path.open(encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except ValueError as err:
                    records.append(BadSample(f"line {line_number}: not JSON ({err})"))
        return records
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: a .json data file must hold a list of samples")
    return data


class CustomData(RecordSource):
    """Samples in the format documented in this module."""

    def __init__(self, path: str | Path, image_root: str | Path | None = None, name: str | None = None):
        path = Path(path)
        super().__init__(read_records(path), name or path.stem)
        self.images = ImageDir(image_root if image_root is not None else path.parent)

    def build(self, record: Any, rng: random.Random | None) -> Sample:
        if isinstance(record, BadSample):
            raise record
        if not isinstance(record, dict):
            raise BadSample(f"a sample must be a JSON object, got {type(record).__name__}")
        turns = _turns(record)
        names = record.get("image") or []
        names = [names] if isinstance(names, str) else list(names)
        images = [self.images.open(name) for name in names]
        boxes = record.get("boxes") or {}
        if boxes:
            if not images:
                raise BadSample("boxes need an image")
            fmt = record.get("box_format", "xyxy")
            width, height = images[0].size
            box_text = {key: format_box(normalize_box(b, width, height, fmt)) for key, b in boxes.items()}
            turns = [Turn(_fill_boxes(t.user, box_text), _fill_boxes(t.assistant, box_text)) for t in turns]
        placed = sum(t.user.count(IMAGE_PLACEHOLDER) for t in turns)
        if placed and placed != len(images):
            raise BadSample(f"the texts place {placed} {IMAGE_PLACEHOLDER} but the sample has {len(images)} image(s)")
        task = record.get("task") or "conversation"
        return Sample(
            turns=turns,
            images=images,
            task=task,
            id=str(record.get("id", "")),
            geometry=bool(boxes) or task in GEOMETRY_TASKS,
        )


def _turns(record: dict) -> list[Turn]:
    messages = record.get("conversations", record.get("turns"))
    if messages is None and "question" in record:
        messages = [{"user": record["question"], "assistant": record.get("answer")}]
    if not isinstance(messages, list) or not messages:
        raise BadSample("no 'conversations' (or 'turns', or 'question' + 'answer')")
    if all(isinstance(m, dict) and "from" in m for m in messages):
        return conversation_turns(messages)
    turns = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("user"), str) or not isinstance(m.get("assistant"), str):
            raise BadSample(f"turn {k}: needs string 'user' and 'assistant'")
        if not m["assistant"].strip():
            raise BadSample(f"turn {k}: empty assistant answer")
        turns.append(Turn(m["user"], m["assistant"]))
    return turns


def _fill_boxes(text: str, box_text: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        key = m.group(1).strip()
        if key not in box_text:
            raise BadSample(f"text refers to {{box:{key}}} but 'boxes' has no {key!r}")
        return box_text[key]

    return _BOX_REF.sub(sub, text)


__all__ = ["CustomData", "read_records"]
