"""Typed settings of one training run (one stage), and how YAML files and ``key=value`` overrides
become them.

A YAML file holds only what differs from the defaults below; unknown keys are errors that name
their path. The paper's numbers (section 4.1, ORIGINAL-NOTES "Training recipe") live in
``configs/tinygptv-phi2/stage{1..4}.yaml``, not here: the defaults are a small, safe run.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


@dataclass
class MixEntry:
    """One dataset of a stage's data mix, read by one of :mod:`tinygptv.data.readers`."""

    ratio: float = 1.0
    """Sampling weight against the other datasets of the mix (e.g. LAION : CC+SBU = 115 : 14)."""
    reader: str | None = None
    """Reader kind (a key of ``tinygptv.data.readers.READERS``); ``None`` means the dataset's name."""
    args: dict[str, Any] = field(default_factory=dict)
    """The reader's arguments. Those the reader types as paths are relative to ``data.root``."""


@dataclass
class DataConfig:
    """Where the batches come from. :func:`tinygptv.train.build_stream` turns this into a stream."""

    kind: Literal["synthetic", "shapes", "mix"] = "synthetic"
    """``synthetic``: random captions of random pixels, in memory (tests, smoke runs); ``shapes``:
    the stage's sets of the shapes world at ``root`` (``tinygptv data make-shapes``); ``mix``: the
    ``datasets`` below, sampled by ratio."""
    root: str | None = None
    """Directory that dataset paths are relative to; set on the command line (``data.root=...``)
    so that config files never hold absolute paths."""
    datasets: dict[str, MixEntry] = field(default_factory=dict)
    """``mix``: the stage's data mix, dataset name -> ratio, reader and its arguments."""
    ratios: dict[str, float] = field(default_factory=dict)
    """``shapes``: sampling weights that replace the world's own for the named sets of the stage
    (e.g. ``{shapes_refer: 25}``; :data:`~tinygptv.data.shapes.STAGE4_RATIOS`); the others keep theirs."""
    identify_names: Literal["shortest", "full", "placed"] = "shortest"
    """``shapes``: what stage 4's ``[identify]`` samples answer: the world's shortest referring phrase,
    the object's full name (size, colour, shape) wherever that picks it out alone, or its position
    and full name ("the top left large red star") (:func:`~tinygptv.data.shapes.shapes_sources`)."""
    val_datasets: dict[str, MixEntry] = field(default_factory=dict)
    """``mix``: held-out datasets that ``validate`` scores (needed when ``val_batches`` > 0)."""
    template: str | None = None
    """Prompt template (:mod:`tinygptv.data.templates`); ``None`` means the stage's."""
    max_length: int | None = None
    """Longest text in tokens, the image's slots not counted (paper: 160 in stage 3, 1024 in
    stage 4); longer samples are cut, as the authors' ``max_txt_len`` does. ``None``: the context."""
    num_workers: int = 0
    """Data-loading worker processes per training process."""
    num_samples: int = 256
    """``synthetic`` only: distinct samples before the stream repeats."""
    val_batches: int = 0
    """Held-out micro-batches (over all processes) scored by ``validate`` at the end of each epoch
    (0: no validation)."""


@dataclass
class ScheduleConfig:
    """The learning-rate schedule (:mod:`tinygptv.schedules`)."""

    kind: Literal["epoch_ramp", "warmup_cosine", "constant"] = "warmup_cosine"
    """``epoch_ramp`` (stage 1), ``warmup_cosine`` (stages 2-4) or ``constant``."""
    peak_lr: float = 1e-4
    """The highest LR (LAVIS's ``init_lr``)."""
    start_lr: float = 1e-6
    """LR at the start of each epoch (``epoch_ramp``) or of the warm-up (LAVIS's ``warmup_lr``)."""
    min_lr: float = 8e-5
    """LR at the end of the cosine."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up."""


@dataclass
class OptimizerConfig:
    """AdamW, as in the paper (section 4.1) and MiniGPT-4's runner."""

    weight_decay: float = 0.05
    """Decoupled weight decay; norms and biases (1-D parameters) get none, as in MiniGPT-4."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's moment decay rates (MiniGPT-4: 0.9 and ``beta2`` 0.999)."""
    eps: float = 1e-8
    """Adam's epsilon."""


