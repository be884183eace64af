"""Boxes and grounded phrases as text: the one place that writes and reads them.

MiniGPT-v2's conventions, which TinyGPT-V's stage 4 inherits (ORIGINAL-NOTES, "Prompt formats"):

* a box is ``{<x1><y1><x2><y2>}``: integer corners normalised to 0-100 of the image's width and
  height (so ``{<0><0><100><100>}`` is the whole image, at any resolution);
* several boxes for one phrase share the braces, separated by ``<delim>``:
  ``{<10><20><30><40><delim><50><60><70><80>}``;
* a grounded phrase is ``<p>a dog</p> {<10><20><50><90>}``.

Writing is strict; reading is tolerant, because it reads what a model generated: it returns every
box and phrase it can make sense of and drops the rest, never raising on malformed text.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Sequence

SCALE = 100
"""Coordinates are integers in ``[0, SCALE]``."""
DELIM = "<delim>"
"""Separator of several boxes inside one pair of braces."""


class Box(NamedTuple):
    """A box in 0-100 normalised integer coordinates, corners ``(x1, y1)`` top-left, ``(x2, y2)`` bottom-right."""

    x1: int
    y1: int
    x2: int
    y2: int


def normalize_box(box: Sequence[float], width: float, height: float, fmt: str = "xyxy") -> Box:
    """A pixel box -> :class:`Box` (0-100 integers, clamped, rounded to nearest).

    ``fmt`` is ``"xyxy"`` (corners) or ``"xywh"`` (top-left corner + size, as COCO, RefCOCO and
    Visual Genome store boxes).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if len(box) != 4:
        raise ValueError(f"a box has 4 numbers, got {list(box)!r}")
    x1, y1, a, b = (float(v) for v in box)
    if fmt == "xywh":
        x2, y2 = x1 + a, y1 + b
    elif fmt == "xyxy":
        x2, y2 = a, b
    else:
        raise ValueError(f"box format must be 'xyxy' or 'xywh', got {fmt!r}")
    return Box(
        _clamp(round(x1 / width * SCALE)),
        _clamp(round(y1 / height * SCALE)),
        _clamp(round(x2 / width * SCALE)),
        _clamp(round(y2 / height * SCALE)),
    )


def denormalize_box(box: Sequence[float], width: float, height: float) -> tuple[float, float, float, float]:
    """A 0-100 box -> pixel corners ``(x1, y1, x2, y2)`` for an image of ``width`` x ``height``."""
    x1, y1, x2, y2 = box
    return (x1 / SCALE * width, y1 / SCALE * height, x2 / SCALE * width, y2 / SCALE * height)


def format_box(boxes: Box | Sequence[int] | Sequence[Sequence[int]]) -> str:
    """``{<x1><y1><x2><y2>}`` for one box; several boxes are joined by ``<delim>`` in one pair of braces."""
    group = [boxes] if _is_single_box(boxes) else list(boxes)
    if not group:
        raise ValueError("format_box needs at least one box")
    parts = []
    for box in group:
        if len(box) != 4:
            raise ValueError(f"a box has 4 coordinates, got {list(box)!r}")
        coords = [int(v) for v in box]
        if any(v < 0 or v > SCALE for v in coords):
            raise ValueError(f"box coordinates must be integers in 0-{SCALE}, got {coords}")
        parts.append("".join(f"<{v}>" for v in coords))
    return "{" + DELIM.join(parts) + "}"


def format_grounded(phrase: str, boxes: Box | Sequence[Sequence[int]]) -> str:
    """``<p>phrase</p> {<x1><y1><x2><y2>}``: a phrase tagged with its box(es)."""
    return f"<p>{phrase.strip()}</p> {format_box(boxes)}"


# --- reading (tolerant) ---------------------------------------------------------------------

_TOKEN = re.compile(r"<\s*(?P<number>-?\d+(?:\.\d+)?)\s*>|\s+|[^<\s]+|<")
_PHRASE = re.compile(r"<p>(.*?)(?:</p>|(?=\{)|(?=<p>)|$)", re.DOTALL)


def parse_boxes(text: str) -> list[Box]:
    """Every box readable in ``text``, in order.

    Tolerates what models get wrong: a missing closing brace, no braces at all, spaces inside
    ``< 12 >``, decimals (rounded), values outside 0-100 (clamped), swapped corners (reordered).
    A run of numbers whose length is not a multiple of 4 keeps its complete leading boxes.
    """
    boxes: list[Box] = []
    run: list[float] = []

    def flush() -> None:
        for k in range(0, len(run) - 3, 4):
            boxes.append(_make_box(run[k : k + 4]))
        run.clear()

    for m in _TOKEN.finditer(text):
        token = m.group(0)
        if m.group("number") is not None:
            run.append(float(m.group("number")))
        elif not token.isspace():  # braces, <delim> or any other text end the current run
            flush()
    flush()
    return boxes


def parse_box(text: str) -> Box | None:
    """The first readable box in ``text``, or None."""
    boxes = parse_boxes(text)
    return boxes[0] if boxes else None


def parse_grounded(text: str) -> list[tuple[str, list[Box]]]:
    """``(phrase, boxes)`` for every ``<p>phrase</p>`` in ``text``, with the boxes that follow it.

    A phrase without a box gets an empty list; a missing ``</p>`` ends the phrase at the next
    ``{``, ``<p>`` or the end of the text.
    """
    results: list[tuple[str, list[Box]]] = []
    matches = list(_PHRASE.finditer(text))
    for k, m in enumerate(matches):
        phrase = m.group(1).strip()
        end = matches[k + 1].start() if k + 1 < len(matches) else len(text)
        tail = text[m.end() : end]
        # The boxes belong to the phrase only if they come before any other running text.
        brace = tail.find("{")
        boxes = parse_boxes(tail) if brace != -1 and not tail[:brace].strip() else []
        if phrase:
            results.append((phrase, boxes))
    return results


def strip_boxes(text: str) -> str:
    """``text`` with the ``<p>``, ``</p>`` tags and box groups removed (the plain caption)."""
    text = re.sub(r"\{[^{}]*\}", "", text)
    text = text.replace("<p>", "").replace("</p>", "")
    return re.sub(r"\s+([.,;:!?])", r"\1", re.sub(r"\s+", " ", text)).strip()


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes (any common scale)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _make_box(numbers: Sequence[float]) -> Box:
    x1, y1, x2, y2 = (_clamp(round(v)) for v in numbers)
    return Box(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def _clamp(v: int) -> int:
    return max(0, min(SCALE, int(v)))


def _is_single_box(value) -> bool:
    return len(value) == 4 and all(isinstance(v, (int, float)) for v in value)


__all__ = [
    "SCALE",
    "DELIM",
    "Box",
    "normalize_box",
    "denormalize_box",
    "format_box",
    "format_grounded",
    "parse_boxes",
    "parse_box",
    "parse_grounded",
    "strip_boxes",
    "box_iou",
]
