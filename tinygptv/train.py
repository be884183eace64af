"""One training loop for all four TinyGPT-V stages: ``setup`` -> ``fit`` -> ``validate``.

The shape follows litgpt's ``finetune/lora.py``: ``setup`` builds everything a run needs (model with
the stage's trainable parts, AdamW, the paper's schedule, the data stream, a resumed state),
``fit`` runs optimizer steps until the stage's ``epochs x iters_per_epoch`` are done, and
``validate`` scores held-out batches at the end of each epoch. What trains is decided by
:func:`tinygptv.stages.apply_stage` alone.

A run directory holds::

    config.yaml              the resolved TrainConfig
    model_config.json        the TinyGPTVConfig the run built
    checkpoints/last.pt      trainable weights + optimizer + scheduler + RNG + data position (resume)
    trainable.safetensors    the stage's output: trainable weights only (the next stage's init_from)
    metrics.jsonl, tensorboard/, loss.png

Checkpoints are written atomically (temp file + ``os.replace``) every ``checkpoint_every`` steps and
at the end of each epoch. Like the authors' runner, only the trainable part is saved: the frozen
ViT, Q-Former and Phi-2 come from ``base_weights`` every time.

Guard rails stop a run whose loss or gradient turns NaN/Inf, or whose gradient norm vanishes for
``guard.vanishing_patience`` steps: the failure modes of the paper's ablation (Table 4). The
failing step is never applied, so the last checkpoint is the last good state.

Scale-out is PyTorch's own: under ``torchrun`` each process trains on its share of every global
batch, with DDP (gloo on CPU, NCCL on CUDA) or, with ``distributed: fsdp``, FSDP2's
``fully_shard``.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from .config import TinyGPTVConfig, get_preset
from .data.encoding import collate, encode_prompt
from .model.tinygptv import TinyGPTV
from .schedules import Schedule, lambda_lr
from .stages import Stage, apply_stage, get_stage, trainable_parameter_names
from .train_config import MixEntry, TrainConfig
from .train_log import MetricsLog, plot_run

CHECKPOINT_FILE = Path("checkpoints") / "last.pt"
TRAINABLE_FILE = "trainable.safetensors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

Batch = dict[str, torch.Tensor]


# =============================================================================================
# Data: the stream protocol, a synthetic in-memory stream, and the one place configs become streams
# =============================================================================================


class DataStream(Protocol):
    """An endless iterable of this process's micro-batches, with a resumable position.

    A batch holds exactly :meth:`TinyGPTV.forward`'s arguments: ``input_ids``, ``attention_mask``
    and ``labels`` (B, T), and ``pixel_values`` (N, 3, S, S) when the batch has images.
    ``state_dict()`` / ``load_state_dict()`` save and restore the position, so that a resumed run
    sees exactly the batches an uninterrupted one would have.
    """

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RandomCaptionStream:
    """Random-word captions of random-pixel images in the stage 1-2 format, held in memory.

    Sample ``i`` is a pure function of ``(seed, i)``. Micro-batch ``g`` of the global sequence holds
    samples ``g*m .. g*m+m-1`` (modulo ``num_samples``), and process ``r`` of ``W`` serves
    micro-batches ``r, r+W, r+2W, ...``: any split of a global batch into processes and
    accumulation steps sees the same samples, which makes runs on 1 and N processes comparable.
    """

    prompt = "<Img><ImageHere></Img> "

    def __init__(
        self,
        tokenizer,
        num_image_tokens: int,
        image_size: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_samples: int = 256,
        seed: int = 0,
    ):
        self.tokenizer, self.num_image_tokens, self.image_size = tokenizer, num_image_tokens, image_size
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.num_samples, self.seed = num_samples, seed
        self.words = sorted(w for w in tokenizer.get_vocab() if w.isalpha())
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = pad if pad is not None else 0
        self.served = 0

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        g = self.served * self.world_size + self.rank
        self.served += 1
        m = self.micro_batch_size
        return self.batch([(g * m + j) % self.num_samples for j in range(m)])

    def batch(self, indices: list[int]) -> Batch:
        encoded, pixels = [], []
        for i in indices:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            n_words = int(torch.randint(3, 9, (1,), generator=gen))
            words = torch.randint(len(self.words), (n_words,), generator=gen).tolist()
            caption = " ".join(self.words[k] for k in words)
            pixels.append(torch.randn(3, self.image_size, self.image_size, generator=gen))
            encoded.append(encode_prompt(self.tokenizer, self.prompt, caption, self.num_image_tokens))
        batch = collate(encoded, self.pad_token_id)
        batch["pixel_values"] = torch.stack(pixels)  # (B, 3, S, S)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"served": self.served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.served = int(state["served"])


def build_stream(config: TrainConfig, model: TinyGPTV, rank: int, world_size: int, split: str = "train") -> DataStream:
    """The one place where a config's ``data`` section becomes this process's stream of micro-batches.

    ``synthetic`` is :class:`RandomCaptionStream`. ``shapes`` and ``mix`` are sources of
    :mod:`tinygptv.data` sampled by ratio (:class:`~tinygptv.data.mixture.Mixture`), prepared with
    the stage's template and image processing, and loaded by a
    :class:`~tinygptv.data.mixture.MixtureLoader` that serves rank ``rank`` of ``world_size`` its
    draws and resumes from its ``state_dict``.
    """
    data = config.data
    train = split == "train"
    seed = config.seed if train else config.seed + 1
    if data.kind == "synthetic":
        size = model.config.vision.image_size
        micro = micro_batch_size(config, world_size)
        return RandomCaptionStream(
            model.tokenizer, model.num_image_tokens, size, micro, rank, world_size, data.num_samples, seed
        )
    from .data.mixture import Mixture, MixtureLoader

    if data.kind == "shapes":
        from .data.shapes import shapes_sources

        if data.root is None:
            raise ValueError("data.kind shapes needs data.root: a world made by `tinygptv data make-shapes`")
        split = "train" if train else "val"
        sources, ratios = shapes_sources(data.root, config.stage, split=split, identify_names=data.identify_names)
        unknown = sorted(set(data.ratios) - set(ratios))
        if unknown:
            raise ValueError(f"data.ratios names {unknown}, not sets of stage {config.stage}: {sorted(ratios)}")
        ratios.update(data.ratios)
    elif data.kind == "mix":
        entries = data.datasets if train else data.val_datasets
        if not entries:
            raise ValueError(f"data.{'datasets' if train else 'val_datasets'} is empty: nothing to read")
        sources = {name: build_reader(name, entry, data.root) for name, entry in entries.items()}
        ratios = {name: entry.ratio for name, entry in entries.items()}
    else:
        raise ValueError(f"unknown data.kind {data.kind!r}; known: synthetic, shapes, mix")
    return MixtureLoader(
        Mixture(sources, ratios, seed=seed),
        collator_for(config, model, train),
        batch_size=micro_batch_size(config, world_size),
        num_workers=data.num_workers,
        rank=rank,
        world_size=world_size,
    )


def collator_for(config: TrainConfig, model: TinyGPTV, train: bool):
    """Samples -> batches: the stage's template (or ``data.template``), BLIP-2 image processing at
    the model's size (random crops when training), texts cut at ``data.max_length``."""
    from .data.batching import Collator
    from .data.image_processing import image_processor_for
    from .data.templates import get_template, template_for_stage

    data = config.data
    template = get_template(data.template) if data.template else template_for_stage(config.stage)
    if data.max_length is None:
        max_length = model.config.language.max_position_embeddings
    else:
        max_length = data.max_length + model.num_image_tokens  # the collator counts the image's slots too
    processor = image_processor_for(model.config.vision.image_size, train=train)
    return Collator(model.tokenizer, template, processor, model.num_image_tokens, max_length, truncate=True)


