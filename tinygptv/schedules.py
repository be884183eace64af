"""The paper's learning-rate schedules (section 4.1 "Training process", Figure 7).

Steps count optimizer steps from 0; an epoch is ``iters_per_epoch`` steps, as the paper and the
authors' LAVIS runner count iterations (an epoch is a fixed number of iterations, not a pass over
the data).

* Stage 1, :func:`epoch_ramp`: "the learning rate commenced at 1e-5 at the beginning of each epoch and
  gradually ascended to 1e-4 by the epoch's end", in each of the 17 epochs.
* Stages 2-4, :func:`warmup_cosine` ("linear_warmup_cosine_lr"): a linear warm-up from a warm-up LR
  to the peak LR, then a cosine decay to a minimum LR at the last step. LAVIS holds the cosine
  value constant within an epoch; we decay it every step, the usual reading of the schedule's name,
  which differs from LAVIS by less than one epoch's worth of decay.

The stage-4 typo: the paper (and the released config) gives a peak of 1e-5 and a minimum of 8e-5,
above the peak, which makes the "decay" climb to 8x the peak. We read it as 8e-6: the same 0.8
min/peak ratio as stage 2, and a decay that decays. :func:`warmup_cosine` refuses a minimum above
the peak, so the typo cannot come back through a config.

:class:`Schedule` holds one run's numbers; calling it with a step gives the LR, and
:func:`lambda_lr` turns it into a ``torch.optim.lr_scheduler.LambdaLR`` whose state (the step)
checkpoints like any scheduler's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def epoch_ramp(step: int, iters_per_epoch: int, start_lr: float, peak_lr: float) -> float:
    """Stage 1: linear from ``start_lr`` at an epoch's first step to ``peak_lr`` at its last, every epoch."""
    if iters_per_epoch < 1:
        raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch}")
    position = step % iters_per_epoch
    return start_lr + (peak_lr - start_lr) * position / max(iters_per_epoch - 1, 1)


def warmup_cosine(
    step: int, total_steps: int, warmup_steps: int, warmup_lr: float, peak_lr: float, min_lr: float
) -> float:
    """Stages 2-4: linear ``warmup_lr`` -> ``peak_lr`` over ``warmup_steps``, then cosine to ``min_lr``.

    The warm-up reaches ``peak_lr`` at step ``warmup_steps``; the cosine ends at ``min_lr`` on the
    last step (``total_steps - 1``) and stays there if training goes on.
    """
    if min_lr > peak_lr:
        raise ValueError(
            f"min_lr {min_lr:g} is above peak_lr {peak_lr:g}: the cosine would climb. (The paper's stage 4 "
            "states min 8e-5 with peak 1e-5, a typo; the configs use 8e-6.)"
        )
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if step < warmup_steps:
        return warmup_lr + (peak_lr - warmup_lr) * step / warmup_steps
    decay_steps = max(total_steps - 1 - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """A learning rate as a function of the optimizer step, built from a run's settings."""

    kind: str
    """``epoch_ramp`` (stage 1), ``warmup_cosine`` (stages 2-4) or ``constant``."""
    peak_lr: float
    """Highest LR: the ramp's end, the warm-up's target, or the constant."""
    start_lr: float
    """LR at the first step of each epoch (``epoch_ramp``) or of the warm-up (``warmup_cosine``)."""
    min_lr: float
    """LR at the last step (``warmup_cosine``)."""
    warmup_steps: int
    """Steps of the linear warm-up (``warmup_cosine``)."""
    iters_per_epoch: int
    """Optimizer steps per epoch."""
    total_steps: int
    """Optimizer steps in the whole stage."""

    def __post_init__(self) -> None:
        if self.kind not in ("epoch_ramp", "warmup_cosine", "constant"):
            raise ValueError(f"unknown schedule {self.kind!r}; known: epoch_ramp, warmup_cosine, constant")
        if self.peak_lr <= 0:
            raise ValueError(f"peak_lr must be positive, got {self.peak_lr}")
        self(0)  # validate the numbers now, not at the first step

    def __call__(self, step: int) -> float:
        if self.kind == "epoch_ramp":
            return epoch_ramp(step, self.iters_per_epoch, self.start_lr, self.peak_lr)
        if self.kind == "warmup_cosine":
            return warmup_cosine(step, self.total_steps, self.warmup_steps, self.start_lr, self.peak_lr, self.min_lr)
        return self.peak_lr


def lambda_lr(optimizer: torch.optim.Optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following ``schedule``; the optimizer's LR must be ``schedule.peak_lr``."""
    for group in optimizer.param_groups:
        if group.get("initial_lr", group["lr"]) != schedule.peak_lr:
            raise ValueError(f"optimizer LR {group['lr']} must equal the schedule's peak_lr {schedule.peak_lr}")
    # A plain function: LambdaLR then checkpoints only its step count, which is all the state there is.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step) / schedule.peak_lr)
