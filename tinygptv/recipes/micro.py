"""The micro recipe: a TinyGPT-V trained from nothing on the shapes world, on two CPU cores.

The paper's model starts from pretrained Phi-2, EVA-ViT-g and BLIP-2 Q-Former and trains four
stages on top (section 4.1). The micro model is the same architecture, only smaller
(``tinygptv-micro``), and the recipe follows the same path, first making its own ingredients:

====  ==================  ====================================================================
 #    phase               what it does (output folder under ``--out``)
====  ==================  ====================================================================
 0    world               ``tinygptv data make-shapes`` (``world/``)
 1    tokenizer           byte-level BPE on the world's texts (``tokenizer/``)
 2    language model      causal-LM pretraining of the micro Phi on the world's texts, each image
                          written as its scene tokens, and on scene drills (fresh text-only scenes,
                          a dozen stage-4 questions each); without TinyGPT-V's norms (``lm/``)
 3    vision              ViT (dense per-patch targets) + Q-Former (its queries become the scene
                          tokens in the LM's embedding space) (``vision/``)
 4    language model      the LM trained on at a low learning rate, its embeddings (what the
      anneal              Q-Former writes into) frozen (``lm_anneal/``; :class:`LMAnneal`)
 5    base                the TinyGPT-V model: pretrained frozen parts, TinyGPT-V's norms (fitted to
                          the LM's activations) and LoRA added, the projections from the vision
                          phase's read-out; our format (``base/``), the stages' ``base_weights``
 6-9  stages 1-4          ``configs/micro/stage{1..4}.yaml`` through :func:`tinygptv.train.train`
                          (``stage1/`` .. ``stage4/``), each evaluated on the test and
                          compositional splits when it ends
 10   package             base + stage 4, LoRA merged, one directory (``model/``)
====  ==================  ====================================================================

Phases 1-4 are in :mod:`tinygptv.recipes.world_tokenizer` and :mod:`tinygptv.recipes.pretrain`
(which says why the frozen parts are pretrained this way). The four stages are the paper's, unchanged:
the same trainer, the same :func:`tinygptv.stages.apply_stage`, the same schedules and templates;
only the numbers in ``configs/micro`` are the micro model's. The one deliberate difference: stage 4
runs at 224 px, not 448 (see ``configs/micro/stage4.yaml``).

Every training phase runs in ``processes`` processes (default 2, one per core: DDP over gloo, each
process computing its share of every batch; the stages through the trainer's own ``torchrun``
path), because on a 2-core machine two one-thread processes are ~1.7x faster than one, where a
second thread in one process is slower. Everything is seeded and runs with a fixed number of
threads and processes and deterministic algorithms, so the same seed gives the same weights, bit
for bit, on the same machine (``scripts/build_builtin_model.py``
checks its output's hashes). ``report.json`` / ``report.md`` record per phase the wall and CPU time
and the load average, the final losses and the accuracy after each stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .pretrain import PretrainSettings

PRESET = "tinygptv-micro"
STAGE_NUMBERS = (1, 2, 3, 4)
EVAL_TASKS = ("vqa", "refer", "identify")
"""Tasks scored after each stage (the targets of the built-in model)."""
EVAL_SPLITS = ("test", "compositional")

Logger = Callable[[str], None]


@dataclass
class LMAnneal:
    """A second language-model phase, after the vision phase: the pretrained LM trained on for
    ``steps`` more steps of the same data (packed texts and new scene drills, drawn from the LM
    seed + :data:`ANNEAL_SEED_OFFSET`) at a low learning rate, with its input embeddings frozen.
    The embedding table is what the vision phase trained the Q-Former to write into, so that phase
    does not depend on this one; the stages start from the annealed LM. ``steps`` 0: none."""

    steps: int = 0
    """Optimizer steps (0: the LM phase's weights as they are)."""
    lr: float = 3e-4
    """Peak learning rate, after ``warmup_steps`` of linear warm-up from ``lr / 100`` (the LM phase
    ends at 3e-4)."""
    min_lr: float = 1e-5
    """Learning rate at the last step (cosine decay)."""
    warmup_steps: int = 30
    """Steps of linear warm-up."""
    drill_fraction: float | None = None
    """Share of each batch's rows that are scene drills (``None``: the LM phase's ``drill_fraction``)."""


ANNEAL_SEED_OFFSET = 100
"""The anneal's data seed is the LM seed plus this: drills and row order other than the LM phase's."""


@dataclass
class MicroRecipe:
    """Every number of the micro recipe outside the stage configs (``configs/micro``)."""

    seed: int = 0
    """Seed of the world, every model init and every data order."""
    lm_seed: int | None = 3
    """Seed of the language-model phase alone (its init, the order of its packed rows and its
    drills' scenes; also the drills the base phase calibrates the added norms on); ``None``: ``seed``.
    The LM phase's outcome swings from draw to draw far more than any of its settings moved it, so
    the recipe takes the best of four draws on ``seed``'s world and tokenizer, chosen on the LM alone
    on 300 validation images (``benchmarks/probe_micro_lm.py``), VQA / ``[refer]`` / ``[identify]``,
    final loss: LM seed 0 (the builds before session 24) 90.3 / 93.8 / 82.8 %, 0.151; 1: 89.4 / 59.1
    / 84.9, 0.226; 2: 86.5 / 34.3 / 57.5, 0.279; 3: 95.4 / 88.6 / 85.5, 0.151. The whole model on LM
    seed 3 against seed 0 (3,000 vision steps), whole test | compositional splits: 93.2 / 86.2 /
    81.5 | 90.0 / 83.3 / 65.3 % against 90.1 / 84.5 / 81.4 | 85.5 / 80.1 / 60.9. Later draws, not taken: 4 (89.0 / 84.7 /
    89.2 alone; its whole model 88.8 / 70.6 / 85.8 | 80.8 / 61.8 / 46.0), 5-8 (none with seed 3's
    colour questions; docs/micro-recipe.md)."""
    threads: int = 1
    """Torch threads per process (a fixed count: results are bitwise repeatable only for the same
    count). One: these matrices are too small for a second thread to pay; on the 2-core machine
    the recipe was measured on, two threads in one process made a step several times slower."""
    processes: int = 2
    """Processes that share every training phase (``torch.distributed``, gloo): each computes its
    share of every batch and DDP averages the gradients. Two processes of one thread use both cores
    of a 2-core machine where a second thread does not. Results are bitwise repeatable for the same
    count; a different count gives (slightly) different weights."""
    world_images: int = 6000
    """Images of the shapes world (80 % train, 5 % val, 5 % test, 10 % compositional)."""
    vocab_size: int = 1024
    """Largest tokenizer (the micro LM's embedding rows)."""
    template_tokens: bool = True
    """One token for each template marker and task tag (:func:`~tinygptv.recipes.world_tokenizer.
    template_tokens`): stage-4 turns a third shorter."""
    position_tokens: bool = False
    """One token for each two-word position (``top left``, ...; :func:`~tinygptv.recipes.
    world_tokenizer.position_tokens`), so that each of the nine position cells is one token, in the
    texts and in the object tokens that hold an object's position. Meant for the ``[identify]``
    answers that wrote the right position and then another object's name, most often where the two
    share a position word (``top`` / ``top left``). Measured (one 2,000-step LM phase, LM alone on 300
    validation images, ``benchmarks/probe_micro_lm.py``; against the same recipe with words, session
    20): ``[identify]`` 82.8 -> 77.0 %, ``[refer]`` 93.8 -> 37.8, VQA 90.3 -> 83.3 (position
    questions 39.3 %), final loss 0.17 -> 0.28: the LM stopped finding an object by its name (every
    ``[refer]`` question of a scene got the same box): off."""
    lm_documents: int = 20000
    """Texts of the world drawn for the tokenizer and the language-model pretraining."""
    lm: PretrainSettings = field(
        default_factory=lambda: PretrainSettings(
            steps=2000,
            batch_size=16,
            lr=3e-3,
            min_lr=3e-4,
            warmup_steps=30,
            drill_fraction=0.8,
            seq_len=224,
            drill_short_prompts=True,
            drill_full_names=True,
            drill_placed_names=True,
            head_at_targets_only=True,
            object_tokens=True,
            object_positions=True,
            coordinate_ramp=0.5,
        )
    )
    """Language-model pretraining (rows of ``seq_len`` tokens; most of them scene drills), reading
    scenes of object tokens that hold each object's words and position. 2,000 steps: the LM alone
    answers ``[identify]`` on true scenes far more than after 1,200 (64.6 % against 47.6, 300
    validation images), and since stage 4 answers ``[identify]`` with full names as the drills do
    (``configs/micro/stage4.yaml``), so does the whole model (whole test split 55.4 % against
    39.0, both with stage 4 of 800 steps; with the world's shortest phrases in stage 4 it did not:
    42.3 against 38.8; docs/micro-recipe.md). Its ``[identify]`` answers start with the object's position ("the
    top left large red star", ``drill_placed_names``, as stage 4 answers): with full names the LM
    found the object by the size word it had just written; the position words follow from the box
    and then pick the object out (the LM alone, 300 validation images, full names on the same
    machine -> position first: ``[identify]`` 76.3 -> 82.8 %, ``[refer]`` 65.4 -> 93.8 %, VQA
    89.0 -> 90.3 %; docs/micro-recipe.md). 3,000 steps did not help (the same world: ``[identify]`` 59.0 %,
    ``[refer]`` 73.1, VQA 90.7), and the outcome swings with the seed (seed 1, its own world:
    75.6 / 70.2 / 90.4), and so does the LM seed on one world (``lm_seed``, which takes the best of
    four draws; docs/micro-recipe.md)."""
    lm_anneal: LMAnneal = field(default_factory=lambda: LMAnneal(steps=1200, drill_fraction=1.0))
    """The LM trained on after the vision phase at a low learning rate, its embeddings frozen
    (:class:`LMAnneal`): 1,200 steps of scene drills alone (no packed texts), 3e-4 -> 1e-5. The LM
    alone on true scenes of 300 validation images (``benchmarks/probe_micro_lm.py``), VQA /
    ``[refer]`` / ``[identify]``: 95.4 / 88.6 / 85.5 % before; after 600 steps of the LM phase's mix
    95.8 / 90.4 / 86.7, 1,500 steps 96.0 / 90.4 / 86.4, 600 steps at 1e-3 95.6 / 90.3 / 85.9; after
    600 steps of drills alone 95.7 / 90.2 / 88.3, 1,200 (taken) 96.2 / 91.0 / 88.8 (test split:
    95.2 / 90.3 / 87.5 -> 96.3 / 92.7 / 90.7; session 28, docs/micro-recipe.md)."""
    vision: PretrainSettings = field(
        default_factory=lambda: PretrainSettings(
            steps=4000,
            batch_size=32,
            lr=4e-3,
            min_lr=1e-4,
            warmup_steps=30,
            object_weight=1.0,
            attention_weight=1.0,
            object_tokens=True,
            object_positions=True,
            pretrained_projections=True,
            fresh_images=True,
        )
    )
    """Vision encoder + Q-Former pretraining (the Q-Former writes the scenes the LM read). 4,000
    steps: its final loss falls with every lengthening (700 steps: 6.97 at the end, in a run with
    soft coordinate targets; 1,000: 4.73; 1,500: 4.19; 2,000: 4.00; 3,000: ~3.2, against the
    2,000-step LM; 3,000 -> 4,000 on LM seed 3: 3.14 -> 3.09), and so does the whole model's error
    (after stage 4, first 200 per task, test VQA / refer / identify: 700 steps 80.0 / 28.5 / 30.5 %,
    1,000 82.5 / 34.5 / 37.5, 1,500 85.5 / 45.0 / 40.5, 2,000 87.5 / 53.5 / 39.5, the last two with
    the stage settings of session 15; with session 18's LM and stage 4, whole test split, 2,000
    steps 88.3 / 61.7 / 58.0, 3,000 89.3 / 65.6 / 58.8; on LM seed 3, whole test | compositional
    splits, 3,000 steps 93.2 / 86.2 / 81.5 | 90.0 / 83.3 / 65.3, 4,000 92.9 / 86.1 / 83.6 | 90.4 /
    82.8 / 68.1, session 26). Each 500 steps cost ~300-450 s on two cores (the stem in
    channels-last since session 26, :class:`~tinygptv.model.vision.ConvStem`). Every step's images
    are new scenes (``fresh_images``, session 27): on the training split's 4,800 images, seen 27
    times each in 4,000 steps, the Q-Former wrote the object tokens of training images 99.5 % right
    and of test images 93.9 % (``benchmarks/probe_micro_vision.py``), so the stages, which train on
    those same images, never saw the errors it makes on new ones; on fresh images it writes test
    images' object tokens 97.2 % right (positions 97.3 against 94.6, boxes at IoU > 0.5 98.4
    against 95.4), and the whole model answers, whole test | compositional splits, 93.3 / 88.3 /
    84.0 | 89.5 / 86.0 / 75.3 against 92.9 / 86.1 / 83.6 | 90.4 / 82.8 / 68.1 (docs/micro-recipe.md).
    Rendering them costs ~2 ms an image."""
    calibrated_norms: bool = True
    """Start TinyGPT-V's added norms (QK LayerNorms, post-attention RMSNorms) as close to the identity
    as each can be on the pretrained micro LM's own activations (:func:`calibrate_added_norms`, on
    :data:`CALIBRATION_DRILLS` scene drills) instead of at weight 1 / bias 0. At 1 / 0 they rescale
    every query, key and attention output of an LM that was trained without them: the micro LM's
    drill loss goes from 0.25 to 1.69, and the stages must first repair what it had learnt."""
    conv_stem: bool = True
    """Give the micro ViT a convolutional stem (:data:`CONV_STEM` channels,
    :class:`~tinygptv.model.vision.ConvStem`) instead of the linear patch embedding: a hybrid ViT.
    A deviation from EVA-ViT-g's design, for a ViT trained from scratch only: it learns shape far
    sooner (per object patch after 300 probe steps: 36 % against 25 %), and the whole model built
    with it answers more (whole test split VQA / refer / identify 59.7 / 8.5 / 13.6 % against
    56.4 / 5.3 / 8.2 % without; docs/micro-recipe.md)."""
    readout_images: int = 0
    """Training images on which the base phase refits the two projections as the least-squares
    read-out of the pretrained Q-Former (:func:`~tinygptv.recipes.pretrain.fit_readout`: each query
    put nearest to the embedding row of its scene token) before stage 1; 0 (default): keep the
    vision pretraining's cross-entropy read-out (``vision.pretrained_projections``). That read-out
    picks the right row for ~93 % of the object tokens but writes vectors ~10x as long as the rows
    at a cosine of ~0.8, which the LM misreads; the refit (1,000 images) makes the model stage 1
    starts from answer far more (first 200 test questions, VQA / refer / identify: 72.0 / 5.5 / 48.5
    against 54.5 / 7.5 / 34.5), but after stage 4 it answers no more (83.0 / 52.0 / 42.5 against
    85.0 / 50.0 / 42.5; docs/micro-recipe.md), so it is off."""
    eval_limit: int | None = 200
    """Questions per task and split scored after each stage (``None``: all)."""
    eval_batch_size: int = 32
    """Questions answered per batch in the evaluations."""

    @property
    def language_seed(self) -> int:
        """The language-model phase's seed: ``lm_seed``, or ``seed`` where that is ``None``."""
        return self.seed if self.lm_seed is None else self.lm_seed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def set(self, key: str, value: str) -> None:
        """Set one setting from text: ``steps`` of the recipe, ``lm.lr`` of a pretraining loop; the
        value is read as YAML (``true``, ``1e-3``, ``null``) and must have the setting's type."""
        import yaml

        *parents, leaf = key.split(".")
        node: Any = self
        for part in parents:
            if not dataclasses.is_dataclass(getattr(node, part, None)):
                raise ValueError(f"unknown recipe setting {key!r}")
            node = getattr(node, part)
        fields = {f.name: f for f in dataclasses.fields(node)}
        if leaf not in fields or dataclasses.is_dataclass(getattr(node, leaf)):
            raise ValueError(f"unknown recipe setting {key!r}")
        current, parsed = getattr(node, leaf), yaml.safe_load(value)
        optional = "None" in str(fields[leaf].type)
        try:
            if parsed is None and optional:
                pass
            elif current is None:  # an optional setting now unset: its declared type
                kind = str(fields[leaf].type).split("|")[0].strip()
                if kind == "int" and (isinstance(parsed, bool) or not isinstance(parsed, int)):
                    raise ValueError
                if kind == "float":
                    parsed = float(value)
            elif isinstance(current, bool):
                if not isinstance(parsed, bool):
                    raise ValueError
            elif isinstance(current, int):
                if isinstance(parsed, bool) or not isinstance(parsed, int):
                    raise ValueError
            elif isinstance(current, float):
                parsed = float(value)
        except ValueError:
            raise ValueError(f"recipe setting {key!r} takes a {type(current).__name__}, got {value!r}") from None
        setattr(node, leaf, parsed)


def default_configs_dir() -> Path:
    """``configs/micro`` of the source tree this package was installed from (editable install)."""
    return Path(__file__).resolve().parents[2] / "configs" / "micro"


# =============================================================================================
# Bookkeeping: phases with times
# =============================================================================================


class Report:
    """What the recipe measured, written to ``report.json`` after every phase."""

    def __init__(self, out: Path, recipe: MicroRecipe, enabled: bool = True, resume: bool = False):
        self.enabled = enabled
        self.path = out / "report.json"
        self.data: dict[str, Any] = {"recipe": recipe.to_dict(), "phases": {}, "stages": {}, "accuracy": {}}
        if resume and self.path.is_file():
            self.data = json.loads(self.path.read_text())
            self.data["resumed"] = self.data.get("resumed", 0) + 1

    def done(self, name: str) -> bool:
        """Whether phase ``name`` finished in an earlier process of this run (``--resume``)."""
        return name in self.data["phases"]

    def phase(self, name: str, log: Logger):
        return _Phase(self, name, log)

    def save(self) -> None:
        if self.enabled:
            self.path.write_text(json.dumps(self.data, indent=2) + "\n")


class _Phase:
    def __init__(self, report: Report, name: str, log: Logger):
        self.report, self.name, self.log = report, name, log

    def __enter__(self):
        self.load = os.getloadavg()[0]
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        self.log(f"== {self.name} (load average {self.load:.2f})")
        return self

    def __exit__(self, kind, value, tb):
        if kind is not None:
            return False
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        record = {
            "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1),
            "load_start": round(self.load, 2),
            "load_end": round(os.getloadavg()[0], 2),
        }
        self.report.data["phases"][self.name] = record
        self.report.save()
        self.log(f"== {self.name} done in {wall:.1f} s (cpu {cpu:.1f} s, load average {record['load_end']:.2f})")
        return False


# =============================================================================================
# Phases 0-4: the world and the frozen parts
# =============================================================================================


CONV_STEM = (24, 48, 96, 128)
"""Channels of the micro ViT's convolutional stem when ``MicroRecipe.conv_stem`` is on: four stride-2
convolutions, so a 1x1 convolution makes the 16-px patch grid's tokens."""
_STEM_KEY = "vision.model.embeddings.patch_embedding.layers.{}.weight"


def micro_config(recipe: MicroRecipe):
    """The micro preset as ``recipe`` builds it."""
    from ..config import get_preset

    config = get_preset(PRESET)
    return config.replace(**{"vision.conv_stem": CONV_STEM}) if recipe.conv_stem else config


def stem_channels(vision_state: dict[str, Any]) -> tuple[int, ...]:
    """The convolutional stem's channels a pretrained vision state holds (empty: none)."""
    channels = []
    while _STEM_KEY.format(3 * len(channels)) in vision_state:
        channels.append(int(vision_state[_STEM_KEY.format(3 * len(channels))].shape[0]))
    return tuple(channels)


def plain_language_config(recipe_config):
    """The micro LM as pretrained: the preset's Phi without TinyGPT-V's two added norms."""
    return dataclasses.replace(recipe_config.language, qk_norm=False, post_attention_rmsnorm=False)


def pretrain_config(model_config):
    """The model the vision pretraining trains: the plain LM, no LoRA."""
    plain = plain_language_config(model_config)
    return dataclasses.replace(model_config, language=plain, lora=dataclasses.replace(model_config.lora, enabled=False))


def make_world(out: Path, recipe: MicroRecipe) -> Path:
    from ..data.shapes import make_shapes

    world = out / "world"
    if world.exists():
        shutil.rmtree(world)
    make_shapes(world, recipe.world_images, seed=recipe.seed)
    return world


def world_held_out(world: Path) -> list[tuple[str, str]]:
    """The colour-shape pairs a world keeps for its compositional split (its ``shapes.json``)."""
    return [tuple(pair) for pair in json.loads((world / "shapes.json").read_text())["held_out_pairs"]]


def build_tokenizer(out: Path, documents, recipe: MicroRecipe):
    from .world_tokenizer import train_world_tokenizer

    from .pretrain import document_texts

    tokenizer = train_world_tokenizer(
        document_texts(documents), recipe.vocab_size, recipe.template_tokens, recipe.position_tokens
    )
    tokenizer.save_pretrained(out / "tokenizer")
    return tokenizer


def build_language_model_phase(out: Path, tokenizer, documents, recipe: MicroRecipe, log: Logger) -> dict[str, Any]:
    """Pretrain the plain micro LM; saves ``lm/model.safetensors``, returns its state and losses."""
    import torch
    from safetensors.torch import save_file

    from ..config import get_preset
    from ..model.language import build_language_model
    from .pretrain import init_coordinate_embeddings, pretrain_language_model

    config = get_preset(PRESET)
    torch.manual_seed(recipe.language_seed)
    lm = build_language_model(plain_language_config(config), config.initializer_range)
    init_coordinate_embeddings(lm, tokenizer, ramp=recipe.lm.coordinate_ramp)
    losses = pretrain_language_model(lm, tokenizer, documents, recipe.lm, recipe.language_seed, log, held_out=world_held_out(out / "world"))
    state = {k: v.detach().contiguous() for k, v in lm.state_dict().items()}
    if _is_main():
        (out / "lm").mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / "lm" / "model.safetensors"))
    return {"state": state, "losses": losses}


