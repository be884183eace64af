"""COCO captioning on the Karpathy test split (5,000 images), scored with pycocoevalcap.

Karpathy's ``dataset_coco.json`` (``{"images": [{"filepath": "val2014", "filename",
"cocoid", "split": "test", "sentences": [{"raw", "tokens"}, ...]}]}``) lists the split and the
five reference captions; images are ``{filepath}/{filename}`` under the folder. The question id is
the ``cocoid``. The prompt is ``[caption] Briefly describe this image.`` (the first caption
instruction of :mod:`tinygptv.data.instructions`, what the stage-4 data uses without a random
draw), greedy, 30 new tokens at most (a COCO caption averages about 11 words; 20 tokens, the VQA
limit, would cut some). Metrics (x100, as reported in papers): CIDEr, BLEU-4, METEOR, ROUGE-L;
each item's score in ``predictions.jsonl`` is its CIDEr (the corpus's IDF makes it final only once
every caption is in). ``accuracy`` is null: captions have none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..data.instructions import INSTRUCTIONS
from ..data.readers.pairs import read_json
from .metrics import caption_metrics
from .runner import Benchmark, Item, Protocol, find_file


class COCOCaption(Benchmark):
    name = "coco-caption"
    title = "COCO Karpathy test"
    splits = ("test", "val")
    default_split = "test"
    primary = "CIDEr"

    def load(self, data: Path, split: str | None, images: Path | None = None) -> list[Item]:
        dataset = read_json(find_file(data, ["dataset_coco.json"], "Karpathy's dataset_coco.json"))
        items = []
        for image in dataset["images"]:
            if image.get("split") != split:
                continue
            folder = images if images is not None else data / image.get("filepath", "")
            items.append(
                Item(
                    question_id=image["cocoid"],
                    image=folder / image["filename"],
                    text=self.protocol.prompt,
                    target=[s["raw"].strip() for s in image["sentences"]],
                    task="caption",
                )
            )
        return items

    def evaluate(self, items: Sequence[Item], predictions: Sequence[dict[str, Any]]) -> tuple[list[dict], dict]:
        references = {item.key: item.target for item in items}
        answers = {item.key: p["answer"] for item, p in zip(items, predictions)}
        metrics, per_item, notes = caption_metrics(references, answers)
        records = [{"score": per_item[item.key]} for item in items]
        return records, {
            "accuracy": None,
            **{k: None if v is None else round(v, 2) for k, v in metrics.items()},
            **notes,
        }


def coco_caption() -> COCOCaption:
    return COCOCaption(Protocol(prompt=INSTRUCTIONS["caption"][0], task="caption", max_new_tokens=30))


__all__ = ["COCOCaption", "coco_caption"]