def build_reader(name: str, entry: MixEntry, root: str | None):
    """The reader of one dataset of a mix; the arguments it types as paths are taken under ``root``."""
    from .data.readers import READERS, build_source

    kind = entry.reader or name
    if kind not in READERS:
        raise ValueError(f"dataset {name!r}: unknown reader {kind!r}; readers: {', '.join(sorted(READERS))}")
    args = {"name": name, **entry.args}
    for key in _path_arguments(READERS[kind]) & set(args):
        args[key] = _under(root, args[key])
    return build_source(kind, **args)


def _path_arguments(cls: type) -> set[str]:
    """Constructor arguments that ``cls`` (or a base class) annotates as a ``Path``."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        names.update(k for k, v in getattr(init, "__annotations__", {}).items() if "Path" in str(v))
    return names


def _under(root: str | None, value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_under(root, v) for v in value]
    if (
        root is None
        or not isinstance(value, str)
        or os.path.isabs(value)
        or "://" in value
        or value.startswith("pipe:")
    ):
        return value  # absolute, remote (webdataset reads URLs) or nothing to join
    return os.path.join(root, value)


def micro_batch_size(config: TrainConfig, world_size: int) -> int:
    return config.micro_batch_size or config.batch_size // world_size


def accumulation_steps(config: TrainConfig, world_size: int) -> int:
    """Micro-batches per optimizer step per process: ``batch_size / (micro_batch_size x world size)``."""
    micro = micro_batch_size(config, world_size)
    per_step = micro * world_size
    if micro < 1 or config.batch_size % per_step:
        raise ValueError(
            f"batch_size {config.batch_size} is not micro_batch_size {micro} x {world_size} process(es) "
            "x a whole number of accumulation steps"
        )
    return config.batch_size // per_step


# =============================================================================================
# The run: everything fit() needs
# =============================================================================================


@dataclass
class Dist:
    """This process's place in the job (``torchrun`` sets the environment; alone: rank 0 of 1)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Run:
    config: TrainConfig
    stage: Stage
    dist: Dist
    module: TinyGPTV
    """The model itself."""
    model: nn.Module
    """What forward and backward go through: ``module``, or its DDP / FSDP wrapper."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    stream: DataStream
    accum_steps: int
    out_dir: Path
    log: MetricsLog | None = None
    step: int = 0
    """Optimizer steps done."""
    small_grad_steps: int = 0
    """Consecutive steps whose gradient norm was below ``guard.vanishing_grad_norm``."""
    last_checkpoint_step: int | None = None
    batches: Iterator[Batch] | None = None
    """``iter(stream)``, opened at the first step (after a resume has moved the stream)."""
    val_stream: DataStream | None = None
    """Held-out batches for ``validate`` (when ``data.val_batches`` > 0)."""
    val_start: dict[str, Any] | None = None
    """``val_stream``'s initial position."""

    def autocast(self):
        dtype = DTYPES[self.config.precision]
        return torch.autocast(self.dist.device.type, dtype=dtype, enabled=dtype != torch.float32)

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


