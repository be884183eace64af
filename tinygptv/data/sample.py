"""The one record type every dataset reader produces and every template consumes.

A :class:`Sample` is format-free: images (in the order of their placeholders), conversation turns
(user text, assistant text), the task it trains and where it came from. Readers of the public
formats (:mod:`tinygptv.data.readers`) build samples; templates (:mod:`tinygptv.data.templates`)
turn them into ``(text, is_target)`` chunks for :func:`~tinygptv.data.encoding.encode_chunks`.

A record that cannot become a sample (missing or corrupt image, malformed annotation) raises
:class:`BadSample`; the mixture loader skips it, counts it and reports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # PIL is imported where images are opened, not at import time
    from PIL.Image import Image


class BadSample(Exception):
    """A record that cannot be used: missing or corrupt image, malformed annotation, too long."""


@dataclass
class Turn:
    """One exchange of a conversation: the user's text and the assistant's answer (the target)."""

    user: str
    """What the user says. May contain ``<ImageHere>`` placeholders where images go; when it has
    none, the template puts the sample's images before the first user text."""
    assistant: str
    """The answer the model learns to give (the only supervised text)."""


@dataclass
class Sample:
    """One training or evaluation example."""

    turns: list[Turn]
    """The conversation, one or more turns."""
    images: list["Image"] = field(default_factory=list)
    """RGB images in placeholder order; empty for text-only samples."""
    task: str = "caption"
    """Task name. The six MiniGPT-v2 tasks (``vqa``, ``caption``, ``refer``, ``grounding``,
    ``identify``, ``detection``) get their ``[task]`` identifier in the stage-4 template; other
    names (``conversation``, ``detail``, ``reason``, ``text``, ...) get none."""
    source: str = ""
    """Name of the dataset the sample came from (for mixing statistics and skip reports)."""
    id: str = ""
    """Identifier of the record inside its dataset (for error messages)."""
    geometry: bool = False
    """True when the text depends on where things are in the image (boxes, positions, counts):
    train-time augmentation must then keep the whole image (no random crop)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Optional extras, e.g. ``boxes`` (0-100 ground-truth boxes) or ``answers`` (all annotators'
    answers) for evaluation."""

    def __post_init__(self) -> None:
        if not self.turns:
            raise BadSample(f"{self.source or 'sample'} {self.id}: no conversation turns")


def load_image(path: str | Path, what: str = "") -> "Image":
    """Open an image file as RGB, fully decoded; a missing or unreadable file raises :class:`BadSample`."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise BadSample(f"{what}missing image {path}") from None
    except (OSError, ValueError, SyntaxError, PILImage.DecompressionBombError) as err:
        raise BadSample(f"{what}corrupt image {path}: {err}") from None


def decode_image(data: bytes, what: str = "") -> "Image":
    """Decode image bytes (JPEG, PNG, WebP, ...) as RGB; undecodable bytes raise :class:`BadSample`."""
    import io

    from PIL import Image as PILImage

    try:
        with PILImage.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, PILImage.DecompressionBombError) as err:
        raise BadSample(f"{what}corrupt image bytes: {err}") from None
