"""Exact-match benchmarks: GQA (testdev balanced) and VSR (zero-shot test).

``accuracy`` is exact match after the official VQA answer normalisation on both sides
(:func:`~tinygptv.eval.metrics.exact_match`). ``accuracy_lenient`` is the rule the original
TinyGPT-V ``eval_vqa.py`` scored these sets with, and so the rule behind the paper's numbers: the
label anywhere inside the lower-cased answer ("no" counts inside "not sure", "red" inside "a red
and blue"). It is reported beside exact match, never instead of it. The original's VSR loop could
count one answer twice (once for "true", once for "yes"); here an answer counts at most once.

Prompts are the authors' (``vqa_datasets.py``) under the stage-4 template with ``[vqa]``:

* GQA: ``Based on the image, respond to this question with a short answer: {question}``
* VSR: ``Based on the image, is this statement true or false? {caption}``; the label is
  ``true``/``false``, and ``yes``/``no`` answer it too (as the original accepted).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data.readers.pairs import read_json
from .metrics import exact_match, substring_match
from .runner import Item, PerItemBenchmark, Protocol, find_dir, find_file, image_path, percent
from .vqa import SHORT_ANSWER

VSR_PROMPT = "Based on the image, is this statement true or false? {caption}"
VSR_SYNONYMS = {"true": ("true", "yes"), "false": ("false", "no")}


class _ExactMatch(PerItemBenchmark):
    def score(self, item: Item, prediction: dict[str, Any]) -> dict[str, Any]:
        targets = item.target
        return {
            "score": exact_match(prediction["answer"], targets),
            "lenient": substring_match(prediction["answer"], targets),
        }

    def metrics(self, items, records) -> dict[str, Any]:
        metrics = super().metrics(items, records)
        metrics["accuracy_lenient"] = percent(r["lenient"] for r in records)
        return metrics


class GQA(_ExactMatch):
    """GQA balanced questions: ``{split}_balanced_questions.json`` = ``{question_id: {"imageId",
    "question", "answer", "fullAnswer", ...}}`` (in ``questions1.2/`` as unpacked, or at the top),
    images ``images/{imageId}.jpg``."""

    name = "gqa"
    title = "GQA testdev balanced"
    splits = ("testdev", "val")
    default_split = "testdev"

    def load(self, data: Path, split: str | None, images: Path | None = None) -> list[Item]:
        file = f"{split}_balanced_questions.json"
        questions = read_json(find_file(data, [file, f"questions1.2/{file}"], f"GQA {file}"))
        folders = find_dir(data, ["images", "allImages/images"], images)
        return [
            Item(
                question_id=qid,
                image=image_path(folders, f"{q['imageId']}.jpg"),
                text=self.protocol.prompt.format(question=q["question"].strip()),
                target=[q["answer"]],
            )
            for qid, q in questions.items()
        ]


class VSR(_ExactMatch):
    """VSR, the repository's ``data/`` folder: ``splits/zeroshot/{split}.jsonl`` with lines
    ``{"image", "caption", "label": 0|1, "relation", ...}`` and the images in ``images/`` (or COCO
    2017's ``trainval2017/``). VSR lines have no id: the question id is the 0-based line number."""

    name = "vsr"
    title = "VSR zero-shot test"
    splits = ("test", "dev")
    default_split = "test"

    def load(self, data: Path, split: str | None, images: Path | None = None) -> list[Item]:
        file = find_file(
            data, [f"splits/zeroshot/{split}.jsonl", f"zeroshot/{split}.jsonl", f"{split}.jsonl"], f"VSR {split}.jsonl"
        )
        folders = find_dir(data, ["images", "trainval2017", "train2017", "val2017"], images)
        items = []
        for k, line in enumerate(file.read_text().splitlines()):
            if not line.strip():
                continue
            record = json.loads(line)
            label = "true" if int(record["label"]) == 1 else "false"
            items.append(
                Item(
                    question_id=k,
                    image=image_path(folders, record["image"]),
                    text=self.protocol.prompt.format(caption=record["caption"].strip()),
                    target=list(VSR_SYNONYMS[label]),
                    meta={"relation": record.get("relation")},
                )
            )
        return items


def gqa() -> GQA:
    return GQA(Protocol(prompt=SHORT_ANSWER, settings={"lenient": "label substring of the answer (the original's)"}))


def vsr() -> VSR:
    return VSR(
        Protocol(
            prompt=VSR_PROMPT,
            settings={"labels": VSR_SYNONYMS, "lenient": "label or synonym substring of the answer, counted once"},
        )
    )


__all__ = ["GQA", "VSR", "gqa", "vsr"]