class TrainingStopped(RuntimeError):
    """A guard rail stopped the run; the message names the stage, the step and the last checkpoint."""


# =============================================================================================
# setup
# =============================================================================================


def setup(config: TrainConfig, resume: bool = False, init_device: str | torch.device | None = None) -> Run:
    """Build model, optimizer, schedule and data for ``config``; with ``resume``, restore the last checkpoint.

    ``init_device``: where a model without ``base_weights`` draws its random weights (default: the
    CPU, so that a run has the same weights on every device; a GPU builds a real-size model in
    seconds instead of a minute, with other values)."""
    stage = get_stage(config.stage)
    out_dir = Path(config.out_dir)
    if resume and not (out_dir / CHECKPOINT_FILE).exists():
        raise FileNotFoundError(f"nothing to resume: {out_dir / CHECKPOINT_FILE} does not exist")
    if not resume and ((out_dir / CHECKPOINT_FILE).exists() or (out_dir / TRAINABLE_FILE).exists()):
        raise ValueError(f"{out_dir} already holds a run: pass --resume to continue it, or choose another out_dir")
    if config.precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("precision fp16 needs CUDA; on the CPU use bf16 or fp32")
    env = init_distributed(config.device)
    seed_everything(config.seed, config.deterministic)

    module = build_model(config, stage, weights_dtype(config, env), init_device)
    if config.image_feature_cache:
        from .model.feature_cache import ImageFeatureCache

        module.feature_cache = ImageFeatureCache(config.image_feature_cache)
    model = place_model(module, config, env)
    optimizer = build_optimizer(model, config)
    schedule = Schedule(
        config.schedule.kind, config.schedule.peak_lr, config.schedule.start_lr, config.schedule.min_lr,
        config.schedule.warmup_steps, config.iters_per_epoch, config.total_steps,
    )  # fmt: skip
    run = Run(
        config=config,
        stage=stage,
        dist=env,
        module=module,
        model=model,
        optimizer=optimizer,
        scheduler=lambda_lr(optimizer, schedule),
        scaler=torch.amp.GradScaler("cuda") if config.precision == "fp16" else None,
        stream=build_stream(config, module, env.rank, env.world_size),
        accum_steps=accumulation_steps(config, env.world_size),
        out_dir=out_dir,
    )
    if config.data.val_batches:  # built now, so that a data error shows before any training
        run.val_stream = build_stream(config, module, env.rank, env.world_size, split="val")
        run.val_start = run.val_stream.state_dict()
    if resume:
        load_checkpoint(run, out_dir / CHECKPOINT_FILE)
    else:
        torch.manual_seed(config.seed + env.rank)  # each process its own dropout stream
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(config.to_yaml())
        module.config.to_json(out_dir / "model_config.json")
    run.log = MetricsLog(
        out_dir,
        enabled=env.is_main,
        resume_step=run.step if resume else None,
        tensorboard=config.tensorboard,
        wandb_project=config.wandb_project if config.wandb else None,
        config=config.to_dict(),
    )
    return run


