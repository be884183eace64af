"""What a training run reports: a metrics JSONL, TensorBoard, optional W&B, and a loss-curve PNG.

``metrics.jsonl`` is the record of truth (one JSON object per line, every step, plus validation
and resume events); TensorBoard and W&B get the same numbers. Only the first process writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLog:
    """Append-only metrics of one run directory, consistent with a resume at ``resume_step``."""

    def __init__(
        self,
        out_dir: Path,
        enabled: bool,
        resume_step: int | None = None,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        config: dict[str, Any] | None = None,
    ):
        self.enabled = enabled
        self.path = out_dir / METRICS_FILE
        self._tb = self._wandb = None
        if not enabled:
            return
        if resume_step is None:
            self.path.write_text("")
        else:  # drop what the killed run logged after its last checkpoint: it is about to be redone
            kept = [r for r in read_metrics(out_dir) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            self._tb = _tensorboard_writer(out_dir / "tensorboard", resume_step)
        if wandb_project:
            import wandb  # optional; an ImportError here says what to install

            self._wandb = wandb.init(project=wandb_project, dir=str(out_dir), config=config, resume="allow")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "stage")}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(f"train/{key}" if not key.startswith("val") else key, value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _tensorboard_writer(log_dir: Path, resume_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a trimmed install still trains
        return None
    # purge_step hides the events the killed run wrote after its last checkpoint.
    return SummaryWriter(str(log_dir), purge_step=None if resume_step is None else resume_step + 1)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (a torn last line from a killed run is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}: is it a training run directory?")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the training loss (and validation loss, and the LR) of a run into a PNG; return its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    if not train:
        raise ValueError(f"{run_dir} has no training steps logged yet")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train loss")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    stage = train[-1].get("stage")
    ax.set_title(f"{Path(run_dir).name}" + (f" (stage {stage})" if stage else ""))
    lr_ax = ax.twinx()
    lr_ax.plot([r["step"] for r in train], [r["lr"] for r in train], color="grey", lw=0.8, ls="--", label="LR")
    lr_ax.set_ylabel("learning rate")
    handles = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend below the axes
    path = Path(out) if out is not None else Path(run_dir) / PLOT_FILE
    fig.savefig(path)
    plt.close(fig)
    return path
