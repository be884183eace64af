"""Closed-answer benchmarks: IconQA multi-text-choice and Hateful Memes.

IconQA (``choose_txt``, val): as the authors evaluated it (``eval_vqa.py`` with the model's
``multi_select``), the model does not write an answer but ranks the options: each option, followed
by the template's end symbol, is scored by the mean cross-entropy of its tokens after the prompt,
and the lowest wins. The chosen option's text is the prediction, so a predictions file of any
system (free text) is scored by the option its answer names (:func:`~tinygptv.eval.metrics.match_choice`).
The original's bug (options split on ``|`` but joined with ``_``, compared as an index against the
answer) is not repeated: options stay a list, and the answer index is compared with the chosen index.

Hateful Memes (dev): the authors' prompt, ``This is an image writting '{text}'. Is this image
hateful? Answer yes or no. Answer:`` (sic), which in their code carries no task identifier, kept
so. The answer's first yes/no word is the prediction (:func:`~tinygptv.eval.metrics.yes_no`);
``accuracy`` counts a neither-answer as wrong. ``auroc`` ranks the memes by the model's
probability of "yes" against "no" as the first answer token (``p_yes``, written per item); for a
predictions file without ``p_yes`` it ranks by the yes/no answer itself (neither = 0.5).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..data.readers.pairs import read_json
from .metrics import auroc, match_choice, yes_no
from .runner import Item, PerItemBenchmark, Protocol, find_file, image_path, percent
from .vqa import SHORT_ANSWER

if TYPE_CHECKING:
    from ..model.tinygptv import TinyGPTV

HM_PROMPT = "This is an image writting '{text}'. Is this image hateful? Answer yes or no. Answer:"


def _pixels(model: "TinyGPTV", items: Sequence[Item]):
    from ..chat import load_image
    from ..data.image_processing import image_processor_for

    processor = image_processor_for(model.config.vision.image_size)
    return [processor(load_image(item.image)).to(model.lm_proj.weight.dtype) for item in items]


class IconQA(PerItemBenchmark):
    """IconQA as released (``iconqa_data/``): ``problems.json`` = ``{pid: {"question", "choices",
    "answer": index, "ques_type", ...}}`` and ``pid_splits.json`` = ``{"choose_txt_val": [pid, ...],
    ...}``, images ``iconqa/{split}/choose_txt/{pid}/image.png``. Without ``problems.json``, each
    question folder's ``data.json`` is read instead."""

    name = "iconqa"
    title = "IconQA choose-txt val"
    splits = ("val", "test", "train")
    default_split = "val"

    def load(self, data: Path, split: str | None, images: Path | None = None) -> list[Item]:
        root = images or data / "iconqa" / split / "choose_txt"
        if (data / "problems.json").is_file():
            problems = read_json(data / "problems.json")
            splits = read_json(find_file(data, ["pid_splits.json"], "IconQA pid_splits.json"))
            key = f"choose_txt_{split}"
            if key not in splits:
                raise ValueError(f"IconQA pid_splits.json has no {key!r}")
            records = [(str(pid), problems[str(pid)]) for pid in splits[key]]
        else:
            folders = sorted(p for p in root.glob("*") if (p / "data.json").is_file()) if root.is_dir() else []
            if not folders:
                raise FileNotFoundError(
                    f"IconQA not found under {data}: expected problems.json and pid_splits.json "
                    f"(or iconqa/{split}/choose_txt/<pid>/data.json)"
                )
            records = [(p.name, json.loads((p / "data.json").read_text())) for p in folders]
        items = []
        for pid, problem in records:
            choices = [str(c) for c in problem["choices"]]
            answer = problem["answer"]
            index = answer if isinstance(answer, int) else choices.index(str(answer))
            items.append(
                Item(
                    question_id=pid,
                    image=image_path([root], f"{pid}/image.png"),
                    text=self.protocol.prompt.format(question=problem["question"].strip()),
                    target=index,
                    meta={"choices": choices},
                )
            )
        return items

    def predict(self, model: "TinyGPTV", items: Sequence[Item], protocol: Protocol) -> list[dict[str, Any]]:
        """Rank each item's options by the mean loss of their tokens; the image is encoded once."""
        import torch

        from ..data.templates import get_template
        from ..model.tinygptv import causal_lm_loss

        template = get_template(protocol.template)
        pixels = _pixels(model, items)
        prompts, answers, row_pixels, owners = [], [], [], []
        for k, item in enumerate(items):
            prompt = template.prompt(item.text, 1, item.task)
            for choice in item.meta["choices"]:
                prompts.append(prompt)
                answers.append(choice + template.end_symbol)
                row_pixels.append(pixels[k])
                owners.append(k)
        batch = model.prepare(prompts, row_pixels, answers, padding_side="right")
        device = model.device
        image_embeds = model.encode_images(torch.stack(pixels).to(device))  # (B, Q, C)
        counts = torch.tensor([len(item.meta["choices"]) for item in items], device=device)
        embeds = model.embed(batch["input_ids"].to(device), image_embeds.repeat_interleave(counts, dim=0))
        logits = model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
        _, per_row = causal_lm_loss(logits, batch["labels"].to(device))
        results = []
        for k, item in enumerate(items):
            losses = [float(per_row[r]) for r, owner in enumerate(owners) if owner == k]
            best = min(range(len(losses)), key=losses.__getitem__)
            results.append({"answer": item.meta["choices"][best], "losses": [round(v, 4) for v in losses]})
        return results

    def score(self, item: Item, prediction: dict[str, Any]) -> dict[str, Any]:
        chosen = match_choice(prediction["answer"], item.meta["choices"])
        return {"score": float(chosen == item.target), "choice": chosen}