def init_distributed(device: str | None) -> Dist:
    """Join the ``torchrun`` job if there is one (gloo on CPU, NCCL on CUDA); pick the device."""
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but CUDA is not available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(0, 1, 0, torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), world_size, local_rank, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def shutdown_distributed(wait_for_all: bool = False) -> None:
    """Leave the ``torchrun`` job. ``wait_for_all`` (after a run that ended normally on every rank):
    meet the other ranks first, so that none tears gloo's connections down while another still
    finishes its last collective or checkpoint (a rank of a 2-process FSDP test once aborted at exit,
    "terminate called without an active exception"). Not after an error: a rank that failed alone
    would leave the others waiting."""
    if dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int, deterministic: bool) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:  # process-wide, as torch's switch is
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def model_config_for(config: TrainConfig, stage: Stage) -> TinyGPTVConfig:
    """The preset with the run's overrides, at the run's image size (the stage's unless set)."""
    image_size = config.image_size or stage.image_size
    return get_preset(config.model).replace(**config.model_overrides, **{"vision.image_size": image_size})


def weights_dtype(config: TrainConfig, env: Dist) -> torch.dtype:
    """The dtype of the frozen weights: the autocast dtype, except under FSDP, which keeps fp32
    shards and gathers them in the autocast dtype itself."""
    sharded = env.world_size > 1 and config.distributed == "fsdp"
    return torch.float32 if sharded else DTYPES[config.precision]


def build_model(
    config: TrainConfig, stage: Stage, dtype: torch.dtype = torch.float32, init_device: str | torch.device | None = None
) -> TinyGPTV:
    """The model with frozen weights from ``base_weights`` (or random, built directly in ``dtype``
    on ``init_device``, the CPU by default: 7.7 GB instead of 15.5 GB at real size in bf16), the
    previous stage's trainable weights (``init_from``), exactly the stage's parameters trainable,
    and those in fp32."""
    model_config = model_config_for(config, stage)
    if config.base_weights:
        module = TinyGPTV.from_pretrained(config.base_weights)
        check_same_architecture(module.config, model_config, config.base_weights)
    else:
        torch.manual_seed(config.seed)  # the same random frozen weights in every stage and process
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(init_device or "cpu"):
                module = TinyGPTV(model_config, tokenizer=load_tokenizer(model_config))
        finally:
            torch.set_default_dtype(default)
    trainable = apply_stage(module, stage)
    module.cast_frozen(dtype)  # frozen weights in dtype, trainable ones in fp32 (TinyGPT-V's norms)
    for name in trainable:
        param = module.get_parameter(name)
        param.data = param.data.clone()  # own memory for the optimizer to write: loads may be memory-mapped
    if config.init_from:
        load_trainable(module, Path(config.init_from) / TRAINABLE_FILE)
    module.lm.config.use_cache = False  # training never reuses keys/values
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs and with DDP / FSDP.
        module.lm.activation_checkpointing_enable({"use_reentrant": False})
    return module


