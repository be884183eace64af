"""What every benchmark shares: the item and protocol records, the benchmark interface, and the run
loop (batched, resumable, with a progress bar) that writes ``predictions.jsonl`` and ``result.json``.

A benchmark (one small class per benchmark, in this package's modules) says three things: how to
read its official files into :class:`Item` records (``load``), how the model answers a batch of
them (``predict``; the default is greedy generation with the pinned :class:`Protocol`), and how an
answer is scored (``score`` per item, ``metrics`` over the set).

Output folder of a run:

* ``predictions.jsonl``: one line per item, ``{"question_id", "answer", "score", ...}``. Lines are
  appended as answers come, so an interrupted run resumes where it stopped; when the run ends the
  file is rewritten in the benchmark's order with every item's score.
* ``result.json``: ``{"benchmark", "split", "n", "metrics": {"accuracy": percent, ...}, "primary",
  "protocol", "model", ...}``.
* ``run.json``: the benchmark, split, model and protocol the predictions were made with; a re-run
  into the same folder with anything different is refused rather than mixing two runs' answers.
"""

from __future__ import annotations

import abc
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:
    from ..model.tinygptv import TinyGPTV

PREDICTIONS_FILE = "predictions.jsonl"
RESULT_FILE = "result.json"
RUN_FILE = "run.json"


@dataclass
class Protocol:
    """How a benchmark is run, pinned per benchmark and recorded in ``result.json``."""

    prompt: str
    """The instruction, with ``{...}`` fields filled from each item (e.g. ``{question}``)."""
    task: str | None = "vqa"
    """MiniGPT-v2 task identifier written by the stage-4 template (``[vqa]``, ``[refer]``, ...)."""
    template: str = "stage4"
    """Prompt template (:mod:`tinygptv.data.templates`)."""
    max_new_tokens: int = 20
    """At most this many generated tokens (the authors' evaluation: 20)."""
    decoding: str = "greedy"
    """Greedy decoding (no sampling, one beam), as the authors evaluated."""
    image_size: int | None = None
    """Side of the square image the model sees (its stage's resolution); set from the model."""
    settings: dict[str, Any] = field(default_factory=dict)
    """What else decides the score (IoU threshold, how choices are selected, ...)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Item:
    """One question of a benchmark."""

    question_id: Any
    """The id as the benchmark's files give it (int or str); predictions files use the same."""
    image: Path | None
    """The image file (None for text-only)."""
    text: str
    """The instruction: the protocol's prompt filled for this item (template and tag come later)."""
    target: Any = None
    """What the metric compares against (human answers, label, box, ...)."""
    task: str | None = "vqa"
    """Task identifier for the template."""
    group: str = ""
    """A split or task name when a benchmark reports several (metrics are given per group too)."""
    max_new_tokens: int | None = None
    """Overrides the protocol's ``max_new_tokens`` for this item (shapes' long answers)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Anything else the benchmark keeps (answer type, image size, choices, ...)."""

    @property
    def key(self) -> str:
        """The id as a string, how predictions are matched (JSON keys and ids may differ in type)."""
        return str(self.question_id)


class Benchmark(abc.ABC):
    """A benchmark: its official files, its pinned protocol, its metric."""

    name: str = ""
    """Name on the command line."""
    title: str = ""
    """Human-readable name and split (for tables)."""
    splits: tuple[str, ...] = ()
    """Splits ``--split`` accepts."""
    default_split: str | None = None
    """The split the paper reports (None: all of ``splits``)."""
    primary: str = "accuracy"
    """The headline metric's key in ``metrics``."""

    def __init__(self, protocol: Protocol):
        self.protocol = protocol

    # --- reading --------------------------------------------------------------------------------
    @abc.abstractmethod
    def load(self, data: Path, split: str | None, images: Path | None = None) -> list[Item]:
        """The items of ``split`` (None: the default) read from ``data``, the folder in the official
        layout; ``images`` overrides where the images are."""

    def resolve_split(self, split: str | None) -> str | None:
        split = split if split is not None else self.default_split
        if split is not None and self.splits and split not in self.splits:
            raise ValueError(f"{self.name} has no split {split!r}; splits: {', '.join(self.splits)}")
        return split

    @staticmethod
    def select(items: list[Item], limit: int | None) -> list[Item]:
        """The first ``limit`` items of each group (of all items when there are no groups)."""
        if limit is None:
            return items
        if limit < 1:
            raise ValueError(f"--limit must be at least 1, got {limit}")
        taken: dict[str, int] = {}
        chosen = []
        for item in items:
            if taken.get(item.group, 0) < limit:
                taken[item.group] = taken.get(item.group, 0) + 1
                chosen.append(item)
        return chosen

    # --- answering ------------------------------------------------------------------------------
    def predict(self, model: "TinyGPTV", items: Sequence[Item], protocol: Protocol) -> list[dict[str, Any]]:
        """Answers to a batch of items of one task: greedy generation with the protocol's template."""
        from ..chat import load_image

        images = [load_image(item.image) if item.image is not None else None for item in items]
        answers = model.generate(
            images,
            [item.text for item in items],
            template=protocol.template,
            task=items[0].task,
            max_new_tokens=fit_new_tokens(model, items, protocol),
            temperature=0.0,
            num_beams=1,
        )
        return [{"answer": answer} for answer in answers]

    # --- scoring --------------------------------------------------------------------------------
    @abc.abstractmethod
    def evaluate(self, items: Sequence[Item], predictions: Sequence[dict[str, Any]]) -> tuple[list[dict], dict]:
        """Per-item score records (``{"score", ...}``, extras go to predictions.jsonl) and the
        metrics of the set (``accuracy`` in percent, and the benchmark's own)."""