def build_vision_phase(out: Path, world: Path, tokenizer, lm_state, recipe: MicroRecipe, log: Logger) -> dict[str, Any]:
    """Pretrain ViT + Q-Former through the frozen LM; saves ``vision/model.safetensors``."""
    import torch
    from safetensors.torch import save_file

    from ..model.tinygptv import TinyGPTV
    from .pretrain import pretrain_vision

    torch.manual_seed(recipe.seed + 1)
    model = TinyGPTV(pretrain_config(micro_config(recipe)), tokenizer=tokenizer)
    model.language_model.load_state_dict(lm_state)
    losses = pretrain_vision(model, world, recipe.vision, recipe.seed, log)
    state = {f"vision.{k}": v for k, v in model.vision.state_dict().items()}
    state.update({f"qformer.{k}": v for k, v in model.qformer.state_dict().items()})
    if recipe.vision.pretrained_projections:  # the stage-1 projections' start (assemble_base)
        for name in ("vision_proj", "lm_proj"):
            state.update({f"{name}.{k}": v for k, v in getattr(model, name).state_dict().items()})
    state = {k: v.detach().contiguous() for k, v in state.items()}
    if _is_main():
        (out / "vision").mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / "vision" / "model.safetensors"))
    return {"state": state, "losses": losses}


