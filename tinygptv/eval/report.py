"""Results side by side with the paper: a markdown table of ``result.json`` files against Table 2.

Table 2 of the paper (TinyGPT-V with Phi-2, zero-shot, ORIGINAL-NOTES "Evaluation as the authors
ran it"): GQA 38.9, VSR 54.7, IconQA 44.7, VizWiz 37.8, HM 54.0, average 46.02. The paper's GQA
and VSR numbers come from the original's substring rule, so they stand beside our lenient score;
exact match is shown above it without a paper number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

PAPER_TABLE2: dict[str, float] = {"gqa": 38.9, "vsr": 54.7, "iconqa": 44.7, "vizwiz": 37.8, "hm": 54.0}
"""TinyGPT-V (Phi-2) in the paper's Table 2, percent."""
PAPER_AVERAGE = 46.02
"""The paper's average of the five."""

# benchmark -> rows (metric key, label, the paper's number for that row)
ROWS: dict[str, list[tuple[str, str, float | None]]] = {
    "gqa": [
        ("accuracy", "exact match", None),
        ("accuracy_lenient", "substring (the paper's rule)", PAPER_TABLE2["gqa"]),
    ],
    "vsr": [
        ("accuracy", "exact match", None),
        ("accuracy_lenient", "substring (the paper's rule)", PAPER_TABLE2["vsr"]),
    ],
    "iconqa": [("accuracy", "choice accuracy", PAPER_TABLE2["iconqa"])],
    "vizwiz": [("accuracy", "VQA accuracy", PAPER_TABLE2["vizwiz"])],
    "hm": [("accuracy", "accuracy", PAPER_TABLE2["hm"]), ("auroc", "AUROC", None)],
}
TABLE2_ORDER = ("gqa", "vsr", "iconqa", "vizwiz", "hm")
NOTES = [
    "Paper: TinyGPT-V (Phi-2), Table 2, zero-shot. Its GQA and VSR numbers count the label as a "
    "substring of the answer (the original eval_vqa.py); its VizWiz number used a substring rule "
    "too (with credit for empty answers), ours is the official VQA accuracy.",
    "Ours: `tinygptv eval` with the pinned protocol recorded in each result.json.",
]


def load_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """``result.json`` files, or folders holding one."""
    results = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            path = path / "result.json"
        if not path.is_file():
            raise FileNotFoundError(f"no result file: {path}")
        result = json.loads(path.read_text())
        for key in ("benchmark", "metrics", "model"):
            if key not in result:
                raise ValueError(f"{path} is not a tinygptv eval result (no {key!r})")
        results.append(result)
    return results


def report_table(results: Sequence[dict[str, Any]]) -> str:
    """The markdown table: Table 2's benchmarks first (always listed), then every other benchmark
    in the results; one column for the paper and one per model."""
    models = list(dict.fromkeys(_model_label(r) for r in results))
    by_key = {(r["benchmark"], _model_label(r)): r for r in results}  # a later result replaces an earlier one
    benchmarks = list(TABLE2_ORDER) + [
        b for b in dict.fromkeys(r["benchmark"] for r in results) if b not in TABLE2_ORDER
    ]
    lines = [
        "| benchmark | metric | paper | " + " | ".join(models) + " |",
        "|---|---|---|" + "---|" * len(models),
    ]
    for benchmark in benchmarks:
        present = [by_key.get((benchmark, m)) for m in models]
        title = next((r.get("title") or r["benchmark"] for r in present if r), _TITLES.get(benchmark, benchmark))
        for key, label, paper in _rows(benchmark, present):
            cells = [_cell(r["metrics"].get(key) if r else None) for r in present]
            lines.append(f"| {title} | {label} | {_cell(paper)} | " + " | ".join(cells) + " |")
    averages = []
    for model in models:
        values = [_paper_comparable(by_key.get((b, model))) for b in TABLE2_ORDER]
        averages.append(_cell(sum(values) / len(values)) if all(v is not None for v in values) else "-")
    lines.append(f"| average of the five | paper's rules | {_cell(PAPER_AVERAGE)} | " + " | ".join(averages) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(f"* {note}" for note in NOTES)


_TITLES = {
    "gqa": "GQA testdev balanced",
    "vsr": "VSR zero-shot test",
    "iconqa": "IconQA choose-txt val",
    "vizwiz": "VizWiz val",
    "hm": "Hateful Memes dev",
}


def _rows(benchmark: str, present: Sequence[dict | None]) -> list[tuple[str, str, float | None]]:
    if benchmark in ROWS:
        return ROWS[benchmark]
    keys: dict[str, None] = {}
    for result in present:
        if result:
            for key, value in result["metrics"].items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    keys[key] = None
    return [(key, key, None) for key in keys]


def _paper_comparable(result: dict | None) -> float | None:
    if result is None:
        return None
    key = next(k for k, _, paper in ROWS[result["benchmark"]] if paper is not None)
    return result["metrics"].get(key)


def _model_label(result: dict[str, Any]) -> str:
    model = str(result.get("model") or "?")
    return Path(model).name if Path(model).exists() else model


def _cell(value) -> str:
    return "-" if value is None else f"{value:.1f}"


__all__ = ["NOTES", "PAPER_AVERAGE", "PAPER_TABLE2", "ROWS", "load_results", "report_table"]
