"""Turn prompts with ``<ImageHere>`` placeholders into token ids and labels, and batch them.

The rules follow the authors' release (ORIGINAL-NOTES, "Prompt formats"):

* text segments around each ``<ImageHere>`` are tokenised separately, and only the first segment
  gets the tokenizer's special tokens (its BOS, if it adds one);
* each placeholder becomes ``num_image_tokens`` slots (id :data:`IMAGE_TOKEN_ID`) that the model fills
  with the projected Q-Former outputs;
* only target text (answers, assistant turns) is supervised; everything else is labelled -100.

A sample is a list of ``(text, is_target)`` chunks, so one function serves single answers and
multi-turn conversations alike (templates build the chunks).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

IMAGE_PLACEHOLDER = "<ImageHere>"
"""The text marker replaced by an image's soft prompt."""
IMAGE_TOKEN_ID = -200
"""Input id of an image slot. Negative, so it can never collide with a real token."""
IGNORE_INDEX = -100
"""Label of positions that carry no loss."""


@dataclass
class Encoded:
    """One tokenised sample."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_chunks(
    tokenizer,
    chunks: Sequence[tuple[str, bool]],
    num_image_tokens: int,
    max_length: int | None = None,
    truncate: bool = False,
) -> Encoded:
    """Tokenise ``chunks`` (text, is_target) into ids and labels.

    ``max_length`` bounds the total length (image slots included). A longer sample raises
    ``ValueError`` unless ``truncate`` is set, in which case it is cut at the end with a warning
    (never silently); a cut that would split an image's slots raises instead.
    """
    ids: list[int] = []
    labels: list[int] = []
    first = True
    for text, is_target in chunks:
        pieces = text.split(IMAGE_PLACEHOLDER)
        if is_target and len(pieces) > 1:
            raise ValueError(f"an image placeholder {IMAGE_PLACEHOLDER} cannot be part of a target text: {text!r}")
        for k, piece in enumerate(pieces):
            if k > 0:  # a placeholder stood between pieces k-1 and k
                ids.extend([IMAGE_TOKEN_ID] * num_image_tokens)
                labels.extend([IGNORE_INDEX] * num_image_tokens)
            if piece == "" and not first:
                continue
            piece_ids = tokenizer(piece, add_special_tokens=first)["input_ids"]
            first = False
            ids.extend(piece_ids)
            labels.extend(piece_ids if is_target else [IGNORE_INDEX] * len(piece_ids))
    if max_length is not None and len(ids) > max_length:
        if not truncate:
            raise ValueError(
                f"sample is {len(ids)} tokens (image slots included), longer than the context of "
                f"{max_length}; shorten it or pass truncate=True to cut it"
            )
        if ids[max_length - 1] == IMAGE_TOKEN_ID and max_length < len(ids) and ids[max_length] == IMAGE_TOKEN_ID:
            raise ValueError(f"truncating to {max_length} tokens would cut an image's slots in half")
        warnings.warn(f"truncated a sample from {len(ids)} to {max_length} tokens", stacklevel=2)
        ids, labels = ids[:max_length], labels[:max_length]
    return Encoded(ids, labels)


def encode_prompt(
    tokenizer,
    prompt: str,
    answer: str | None,
    num_image_tokens: int,
    max_length: int | None = None,
    truncate: bool = False,
) -> Encoded:
    """A single-turn sample: ``prompt`` is context, ``answer`` (if any) is the target."""
    chunks = [(prompt, False)]
    if answer:
        chunks.append((answer, True))
    return encode_chunks(tokenizer, chunks, num_image_tokens, max_length, truncate)


def collate(samples: Sequence[Encoded], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a list of samples into ``input_ids``, ``attention_mask`` and ``labels`` tensors (B, T).

    Training pads on the right; batched generation pads on the left so every row ends at the
    position where decoding continues.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not samples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(s) for s in samples)
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s)
        span = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[row, span] = torch.tensor(s.input_ids, dtype=torch.long)
        labels[row, span] = torch.tensor(s.labels, dtype=torch.long)
        mask[row, span] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