def pretrained_lm_file(run: str | Path) -> Path:
    """The language model a recipe run's stages started from: ``lm_anneal/`` where the run has it
    (runs before :class:`LMAnneal` do not), else ``lm/``."""
    run = Path(run)
    annealed = run / "lm_anneal" / "model.safetensors"
    return annealed if annealed.is_file() else run / "lm" / "model.safetensors"


def build_lm_anneal_phase(out: Path, tokenizer, documents, lm_state, recipe: MicroRecipe, log: Logger) -> dict[str, Any]:
    """Train the pretrained LM on at a low LR with its input embeddings frozen (:class:`LMAnneal`);
    saves ``lm_anneal/model.safetensors`` (the LM as it was, with ``steps`` 0) and returns its state
    and losses. ``documents`` may be None when ``steps`` is 0."""
    import torch
    from safetensors.torch import save_file

    from ..config import get_preset
    from ..model.language import build_language_model
    from .pretrain import pretrain_language_model

    anneal, losses = recipe.lm_anneal, []
    state = lm_state
    if anneal.steps:
        config = get_preset(PRESET)
        seed = recipe.language_seed + ANNEAL_SEED_OFFSET
        torch.manual_seed(seed)
        lm = build_language_model(plain_language_config(config), config.initializer_range)
        lm.load_state_dict(lm_state)
        embeddings = lm.get_input_embeddings().weight
        embeddings.requires_grad_(False)  # the table the Q-Former writes into (vision phase)
        settings = dataclasses.replace(
            recipe.lm, steps=anneal.steps, lr=anneal.lr, min_lr=anneal.min_lr, warmup_steps=anneal.warmup_steps
        )
        if anneal.drill_fraction is not None:
            settings.drill_fraction = anneal.drill_fraction
        losses = pretrain_language_model(
            lm, tokenizer, documents, settings, seed, log, held_out=world_held_out(out / "world")
        )
        state = {k: v.detach().contiguous() for k, v in lm.state_dict().items()}
    if _is_main():
        (out / "lm_anneal").mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / "lm_anneal" / "model.safetensors"))
    return {"state": state, "losses": losses}