class PerItemBenchmark(Benchmark):
    """A benchmark whose answers are scored one by one (all but captioning, whose CIDEr needs the
    whole set)."""

    @abc.abstractmethod
    def score(self, item: Item, prediction: dict[str, Any]) -> dict[str, Any]:
        """``{"score": 0..1, ...}`` of one prediction (more keys are written to predictions.jsonl)."""

    def evaluate(self, items: Sequence[Item], predictions: Sequence[dict[str, Any]]) -> tuple[list[dict], dict]:
        records = [self.score(item, prediction) for item, prediction in zip(items, predictions)]
        return records, self.metrics(items, records)

    def metrics(self, items: Sequence[Item], records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """``accuracy`` (percent of the mean score) over all items and, with several groups, per group."""
        metrics: dict[str, Any] = {"accuracy": percent(r["score"] for r in records)}
        groups = _ordered_groups(items)
        if len(groups) > 1:
            for group in groups:
                metrics[f"accuracy_{group}"] = percent(r["score"] for i, r in zip(items, records) if i.group == group)
        return metrics


def fit_new_tokens(model: "TinyGPTV", items: Sequence[Item], protocol: Protocol) -> int:
    """The batch's answer length (the item's or the protocol's), cut to what the model's context has
    room for after the longest prompt, with a warning when cut."""
    from ..data.encoding import encode_prompt
    from ..data.templates import get_template

    wanted = items[0].max_new_tokens or protocol.max_new_tokens
    template = get_template(protocol.template)
    longest = max(
        len(
            encode_prompt(
                model.tokenizer, template.prompt(i.text, int(i.image is not None), i.task), None, model.num_image_tokens
            )
        )
        for i in items
    )
    room = model.config.language.max_position_embeddings - longest
    if room < 1:
        raise ValueError(f"a prompt of {longest} tokens fills the model's context ({room + longest} tokens)")
    if room < wanted:
        warnings.warn(
            f"answers cut to {room} new tokens (the context is {room + longest}; prompt {longest})", stacklevel=3
        )
    return min(wanted, room)


def percent(values: Iterable[float | None]) -> float | None:
    """Mean of ``values`` x 100, rounded to 2 decimals (None for no values)."""
    values = [v for v in values if v is not None]
    return round(100 * sum(values) / len(values), 2) if values else None


def _ordered_groups(items: Sequence[Item]) -> list[str]:
    return list(dict.fromkeys(item.group for item in items))


# --- running --------------------------------------------------------------------------------------


def predict_items(
    benchmark: Benchmark,
    model: "TinyGPTV",
    items: Sequence[Item],
    protocol: Protocol,
    batch_size: int = 8,
    progress: bool = True,
    done: int = 0,
    on_batch=None,
) -> list[dict[str, Any]]:
    """Answer ``items`` in batches (consecutive items of the same task and answer length) with a
    progress bar; ``on_batch(items, predictions)`` is called after each batch."""
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    results: list[dict[str, Any]] = []
    bar = tqdm(total=done + len(items), initial=done, desc=benchmark.name, unit="q", disable=not progress)
    try:
        for batch in _batches(items, batch_size):
            with torch.inference_mode():
                predictions = benchmark.predict(model, batch, protocol)
            results.extend(predictions)
            if on_batch is not None:
                on_batch(batch, predictions)
            bar.update(len(batch))
    finally:
        bar.close()
    return results


def _batches(items: Sequence[Item], size: int):
    batch: list[Item] = []
    for item in items:
        if batch and (
            len(batch) == size or (item.task, item.max_new_tokens) != (batch[0].task, batch[0].max_new_tokens)
        ):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def run_protocol(benchmark: Benchmark, model: "TinyGPTV | None", template: str | None = None) -> Protocol:
    """The benchmark's protocol with the run's template and the model's image size filled in."""
    protocol = benchmark.protocol
    if template is not None:
        protocol = replace(protocol, template=template)
    if model is not None:
        protocol = replace(protocol, image_size=model.config.vision.image_size)
    return protocol


def run_benchmark(
    benchmark: Benchmark,
    data: str | Path,
    model: "TinyGPTV",
    out: str | Path,
    model_name: str,
    split: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    images: str | Path | None = None,
    template: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``model`` on a benchmark, resuming from ``out`` when it holds part of the same run; returns
    the result (also written to ``out/result.json``)."""
    start = time.perf_counter()
    split = benchmark.resolve_split(split)
    items = benchmark.select(benchmark.load(Path(data), split, _path(images)), limit)
    if not items:
        raise ValueError(f"{benchmark.name}: no items found under {data}")
    protocol = run_protocol(benchmark, model, template)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    predictions_path = out / PREDICTIONS_FILE
    run_info = {"benchmark": benchmark.name, "split": split, "model": model_name, "protocol": protocol.to_dict()}
    if overwrite:
        predictions_path.unlink(missing_ok=True)
    _check_same_run(out / RUN_FILE, run_info, predictions_path)
    _write_json(out / RUN_FILE, run_info)
    existing = read_predictions(predictions_path) if predictions_path.exists() else {}
    todo = [item for item in items if item.key not in existing]

    with predictions_path.open("a") as sink:

        def append(batch: Sequence[Item], predictions: Sequence[dict[str, Any]]) -> None:
            for item, prediction in zip(batch, predictions):
                line = {"question_id": item.question_id, **prediction}
                sink.write(json.dumps(line) + "\n")
                existing[item.key] = line
            sink.flush()

        predict_items(benchmark, model, todo, protocol, batch_size, progress, len(items) - len(todo), append)
    result = _finish(benchmark, items, existing, out, split, protocol, model_name, data, limit)
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["resumed"] = len(items) - len(todo)
    _write_json(out / RESULT_FILE, result)
    return result


def score_predictions_file(
    benchmark: Benchmark,
    data: str | Path,
    predictions_file: str | Path,
    out: str | Path,
    split: str | None = None,
    limit: int | None = None,
    images: str | Path | None = None,
) -> dict[str, Any]:
    """Score an existing predictions file (JSON list or JSONL of ``{"question_id", "answer"}``) with
    this benchmark's metric; no model runs. Items without a prediction count as wrong."""
    split = benchmark.resolve_split(split)
    items = benchmark.select(benchmark.load(Path(data), split, _path(images)), limit)
    if not items:
        raise ValueError(f"{benchmark.name}: no items found under {data}")
    predictions = read_predictions(Path(predictions_file))
    known = {item.key for item in items}
    unknown = [k for k in predictions if k not in known]
    if unknown and len(unknown) == len(predictions):
        raise ValueError(
            f"none of the {len(predictions)} question ids of {predictions_file} is in {benchmark.name} "
            f"({split or 'all splits'}); e.g. {unknown[0]!r} vs {items[0].key!r}"
        )
    if unknown:
        warnings.warn(f"{len(unknown)} predictions have ids that are not in the benchmark; ignored", stacklevel=2)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    protocol = replace(benchmark.protocol, settings={**benchmark.protocol.settings, "source": "predictions file"})
    model_name = f"predictions:{Path(predictions_file).name}"
    result = _finish(benchmark, items, predictions, out, split, protocol, model_name, data, limit, keep_extra=False)
    _write_json(out / RESULT_FILE, result)
    return result


def _finish(benchmark, items, predictions, out, split, protocol, model_name, data, limit, keep_extra=True):
    """Score every item, rewrite predictions.jsonl in order with scores, build the result."""
    from .. import __version__

    missing = [item for item in items if item.key not in predictions]
    if missing:
        warnings.warn(f"{len(missing)} of {len(items)} items have no prediction; they count as wrong", stacklevel=3)
    preds = [predictions.get(item.key) or {"answer": "", "missing": True} for item in items]
    for p in preds:
        if not isinstance(p.get("answer"), str):
            p["answer"] = "" if p.get("answer") is None else str(p["answer"])
    records, metrics = benchmark.evaluate(items, preds)
    lines = []
    for item, prediction, record in zip(items, preds, records):
        line = {"question_id": item.question_id, **{k: v for k, v in prediction.items() if k != "question_id"}}
        line.update(record)
        if item.group:
            line["group"] = item.group
        lines.append(line)
    if keep_extra:  # answers from an earlier run with a larger --limit stay in the file
        keys = {item.key for item in items}
        lines.extend(p for k, p in predictions.items() if k not in keys)
    _write_lines(out / PREDICTIONS_FILE, lines)
    return {
        "benchmark": benchmark.name,
        "title": benchmark.title,
        "split": split,
        "n": len(items),
        "missing": len(missing),
        "primary": benchmark.primary,
        "metrics": metrics,
        "protocol": protocol.to_dict(),
        "model": model_name,
        "data": str(data),
        "limit": limit,
        "predictions": PREDICTIONS_FILE,
        "tinygptv_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def read_predictions(path: Path) -> dict[str, dict[str, Any]]:
    """``{question_id as str: record}`` from a JSON list or JSONL file of ``{"question_id", "answer"}``.

    ``image`` stands in for ``question_id`` (VizWiz's official result format); a truncated last
    line (an interrupted run) is skipped with a warning.
    """
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    text = path.read_text()
    stripped = text.lstrip()
    if stripped.startswith("["):
        records = json.loads(stripped)
    else:
        records = []
        lines = text.splitlines()
        for k, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if k == len(lines) - 1:
                    warnings.warn(f"{path}: skipped a truncated last line", stacklevel=2)
                    continue
                raise ValueError(f"{path}, line {k + 1}: not JSON: {line[:80]!r}") from None
    out: dict[str, dict[str, Any]] = {}
    for k, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {k + 1} is not an object")
        qid = record.get("question_id", record.get("image"))
        if qid is None or "answer" not in record:
            raise ValueError(f"{path}: record {k + 1} needs 'question_id' and 'answer', got {sorted(record)}")
        out[str(qid)] = record
    return out


def _check_same_run(run_file: Path, run_info: dict, predictions_path: Path) -> None:
    if not predictions_path.exists() or not run_file.exists():
        return
    previous = json.loads(run_file.read_text())
    run_info = json.loads(json.dumps(run_info))  # tuples -> lists, as the file holds them
    for key in ("benchmark", "split", "model", "protocol"):
        if previous.get(key) != run_info[key]:
            raise ValueError(
                f"{predictions_path.parent} holds predictions of a different run ({key}: "
                f"{previous.get(key)!r} vs {run_info[key]!r}); use another --out or --overwrite"
            )


def _path(value) -> Path | None:
    return None if value is None else Path(value)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _write_lines(path: Path, lines: Sequence[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    os.replace(tmp, path)


def find_file(root: Path, candidates: Sequence[str], what: str) -> Path:
    """The first of ``candidates`` (paths relative to ``root``) that exists; else a clear error
    naming the expected place."""
    for candidate in candidates:
        path = root / candidate
        if path.exists():
            return path
    raise FileNotFoundError(
        f"{what} not found under {root}: expected {candidates[0]}"
        + (f" (or {', '.join(candidates[1:])})" if len(candidates) > 1 else "")
    )


def find_dir(root: Path, candidates: Sequence[str], override: Path | None = None) -> list[Path]:
    """Folders to look for images in: ``override`` alone when given, else those of ``candidates``
    (relative to ``root``) that exist, else ``root`` itself."""
    if override is not None:
        return [override]
    found = [root / c for c in candidates if (root / c).is_dir()]
    return found or [root]


def image_path(folders: Sequence[Path], name: str) -> Path:
    """``name`` in the first folder that has it (the first folder when none has: the error comes at
    load time, naming the expected file)."""
    for folder in folders:
        path = folder / name
        if path.exists():
            return path
    return folders[0] / name


__all__ = [
    "Benchmark",
    "Item",
    "PerItemBenchmark",
    "Protocol",
    "find_dir",
    "find_file",
    "image_path",
    "percent",
    "predict_items",
    "read_predictions",
    "run_benchmark",
    "run_protocol",
    "score_predictions_file",
]
