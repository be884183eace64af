"""Instruction phrasings per task, and caption cleaning.

MiniGPT-4 (stage 3) and MiniGPT-v2 (stage 4) draw each sample's instruction at random from a
small pool per task, so the model does not overfit one wording; these pools are ours, written in
the same spirit. ``{}`` marks where the question, phrase or box goes. The ``[task]`` identifier is
not part of these strings: the stage-4 template adds it (:mod:`tinygptv.data.templates`).

A reader picks a phrasing with the sample's ``rng``; without one (evaluation) it takes the first,
so evaluation prompts are fixed.
"""

from __future__ import annotations

import random
import re
from typing import Sequence

INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    # Short captions ([caption]); pair datasets use them when read by an instruction template.
    "caption": (
        "Briefly describe this image.",
        "Give a short caption for the image.",
        "Write a one-sentence description of this picture.",
        "What does this image show? Answer in one sentence.",
        "Summarise the image in a few words.",
    ),
    # Detailed descriptions (stage 3, LLaVA detail).
    "detail": (
        "Describe this image in detail.",
        "Take a close look at this image and describe everything you see.",
        "Give a thorough description of the picture.",
        "Explain what is in this image, with as much detail as you can.",
        "What can you see in this image? Describe it fully.",
    ),
    # Visual question answering ([vqa]); {} is the question.
    "vqa": (
        "{}",
        "Based on the image, answer this question with a short answer: {}",
        "Look at the picture and answer briefly: {}",
    ),
    # Referring expression -> box ([refer]); {} is the phrase.
    "refer": (
        "Where is {}?",
        "Give the location of {} in the image.",
        "Find {} and give its bounding box.",
        "Point out {} with a box.",
    ),
    # Box -> referring expression ([identify]); {} is the box text.
    "identify": (
        "What is in the region {}?",
        "Describe the object inside {}.",
        "Which object is at {}?",
        "Tell me what this box contains: {}",
    ),
    # Grounded caption ([grounding]).
    "grounding": (
        "Describe this image and give the location of each object you mention.",
        "Write a caption and tag every object with its box.",
        "Give a grounded description of the picture.",
    ),
    # Object detection ([detection]); {} is the category.
    "detection": (
        "Find every {} in the image.",
        "Give the boxes of all {}.",
    ),
}


def instruction(task: str, rng: random.Random | None = None, *args: str) -> str:
    """A phrasing of ``task``'s instruction, formatted with ``args``; the first phrasing when ``rng`` is None."""
    return pick(INSTRUCTIONS[task], rng).format(*args)


def pick(options: Sequence[str], rng: random.Random | None) -> str:
    """``options[0]`` without an ``rng`` (deterministic evaluation), else a random choice."""
    if not options:
        raise ValueError("nothing to pick from")
    return options[0] if rng is None else options[rng.randrange(len(options))]


def clean_caption(text: str, max_words: int = 50) -> str:
    """BLIP's caption cleaning (LAVIS ``blip_caption`` processor, used for the stage 1-2 pairs):
    lower case, the characters ``.!"()*#:;~`` replaced by spaces, whitespace collapsed, at most
    ``max_words`` words. Removing ``#`` also keeps captions free of the ``###`` end symbol."""
    text = re.sub(r"[.!\"()*#:;~]", " ", text.lower())
    words = text.split()
    return " ".join(words[:max_words])


__all__ = ["INSTRUCTIONS", "clean_caption", "instruction", "pick"]