def check_same_architecture(loaded: TinyGPTVConfig, wanted: TinyGPTVConfig, source: str) -> None:
    """Refuse base weights built for another architecture or image size than the run's."""
    a, b = flatten_dotted(loaded.to_dict()), flatten_dotted(wanted.to_dict())
    diffs = [
        f"{k}: {a[k]!r} (weights) vs {b.get(k)!r} (run)"
        for k in a
        if k not in ("name", "tokenizer") and a[k] != b.get(k)
    ]
    if diffs:
        raise ValueError(
            f"base_weights {source} hold a model that differs from the run's ({'; '.join(diffs)}); convert the "
            "ingredients for this stage (tinygptv convert, e.g. --stage 4 for 448 px) or change the run's settings"
        )


def flatten_dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level with dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten_dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def load_tokenizer(model_config: TinyGPTVConfig):
    """The preset's tokenizer; presets without one (tiny, micro) use the built-in word-level tokenizer."""
    if model_config.tokenizer is None:
        from .testing import word_tokenizer

        return word_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_config.tokenizer)


def place_model(module: TinyGPTV, config: TrainConfig, env: Dist) -> nn.Module:
    """Device and (under torchrun) the DDP or FSDP wrapper."""
    module.to(env.device)
    if env.world_size == 1:
        return module
    if config.distributed == "fsdp":
        return shard_model(module, config, env)
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [env.local_rank] if env.device.type == "cuda" else None
    return DDP(module, device_ids=device_ids, find_unused_parameters=config.find_unused_parameters)


def shard_model(module: TinyGPTV, config: TrainConfig, env: Dist) -> nn.Module:
    """FSDP2: shard each ViT and LM block, then the rest; weights stay fp32 and are gathered in the
    autocast dtype for compute, gradients are reduced in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The model's output holds views (logits slices); we only read `.loss` out of place, so FSDP's
    # warning about in-place ops on returned views does not apply.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    dtype = DTYPES[config.precision]
    policy = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
    blocks = [*module.vision.model.encoder.layers, *module.lm.model.layers]
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    return fully_shard(module, mesh=mesh, mp_policy=policy)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; as MiniGPT-4's runner does, 1-D ones (norms, biases)
    get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.optimizer.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=config.schedule.peak_lr,
        betas=config.optimizer.betas,
        eps=config.optimizer.eps,
    )


# =============================================================================================
# fit
# =============================================================================================


@dataclass
class StepResult:
    loss: float
    """Mean loss of the step's micro-batches over all processes."""
    grad_norm: float
    """Total gradient norm before clipping."""
    lr: float
    """Learning rate the step used."""
    samples: int
    """Samples in the step over all processes."""


