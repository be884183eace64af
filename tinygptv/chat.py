"""Multi-turn chat with images: the conversation state behind ``model.ask``, ``tinygptv chat`` and
the server.

A :class:`Conversation` keeps its images' soft prompts (each image is encoded once) and the KV
cache of everything said so far. Each turn the whole prompt is re-rendered by the template and
tokenised; only the part after the longest prefix the cache already holds is run through the
model, so earlier turns are never recomputed. When the conversation outgrows the context, the
oldest turns are dropped (the images stay) with a warning saying what was dropped.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from .data.boxes import denormalize_box, parse_boxes, parse_grounded
from .data.encoding import encode_chunks
from .data.templates import Template, get_template
from .generate import SamplingParams, StopChecker, new_cache, stream_tokens

if TYPE_CHECKING:
    from PIL.Image import Image

    from .model.tinygptv import TinyGPTV

TASKS = ("vqa", "caption", "refer", "identify", "grounding", "detection")


@dataclass
class Answer:
    """A model answer: the text, and any boxes it contains, parsed."""

    text: str
    """The answer as generated (box text included), without the template's end symbol."""
    boxes: list[dict[str, Any]] = field(default_factory=list)
    """``{"phrase", "box" (pixels of the original image, x1 y1 x2 y2), "box_norm" (0-100)}`` each."""

    def to_dict(self) -> dict[str, Any]:
        return {"answer": self.text, "boxes": self.boxes}


def parse_answer(text: str, image_size: tuple[int, int] | None, task: str | None = None, query: str = "") -> Answer:
    """Read the boxes out of an answer. Grounded phrases (``<p>x</p> {box}``) name their boxes; a bare
    box (the ``[refer]`` answer) is named by the referring expression ``query``."""
    found: list[tuple[str, Any]] = []
    for phrase, boxes in parse_grounded(text):
        found.extend((phrase, b) for b in boxes)
    if not found:
        name = query.strip() if task == "refer" else ""
        found = [(name, b) for b in parse_boxes(text)]
    boxes = []
    for phrase, b in found:
        item: dict[str, Any] = {"phrase": phrase, "box_norm": list(b)}
        if image_size is not None:
            item["box"] = [round(v, 1) for v in denormalize_box(b, *image_size)]
        boxes.append(item)
    return Answer(text=text, boxes=boxes)


MAX_IMAGE_PIXELS = 8192 * 8192
"""Largest image :func:`load_image` decodes (64 Mpx, ~200 MB as RGB). The model sees 224 or 448 px,
so anything larger is a mistake or a decompression bomb; the size is read from the header first."""