@dataclass
class GuardConfig:
    """When to stop a run that is failing the way the paper's ablation runs failed (Table 4)."""

    vanishing_grad_norm: float = 1e-8
    """A gradient norm below this counts as vanished."""
    vanishing_patience: int = 100
    """Consecutive vanished steps that stop the run."""


@dataclass
class TrainConfig:
    """One training run: one stage of the recipe, or a custom fine-tune."""

    stage: int = 1
    """Paper stage 1-4: decides what trains (:func:`tinygptv.stages.apply_stage`) and the image size."""
    model: str = "tinygptv-phi2"
    """Model preset (:func:`tinygptv.config.get_preset`)."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted overrides of the preset, e.g. ``{"language.qk_norm": false}`` for an ablation."""
    base_weights: str | None = None
    """A model directory or hub id in our format (``tinygptv convert``, ``TinyGPTV.save_pretrained``)
    giving the frozen parts (ViT, Q-Former, Phi-2); its architecture and image size must be the run's.
    ``None`` builds random weights (tests, benchmarks)."""
    init_from: str | None = None
    """Run directory of the previous stage, whose trainable weights this stage starts from."""
    out_dir: str = "runs/stage1"
    """Run directory: checkpoints, metrics, logs and the stage's output weights."""
    image_size: int | None = None
    """Image side in pixels; ``None`` means the stage's (224, or 448 in stage 4)."""
    epochs: int = 1
    """Epochs of the stage."""
    iters_per_epoch: int = 100
    """Optimizer steps per epoch, as the paper counts iterations."""
    batch_size: int = 8
    """Samples per optimizer step over all processes (the paper's batch size)."""
    micro_batch_size: int | None = None
    """Samples per forward pass per process; ``batch_size / (micro_batch_size * world size)`` is the
    gradient accumulation. ``None``: no accumulation."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Autocast dtype; frozen weights are stored in it, trainable ones stay fp32. fp16 (with a
    gradient scaler) needs CUDA; the CPU runs fp32 or bf16."""
    grad_clip: float | None = None
    """Clip the gradient norm to this; ``None`` (the authors' runner) does not clip."""
    image_feature_cache: int = 0
    """Keep the frozen ViT + Q-Former outputs of up to this many images and look them up when an
    image comes again (:mod:`tinygptv.model.feature_cache`); 0: off. Exact, and worth it, only where
    training images are not randomly cropped (the shapes world); memory: images x 32 x Q-Former width."""
    gradient_checkpointing: bool = False
    """Recompute the language model's activations in the backward pass (stage 4 at 448 px on 24 GB)."""
    seed: int = 42
    """Seed of the model init, data and dropout."""
    deterministic: bool = False
    """``torch.use_deterministic_algorithms(True)``: bitwise repeatable runs, somewhat slower."""
    checkpoint_every: int = 1000
    """Write a resumable checkpoint every this many steps (and at the end of every epoch)."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """Under ``torchrun``: DDP replicates the model; FSDP (FSDP2 ``fully_shard``) shards it, for
    real-size runs on several GPUs or nodes."""
    find_unused_parameters: bool = False
    """DDP: set when some batches leave trainable parameters unused (text-only samples in stage 4)."""
    device: str | None = None
    """``cpu`` or ``cuda``; ``None`` picks CUDA when there is one."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tensorboard: bool = True
    """Write TensorBoard logs to ``out_dir/tensorboard`` (when the package is installed)."""
    wandb: bool = False
    """Also log to Weights & Biases (``wandb`` must be installed and logged in)."""
    wandb_project: str = "tinygptv"
    """W&B project name."""
    progress: bool = True
    """Show a progress bar on the first process."""

    # --- derived ------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return self.epochs * self.iters_per_epoch

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists, plain YAML/JSON types

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_train_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file of overrides (or none) and ``key.sub=value`` strings.

    Values of the command-line overrides are parsed as YAML (``epochs=2``, ``grad_clip=null``).
    """
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value (e.g. epochs=2)")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(value)
    return from_dict(TrainConfig, data, "config")


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from nested mappings, checking keys and basic types; errors name the path."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
    return cls(**{name: _coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()})


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return {k: _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if hint is float:
        # YAML 1.1 reads "1e-4" (no dot) as a string: accept numbers written either way.
        try:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if hint in (int, bool, str) and not (isinstance(value, hint) and (hint is bool or not isinstance(value, bool))):
        raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value