def fit(run: Run) -> None:
    """Optimizer steps until the stage is done; log, validate each epoch, checkpoint as configured."""
    from tqdm.auto import tqdm

    cfg = run.config
    bar = tqdm(
        total=cfg.total_steps,
        initial=run.step,
        desc=f"stage {run.stage.number}",
        unit="step",
        disable=not (cfg.progress and run.dist.is_main),
        dynamic_ncols=True,
    )
    set_train_mode(run.module)
    while run.step < cfg.total_steps:
        start = time.perf_counter()
        result = train_step(run)
        run.step += 1
        rate = result.samples / (time.perf_counter() - start)
        run.log.write(
            {"stage": run.stage.number, "step": run.step, "epoch": run.step / cfg.iters_per_epoch,
             "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm, "samples_per_s": rate}
        )  # fmt: skip
        bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", samples_s=f"{rate:.1f}", refresh=False)
        bar.update(1)
        end_of_epoch = run.step % cfg.iters_per_epoch == 0
        if end_of_epoch or run.step % cfg.checkpoint_every == 0:
            save_checkpoint(run)
        if end_of_epoch and run.val_stream is not None:
            run.log.write({"stage": run.stage.number, "step": run.step, "val_loss": validate(run)})
    bar.close()


def train_step(run: Run) -> StepResult:
    """One optimizer step over ``accum_steps`` micro-batches per process, guarded."""
    lr = run.optimizer.param_groups[0]["lr"]
    if run.batches is None:
        run.batches = iter(run.stream)
    totals = torch.zeros(3, device=run.dist.device)  # loss sum, micro-batches, samples
    for micro in range(run.accum_steps):
        batch = {k: v.to(run.dist.device, non_blocking=True) for k, v in next(run.batches).items()}
        with grad_sync(run.model, micro == run.accum_steps - 1):
            with run.autocast():
                loss = run.model(**batch).loss
            scaled = loss / run.accum_steps
            (run.scaler.scale(scaled) if run.scaler else scaled).backward()
        totals += torch.stack(
            [loss.detach().float(), totals.new_tensor(1.0), totals.new_tensor(batch["input_ids"].shape[0])]
        )
    if run.dist.world_size > 1:
        dist.all_reduce(totals)
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    max_norm = run.config.grad_clip if run.config.grad_clip is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, max_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
    mean_loss = (totals[0] / totals[1]).item()
    guard(run, mean_loss, grad_norm.item())  # raises before a bad update is applied
    if run.scaler:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return StepResult(mean_loss, grad_norm.item(), lr, int(totals[2].item()))


def grad_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        return nullcontext()
    if hasattr(model, "no_sync") and not enabled:  # DDP
        return model.no_sync()
    return nullcontext()


def guard(run: Run, loss: float, grad_norm: float) -> None:
    """Stop on a NaN/Inf loss or gradient, or on gradients that stay vanished (paper, Table 4)."""
    cfg = run.config.guard
    if not math.isfinite(loss):
        stop(run, f"the loss is {loss}")
    if not math.isfinite(grad_norm):
        if run.scaler is None:
            stop(run, f"the gradient norm is {grad_norm}")
        return  # fp16: the scaler skips this step and lowers its scale
    run.small_grad_steps = run.small_grad_steps + 1 if grad_norm < cfg.vanishing_grad_norm else 0
    if run.small_grad_steps >= cfg.vanishing_patience:
        stop(
            run,
            f"the gradient norm has stayed below {cfg.vanishing_grad_norm:g} for {run.small_grad_steps} steps "
            f"(last {grad_norm:.3g}): the gradients vanished",
        )


def stop(run: Run, reason: str) -> None:
    where = f"stage {run.stage.number} ({run.stage.name}), step {run.step + 1} of {run.config.total_steps}"
    if run.last_checkpoint_step is None:
        kept = "no checkpoint had been written yet"
    else:
        kept = f"the last good checkpoint is {run.out_dir / CHECKPOINT_FILE} (step {run.last_checkpoint_step})"
    raise TrainingStopped(f"{where}: {reason}. Training stopped; {kept}.")


def set_train_mode(module: nn.Module) -> None:
    """Train mode where something trains; eval mode (no dropout) in the frozen parts, as MiniGPT-4
    keeps its frozen ViT and Q-Former (``disabled_train``)."""
    module.train()
    for child in module.children():
        if not any(p.requires_grad for p in child.parameters()):
            child.eval()


# =============================================================================================
# validate
# =============================================================================================


@torch.no_grad()
def validate(run: Run) -> float:
    """Mean loss over ``data.val_batches`` held-out micro-batches, shared out among the processes
    (the same batches at every epoch and for any number of processes)."""
    env = run.dist
    run.val_stream.load_state_dict(run.val_start)  # from the start: the same batches every time
    stream = iter(run.val_stream)
    run.module.eval()
    totals = torch.zeros(2, device=env.device)
    for _ in range(env.rank, run.config.data.val_batches, env.world_size):
        batch = {k: v.to(run.dist.device) for k, v in next(stream).items()}
        with run.autocast():
            loss = run.model(**batch).loss
        totals += torch.stack([loss.float(), totals.new_tensor(1.0)])
    if env.world_size > 1:
        dist.all_reduce(totals)
    set_train_mode(run.module)
    return (totals[0] / totals[1]).item()


# =============================================================================================
# checkpoints
# =============================================================================================


def _state_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def trainable_state(run: Run) -> dict[str, torch.Tensor]:
    """Full (unsharded) trainable weights on the CPU, by the model's own parameter names. Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(run.model, options=_state_options(cpu_offload=True, ignore_frozen_params=True))


def save_checkpoint(run: Run) -> None:
    """Everything a resume needs, written atomically by the first process. Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model_state = trainable_state(run)
    optim_state = get_optimizer_state_dict(run.model, run.optimizer, options=_state_options(cpu_offload=True))
    per_rank = gather({"rng": rng_state(), "data": run.stream.state_dict()}, run.dist)
    if run.dist.is_main:
        state = {
            "format": 1,
            "stage": run.stage.number,
            "step": run.step,
            "model": model_state,
            "optimizer": optim_state,
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler else {},
            "small_grad_steps": run.small_grad_steps,
            "ranks": per_rank,
        }
        atomic_save(state, run.out_dir / CHECKPOINT_FILE)
    if run.dist.world_size > 1:
        dist.barrier()
    run.last_checkpoint_step = run.step


def load_checkpoint(run: Run, path: Path) -> None:
    """Restore trainable weights, optimizer, scheduler, scaler, RNG and data position from ``path``."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = torch.load(path, map_location="cpu", weights_only=True)
    expected = trainable_parameter_names(run.module, run.stage)
    if state["stage"] != run.stage.number or set(state["model"]) != expected:
        raise ValueError(
            f"{path} was written by a stage-{state['stage']} run whose trainable parameters differ from this "
            f"stage-{run.stage.number} run's ({len(state['model'])} vs {len(expected)} tensors)"
        )
    if len(state["ranks"]) != run.dist.world_size:
        raise ValueError(
            f"{path} was written by {len(state['ranks'])} process(es); resume it with the same number "
            f"(now {run.dist.world_size}) so that every process continues its own data and RNG streams"
        )
    set_model_state_dict(run.model, state["model"], options=_state_options(strict=False))
    # strict=False: a parameter that never had a gradient (e.g. no image yet) has no AdamW state.
    set_optimizer_state_dict(run.model, run.optimizer, state["optimizer"], options=_state_options(strict=False))
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler and state["scaler"]:
        run.scaler.load_state_dict(state["scaler"])
    run.step = run.last_checkpoint_step = state["step"]
    run.small_grad_steps = state["small_grad_steps"]
    mine = state["ranks"][run.dist.rank]
    run.stream.load_state_dict(mine["data"])
    set_rng_state(mine["rng"])


def save_trainable(run: Run) -> Path:
    """The stage's output: trainable weights as safetensors (small, like the authors' stage files). Collective."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in trainable_state(run).items()}
    path = run.out_dir / TRAINABLE_FILE
    if run.dist.is_main:
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"stage": str(run.stage.number), "model": run.module.config.name})
        os.replace(tmp, path)
    return path