def load_image(image: "Image | str | Path | bytes") -> "Image":
    """An RGB PIL image from a PIL image, a path or encoded bytes; a ``ValueError`` naming the
    problem if it is not one (empty, not an image, truncated, unreadable, too many pixels), a
    ``FileNotFoundError`` if the path does not exist."""
    import io

    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    if isinstance(image, PILImage.Image):
        return image.convert("RGB")
    where = "the given bytes" if isinstance(image, (bytes, bytearray)) else str(image)
    if isinstance(image, (bytes, bytearray)):
        source = io.BytesIO(image)
    else:
        source = Path(image)
        if not source.exists():
            raise FileNotFoundError(f"image not found: {image}")
        if source.is_file() and source.stat().st_size == 0:
            raise ValueError(f"cannot read an image from {where}: the file is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)  # our own, lower limit applies
        try:
            img = PILImage.open(source)
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ValueError(
                    f"the image in {where} has too many pixels: {width}x{height}, more than the limit of "
                    f"{MAX_IMAGE_PIXELS} (8192 x 8192); resize it first"
                )
            img.load()
        except PILImage.DecompressionBombError as err:  # Pillow's own limit, raised while opening
            raise ValueError(f"the image in {where} has too many pixels: {err}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, EOFError) as err:
            # OSError: unreadable or truncated files, directories; SyntaxError/EOFError: malformed headers
            raise ValueError(f"cannot read an image from {where}: {err}") from None
    return img.convert("RGB")


class Conversation:
    """A multi-turn conversation with a :class:`~tinygptv.TinyGPTV`, about zero or more images.

    Images are added before the first question (they go into the first user turn, as in training);
    adding one later starts a new conversation about it, like the original demo's upload.
    """

    def __init__(self, model: "TinyGPTV", template: str | Template = "stage4", sampling: SamplingParams | None = None):
        self.model = model
        self.template = get_template(template) if isinstance(template, str) else template
        self.sampling = sampling or SamplingParams()
        self.images: list["Image"] = []
        self.history: list[tuple[str, str]] = []
        self._image_embeds: torch.Tensor | None = None
        self._cache = None
        self._cached_ids: list[int] = []
        self.last_answer: Answer | None = None

    # --- state ----------------------------------------------------------------------------
    def reset(self, keep_images: bool = False) -> None:
        """Forget the conversation (and the images, unless ``keep_images``)."""
        if not keep_images:
            self.images, self._image_embeds = [], None
        self.history, self._cache, self._cached_ids = [], None, []

    def add_image(self, image: "Image | str | Path | bytes") -> None:
        loaded = load_image(image)  # a bad image leaves the conversation as it was
        if self.history:
            self.reset()
        self.images.append(loaded)
        self._image_embeds = None
        self._cache, self._cached_ids = None, []

    @property
    def cached_tokens(self) -> int:
        """Tokens whose keys and values the cache holds."""
        return len(self._cached_ids)

    # --- asking ---------------------------------------------------------------------------
    def ask(self, text: str, task: str | None = None, **sampling: Any) -> Answer:
        """Answer ``text`` (with the ``[task]`` identifier of ``task``), remember the turn."""
        for _ in self.stream(text, task, **sampling):
            pass
        return self.last_answer

    def stream(self, text: str, task: str | None = None, **sampling: Any) -> Iterator[str]:
        """Like :meth:`ask`, yielding the answer's text piece by piece; afterwards
        :attr:`last_answer` holds the parsed answer."""
        if task is not None and task not in TASKS:
            raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
        if not text.strip():
            raise ValueError("the question is empty")
        params = replace(self.sampling, **sampling)
        params = replace(params, stop=tuple(params.stop) + self.template.stop_strings)
        params.validate()
        model, tok = self.model, self.model.tokenizer
        ids = self._prompt_ids(text, task, params.max_new_tokens)
        embeds = self._embeds_after_cached_prefix(ids)
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        checker = StopChecker(tok, params.stop)
        generated: list[int] = []
        for token in stream_tokens(model.lm, embeds, self._cache, params, eos):
            generated.append(token)
            piece = checker.push(token)
            if piece:
                yield piece
            if checker.stopped:
                break
        tail = checker.flush()
        if tail:
            yield tail
        self._cached_ids = (ids + generated)[: self._cache.get_seq_length()]
        answer_text = checker.text()
        for stop in params.stop:
            answer_text = answer_text.split(stop)[0]
        answer_text = answer_text.strip()
        self.history.append((text, answer_text))
        size = self.images[0].size if self.images else None
        self.last_answer = parse_answer(answer_text, size, task, query=text)

    # --- internals ------------------------------------------------------------------------
    def _prompt_ids(self, text: str, task: str | None, max_new_tokens: int) -> list[int]:
        limit = self.model.config.language.max_position_embeddings - max_new_tokens
        q = self.model.num_image_tokens
        while True:
            prompt = self.template.prompt(text, len(self.images), task, self.history)
            ids = encode_chunks(self.model.tokenizer, [(prompt, False)], q).input_ids
            if len(ids) <= limit:
                return ids
            if not self.history:
                raise ValueError(
                    f"the question alone is {len(ids)} tokens; with max_new_tokens={max_new_tokens} it does not "
                    f"fit the context of {self.model.config.language.max_position_embeddings}"
                )
            dropped = self.history.pop(0)
            warnings.warn(
                f"the conversation exceeds the context ({len(ids)} + {max_new_tokens} new tokens > "
                f"{self.model.config.language.max_position_embeddings}); dropped the oldest turn: {dropped[0]!r}",
                stacklevel=3,
            )

    def _embeds_after_cached_prefix(self, ids: list[int]) -> torch.Tensor:
        model = self.model
        if self.images and self._image_embeds is None:
            from .data.image_processing import image_processor_for

            pixels = image_processor_for(model.config.vision.image_size).batch(self.images).to(model.device)
            with torch.inference_mode():
                self._image_embeds = model.encode_images(pixels.to(_float_dtype(model)))
        if self._cache is None:
            self._cache, self._cached_ids = new_cache(model.lm), []
        common = 0
        for a, b in zip(self._cached_ids, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # always run at least one token to get fresh logits
        held = self._cache.get_seq_length()
        if common < held:
            self._cache.crop(common - held)  # transformers 5: a negative count of tokens to remove
        self._cached_ids = self._cached_ids[:common]
        with torch.inference_mode():
            full = model.embed(torch.tensor([ids], device=model.device), self._image_embeds)
        return full[:, common:]


def _float_dtype(model) -> torch.dtype:
    return model.lm_proj.weight.dtype
