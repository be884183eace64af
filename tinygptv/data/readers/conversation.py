"""Conversations and instructions: LLaVA-Instruct (conversation / detail / reason), MiniGPT-v2's
multi-task conversation set, and Unnatural Instructions (text only)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from ..sample import BadSample, Sample, Turn
from ..sources import ImageDir, RecordSource
from .pairs import read_json

LLAVA_IMAGE_TOKEN = "<image>"
"""LLaVA's image marker in the first human message; TinyGPT-V's templates place the image instead."""


def conversation_turns(messages: list[dict]) -> list[Turn]:
    """LLaVA-style ``[{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]`` -> turns.

    Roles must alternate human / gpt, starting with human; ``<image>`` markers are removed.
    """
    if not messages or len(messages) % 2:
        raise BadSample(f"a conversation needs human/gpt pairs, got {len(messages)} message(s)")
    turns = []
    for k in range(0, len(messages), 2):
        human, gpt = messages[k], messages[k + 1]
        if human.get("from") not in ("human", "user") or gpt.get("from") not in ("gpt", "assistant"):
            raise BadSample(f"message {k}: roles must alternate human/gpt, got {human.get('from')}/{gpt.get('from')}")
        question = human["value"].replace(LLAVA_IMAGE_TOKEN, "").strip()
        answer = gpt["value"].strip()
        if not question or not answer:
            raise BadSample(f"message {k}: empty question or answer")
        turns.append(Turn(question, answer))
    return turns


class LLaVAInstruct(RecordSource):
    """LLaVA-Instruct-150K files (``conversation_58k.json``, ``detail_23k.json``,
    ``complex_reasoning_77k.json``): ``[{"id", "image", "conversations": [{"from", "value"}]}]``.

    ``task`` names the part (``conversation``, ``detail`` or ``reason``); none has a MiniGPT-v2
    task identifier. The image is ``image_dir / (image_prefix + entry["image"])``, or, for
    entries without ``image``, ``image_pattern.format(id=entry["id"])`` when a pattern is given;
    entries with neither are text-only.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        task: str = "conversation",
        name: str | None = None,
        image_prefix: str = "",
        image_pattern: str | None = None,
    ):
        super().__init__(read_json(annotation_file), name or f"llava_{task}")
        self.images = ImageDir(image_dir)
        self.task = task
        self.image_prefix = image_prefix
        self.image_pattern = image_pattern

    def image_name(self, entry: dict) -> str | None:
        if entry.get("image"):
            return self.image_prefix + entry["image"]
        if self.image_pattern is not None:
            return self.image_pattern.format(id=entry["id"])
        return None

    def build(self, record: dict, rng: random.Random | None) -> Sample:
        turns = conversation_turns(record["conversations"])
        name = self.image_name(record)
        images = [self.images.open(name)] if name else []
        return Sample(turns=turns, images=images, task=self.task, id=str(record.get("id", "")))


class MultiTaskConversation(LLaVAInstruct):
    """MiniGPT-v2's ``multitask_conversation.json``: LLaVA's conversation layout whose entries name
    their COCO image by ``id`` (``COCO_train2014_{id}.jpg``) instead of an ``image`` field."""

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        name: str = "multitask_conversation",
        image_pattern: str = "COCO_train2014_{id}.jpg",
    ):
        super().__init__(annotation_file, image_dir, task="conversation", name=name, image_pattern=image_pattern)


class UnnaturalInstructions(RecordSource):
    """Unnatural Instructions (``core_data.jsonl``): one JSON object per line, ``{"instruction",
    "instances": [{"instruction_with_input", "constraints", "output"}]}``; one text-only sample
    per instance, the instruction followed by its constraints (as MiniGPT-v2 uses it)."""

    def __init__(self, data_file: str | Path, name: str = "unnatural_instructions"):
        path = Path(data_file)
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path}")
        records: list[Any] = []
        with path.open(encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except ValueError as err:
                    records.append(BadSample(f"line {line_number}: not JSON ({err})"))
                    continue
                instances = entry.get("instances") if isinstance(entry, dict) else None
                if not instances:
                    records.append(BadSample(f"line {line_number}: no instances"))
                    continue
                records.extend(instances)
        super().__init__(records, name)

    def build(self, record: Any, rng: random.Random | None) -> Sample:
        if isinstance(record, BadSample):
            raise record
        text = record["instruction_with_input"].strip()
        constraints = record.get("constraints")
        if constraints:
            text = f"{text} {constraints.strip()}"
        output = record["output"].strip()
        if not text or not output:
            raise BadSample("empty instruction or output")
        return Sample(turns=[Turn(text, output)], task="text")


__all__ = ["LLaVAInstruct", "MultiTaskConversation", "UnnaturalInstructions", "conversation_turns"]