def load_trainable(module: TinyGPTV, path: Path) -> list[str]:
    """Copy a run's trainable weights into ``module``; every tensor must match a parameter by name and shape."""
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: init_from must name a finished run directory")
    tensors = load_file(str(path))
    own = dict(module.named_parameters())
    unknown = sorted(k for k in tensors if k not in own)
    mismatched = sorted(k for k in tensors if k in own and own[k].shape != tensors[k].shape)
    if unknown or mismatched:
        raise ValueError(
            f"{path} does not fit {module.config.name}: unknown {unknown[:5]}{'...' if len(unknown) > 5 else ''}, "
            f"shape mismatch {mismatched[:5]}{'...' if len(mismatched) > 5 else ''}"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor)
    return sorted(tensors)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file beside ``path``, flushed to disk, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def gather(obj: Any, env: Dist) -> list[Any]:
    """``obj`` of every process, in rank order."""
    if env.world_size == 1:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as tensors and numbers (``weights_only`` loads)."""
    import numpy as np

    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# =============================================================================================
# the whole stage
# =============================================================================================


def is_finished(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a finished stage (its output weights)."""
    return (Path(out_dir) / TRAINABLE_FILE).exists()


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Run one stage: setup, fit, then write its trainable weights and loss curve. Returns the run directory.

    Raises :class:`TrainingStopped` when a guard rail stops the run (after drawing the curve that led there).
    """
    run = setup(config, resume)
    draw = run.dist.is_main
    try:
        fit(run)
        save_trainable(run)
    except TrainingStopped:
        if draw and run.step > 0:
            plot_run(run.out_dir)  # the curve that led to the stop
        raise
    else:
        if draw:
            plot_run(run.out_dir)
    finally:
        run.log.close()
        for stream in (run.stream, run.val_stream):
            if hasattr(stream, "close"):
                stream.close()  # data-loading workers
    return run.out_dir
