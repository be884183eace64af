"""Visual question answering: VQAv2, OK-VQA, A-OKVQA, GQA and OCR-VQA in their official formats.

Every sample is one ``[vqa]`` question with one short answer; ``meta["answers"]`` keeps all the
annotators' answers where the format has them (VQA accuracy needs them).
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from ..instructions import instruction
from ..sample import BadSample, Sample, Turn
from ..sources import ImageDir, RecordSource
from .pairs import read_json


def majority_answer(answers: Sequence[str]) -> str:
    """The most frequent answer (the first one seen among ties)."""
    counts = Counter(a.strip() for a in answers if isinstance(a, str) and a.strip())
    if not counts:
        raise BadSample("no answers")
    best = max(counts.values())
    return next(a for a in (x.strip() for x in answers) if counts.get(a) == best)


def _vqa_sample(image, question: str, answer: str, rng, sample_id: str, answers: list[str]) -> Sample:
    question = question.strip()
    if not question:
        raise BadSample("empty question")
    return Sample(
        turns=[Turn(instruction("vqa", rng, question), answer)],
        images=[image],
        task="vqa",
        id=sample_id,
        meta={"answers": answers},
    )


class VQAv2(RecordSource):
    """VQAv2 (and OK-VQA, same layout).

    ``questions_file``: ``{"questions": [{"question_id", "image_id", "question"}]}``;
    ``annotations_file``: ``{"annotations": [{"question_id", "multiple_choice_answer",
    "answers": [{"answer": ...}] x 10}]}`` (optional: test splits have none, their answer is ``""``).
    The trained answer is ``multiple_choice_answer`` (VQAv2's most frequent answer) or, where a
    set lacks it (OK-VQA), the majority of ``answers``. Images are
    ``image_dir / image_pattern.format(image_id=...)``.
    """

    def __init__(
        self,
        questions_file: str | Path,
        annotations_file: str | Path | None,
        image_dir: str | Path,
        image_pattern: str = "COCO_train2014_{image_id:012d}.jpg",
        name: str = "vqav2",
    ):
        questions = read_json(questions_file)["questions"]
        annotations: dict[Any, dict] = {}
        if annotations_file is not None:
            annotations = {a["question_id"]: a for a in read_json(annotations_file)["annotations"]}
        records = []
        for q in questions:
            ann = annotations.get(q.get("question_id"))
            answers = [a.get("answer") for a in ann.get("answers", [])] if ann else []
            best = ann.get("multiple_choice_answer") if ann else None
            records.append((q.get("question_id"), q.get("image_id"), q.get("question"), best, answers, ann is not None))
        super().__init__(records, name)
        self.images = ImageDir(image_dir)
        self.image_pattern = image_pattern
        self.has_answers = annotations_file is not None

    def build(self, record: tuple, rng: random.Random | None) -> Sample:
        question_id, image_id, question, best, answers, annotated = record
        if self.has_answers and not annotated:
            raise BadSample(f"question {question_id} has no annotation")
        answer = (best or majority_answer(answers)).strip() if self.has_answers else ""
        image = self.images.open(self.image_pattern.format(image_id=int(image_id)))
        return _vqa_sample(image, question, answer, rng, str(question_id), answers)


class OKVQA(VQAv2):
    """OK-VQA: VQAv2's layout (``OpenEnded_mscoco_train2014_questions.json``,
    ``mscoco_train2014_annotations.json``); answers by majority."""

    def __init__(
        self,
        questions_file,
        annotations_file,
        image_dir,
        image_pattern="COCO_train2014_{image_id:012d}.jpg",
        name="okvqa",
    ):
        super().__init__(questions_file, annotations_file, image_dir, image_pattern, name)


class AOKVQA(RecordSource):
    """A-OKVQA (``aokvqa_v1p0_{split}.json``): ``[{"question_id", "image_id", "question",
    "choices", "correct_choice_idx", "direct_answers", "rationales"}]``, COCO 2017 images
    ``{image_id:012d}.jpg``. The answer is the majority direct answer (the correct choice where
    there are none)."""

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        image_pattern: str = "{image_id:012d}.jpg",
        name: str = "aokvqa",
    ):
        super().__init__(read_json(annotation_file), name)
        self.images = ImageDir(image_dir)
        self.image_pattern = image_pattern

    def build(self, record: dict, rng: random.Random | None) -> Sample:
        direct = record.get("direct_answers") or []
        if direct:
            answer = majority_answer(direct)
        else:
            answer = record["choices"][record["correct_choice_idx"]]
        image = self.images.open(self.image_pattern.format(image_id=int(record["image_id"])))
        sample = _vqa_sample(image, record["question"], answer, rng, str(record.get("question_id")), list(direct))
        sample.meta["choices"] = record.get("choices")
        return sample


class GQA(RecordSource):
    """GQA questions (``{split}_balanced_questions.json``): ``{question_id: {"imageId", "question",
    "answer", "fullAnswer", ...}}``, images ``{imageId}.jpg``. The short ``answer`` is trained."""

    def __init__(self, questions_file: str | Path, image_dir: str | Path, name: str = "gqa"):
        data = read_json(questions_file)
        items = data.items() if isinstance(data, dict) else ((q.get("question_id"), q) for q in data)
        super().__init__([(qid, q) for qid, q in items], name)
        self.images = ImageDir(image_dir)

    def build(self, record: tuple, rng: random.Random | None) -> Sample:
        question_id, q = record
        answer = q["answer"].strip()
        if not answer:
            raise BadSample(f"question {question_id} has an empty answer")
        image = self.images.open(f"{q['imageId']}.jpg")
        return _vqa_sample(image, q["question"], answer, rng, str(question_id), [answer])


class OCRVQA(RecordSource):
    """OCR-VQA (``dataset.json``): ``{image_id: {"imageURL", "questions": [...], "answers": [...],
    "split": 1|2|3}}`` with 1 = train, 2 = val, 3 = test; images ``{image_id}{ext}`` where the
    extension is the one of ``imageURL``. One sample per question."""

    SPLITS = {"train": 1, "val": 2, "test": 3}

    def __init__(self, dataset_file: str | Path, image_dir: str | Path, split: str = "train", name: str = "ocrvqa"):
        if split not in self.SPLITS:
            raise ValueError(f"OCR-VQA split must be one of {sorted(self.SPLITS)}, got {split!r}")
        records = []
        for image_id, entry in read_json(dataset_file).items():
            if entry.get("split") != self.SPLITS[split]:
                continue
            ext = Path(str(entry.get("imageURL", ""))).suffix or ".jpg"
            questions, answers = entry.get("questions") or [], entry.get("answers") or []
            if len(questions) != len(answers):
                records.append((image_id, ext, None, None))  # reported when drawn
                continue
            records.extend((image_id, ext, q, a) for q, a in zip(questions, answers))
        super().__init__(records, name)
        self.images = ImageDir(image_dir)

    def build(self, record: tuple, rng: random.Random | None) -> Sample:
        image_id, ext, question, answer = record
        if question is None:
            raise BadSample(f"image {image_id}: questions and answers differ in number")
        answer = str(answer).strip()
        if not answer:
            raise BadSample(f"image {image_id}: empty answer")
        image = self.images.open(image_id + ext)
        return _vqa_sample(image, question, answer, rng, image_id, [answer])


__all__ = ["AOKVQA", "GQA", "OCRVQA", "OKVQA", "VQAv2", "majority_answer"]