class HatefulMemes(PerItemBenchmark):
    """Hateful Memes (``data/`` of the release): ``{split}.jsonl`` with lines ``{"id", "img":
    "img/01235.png", "label": 0|1, "text"}``; images at the ``img`` path under the folder."""

    name = "hm"
    title = "Hateful Memes dev"
    splits = ("dev", "dev_seen", "dev_unseen", "test_seen", "test_unseen")
    default_split = "dev"
    primary = "accuracy"

    def load(self, data: Path, split: str | None, images: Path | None = None) -> list[Item]:
        file = find_file(data, [f"{split}.jsonl"], f"Hateful Memes {split}.jsonl")
        items = []
        for line in file.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            if "label" not in record:
                raise ValueError(f"{file} has no labels (a test file without answers?)")
            image = (images / Path(record["img"]).name) if images is not None else data / record["img"]
            items.append(
                Item(
                    question_id=record["id"],
                    image=image,
                    text=self.protocol.prompt.format(text=str(record["text"]).strip()),
                    target=int(record["label"]),
                    task=self.protocol.task,
                )
            )
        return items

    def predict(self, model: "TinyGPTV", items: Sequence[Item], protocol: Protocol) -> list[dict[str, Any]]:
        """The greedy answer, and p(yes) = P("yes") / (P("yes") + P("no")) for the first answer token."""
        import torch

        from ..data.templates import get_template

        answers = super().predict(model, items, protocol)
        template = get_template(protocol.template)
        prompts = [template.prompt(item.text, 1, item.task) for item in items]
        batch = model.prepare(prompts, _pixels(model, items), padding_side="right")
        device = model.device
        logits = model(
            batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["pixel_values"].to(device)
        ).logits.float()  # (B, T, V)
        last = batch["attention_mask"].sum(dim=1) - 1
        next_logits = logits[torch.arange(len(items)), last.to(device)]  # (B, V)
        yes = torch.logsumexp(next_logits[:, _first_token_ids(model.tokenizer, ("yes", "Yes"))], dim=-1)
        no = torch.logsumexp(next_logits[:, _first_token_ids(model.tokenizer, ("no", "No"))], dim=-1)
        p_yes = torch.sigmoid(yes - no)
        for answer, p in zip(answers, p_yes.tolist()):
            answer["p_yes"] = round(p, 6)
        return answers

    def score(self, item: Item, prediction: dict[str, Any]) -> dict[str, Any]:
        predicted = yes_no(prediction["answer"])
        return {"score": float(predicted == item.target), "prediction": predicted}

    def metrics(self, items, records) -> dict[str, Any]:
        metrics = super().metrics(items, records)
        labels = [item.target for item in items]
        if all(isinstance(r.get("p_yes"), (int, float)) for r in records):
            scores = [r["p_yes"] for r in records]
            metrics["auroc_score"] = "p_yes"
        else:
            scores = [0.5 if r["prediction"] is None else float(r["prediction"]) for r in records]
            metrics["auroc_score"] = "yes/no answer"
        value = auroc(labels, scores)
        metrics["auroc"] = None if value is None else round(100 * value, 2)
        metrics["unparsed"] = percent(float(r["prediction"] is None) for r in records)
        return metrics

    def evaluate(self, items, predictions):
        records = [self.score(item, prediction) for item, prediction in zip(items, predictions)]
        for record, prediction in zip(records, predictions):
            if "p_yes" in prediction:
                record["p_yes"] = prediction["p_yes"]
        return records, self.metrics(items, records)


def _first_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    ids = {tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in words}
    return sorted(ids)


def iconqa() -> IconQA:
    return IconQA(
        Protocol(
            prompt=SHORT_ANSWER,
            settings={"selection": "the option with the lowest mean token loss (the authors' multi_select)"},
        )
    )


def hateful_memes() -> HatefulMemes:
    return HatefulMemes(
        Protocol(
            prompt=HM_PROMPT,
            task=None,
            settings={"answer": "first yes/no word", "auroc": "p(yes) vs p(no) of the first answer token"},
        )
    )


__all__ = ["HatefulMemes", "IconQA", "hateful_memes", "iconqa"]
