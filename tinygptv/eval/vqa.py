"""VQA-accuracy benchmarks: VQAv2, OK-VQA and VizWiz, scored by the official VQA accuracy
(:func:`~tinygptv.eval.metrics.vqa_accuracy`) against their ten human answers.

Prompts are the authors' (TinyGPT-V ``minigpt4/datasets/datasets/vqa_datasets.py``, used by
``eval_vqa.py``), under the stage-4 template with ``[vqa]``; 20 new tokens at most, greedy:

* OK-VQA (and VQAv2): ``Based on the image, respond to this question with a short answer: {question}``
* VizWiz: ``The question is '{question}' Based on the image, answer the question with a single word
  or phrase. and reply 'unanswerable' when the provided information is insufficient``

VizWiz keeps its unanswerable questions: "unanswerable" is an answer like any other, and the
metrics add the accuracy per answer type (``unanswerable``, ``yes/no``, ``number``, ``other``).
The original scored VizWiz with a substring rule that gave an empty answer credit; not repeated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..data.readers.pairs import read_json
from .metrics import vqa_accuracy
from .runner import Item, PerItemBenchmark, Protocol, find_dir, find_file, image_path, percent

SHORT_ANSWER = "Based on the image, respond to this question with a short answer: {question}"
VIZWIZ_PROMPT = (
    "The question is '{question}' Based on the image, answer the question with a single word or phrase. "
    "and reply 'unanswerable' when the provided information is insufficient"
)


class _VQAAccuracy(PerItemBenchmark):
    """Shared scoring: official VQA accuracy, plus per answer type where the files give one."""

    def score(self, item: Item, prediction: dict[str, Any]) -> dict[str, Any]:
        return {"score": vqa_accuracy(prediction["answer"], item.target)}

    def metrics(self, items: Sequence[Item], records: Sequence[dict]) -> dict[str, Any]:
        metrics = super().metrics(items, records)
        types = sorted({i.meta.get("answer_type") for i in items if i.meta.get("answer_type")})
        for answer_type in types:
            metrics[f"accuracy_{answer_type}"] = percent(
                r["score"] for i, r in zip(items, records) if i.meta.get("answer_type") == answer_type
            )
        return metrics


class _COCOQuestions(_VQAAccuracy):
    """VQAv2 / OK-VQA: official question and annotation files, COCO val2014 images."""

    questions_file = ""
    annotations_file = ""

    def load(self, data: Path, split: str | None, images: Path | None = None) -> list[Item]:
        questions = read_json(find_file(data, [self.questions_file], f"{self.title} questions"))["questions"]
        annotations = read_json(find_file(data, [self.annotations_file], f"{self.title} annotations"))
        by_id = {a["question_id"]: a for a in annotations["annotations"]}
        folders = find_dir(data, ["val2014", "images/val2014", "images"], images)
        items = []
        for q in questions:
            ann = by_id.get(q["question_id"])
            if ann is None:
                raise ValueError(f"{self.title}: question {q['question_id']} has no annotation")
            items.append(
                Item(
                    question_id=q["question_id"],
                    image=image_path(folders, f"COCO_val2014_{int(q['image_id']):012d}.jpg"),
                    text=self.protocol.prompt.format(question=q["question"].strip()),
                    target=[a["answer"] for a in ann["answers"]],
                    meta={"answer_type": ann.get("answer_type")},
                )
            )
        return items


class VQAv2(_COCOQuestions):
    name = "vqav2"
    title = "VQAv2 val"
    splits = ("val",)
    default_split = "val"
    questions_file = "v2_OpenEnded_mscoco_val2014_questions.json"
    annotations_file = "v2_mscoco_val2014_annotations.json"


class OKVQA(_COCOQuestions):
    name = "okvqa"
    title = "OK-VQA val"
    splits = ("val",)
    default_split = "val"
    questions_file = "OpenEnded_mscoco_val2014_questions.json"
    annotations_file = "mscoco_val2014_annotations.json"


class VizWiz(_VQAAccuracy):
    """VizWiz-VQA: ``Annotations/{split}.json`` = ``[{"image", "question", "answers": [{"answer",
    "answer_confidence"}] x 10, "answer_type", "answerable"}]``, images ``{split}/{image}``. The
    question id is the image file name (VizWiz's result files name questions by ``image``)."""

    name = "vizwiz"
    title = "VizWiz val"
    splits = ("val", "train")
    default_split = "val"

    def load(self, data: Path, split: str | None, images: Path | None = None) -> list[Item]:
        records = read_json(find_file(data, [f"Annotations/{split}.json", f"{split}.json"], f"VizWiz {split}.json"))
        folders = find_dir(data, [split, f"images/{split}"], images)
        return [
            Item(
                question_id=r["image"],
                image=image_path(folders, r["image"]),
                text=self.protocol.prompt.format(question=r["question"].strip()),
                target=[a["answer"] for a in r["answers"]],
                meta={"answer_type": r.get("answer_type")},
            )
            for r in records
        ]


def vqav2() -> VQAv2:
    return VQAv2(Protocol(prompt=SHORT_ANSWER))


def okvqa() -> OKVQA:
    return OKVQA(Protocol(prompt=SHORT_ANSWER))


def vizwiz() -> VizWiz:
    return VizWiz(Protocol(prompt=VIZWIZ_PROMPT))


__all__ = ["OKVQA", "VQAv2", "VizWiz", "okvqa", "vizwiz", "vqav2"]
