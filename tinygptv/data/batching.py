"""Samples -> the model-ready batch.

The batch is exactly what :meth:`tinygptv.model.tinygptv.TinyGPTV.forward` takes::

    {"input_ids": (B, T) long, "attention_mask": (B, T) long, "labels": (B, T) long,
     "pixel_values": (N, 3, S, S) float}      # absent when no sample of the batch has an image

with the N images in the order of their placeholders, sample after sample. Work is split in two
so that the expensive half runs in loader workers: :meth:`Collator.prepare` (template, tokens,
image processing: one sample) and :meth:`Collator.collate` (padding: the batch).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from .encoding import IMAGE_PLACEHOLDER, Encoded, collate, encode_chunks
from .image_processing import ImageProcessor
from .sample import BadSample, Sample
from .templates import Template, get_template

if TYPE_CHECKING:
    import torch


@dataclass
class Prepared:
    """One sample, tokenised and with its images processed."""

    encoded: Encoded
    pixel_values: "torch.Tensor | None"
    """(k, 3, S, S) for the sample's k images, or None for a text-only sample."""
    source: str = ""
    task: str = ""


class Collator:
    """Turns :class:`~tinygptv.data.sample.Sample` objects into model batches.

    ``template`` (a :class:`~tinygptv.data.templates.Template` or its name) builds the prompt and
    targets; ``image_processor`` makes the pixels (its ``train`` flag switches the random crop on,
    except for samples whose text refers to image geometry); ``max_length`` bounds the tokens per
    sample, image slots included (longer ones are cut with ``truncate``, else skipped as bad).
    """

    def __init__(
        self,
        tokenizer,
        template: Template | str,
        image_processor: ImageProcessor,
        num_image_tokens: int,
        max_length: int | None = None,
        truncate: bool = False,
        pad_token_id: int | None = None,
        padding_side: str = "right",
    ):
        self.tokenizer = tokenizer
        self.template = get_template(template) if isinstance(template, str) else template
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.truncate = truncate
        self.padding_side = padding_side
        if pad_token_id is None:
            pad_token_id = next(
                (
                    t
                    for t in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                    if t is not None
                ),
                0,
            )
        self.pad_token_id = pad_token_id

    def prepare(self, sample: Sample, rng: random.Random | None = None) -> Prepared:
        """Template + tokens + pixels of one sample; a sample that cannot fit raises :class:`BadSample`."""
        chunks = self.template.chunks(sample)
        placeholders = sum(text.count(IMAGE_PLACEHOLDER) for text, _ in chunks)
        if placeholders != len(sample.images):
            raise BadSample(
                f"{sample.source} {sample.id}: {placeholders} image placeholder(s) for {len(sample.images)} image(s)"
            )
        try:
            encoded = encode_chunks(self.tokenizer, chunks, self.num_image_tokens, self.max_length, self.truncate)
        except ValueError as err:  # too long for max_length (without truncate)
            raise BadSample(f"{sample.source} {sample.id}: {err}") from None
        pixels = None
        if sample.images:
            pixels = self.image_processor.batch(sample.images, rng, crop=not sample.geometry)
        return Prepared(encoded, pixels, sample.source, sample.task)

    def collate(self, items: Sequence[Prepared]) -> dict[str, "torch.Tensor"]:
        """Pad prepared samples into one batch."""
        import torch

        batch = collate([item.encoded for item in items], self.pad_token_id, self.padding_side)
        pixels = [item.pixel_values for item in items if item.pixel_values is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        return batch

    def __call__(self, samples: Sequence[Sample], rng: random.Random | None = None) -> dict[str, "torch.Tensor"]:
        """Prepare and collate ``samples`` in one go (raises :class:`BadSample` on an unusable one)."""
        return self.collate([self.prepare(s, rng) for s in samples])


__all__ = ["Collator", "Prepared"]
