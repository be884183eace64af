"""Evaluation: the paper's benchmarks in their official formats, with their official metrics.

One benchmark = one small entry (loader + pinned prompt + metric), grouped by family:

==================  ====================================  ==============================================
module              benchmarks                            metric
==================  ====================================  ==============================================
:mod:`.vqa`         ``vqav2``, ``okvqa``, ``vizwiz``      official VQA accuracy (10 human answers)
:mod:`.short_answer` ``gqa``, ``vsr``                     exact match (+ the original's lenient substring)
:mod:`.choice`      ``iconqa``, ``hm``                    choice accuracy; accuracy + AUROC
:mod:`.refer`       ``refcoco``, ``refcoco+``, ``refcocog``  box accuracy at IoU > 0.5
:mod:`.caption`     ``coco-caption``                      CIDEr, BLEU-4, METEOR, ROUGE-L (pycocoevalcap)
:mod:`.shapes`      ``shapes``                            per task and split on the synthetic world
==================  ====================================  ==============================================

:mod:`.runner` holds the shared run loop (batched, resumable, progress bar) and the output files;
:mod:`.metrics` the metrics; :mod:`.report` the comparison with the paper's Table 2. Nothing is
imported or read until a benchmark is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runner import Benchmark

BENCHMARKS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gqa": ("short_answer", "gqa", {}),
    "vsr": ("short_answer", "vsr", {}),
    "iconqa": ("choice", "iconqa", {}),
    "vizwiz": ("vqa", "vizwiz", {}),
    "hm": ("choice", "hateful_memes", {}),
    "okvqa": ("vqa", "okvqa", {}),
    "vqav2": ("vqa", "vqav2", {}),
    "refcoco": ("refer", "refcoco", {"name": "refcoco"}),
    "refcoco+": ("refer", "refcoco", {"name": "refcoco+"}),
    "refcocog": ("refer", "refcoco", {"name": "refcocog"}),
    "coco-caption": ("caption", "coco_caption", {}),
    "shapes": ("shapes", "shapes", {}),
}
"""Benchmark name -> (module of this package, factory function, fixed arguments)."""


def get_benchmark(name: str, **settings: Any) -> "Benchmark":
    """The benchmark called ``name`` with its pinned protocol; ``settings`` are the factory's options
    (``iou_threshold`` for RefCOCO and shapes, ``image_size`` and ``tasks`` for shapes)."""
    try:
        module, factory, fixed = BENCHMARKS[name]
    except KeyError:
        raise KeyError(f"unknown benchmark {name!r}; benchmarks: {', '.join(BENCHMARKS)}") from None
    build = getattr(importlib.import_module(f"{__name__}.{module}"), factory)
    return build(**fixed, **settings)


__all__ = ["BENCHMARKS", "get_benchmark"]
