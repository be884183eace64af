"""A tiny training run for the trainer's tests: the tinygptv-tiny model, 28 px images, random captions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tinygptv.train_config import TrainConfig, load_train_config

BASE: dict[str, Any] = {
    "stage": 2,
    "model": "tinygptv-tiny",
    "image_size": 28,
    "epochs": 2,
    "iters_per_epoch": 5,
    "batch_size": 4,
    "micro_batch_size": 2,
    "precision": "fp32",
    "checkpoint_every": 3,
    "progress": False,
    "schedule": {"kind": "warmup_cosine", "peak_lr": 1e-3, "start_lr": 1e-5, "min_lr": 1e-4, "warmup_steps": 3},
    "data": {"kind": "synthetic", "num_samples": 16},
}


def write_config(path: Path, out_dir: Path, changes: dict[str, Any] | None = None) -> Path:
    """Write the tiny run's YAML to ``path``, with dotted ``changes`` (e.g. ``{"schedule.peak_lr": 1.0}``)."""
    settings = json.loads(json.dumps(BASE))
    settings["out_dir"] = str(out_dir)
    for dotted, value in (changes or {}).items():
        node = settings
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(settings))
    return path


def tiny_config(out_dir: Path, changes: dict[str, Any] | None = None) -> TrainConfig:
    return load_train_config(write_config(Path(out_dir).parent / f"{Path(out_dir).name}.yaml", out_dir, changes))


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """step -> value of ``key`` from a run's metrics.jsonl (each step must appear once)."""
    out: dict[int, float] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            assert record["step"] not in out, f"step {record['step']} logged twice"
            out[record["step"]] = record[key]
    return out
