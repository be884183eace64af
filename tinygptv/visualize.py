"""Drawing predicted boxes and their phrases on an image."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from PIL.Image import Image

_COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c"]


def draw_boxes(image: "Image", boxes: Sequence[dict[str, Any]], width: int | None = None) -> "Image":
    """A copy of ``image`` with each ``{"phrase", "box"}`` (pixel corners) outlined and labelled."""
    from PIL import ImageDraw

    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    line = width or max(2, round(min(out.size) / 150))
    for k, item in enumerate(boxes):
        color = _COLORS[k % len(_COLORS)]
        x1, y1, x2, y2 = item["box"]
        draw.rectangle([x1, y1, x2, y2], outline=color, width=line)
        if item.get("phrase"):
            tx, ty = x1 + line, max(0, y1 - 12) if y1 >= 12 else y1 + line
            text_box = draw.textbbox((tx, ty), item["phrase"])
            draw.rectangle(text_box, fill=color)
            draw.text((tx, ty), item["phrase"], fill="white")
    return out