CALIBRATION_DRILLS = 64
"""Scene drills whose activations :func:`calibrate_added_norms` fits the added norms on."""


def calibration_rows(tokenizer, world: Path, recipe: MicroRecipe):
    """The first :data:`CALIBRATION_DRILLS` scene drills of the language model's pretraining, as
    ``(token rows, object parts or None)``: what :func:`assemble_base` calibrates the added norms on."""
    from .pretrain import drill_rows, object_parts

    rows = drill_rows(tokenizer, range(CALIBRATION_DRILLS), recipe.language_seed, world_held_out(world), recipe.lm)[0]
    parts = object_parts(tokenizer, recipe.lm.object_positions) if recipe.lm.object_tokens else None
    return rows, parts


def calibrate_added_norms(lm, inputs_embeds, mask) -> dict[str, float]:
    """Set TinyGPT-V's added norms of ``lm`` (each attention's ``q_layernorm`` / ``k_layernorm`` and
    each layer's ``post_attention_norm``, whichever it has) to the affine maps that best reproduce
    their inputs: one pass over ``inputs_embeds`` (N, T, C) with every added norm passing its input
    through unchanged (the pretrained LM's own computation), then per channel the least-squares
    weight (and LayerNorm bias) from the normalised input to the input, over the tokens of
    ``mask`` (N, T), pooled over heads. Returns each norm's fraction of variance explained."""
    import torch

    norms = {
        name: module
        for name, module in lm.named_modules()
        if name.endswith(("q_layernorm", "k_layernorm", "post_attention_norm")) and hasattr(module, "weight")
    }
    seen: dict[str, torch.Tensor] = {}

    def through(name):
        def hook(module, args, output):
            seen[name] = args[0].detach()
            return args[0]  # the LM computes as if the norm were not there

        return hook

    hooks = [module.register_forward_hook(through(name)) for name, module in norms.items()]
    try:
        with torch.no_grad():
            lm(inputs_embeds=inputs_embeds, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    fit: dict[str, float] = {}
    with torch.no_grad():
        for name, norm in norms.items():
            x = seen[name].float()
            width = norm.weight.shape[0]
            if x.dim() == 4:  # queries / keys: (N, heads, T, D)
                x = x.transpose(1, 2)
            x = x[mask.bool()]  # the real tokens
            x = x.reshape(-1, width)
            if isinstance(norm, torch.nn.LayerNorm):
                unit = (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
                unit_mean, x_mean = unit.mean(0), x.mean(0)
                weight = ((unit - unit_mean) * (x - x_mean)).mean(0) / ((unit - unit_mean) ** 2).mean(0).clamp(min=1e-12)
                bias = x_mean - weight * unit_mean
                norm.bias.copy_(bias)
            else:  # RMSNorm: weight only
                unit = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
                weight = (unit * x).mean(0) / (unit * unit).mean(0).clamp(min=1e-12)
                bias = torch.zeros_like(weight)
            norm.weight.copy_(weight)
            fit[name] = float(1 - ((unit * weight + bias - x) ** 2).mean() / x.var().clamp(min=1e-12))
    return fit


def assemble_base(
    tokenizer,
    lm_state,
    vision_state,
    seed: int,
    overrides: dict[str, Any] | None = None,
    calibration=None,
):
    """The TinyGPT-V micro model before stage 1: the pretrained LM, ViT and Q-Former, with
    TinyGPT-V's added norms at their initial values (QK LayerNorms 1/0, RMSNorms 1; with
    ``calibration``, ``(token rows, object parts)``, fitted on the LM's activations on those rows by
    :func:`calibrate_added_norms`), a new LoRA (B = 0) and fresh projections, all drawn from ``seed``
    (projections in ``vision_state``, ``pretrained_projections``, are taken from there). ``overrides`` are dotted config
    overrides (the ablations remove modules this way). A convolutional stem in ``vision_state``
    goes into the config (:func:`stem_channels`)."""
    import torch

    from ..config import get_preset
    from ..model.tinygptv import TinyGPTV
    from ..model.weights import model_keys, parameter_kind

    stem = {"vision.conv_stem": stem_channels(vision_state)} if stem_channels(vision_state) else {}
    config = get_preset(PRESET).replace(**stem, **(overrides or {}))
    torch.manual_seed(seed)
    model = TinyGPTV(config, tokenizer=tokenizer)
    pretrained = {f"language_model.{k}": v for k, v in lm_state.items()}
    pretrained.update(vision_state)
    keys = model_keys(model)
    state = model.state_dict()
    unknown = sorted(set(pretrained) - set(keys))
    if unknown:
        raise ValueError(f"pretrained tensors the model does not have: {unknown[:5]}")
    with torch.no_grad():
        for canonical, tensor in pretrained.items():
            target = state[keys[canonical]]
            if target.shape != tensor.shape:
                raise ValueError(f"{canonical}: pretrained {tuple(tensor.shape)} vs model {tuple(target.shape)}")
            target.copy_(tensor)
    fresh = sorted(k for k in set(keys) - set(pretrained) if parameter_kind(k) == "pretrained" and "rotary" not in k)
    if fresh:
        raise ValueError(f"pretrained parts left at their random init: {fresh[:5]}")
    model.eval()
    if calibration is not None:  # (token rows, object parts): see calibrate_added_norms
        from .pretrain import embed_scene_ids

        rows, parts = calibration
        with torch.no_grad():
            embeds = embed_scene_ids(model.lm.get_input_embeddings(), rows, parts)
        calibrate_added_norms(model.lm, embeds, rows != tokenizer.pad_token_id)
    return model


def fit_base_readout(model, world: Path, recipe: MicroRecipe) -> float:
    """:func:`~tinygptv.recipes.pretrain.fit_readout` on ``recipe.readout_images`` images of ``world``
    (the scene tokens as the vision phase wrote them); returns the fit's relative error."""
    from .pretrain import fit_readout

    vision = recipe.vision
    return round(fit_readout(model, world, recipe.readout_images, recipe.seed, vision.object_tokens, vision.object_positions), 4)


# =============================================================================================
# Phases 5-8: the four TinyGPT-V stages
# =============================================================================================


def stage_config(
    configs_dir: Path,
    number: int,
    out: Path,
    world: Path,
    base: Path,
    recipe: MicroRecipe,
    overrides: Sequence[str] = (),
    model_overrides: dict[str, Any] | None = None,
):
    """``configs/micro/stage{number}.yaml`` with this recipe's paths and seed (and, for the
    ablations, dotted overrides of the model preset). ``overrides`` are ``key=value`` settings of
    every stage, or of one stage as ``stageN.key=value`` (``stage4.iters_per_epoch=500``)."""
    from ..train_config import load_train_config

    overrides = stage_overrides_for(number, overrides)
    path = configs_dir / f"stage{number}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no stage config {path}: pass the configs/micro directory of a source checkout")
    paths = [f"out_dir={out / f'stage{number}'}", f"data.root={world}", f"base_weights={base}", f"seed={recipe.seed}"]
    paths.append(f"init_from={out / f'stage{number - 1}'}" if number > 1 else "init_from=null")
    config = load_train_config(path, [*paths, *overrides])
    if config.stage != number:
        raise ValueError(f"{path} declares stage {config.stage}, expected {number}")
    stem = base_conv_stem(base)
    if stem:  # the base holds a stem the preset does not have; the base decides, not the recipe flag
        config.model_overrides = {**config.model_overrides, "vision.conv_stem": stem}
    if model_overrides:
        config.model_overrides = {**config.model_overrides, **model_overrides}
    return config


def stage_overrides_for(number: int, overrides: Sequence[str]) -> list[str]:
    """The ``key=value`` overrides that apply to stage ``number``: those of every stage, and those
    given as ``stage{number}.key=value`` with the prefix taken off."""
    mine = []
    for item in overrides:
        match = re.match(r"stage(\d+)\.(.+)", item)
        if not match:
            mine.append(item)
            continue
        if int(match.group(1)) not in STAGE_NUMBERS:
            raise ValueError(f"{item!r}: there is no stage {match.group(1)} (stages {STAGE_NUMBERS[0]}-{STAGE_NUMBERS[-1]})")
        if int(match.group(1)) == number:
            mine.append(match.group(2))
    return mine


def base_conv_stem(base: Path) -> tuple[int, ...]:
    """The convolutional stem of the assembled base in ``base`` (its ``config.json``), ``()`` if it has
    none or no base is there yet. Reading it from the base keeps ablations of a stem run (which reuse
    its base with the default recipe flags) building the architecture the weights hold."""
    path = Path(base) / "config.json"
    if not path.is_file():
        return ()
    import json

    stem = json.loads(path.read_text()).get("config", {}).get("vision", {}).get("conv_stem") or ()
    return tuple(int(c) for c in stem)


def final_loss(run_dir: Path, last: int = 10) -> float:
    """Mean training loss of the last ``last`` steps of a run."""
    from ..train_log import read_metrics

    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    tail = losses[-last:]
    return sum(tail) / len(tail)


def stage_model(base: Path, run_dir: Path):
    """The model at the end of a stage: the base with the stage's trainable weights."""
    from ..model.tinygptv import TinyGPTV
    from ..train import TRAINABLE_FILE, load_trainable

    model = TinyGPTV.from_pretrained(base)
    load_trainable(model, run_dir / TRAINABLE_FILE)
    return model.eval()


def evaluate(model, world: Path, recipe: MicroRecipe, limit: int | None = None) -> dict[str, dict[str, float]]:
    """Accuracy (%) per split and task on the shapes world (:func:`tinygptv.eval.shapes.evaluate_shapes`)."""
    from ..eval.shapes import evaluate_shapes

    summary = evaluate_shapes(
        model, world, EVAL_SPLITS, EVAL_TASKS, limit=limit, batch_size=recipe.eval_batch_size
    )
    return summary["accuracy"]


# =============================================================================================
# The whole recipe
# =============================================================================================


def run_micro_recipe(
    out: str | Path,
    recipe: MicroRecipe | None = None,
    configs_dir: str | Path | None = None,
    stage_overrides: Sequence[str] = (),
    evaluate_stages: bool = True,
    progress: bool = False,
    log: Logger = print,
    resume: bool = False,
    reuse: str | Path | None = None,
) -> dict[str, Any]:
    """Run every phase into ``out`` (which must not hold an earlier run) and return the report.

    ``reuse``: an earlier run whose finished phases this recipe would repeat exactly are taken
    from it instead of rerun (:func:`reuse_phases`): an experiment on the stages, or on the vision
    pretraining, starts where its settings first differ.

    ``resume=True`` continues a run that stopped (killed, crashed) in ``out``: the phases its
    ``report.json`` records as finished are loaded from their files instead of rerun, a stage that was
    cut short continues from its last checkpoint (the trainer's own resume), and the rest runs as
    before. The recipe must be the one the run was started with. Since every phase is seeded on its
    own, the finished model is the one an uninterrupted run writes.

    ``stage_overrides`` are ``key=value`` settings applied to every stage config (tests shorten the
    stages this way), or to one as ``stageN.key=value``; ``evaluate_stages=False`` skips the evaluations. With ``recipe.processes``
    above one, the phases run in that many processes started here (``log`` must then be picklable,
    e.g. ``print``); the first one writes every file and logs.
    """
    recipe = recipe or MicroRecipe()
    for name in ("object_tokens", "object_positions"):
        if getattr(recipe.lm, name) != getattr(recipe.vision, name):
            raise ValueError(
                f"lm.{name} and vision.{name} differ: the Q-Former must write scenes as the language model read them"
            )
    out = Path(out)
    configs_dir = Path(configs_dir) if configs_dir else default_configs_dir()
    for number in STAGE_NUMBERS:  # a bad stage setting fails now, not after the pretraining phases
        stage_config(configs_dir, number, out, out / "world", out / "base", recipe, stage_overrides)
    if reuse is not None:
        if resume:
            raise ValueError("--reuse starts a new run from an earlier one's phases; --resume continues a run: not both")
        taken = reuse_phases(reuse, out, recipe)
        log(f"reusing from {reuse}: {', '.join(taken) if taken else 'no phase (the first one differs or did not finish)'}")
        resume = bool(taken)
    if (out / "report.json").exists():
        if not resume:
            raise ValueError(f"{out} already holds a recipe run (report.json); choose another --out, or --resume it")
        check_resumable(out, recipe)
    out.mkdir(parents=True, exist_ok=True)
    args = (out, recipe, configs_dir, tuple(stage_overrides), evaluate_stages, progress, log, resume)
    if recipe.processes > 1:
        import torch.multiprocessing as mp

        parent = os.getpid()
        mp.start_processes(
            _recipe_process, args=(recipe.processes, _free_port(), args, parent), nprocs=recipe.processes, start_method="spawn"
        )
        return json.loads((out / "report.json").read_text())
    return _run_recipe(*args)


PHASE_FOLDERS = {
    "world": "world",
    "tokenizer": "tokenizer",
    "language model": "lm",
    "vision": "vision",
    "language model anneal": "lm_anneal",
    "base": "base",
}
"""The phases before the stages, in order, and the folder of ``--out`` each writes."""
PHASE_SETTINGS = {
    "world": ("seed", "world_images"),
    "tokenizer": ("vocab_size", "template_tokens", "position_tokens", "lm_documents"),
    "language model": ("lm", "lm_seed", "threads", "processes"),
    "vision": ("vision", "conv_stem"),
    "language model anneal": ("lm_anneal",),
    "base": ("calibrated_norms", "readout_images"),
}
"""The recipe settings each phase reads (besides what the phases before it made). A setting of
:class:`MicroRecipe` named nowhere here, other than the evaluations', counts for every phase."""
_STAGE_ONLY_SETTINGS = ("eval_limit", "eval_batch_size")
BEFORE_SETTING = {"lm_seed": None, "lm_anneal.steps": 0}
"""What a run recorded before a setting existed ran with, where that is not the setting's default
today (``lm_seed`` came with the default 3; older runs drew their LM with ``seed``; runs before
``lm_anneal`` did not anneal their LM)."""


def ran_setting(ran: dict[str, Any], default: dict[str, Any], key: str) -> Any:
    """Setting ``key`` (dotted) as the run whose flattened ``report.json`` recipe is ``ran`` had it: a
    setting newer than the run's code is missing from its report, and the run had what it does
    now by default, or its :data:`BEFORE_SETTING` value."""
    return ran[key] if key in ran else BEFORE_SETTING.get(key, default[key])


def reuse_phases(source: str | Path, out: str | Path, recipe: MicroRecipe) -> list[str]:
    """Start run ``out`` with the finished phases of run ``source`` that ``recipe`` would repeat.

    Phases are taken in order (world, tokenizer, language model, vision, language model anneal,
    base) while each is finished in ``source`` and ran with the same settings (:data:`PHASE_SETTINGS`, compared as
    ``source``'s ``report.json`` recorded them); the first that differs, and every phase after it,
    runs anew. The taken phases' folders are hard-linked into ``out`` (copied across file systems)
    and their report entries marked ``reused_from``. The stages always run anew. Returns the
    phases taken; ``out`` is then continued as by ``--resume``."""
    from ..train import flatten_dotted as flat

    source, out = Path(source), Path(out)
    if not (source / "report.json").is_file():
        raise FileNotFoundError(f"{source} is not a recipe run (no report.json)")
    if (out / "report.json").exists():
        raise ValueError(f"{out} already holds a recipe run; --reuse starts a new one")
    ran_report = json.loads((source / "report.json").read_text())
    default = flat(json.loads(json.dumps(MicroRecipe().to_dict())))
    ran = flat(ran_report.get("recipe", {}))
    wanted = flat(json.loads(json.dumps(recipe.to_dict())))
    named = {key for keys in PHASE_SETTINGS.values() for key in keys} | set(_STAGE_ONLY_SETTINGS)
    unnamed = {key.split(".")[0] for key in wanted} - named

    def differs(key: str) -> bool:
        return any(
            ran_setting(ran, default, k) != v for k, v in wanted.items() if k == key or k.startswith(key + ".")
        )

    report = Report(out, recipe)
    taken: list[str] = []
    for name, folder in PHASE_FOLDERS.items():
        keys = PHASE_SETTINGS[name] + (tuple(unnamed) if name == "world" else ())
        if name not in ran_report.get("phases", {}) or not (source / folder).is_dir() or any(map(differs, keys)):
            break
        out.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copytree(source / folder, out / folder, copy_function=os.link)
        except OSError:  # another file system: copy
            shutil.rmtree(out / folder, ignore_errors=True)
            shutil.copytree(source / folder, out / folder)
        report.data["phases"][name] = {**ran_report["phases"][name], "reused_from": str(source)}
        taken.append(name)
    if "tokenizer" in taken and "tokenizer" in ran_report:
        report.data["tokenizer"] = ran_report["tokenizer"]
    losses = {k: v for k, v in ran_report.get("pretrain_loss", {}).items() if k in taken}
    if losses:
        report.data["pretrain_loss"] = losses
    if taken:
        report.save()
    return taken


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_with_parent(parent: int) -> None:
    """Have this process end (SIGTERM) when process ``parent``, which started it, dies, by any signal
    (SIGKILL included), so that a killed recipe leaves no worker training on. Linux only (``prctl``'s
    PR_SET_PDEATHSIG); elsewhere a no-op. If ``parent`` is already gone, end now."""
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
        return
    if os.getppid() != parent:  # it died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


def _recipe_process(rank: int, processes: int, port: int, args, parent: int | None = None) -> None:
    """One process of a multi-process recipe: join the group (as ``torchrun`` would set it up, which the
    trainer's stages expect), run every phase, leave the group. It ends with process ``parent`` (the
    one that started it) if that one is killed."""
    import sys

    import torch.distributed as dist

    if parent is not None:
        exit_with_parent(parent)
    sys.stdout.reconfigure(line_buffering=True)  # the log shows up as it is written
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    dist.init_process_group("gloo", rank=rank, world_size=processes)
    try:
        _run_recipe(*args)
    finally:
        dist.destroy_process_group()


def _is_main() -> bool:
    from .pretrain import process_group

    return process_group()[0] == 0


def _barrier() -> None:
    """Wait for every process of the group (no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _quiet(message: str) -> None:
    """The log of every process but the first."""


def check_resumable(out: Path, recipe: MicroRecipe) -> None:
    """Refuse to resume ``out`` with a recipe other than the one its run started with."""
    from ..train import flatten_dotted as flat

    ran = flat(json.loads((out / "report.json").read_text()).get("recipe", {}))
    wanted = flat(json.loads(json.dumps(recipe.to_dict())))  # as JSON has it (tuples are lists)
    default = flat(json.loads(json.dumps(MicroRecipe().to_dict())))
    diffs = [f"{k}: {ran_setting(ran, default, k)!r} (run) vs {v!r} (now)" for k, v in wanted.items() if ran_setting(ran, default, k) != v]
    if diffs:
        raise ValueError(f"{out} was started with another recipe ({'; '.join(diffs)}); resume it with the same settings")


def _run_recipe(out, recipe, configs_dir, stage_overrides, evaluate_stages, progress, log, resume=False) -> dict[str, Any]:
    import torch

    from ..train import train

    main = _is_main()
    log = log if main else _quiet
    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True)
    report = Report(out, recipe, enabled=main, resume=resume)
    report.data["processes"] = recipe.processes
    overrides = [f"progress={str(progress and main).lower()}", *stage_overrides]
    start = time.perf_counter()
    world, base = out / "world", out / "base"
    if resume and report.data["phases"]:
        log(f"resuming {out}: done before: {', '.join(report.data['phases'])}")

    if not report.done("world"):
        with report.phase("world", log):
            if main:
                make_world(out, recipe)
            _barrier()
    from transformers import PreTrainedTokenizerFast

    from .pretrain import world_documents

    documents = None
    if not report.done("tokenizer"):
        with report.phase("tokenizer", log):
            documents = world_documents(world, recipe.lm_documents, recipe.seed)
            if main:
                build_tokenizer(out, documents, recipe)
            _barrier()
            report.data["tokenizer"] = {"tokens": len(PreTrainedTokenizerFast.from_pretrained(out / "tokenizer"))}
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out / "tokenizer")
    if report.done("language model"):
        lm = {"state": _load_state(out / "lm")}
    else:
        with report.phase("language model", log):
            if documents is None:
                documents = world_documents(world, recipe.lm_documents, recipe.seed)
            lm = build_language_model_phase(out, tokenizer, documents, recipe, log)
            report.data["pretrain_loss"] = {"language model": _tail_mean(lm["losses"])}
    if report.done("vision"):
        vision = {"state": _load_state(out / "vision")}
    else:
        with report.phase("vision", log):
            vision = build_vision_phase(out, world, tokenizer, lm["state"], recipe, log)
            report.data["pretrain_loss"]["vision"] = _tail_mean(vision["losses"])
    if report.done("language model anneal"):
        lm = {"state": _load_state(out / "lm_anneal")}
    else:
        with report.phase("language model anneal", log):
            if documents is None and recipe.lm_anneal.steps:
                documents = world_documents(world, recipe.lm_documents, recipe.seed)
            lm = build_lm_anneal_phase(out, tokenizer, documents, lm["state"], recipe, log)
            if lm["losses"]:
                report.data.setdefault("pretrain_loss", {})["language model anneal"] = _tail_mean(lm["losses"])
    if not report.done("base"):
        with report.phase("base", log):
            if main:
                calibration = calibration_rows(tokenizer, world, recipe) if recipe.calibrated_norms else None
                model = assemble_base(tokenizer, lm["state"], vision["state"], recipe.seed, calibration=calibration)
                if recipe.readout_images:
                    report.data["readout_error"] = fit_base_readout(model, world, recipe)
                model.save_pretrained(base)
            _barrier()

    from ..train import is_finished

    for number in STAGE_NUMBERS:
        run_dir = out / f"stage{number}"
        if not report.done(f"stage {number}"):
            with report.phase(f"stage {number}", log):
                config = stage_config(configs_dir, number, out, world, base, recipe, overrides)
                if not (resume and is_finished(run_dir)):  # a stage that finished before its report was written
                    train(config, resume=resume and (run_dir / "checkpoints").is_dir())
                _barrier()
                if main:
                    report.data["stages"][str(number)] = {"final_loss": round(final_loss(run_dir), 4)}
        if evaluate_stages and not report.done(f"eval {number}"):
            with report.phase(f"eval {number}", log):
                if main:
                    accuracy = evaluate(stage_model(base, run_dir), world, recipe, recipe.eval_limit)
                    report.data["accuracy"][str(number)] = accuracy
                    log(format_accuracy({str(number): accuracy}))
                _barrier()

    with report.phase("package", log):
        if main:
            package(base, out / "stage4", out / "model")
        _barrier()
    report.data["total_wall_s"] = round(time.perf_counter() - start, 1)
    if report.data.get("resumed"):  # this process saw only part of the run: add up the phases instead
        report.data["total_wall_s"] = round(sum(p["wall_s"] for p in report.data["phases"].values()), 1)
    report.save()
    if main:
        (out / "report.md").write_text(format_report(report.data) + "\n")
        log(format_report(report.data))
    return report.data


def _load_state(folder: Path) -> dict[str, Any]:
    """The tensors a pretraining phase saved in ``folder/model.safetensors`` (read into memory)."""
    from safetensors.torch import load_file

    path = folder / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the report says its phase finished; rerun into a new --out")
    return {k: v.clone() for k, v in load_file(str(path)).items()}


def package(base: Path, run_dir: Path, target: Path) -> Path:
    """The finished model in one directory of our format: base + the last stage, LoRA merged."""
    model = stage_model(base, run_dir)
    model.merge_lora()
    if target.exists():
        shutil.rmtree(target)
    model.save_pretrained(target)
    return target


def _tail_mean(losses: Sequence[float], last: int = 10) -> float:
    tail = list(losses)[-last:]
    return round(sum(tail) / len(tail), 4)


# =============================================================================================
# Tables
# =============================================================================================


def format_accuracy(accuracy: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: one row per stage, one column per split/task."""
    columns = [(s, t) for s in EVAL_SPLITS for t in EVAL_TASKS]
    lines = [
        "| after stage | " + " | ".join(f"{s} {t}" for s, t in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for stage, table in accuracy.items():
        cells = [_percent(table.get(s, {}).get(t)) for s, t in columns]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _percent(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_report(data: dict[str, Any]) -> str:
    lines = ["## Phases", "", "| phase | wall s | cpu s | load average (start/end) |", "|---|---|---|---|"]
    for name, p in data["phases"].items():
        reused = f" (reused from {p['reused_from']})" if p.get("reused_from") else ""
        lines.append(f"| {name}{reused} | {p['wall_s']} | {p['cpu_s']} | {p['load_start']} / {p['load_end']} |")
    training = [p for name, p in data["phases"].items() if not name.startswith("eval")]
    if training:
        wall, cpu = (round(sum(p[k] for p in training), 1) for k in ("wall_s", "cpu_s"))
        lines.append(f"| **training** (every phase but the evaluations) | **{wall}** | **{cpu}** | |")
    if "total_wall_s" in data:
        lines.append(f"| **total** | **{data['total_wall_s']}** | | |")
    lines += ["", "## Losses", "", "| phase | final loss (mean of the last 10 steps) |", "|---|---|"]
    for name, loss in data.get("pretrain_loss", {}).items():
        lines.append(f"| pretrain {name} | {loss} |")
    for number, stage in data["stages"].items():
        lines.append(f"| stage {number} | {stage['final_loss']} |")
    if data["accuracy"]:
        limit = data["recipe"]["eval_limit"]
        lines += ["", f"## Accuracy (%) after each stage (first {limit} questions per task and split)", ""]
        lines.append(format_accuracy(data["accuracy"]))
    return "\n".join(lines)


# =============================================================================================
# The ablation (the paper's Table 4)
# =============================================================================================

ABLATIONS: dict[str, dict[str, Any]] = {
    "TinyGPT-V": {},
    "- LoRA": {"lora.enabled": False},
    "- input LayerNorm": {"train_input_layernorm": False},
    "- RMSNorm": {"language.post_attention_rmsnorm": False},
    "- QK Norm": {"language.qk_norm": False},
}
"""The paper's Table 4 rows: the full model, then each of its four changes removed (a preset override)."""


def run_ablation(
    recipe_dir: str | Path,
    out: str | Path,
    recipe: MicroRecipe | None = None,
    configs_dir: str | Path | None = None,
    variants: Sequence[str] | None = None,
    stage_overrides: Sequence[str] = (),
    evaluate_final: bool = True,
    log: Logger = print,
) -> dict[str, Any]:
    """The four stages again for each of :data:`ABLATIONS`, on the frozen parts of a finished
    micro recipe run (``recipe_dir``: its ``world``, ``tokenizer``, LM (``lm_anneal`` or ``lm``) and ``vision``), so
    only what the paper's ablation changes differs. A stage the trainer stops (NaN/Inf loss or
    gradient, vanished gradients) is recorded with the trainer's message and ends that row.
    Returns ``{variant: {"stages": {n: loss | None}, "failure": str | None, "accuracy": ...}}``,
    also written to ``out/ablation.json``."""
    import torch
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast

    from ..train import TrainingStopped, train

    recipe = recipe or MicroRecipe()
    recipe_dir, out = Path(recipe_dir), Path(out)
    configs_dir = Path(configs_dir) if configs_dir else default_configs_dir()
    for part in ("world", "tokenizer", pretrained_lm_file(recipe_dir).relative_to(recipe_dir), "vision/model.safetensors"):
        if not (recipe_dir / part).exists():
            raise FileNotFoundError(f"{recipe_dir / part} is missing: pass the --out folder of `tinygptv recipe micro`")
    names = list(variants or ABLATIONS)
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; choose from {list(ABLATIONS)}")
    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(recipe_dir / "tokenizer")
    lm_state = load_file(str(pretrained_lm_file(recipe_dir)))
    vision_state = load_file(str(recipe_dir / "vision" / "model.safetensors"))
    world = recipe_dir / "world"
    results: dict[str, Any] = {}
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        overrides = ABLATIONS[name]
        folder = out / _slug(name)
        base = folder / "base"
        calibration = calibration_rows(tokenizer, world, recipe) if recipe.calibrated_norms else None
        model = assemble_base(tokenizer, lm_state, vision_state, recipe.seed, overrides, calibration)
        if recipe.readout_images:
            fit_base_readout(model, world, recipe)
        model.save_pretrained(base)
        row: dict[str, Any] = {"stages": {}, "failure": None, "accuracy": None}
        run_dir = None
        for number in STAGE_NUMBERS:
            log(f"== {name}: stage {number}")
            config = stage_config(
                configs_dir, number, folder, world, base, recipe, ["progress=false", *stage_overrides], overrides
            )
            try:
                run_dir = train(config)
            except TrainingStopped as stop:
                row["failure"] = f"stage {number}: {stop}"
                log(f"{name}: {stop}")
                break
            row["stages"][str(number)] = round(final_loss(run_dir), 4)
        if evaluate_final and row["failure"] is None and run_dir is not None:
            row["accuracy"] = evaluate(stage_model(base, run_dir), world, recipe, recipe.eval_limit)
        results[name] = row
        (out / "ablation.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "ablation.md").write_text(format_ablation(results) + "\n")
    return results


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-") or "full"


def format_ablation(results: dict[str, Any]) -> str:
    """Markdown shaped like the paper's Table 4: the final loss of each stage per variant, the
    failure where the trainer stopped one, and (when measured) test accuracy after stage 4."""
    lines = [
        "| method | stage 1 | stage 2 | stage 3 | stage 4 | test vqa | test refer | test identify |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        cells = []
        for number in STAGE_NUMBERS:
            loss = row["stages"].get(str(number))
            if loss is not None:
                cells.append(f"{loss:.4f}")
            elif row["failure"] and row["failure"].startswith(f"stage {number}:"):
                cells.append("stopped: " + row["failure"].split(":", 1)[1].strip().split(".")[0])
            else:
                cells.append("-")
        test = (row.get("accuracy") or {}).get("test", {})
        cells += [_percent(test.get(t)) for t in EVAL_TASKS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "ABLATIONS",
    "format_ablation",
    "run_ablation",
    "EVAL_SPLITS",
    "EVAL_TASKS",
    "MicroRecipe",
    "assemble_base",
    "calibrate_added_norms",
    "micro_config",
    "stem_channels",
    "default_configs_dir",
    "evaluate",
    "format_accuracy",
    "format_report",
    "package",
    "run_micro_recipe",
    "stage_config",
    "stage_model",
]
