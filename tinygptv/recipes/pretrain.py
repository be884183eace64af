"""Pretraining the micro model's frozen parts, which the paper takes ready-made.

TinyGPT-V starts from three pretrained, frozen components: Phi-2 (a language model), EVA-ViT-g and
BLIP-2's Q-Former (an image encoder whose 32 query outputs already describe the image in a form a
language model can read). The micro model has no such ingredients, so the micro recipe makes its
own, on the shapes world, before the four TinyGPT-V stages:

1. **Language model** (:func:`pretrain_language_model`): a plain causal-LM run of the micro Phi
   (:class:`~tinygptv.model.language.TinyGPTVPhiForCausalLM`) on text-only renderings of the
   world's texts in each stage's template (:func:`world_documents`), packed into fixed-length rows.
   Where a text has an image, the LM reads the image's 32 *scene tokens* instead
   (:func:`scene_tokens`: the background, then each object's size, colour, shape and box, in a
   random order; in the micro recipe each object is one *object token*, the sum of its words'
   embeddings, position words included, then its box), never as targets: it learns to answer, describe and locate from a written scene,
   as a real LLM has read countless descriptions of scenes. Most rows of each batch are *scene
   drills* (:func:`drill_document`): a fresh text-only scene drawn by the world's own generator,
   followed by a dozen stage-4 questions about it (``[vqa]``, ``[refer]``, ``[identify]``), so
   that looking a scene up, not remembering the training images, is what lowers the loss. In the
   options, drills ask in each task's first phrasing (a drill then fits a row) and answer
   ``[identify]`` with the object's full name, and the output head runs at the answers only
   (:class:`TargetPositionsLoss`). The box coordinates' embeddings start as a code of their value
   (:func:`init_coordinate_embeddings`).
   Like Phi-2 it is trained *without*
   TinyGPT-V's QK norm and post-attention RMSNorm: those are TinyGPT-V's additions, put on top of
   the pretrained LM at their identity-like init when the base model is assembled, exactly as the
   paper adds them to Phi-2. This keeps the Table 4 ablation meaningful too.

2. **Vision encoder + Q-Former** (:func:`pretrain_vision`): the ViT learns dense per-patch targets
   (:class:`DenseTargets`: what object each patch belongs to and its box, as a detector's backbone
   does), and the Q-Former's 32 queries learn to become the image's scene tokens, objects in
   reading order, in the frozen LM's embedding space (:class:`VisionHeads`), the form in which the
   LM read images in step 1. BLIP-2's Q-Former likewise learns to hand a frozen LM what it can
   read; here the target is given token by token, which a CPU budget can afford to learn, where
   a contrastive loss (satisfied by a few salient attributes) asks nothing about boxes. The
   temporary heads are then thrown away, but for the read-out into the LM's space, which with
   ``pretrained_projections`` starts the stage-1 projections (as MiniGPT-4's projection starts
   the paper's).

Both loops are deterministic: the data order is a pure function of the seed, and nothing else is
random but the seeded model init. In a ``torch.distributed`` group (the recipe's ``processes``)
each process computes its share of every batch under DDP. How far they get in the recipe's budget is measured in the
recipe's report (and in docs/micro-recipe.md): not yet far enough.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.encoding import IGNORE_INDEX, IMAGE_TOKEN_ID, encode_chunks

if TYPE_CHECKING:
    from ..data.shapes import Scene

Chunks = list[tuple[str, bool]]
Document = tuple[Chunks, "Scene | None"]
"""A text of the world: its template chunks, and the scene of its image (None: no image)."""
Logger = Callable[[str], None]


@dataclass
class PretrainSettings:
    """One pretraining loop: AdamW with a linear warm-up and a cosine decay."""

    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 16
    """Rows (language model) or samples (vision) per step."""
    lr: float = 1e-3
    """Peak learning rate, reached after the warm-up."""
    min_lr: float = 1e-4
    """Learning rate at the last step."""
    warmup_steps: int = 30
    """Steps of linear warm-up from ``lr / 100``."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay on matrices (none on norms and biases)."""
    seq_len: int = 256
    """Language model only: tokens per packed row."""
    drill_fraction: float = 0.0
    """Language model only: share of each batch's rows that are scene drills (:func:`drill_document`:
    a fresh scene and every stage-4 question about it); the rest are packed world documents."""
    object_weight: float = 0.0
    """Vision only: weight of the dense cross-entropy over object patches alone, on top of the one over
    every patch (:class:`VisionHeads`)."""
    drill_questions: int = 6
    """Language model only: ``[vqa]`` questions per drill (its ``[refer]`` / ``[identify]`` pairs
    come on top, one each per object that a phrase picks out)."""
    set_matching: bool = False
    """Vision only: the Q-Former's object groups are matched to the scene's objects as a set (each
    image's cheapest of the 24 ways to put its objects and empty groups in the four groups, as DETR
    matches its queries), instead of in reading order. The language model reads the groups in any
    order, so no query has to work out which object is the k-th from the left. Measured no better
    than reading order on the micro model (docs/micro-recipe.md), so off by default."""
    fresh_images: bool = False
    """Vision only: every step's images are new scenes drawn by the world's generator (the training
    split's rules: no held-out colour-shape pair) and rendered on the fly, as drills are for the
    language model, instead of the training split's few thousand images seen again and again. On in
    the micro recipe since session 27, where 4,000 steps on the same 4,800 images had overfitted
    them (object tokens right on 99.5 % of training images' objects, 93.9 % of test images')."""
    attention_weight: float = 0.0
    """Vision only: weight of a loss on where the Q-Former looks: in its first cross-attention layer
    (heads averaged), the queries that write object ``k``'s tokens should spread their attention over
    that object's patches (cross-entropy against a uniform distribution over them; objects absent
    from the scene add nothing). The token loss alone has to discover where each object is; this
    says it directly, as the dense targets do for the ViT. On in the micro recipe (1.0): with it the
    whole model's test-split ``[identify]`` accuracy went from 13.6 to 22.0 % and ``[refer]`` from
    8.5 to 10.5 % (docs/micro-recipe.md)."""
    coordinate_sigma: float = 0.0
    """Vision only: where a query must become a box coordinate ``<v>``, its cross-entropy target is
    spread over the neighbouring coordinates (a Gaussian over ``<0>`` ... ``<100>`` of this standard
    deviation, in coordinate units) instead of ``<v>`` alone: a query that writes ``<v+1>`` is nearly
    right (IoU barely moves) and the loss says so, where a one-hot target calls it as wrong as
    ``<v+40>``. 0: one-hot. Measured only together with ``drill_isolated_turns`` (1.5): that build
    answered ``[refer]`` no better (3.0 % of the first 200 test questions, as a build with isolated
    turns and no soft targets, against 7.5 % without either; docs/micro-recipe.md), so off."""
    pretrained_projections: bool = False
    """Vision only: the stage-1 model starts its two projections (``vision_proj``, ``lm_proj``) from
    this loop's read-out head (``VisionHeads.to_lm``, fitted with the Q-Former to put its outputs
    on the LM's scene tokens), factored exactly into the two (:func:`factor_projection`), instead
    of a fresh Gaussian init. The paper's stage 1 likewise starts ``vision_proj`` from MiniGPT-4's
    projection, trained to map the Q-Former's outputs into an LLM's input space; the micro model
    has no MiniGPT-4, and its vision pretraining plays that role."""
    coordinate_ramp: float = 0.0
    """Language model only: :func:`init_coordinate_embeddings`' ``ramp``: two dimensions of every box
    coordinate's starting embedding that grow linearly and quadratically with its value (0: none)."""
    drill_isolated_turns: bool = False
    """Language model only: each of a drill's questions sees the scene and itself alone, as a
    one-question prompt would (:func:`drill_document`): the questions share the scene's tokens in
    one row but attend to no other question or answer, and their positions restart after the scene.
    In a drill read as one conversation, earlier turns give later answers away (an ``[identify]``
    after the ``[refer]`` of the same object copies its phrase from that question; a ``[refer]``
    phrase says which colour-shape pairs exist), so the LM is rewarded for reading the text before
    it, not the scene, and the benchmark asks single questions about the scene. Measured: the LM
    alone on true scenes answers alike with and without (``benchmarks/probe_micro_lm.py``; docs/micro-recipe.md),
    so the leak was not what held it back. With object tokens (session 19): the box match of
    ``[identify]`` forms a layer earlier (``benchmarks/probe_micro_lookup.py``), but the LM alone
    answered ``[identify]`` on 58.4 % against 64.6 without (one run each), so still off."""
    head_at_targets_only: bool = False
    """Language model only: apply the output head at the target positions alone
    (:class:`TargetPositionsLoss`; the same loss, less compute, not the same bits)."""
    drill_full_names: bool = False
    """Language model only: a drill's ``[identify]`` answers name the object by size, colour and shape
    wherever that picks it out alone (:func:`drill_document`), instead of the world's shortest phrase."""
    drill_placed_names: bool = False
    """Language model only: a drill's ``[identify]`` answers name the object by its position, then
    size, colour and shape ("the top left large red star", :func:`~tinygptv.data.shapes.placed_name`),
    instead of its full name (over ``drill_full_names``). The LM alone finds the object of a full-name
    answer by the size word it has just written, not by the box (right on 52 % of boxes where another
    object shares the size; docs/micro-recipe.md): the box is matched only in its last layer. The position words
    follow from the box alone (thirds of its centre), and they pick the object out in 96 % of the
    test split's boxes, so the words after them are a one-step look-up like a colour word's.
    Measured (2,000 LM steps, LM alone on 300 validation images): ``[identify]`` 64.6 -> 82.8 %
    (76.3 for full names retrained on the same machine), ``[refer]`` 64.3 -> 93.8 % (65.4),
    VQA 89.5 -> 90.3 % (89.0); the whole model built on it, whole test split:
    ``[identify]`` 58.8 -> 80.5 %, ``[refer]`` 65.6 -> 84.5 % (docs/micro-recipe.md). On in the micro recipe."""
    drill_short_prompts: bool = False
    """Language model only: drills ask every question with its task's first (shortest) phrasing
    instead of a random one, so a row holds more questions (the packed world documents keep every
    phrasing)."""
    object_tokens: bool = False
    """Both loops (the recipe refuses a run where they differ): write each object of a scene as one
    *object token* (:func:`scene_tokens`), a vector that is the sum of the embeddings of its size,
    colour and shape words, instead of three tokens in a row. Reading "the colour of the square"
    off a scene of word tokens means finding the position of ``square`` and taking the word one
    position earlier, a two-step lookup across positions that the micro LM did not learn (every
    wrong colour or shape answer of the LM alone named another object's; docs/micro-recipe.md); an object token
    holds all three in one vector, so one attention step finds the object and reads it. A
    held-out colour-shape pair is the sum of words the LM knows, so it stays readable."""
    object_positions: bool = False
    """Both loops, with ``object_tokens``: an object token also sums the words of where the object
    is (``top left``, ``center``, ...: its box centre by thirds, as the world's texts say it), so
    "where is the red circle" is answered from the object token as its colour is, instead of by
    working the thirds out of four box coordinates."""
    drill_color_first: bool = False
    """Language model only: a drill's ``[vqa]`` questions hold every colour question its scene has
    (up to ``drill_questions``) before the other kinds (:func:`drill_document`). A colour question is
    the one kind whose object is named by its shape alone, and the LM alone answered it on 59-61 %
    of true scenes (shape questions, named by colour: 100 %): in its first layer, heads at a colour
    word attend to the object token that holds it (~100 % on the right one), while at a shape word
    no head does (``benchmarks/probe_micro_lm.py``, docs/micro-recipe.md). Colours name the object in most
    questions and phrases, so that is the look-up the LM learned; the shape look-up had only the
    colour questions to learn from, one in seven of a drill's questions. Measured with
    ``drill_shape_phrases`` (2,000 LM steps, LM alone on 300 validation images): no head finds the
    object at the shape word still, colour questions 56.9 %, and position questions fell from 91.4 to
    62.3 % (colour questions crowd them out of a drill's six), ``[refer]`` from 64.3 to 32.0: off."""
    drill_shape_phrases: bool = False
    """Language model only: a drill's ``[refer]`` question names its object by its shape alone ("the
    star") wherever that picks it out alone (:func:`drill_document`), instead of the world's phrase,
    which does so one time in three. The same look-up as a colour question (by shape): the whole
    model answered such ``[refer]`` questions on 39.5 % of the test split, and those naming a colour
    and a shape on 75.9 % (docs/micro-recipe.md). Measured only with ``drill_color_first`` (above): off."""
    log_every: int = 50
    """Report the mean loss every this many steps."""


# =============================================================================================
# The world's texts
# =============================================================================================

DOCUMENT_RATIOS = {
    "shapes_pairs": 5.0,
    "shapes_detail": 5.0,
    "shapes_vqa": 30.0,
    "shapes_refer": 30.0,
    "shapes_identify": 20.0,
    "shapes_grounding": 3.0,
    "shapes_caption": 2.0,
    "shapes_conversation": 4.0,
    "shapes_text": 1.0,
}
"""How often each of the world's texts is drawn for the language model: every stage's texts, the
question-answer kinds most (reading a scene to answer is what the LM must learn from them)."""

_IMAGE_KEYED = ("shapes_pairs", "shapes_detail", "shapes_grounding", "shapes_conversation", "shapes_caption")
"""Sources whose sample id is the image id; the others (questions, referring annotations) number
their records ``image_id * 10 + k`` (:mod:`tinygptv.data.shapes`)."""


SCENE_OBJECTS = 4
"""Object groups in a scene's token sequence (the world draws 1-4 objects per image)."""
GROUP = ("size", "color", "shape", "x1", "y1", "x2", "y2")
"""One object's tokens, in order: its words and its 0-100 box corners."""
SCENE_LENGTH = 3 + SCENE_OBJECTS * len(GROUP) + 1
"""Tokens of a scene: background (3), object groups, an end token: 32, one per Q-Former query."""
EMPTY = "."
"""The token that fills the groups of absent objects and ends the scene."""
OBJECT_GROUP = ("object", "x1", "y1", "x2", "y2", "object", "object")
"""One object's tokens with ``object_tokens`` (:func:`scene_tokens`): its object token, its box, and
its object token twice more, so that the groups keep :data:`GROUP`'s width and a scene its 32
tokens (one per Q-Former query); an object token after the box lets ``[identify]`` read the box
just before it, as the one before the box lets ``[refer]`` read the box just after it."""
OBJECT_ID_BASE = 1 << 20
"""Object token ``k`` (:func:`object_words`) has id ``OBJECT_ID_BASE + k`` in scene token rows: far
above any vocabulary, as it has no row of its own (:func:`embed_scene_ids` makes its vector)."""


POSITIONS = tuple(
    " ".join(w for w in (vertical, horizontal) if w) or "center"
    for vertical in ("top", "", "bottom")
    for horizontal in ("left", "", "right")
)
"""The world's nine position phrases (:func:`~tinygptv.data.shapes.position_word`)."""


def object_words(positions: bool = False) -> list[tuple[str, ...]]:
    """Every object the world can draw, as (size, colour, shape), or with ``positions`` as (size,
    colour, shape, position word(s)) in each of the :data:`POSITIONS`: object token ``k`` is the
    ``k``-th."""
    from ..data.shapes import COLORS, SHAPES, SIZES

    kinds = [(size, color, shape) for size in SIZES for color in COLORS for shape in SHAPES]
    if not positions:
        return kinds
    return [(*kind, *where.split()) for kind in kinds for where in POSITIONS]


@functools.lru_cache(maxsize=2)
def _object_index(positions: bool) -> dict[tuple[str, ...], int]:
    """:func:`object_words` -> object token number (built once: every scene written looks it up)."""
    return {words: k for k, words in enumerate(object_words(positions))}


def object_parts(tokenizer, positions: bool = False) -> torch.Tensor:
    """(K, W) token ids of each object token's words (:func:`object_words`) as ``tokenizer`` writes
    them after a space, -1 after the last token of a shorter one. Each word is one token, except
    that a tokenizer with the position cells as tokens (:func:`~tinygptv.recipes.world_tokenizer.
    position_tokens`) writes a two-word position (``top left``) as one."""
    rows = []
    for words in object_words(positions):
        ids = tokenizer(" " + " ".join(words), add_special_tokens=False)["input_ids"]
        if len(ids) > len(words):
            raise ValueError(f"{' '.join(words)!r} is {len(ids)} tokens in this tokenizer; a scene needs whole words")
        rows.append(ids)
    width = max(len(ids) for ids in rows)
    return torch.tensor([ids + [-1] * (width - len(ids)) for ids in rows], dtype=torch.long)


def _sum_parts(embedding: nn.Module, parts: torch.Tensor) -> torch.Tensor:
    """(..., W) word ids (-1: none) -> (..., C) the sum of their embeddings."""
    vectors = embedding(parts.clamp(min=0))
    if bool((parts < 0).any()):
        vectors = vectors * (parts >= 0)[..., None].to(vectors.dtype)
    return vectors.sum(-2)


def embed_scene_ids(embedding: nn.Module, ids: torch.Tensor, parts: torch.Tensor | None) -> torch.Tensor:
    """Input vectors of token rows ``ids`` (any shape): the embedding's row for an ordinary id, and
    for an object token the sum of its words' rows (``parts``: :func:`object_parts`), through
    which the gradient reaches those rows."""
    is_object = ids >= OBJECT_ID_BASE
    vectors = embedding(ids.masked_fill(is_object, 0))
    if not bool(is_object.any()):
        return vectors
    if parts is None:
        raise ValueError("object tokens in a row but no object parts to embed them with")
    summed = _sum_parts(embedding, parts.to(ids.device)[ids[is_object] - OBJECT_ID_BASE])
    return vectors.index_put((is_object,), summed)


def scene_table(weight: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
    """``weight`` (V, C) with one more row per object token (the sum of its words' rows): the vectors
    a Q-Former query may become; object token ``k`` is row ``V + k`` (:func:`scene_table_ids`)."""
    return torch.cat([weight, _sum_parts(nn.Embedding.from_pretrained(weight), parts)])


def scene_table_ids(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Scene token ids as rows of :func:`scene_table` over a ``vocab``-row embedding."""
    return torch.where(ids >= OBJECT_ID_BASE, ids - OBJECT_ID_BASE + vocab, ids)


def scene_words(scene) -> list[list[str]]:
    """The background and each object as the tokens (as strings) of the scene sequence."""
    from ..data.boxes import normalize_box
    from ..data.shapes import CANONICAL_SIZE, _background_phrase  # the captions' wording

    background = _background_phrase(scene).split()[1:]  # "a striped gray background" -> 3 words
    groups = []
    for obj in scene.objects:
        box = normalize_box(obj.box, CANONICAL_SIZE, CANONICAL_SIZE)
        groups.append([f" {obj.size}", f" {obj.color}", f" {obj.shape}", *(f"<{v}>" for v in box)])
    return [[f" {w}" for w in background], *groups]


def token_id(tokenizer, token: str) -> int:
    """The id of a string that must be exactly one token."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{token!r} is {len(ids)} tokens in this tokenizer; a scene needs single tokens")
    return ids[0]


def scene_tokens(
    scene, tokenizer, order: Sequence[int], object_tokens: bool = False, object_positions: bool = False
) -> list[int]:
    """The image as :data:`SCENE_LENGTH` token ids: the background, then :data:`SCENE_OBJECTS`
    object groups (size, colour, shape, x1, y1, x2, y2), object ``k`` in group ``order[k]`` and
    the other groups :data:`EMPTY`, then :data:`EMPTY`. ``order`` is a permutation of the groups.
    With ``object_tokens`` a group is :data:`OBJECT_GROUP`: the object as one object token (id
    ``OBJECT_ID_BASE + k``, :func:`embed_scene_ids`), its box, the object token twice more;
    ``object_positions``: object tokens that also hold the object's position words."""
    background, *objects = scene_words(scene)
    empty = token_id(tokenizer, EMPTY)
    groups = [[empty] * len(GROUP) for _ in range(SCENE_OBJECTS)]
    kinds = _object_index(object_positions)
    for k, words in enumerate(objects):
        ids = [token_id(tokenizer, w) for w in words]
        if object_tokens:
            where = tuple(scene.objects[k].position().split()) if object_positions else ()
            obj = OBJECT_ID_BASE + kinds[(*(w.strip() for w in words[:3]), *where)]
            ids = [obj, *ids[3:], obj, obj]
        groups[order[k]] = ids
    ids = [token_id(tokenizer, w) for w in background]
    for group in groups:
        ids.extend(group)
    return [*ids, empty]


def _image_id(sample) -> int:
    return int(sample.id) if sample.source in _IMAGE_KEYED else int(sample.id) // 10


def world_documents(root: str | Path, num_docs: int, seed: int, split: str = "train") -> list[Document]:
    """``num_docs`` texts of the world, drawn by ratio, deterministically by ``seed``: captions
    (``pretrain`` template), detailed descriptions (``stage3``) and the stage-4 multi-task mix
    (``stage4``), each as the ``(text, is_target)`` chunks its template writes, with the scene of
    its image (None for text-only ones)."""
    from ..data.mixture import Mixture
    from ..data.shapes import load_scenes, shapes_sources
    from ..data.templates import template_for_stage

    sources, ratios, templates = {}, {}, {}
    for stage in (1, 3, 4):
        stage_sources, stage_ratios = shapes_sources(root, stage, split=split, image_size=224)
        for name, source in stage_sources.items():
            sources[name] = source
            ratios[name] = DOCUMENT_RATIOS[name]
            templates[name] = template_for_stage(stage)
    scenes = {scene.image_id: scene for scene in load_scenes(root, split)}
    mixture = Mixture(sources, ratios, seed=seed)
    documents = []
    for draw in range(num_docs):
        sample = mixture.load(draw)
        scene = scenes[_image_id(sample)] if sample.images else None
        documents.append((templates[sample.source].chunks(sample), scene))
    return documents


def document_texts(documents: Sequence[Document]) -> Iterator[str]:
    """Every text of ``documents`` as the tokenizer meets it: the chunks, and each scene's words."""
    for chunks, scene in documents:
        yield from (text for text, _ in chunks)
        if scene is not None:
            yield "".join(w for group in scene_words(scene) for w in group)


def encode_document(
    tokenizer, document: Document, rng, object_tokens: bool = False, object_positions: bool = False
) -> tuple[list[int], list[int]]:
    """A document's tokens and targets: its scene's tokens (groups in an order drawn from
    ``rng``) where the image's slots would be, not targets (an image is read, never written); the
    rest tokenised exactly as the stages tokenise it (pieces around the image separately, BOS
    first), every token a target. ``object_tokens``, ``object_positions``: as :func:`scene_tokens`."""
    chunks, scene = document
    ids = encode_chunks(tokenizer, chunks, num_image_tokens=1).input_ids  # one slot per image
    return splice_scene(ids, ids, scene, tokenizer, rng, None, object_tokens, object_positions)


def splice_scene(
    ids: Sequence[int],
    labels: Sequence[int],
    scene,
    tokenizer,
    rng,
    order: Sequence[int] | None = None,
    object_tokens: bool = False,
    object_positions: bool = False,
) -> tuple[list[int], list[int]]:
    """``ids`` / ``labels`` with each image slot replaced by the scene's tokens (groups in an order
    drawn from ``rng``, or in ``order``; ``object_tokens``, ``object_positions`` as
    :func:`scene_tokens`), which are never
    targets."""
    tokens: list[int] = []
    targets: list[int] = []
    for token, label in zip(ids, labels):
        if token == IMAGE_TOKEN_ID:
            groups = order if order is not None else rng.sample(range(SCENE_OBJECTS), SCENE_OBJECTS)
            scene_ids = scene_tokens(scene, tokenizer, groups, object_tokens, object_positions)
            tokens.extend(scene_ids)
            targets.extend([IGNORE_INDEX] * len(scene_ids))
        else:
            tokens.append(token)
            targets.append(label)
    return tokens, targets


def pack_documents(
    tokenizer,
    documents: Sequence[Document],
    seq_len: int,
    seed: int = 0,
    object_tokens: bool = False,
    object_positions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows and their targets, both (N, seq_len): the documents (:func:`encode_document`),
    each followed by EOS, concatenated and cut."""
    import random

    rng = random.Random(seed)
    stream: list[int] = []
    targets: list[int] = []
    for document in documents:
        ids, labels = encode_document(tokenizer, document, rng, object_tokens, object_positions)
        stream.extend([*ids, tokenizer.eos_token_id])
        targets.extend([*labels, tokenizer.eos_token_id])
    rows = len(stream) // seq_len
    if rows == 0:
        raise ValueError(f"{len(stream)} tokens of text are fewer than one row of {seq_len}")
    cut = rows * seq_len
    return (
        torch.tensor(stream[:cut], dtype=torch.long).view(rows, seq_len),
        torch.tensor(targets[:cut], dtype=torch.long).view(rows, seq_len),
    )


# =============================================================================================
# Scene drills: text-only scenes, every stage-4 question about each
# =============================================================================================

DRILL_IMAGE_IDS = 1_000_000_000
"""Scene ids of the drills start here, far above any image of a world: a drill never repeats an image."""


def drill_document(
    tokenizer,
    index: int,
    seed: int,
    held_out: Sequence[tuple[str, str]],
    questions: int = 6,
    short_prompts: bool = False,
    full_names: bool = False,
    isolated_turns: bool = False,
    object_tokens: bool = False,
    object_positions: bool = False,
    color_first: bool = False,
    shape_phrases: bool = False,
    placed_names: bool = False,
):
    """Scene drill ``index``: token ids and targets of one fresh scene of the world (drawn by the
    world's own generator under the training split's rules, so no held-out colour-shape pair), read
    as its scene tokens, followed by a stage-4 conversation of its questions in a random order:
    ``questions`` ``[vqa]`` questions and, for every object a phrase picks out alone, its
    ``[refer]`` and ``[identify]`` pair, each in a random phrasing of its task (``short_prompts``:
    the first, shortest one). Only the answers are targets. An ``[identify]`` answer is the world's
    phrase for the object, or with ``full_names`` its size, colour and shape ("the large red star")
    wherever those pick it out alone: the world's phrases are the shortest that do ("the star" when
    there is one star), which asks the LM to weigh every other object before it writes a word; the
    full name is three tokens copied from the object's own group, and it is right for the same
    objects (the benchmark accepts any phrase that picks out the object).

    Why: in packed world documents, one image's few questions share a row with other images'
    scenes, and the 4,800 training images repeat. A drill gives each scene a dozen questions that
    must be answered by looking it up, about a scene never seen before: the LM learns to read a
    scene, not to remember one.

    With ``isolated_turns``, every question is written as a one-question prompt of its own (the
    scene, then the question, as the benchmark asks it), and the row holds the prompts' shared
    beginning (through the scene) once, then each question and answer after it. Returns then also
    each token's position and segment: 0 for the shared beginning, ``k`` for the tokens of question
    ``k`` (1, 2, ...), which attend only to segment 0 and to their own segment (:func:`segment_mask`);
    their positions restart where the shared beginning ends. ``object_tokens``, ``object_positions``:
    the scene is written as :func:`scene_tokens` writes it with them. ``color_first``: the scene's
    colour questions ("what color is the square", asked wherever its shape is unique) are among the
    ``[vqa]`` questions before any other kind but the two the world always asks, instead of drawn
    like the others (:attr:`PretrainSettings.drill_color_first`). ``shape_phrases``: a ``[refer]``
    question names its object by its shape alone ("the star") wherever that picks it out alone,
    instead of by the world's phrase (:attr:`PretrainSettings.drill_shape_phrases`). ``placed_names``:
    an ``[identify]`` answer is the object's position and full name ("the top left large red star")
    wherever that picks it out alone (:attr:`PretrainSettings.drill_placed_names`)."""
    import random

    from ..data import shapes as world
    from ..data.boxes import format_box, normalize_box
    from ..data.instructions import instruction
    from ..data.sources import stable_hash
    from ..data.templates import template_for_stage

    scene = world.generate_scene(seed, DRILL_IMAGE_IDS + index, "train", held_out)
    world.measure_boxes(scene, world.render(scene))  # boxes as the world measures them
    rng = random.Random(stable_hash(seed, "drill", index))
    phrasing = None if short_prompts else rng  # instruction(): the first phrasing without an rng
    if color_first:  # all of the scene's questions (the first two, then the others in a random order)
        asked = world.questions(scene, seed, held_out, 1 << 10)
        others = sorted(asked[2:], key=lambda qa: qa.kind != "color")  # stable: the order kept otherwise
        asked = [*asked[:2], *others][:questions]
    else:
        asked = world.questions(scene, seed, held_out, questions)
    turns = [("vqa", instruction("vqa", phrasing, qa.question), qa.answer) for qa in asked]
    for obj, phrase in zip(scene.objects, world.referring_expressions(scene, seed)):
        if phrase is not None:
            box = format_box(normalize_box(obj.box, world.CANONICAL_SIZE, world.CANONICAL_SIZE))
            alone = sum(o.shape == obj.shape for o in scene.objects) == 1
            turns.append(("refer", instruction("refer", phrasing, f"the {obj.shape}" if shape_phrases and alone else phrase), box))
            if placed_names:
                phrase = world.placed_name(scene, obj) or phrase
            elif full_names:
                phrase = world.unique_full_name(scene, obj) or phrase
            turns.append(("identify", instruction("identify", phrasing, box), phrase))
    rng.shuffle(turns)
    template = template_for_stage(4)
    if isolated_turns:
        order = rng.sample(range(SCENE_OBJECTS), SCENE_OBJECTS)
        return _isolated_turns(tokenizer, scene, turns, template, order, object_tokens, object_positions)
    chunks: list[tuple[str, bool]] = []
    for k, (task, user, answer) in enumerate(turns):
        chunks.append((template.user_format.format(template.first_content(user, 1 if k == 0 else 0, task)), False))
        chunks.append((answer + template.end_symbol, True))
    encoded = encode_chunks(tokenizer, chunks, num_image_tokens=1)
    return splice_scene(encoded.input_ids, encoded.labels, scene, tokenizer, rng, None, object_tokens, object_positions)


def _isolated_turns(
    tokenizer, scene, turns, template, order: Sequence[int], object_tokens: bool = False, object_positions: bool = False
):
    """:func:`drill_document`'s ``isolated_turns`` layout of ``turns`` ``(task, question, answer)``."""
    encoded = []
    for task, user, answer in turns:
        chunks = [(template.user_format.format(template.first_content(user, 1, task)), False)]
        chunks.append((answer + template.end_symbol, True))
        single = encode_chunks(tokenizer, chunks, num_image_tokens=1)
        spliced = splice_scene(single.input_ids, single.labels, scene, tokenizer, None, order, object_tokens, object_positions)
        encoded.append(spliced)
    shared = len(encoded[0][0])  # the longest beginning every prompt shares, never into an answer
    for ids, labels in encoded:
        common = next((k for k, (a, b) in enumerate(zip(encoded[0][0], ids)) if a != b), min(len(ids), shared))
        shared = min(shared, common, next(k for k, label in enumerate(labels) if label != IGNORE_INDEX))
    tokens, targets = list(encoded[0][0][:shared]), [IGNORE_INDEX] * shared
    positions, segments = list(range(shared)), [0] * shared
    for k, (ids, labels) in enumerate(encoded, start=1):
        tokens += ids[shared:]
        targets += labels[shared:]
        positions += range(shared, len(ids))
        segments += [k] * (len(ids) - shared)
    return tokens, targets, positions, segments


def segment_mask(segments: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, T) segment ids -> the (N, 1, T, T) additive attention mask of :func:`drill_document`'s
    ``isolated_turns`` rows: causal, and a token sees segment 0 and its own segment only (a row of
    one segment is the plain causal mask)."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    seen = (segments[:, None, :] == 0) | (segments[:, None, :] == segments[:, :, None])  # (N, query, key)
    allowed = (seen & causal)[:, None]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def drill_rows(tokenizer, indices: Sequence[int], seed: int, held_out, settings: "PretrainSettings"):
    """Drills ``indices`` as (N, seq_len) token and target rows, cut or padded (pad: no target).
    With ``settings.drill_isolated_turns`` also their positions and segments (padding: a segment of
    its own, so every row of the attention mask keeps a key), else ``None`` for both."""
    shape = (len(indices), settings.seq_len)
    rows = torch.full(shape, tokenizer.pad_token_id, dtype=torch.long)
    targets = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    isolated = settings.drill_isolated_turns
    positions = torch.arange(settings.seq_len).repeat(len(indices), 1) if isolated else None
    segments = torch.full(shape, -1, dtype=torch.long) if isolated else None
    for row, index in enumerate(indices):
        drill = drill_document(
            tokenizer,
            index,
            seed,
            held_out,
            settings.drill_questions,
            settings.drill_short_prompts,
            settings.drill_full_names,
            isolated,
            settings.object_tokens,
            settings.object_positions,
            settings.drill_color_first,
            settings.drill_shape_phrases,
            settings.drill_placed_names,
        )
        n = min(len(drill[0]), settings.seq_len)
        rows[row, :n] = torch.tensor(drill[0][:n])
        targets[row, :n] = torch.tensor(drill[1][:n])
        if isolated:
            positions[row, :n] = torch.tensor(drill[2][:n])
            segments[row, :n] = torch.tensor(drill[3][:n])
    return rows, targets, positions, segments


# =============================================================================================
# Optimisation shared by both loops
# =============================================================================================


def _optimizer(params: Sequence[nn.Parameter], settings: PretrainSettings):
    from ..schedules import warmup_cosine

    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.lr)
    warmup = min(settings.warmup_steps, settings.steps)

    def factor(step: int) -> float:
        lr = warmup_cosine(step, settings.steps, warmup, settings.lr / 100, settings.lr, settings.min_lr)
        return lr / settings.lr

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _fit(
    step_loss: Callable[[int], torch.Tensor],
    params: Sequence[nn.Parameter],
    settings: PretrainSettings,
    what: str,
    log: Logger | None,
) -> list[float]:
    """``settings.steps`` AdamW steps on ``step_loss(step)``; returns the loss of every step."""
    optimizer, scheduler = _optimizer(params, settings)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(settings.steps):
        loss = step_loss(step)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"{what} pretraining: the loss is {loss.item()} at step {step + 1}")
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log and ((step + 1) % settings.log_every == 0 or step + 1 == settings.steps):
            recent = losses[-settings.log_every :]
            log(
                f"{what} step {step + 1}/{settings.steps}: loss {sum(recent) / len(recent):.4f} "
                f"({time.perf_counter() - start:.0f} s)"
            )
    return losses


# =============================================================================================
# 1. the language model
# =============================================================================================


def pretrain_language_model(
    lm: nn.Module,
    tokenizer,
    documents: Sequence[Document],
    settings: PretrainSettings,
    seed: int,
    log: Logger | None = None,
    held_out: Sequence[tuple[str, str]] = (),
) -> list[float]:
    """Train ``lm`` (a transformers causal LM) on the packed ``documents`` (scene tokens read, not
    written) and, with ``settings.drill_fraction``, scene drills (:func:`drill_document`; ``held_out``:
    the world's held-out colour-shape pairs, which no drill shows). Packed rows are visited in a
    seeded random order, epoch after epoch; drills are new every step. In a process group
    (``torch.distributed``), each process computes its share of every batch under DDP, so the
    result depends on the number of processes, not on their timing. Returns the per-step losses."""
    rows, targets = pack_documents(  # (N, T) each
        tokenizer, documents, settings.seq_len, seed, settings.object_tokens, settings.object_positions
    )
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    drills = round(settings.batch_size * settings.drill_fraction)
    rank, world_size = process_group()
    parts = object_parts(tokenizer, settings.object_positions) if settings.object_tokens else None
    loss = TargetPositionsLoss(lm, parts) if settings.head_at_targets_only else _CausalLMLoss(lm, parts)
    model = _distributed(loss)
    lm.train()

    def step_loss(step: int) -> torch.Tensor:
        nonlocal order
        packed = settings.batch_size - drills
        while len(order) < packed:
            order = torch.cat([order, torch.randperm(len(rows), generator=generator)])
        picked, order = order[:packed], order[packed:]
        mine = list(range(settings.batch_size))[rank::world_size]  # this process's rows of the batch
        drill_ids = [step * drills + k for k in mine if k < drills]
        packed_ids = picked[[k - drills for k in mine if k >= drills]]
        batch = [drill_rows(tokenizer, drill_ids, seed, held_out, settings)] if drill_ids else []
        packed_rows = rows[packed_ids]
        batch.append((packed_rows, targets[packed_ids], None, None))
        input_ids, labels = torch.cat([b[0] for b in batch]), torch.cat([b[1] for b in batch])
        if not settings.drill_isolated_turns:
            return model(input_ids, labels)
        plain = torch.arange(settings.seq_len).repeat(len(packed_rows), 1)  # packed rows: plain causal
        positions = torch.cat([b[2] if b[2] is not None else plain for b in batch])
        segments = torch.cat([b[3] if b[3] is not None else torch.zeros_like(plain) for b in batch])
        return model(input_ids, labels, segment_mask(segments), positions)

    params = [p for p in lm.parameters() if p.requires_grad]
    return _fit(step_loss, params, settings, "language model", log if rank == 0 else None)


class _SceneInputs(nn.Module):
    """A causal LM's loss on token rows that may hold object tokens (``parts``: :func:`object_parts`,
    or ``None``: ordinary ids only, given to the LM as ids)."""

    def __init__(self, lm: nn.Module, parts: torch.Tensor | None = None):
        super().__init__()
        self.lm = lm
        self.register_buffer("parts", parts, persistent=False)

    def inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.parts is None:
            return {"input_ids": input_ids}
        return {"inputs_embeds": embed_scene_ids(self.lm.get_input_embeddings(), input_ids, self.parts)}


class _CausalLMLoss(_SceneInputs):
    """The causal LM's own loss (transformers computes it over every position's logits)."""

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None) -> torch.Tensor:
        return self.lm(  # no KV cache in training
            **self.inputs(input_ids), labels=labels, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).loss


class TargetPositionsLoss(_SceneInputs):
    """A causal LM's next-token cross-entropy (as transformers computes it: mean over the tokens
    whose label is not ignored) with the output head applied at those positions only: in a drill
    the answers are a fifth of the tokens, and the head and its softmax over the vocabulary would
    otherwise be computed, and back-propagated, for every token."""

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None) -> torch.Tensor:
        decoder = self.lm.get_decoder()
        hidden = decoder(
            **self.inputs(input_ids), attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (N, T, C)
        targets = labels[:, 1:]
        kept = targets != IGNORE_INDEX
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][kept])  # (targets, V)
        return F.cross_entropy(logits.float(), targets[kept])


def coordinate_token_ids(tokenizer) -> list[int]:
    """The token ids of the box coordinates ``<0>`` ... ``<100>``, in value order."""
    from ..data.boxes import SCALE

    return [token_id(tokenizer, f"<{k}>") for k in range(SCALE + 1)]


def init_coordinate_embeddings(
    lm: nn.Module, tokenizer, shortest_period: float = 8.0, longest_period: float = 400.0, ramp: float = 0.0
) -> None:
    """Start the rows of the box coordinates ``<0>`` ... ``<100>`` (input embeddings and output head)
    as a sine-cosine code of their value, at the size of the random init: neighbouring values start
    alike (cosine ~0.96 for 1 apart, ~0.15 for 20 apart) instead of as unrelated random vectors.
    Whatever reads or writes coordinates (the LM copying a box, the Q-Former learning to emit one)
    then starts from "close is almost right"; the rows still train.

    ``ramp`` (0: none) gives the code's last two dimensions to ``u`` and ``2u^2 - 1``, where ``u``
    runs from -1 (``<0>``) to 1 (``<100>``), times ``ramp`` (relative to a row's size, which the
    sine-cosine part keeps). A linear map can then compare two coordinates (the sign of ``u_a -
    u_b``: is A left of B) and score every coordinate by how near it is to a value ``w`` it has as a
    number (``2wu - u^2`` is largest at ``u = w``): what a linear read-out of a Q-Former query, or
    one attention step of the LM, can do with a value, where sines of it need a non-linear map."""
    rows = coordinate_token_ids(tokenizer)
    embeddings = lm.get_input_embeddings().weight
    width = embeddings.shape[1]
    value = torch.arange(len(rows), dtype=torch.float32)[:, None]
    ramped = 2 if ramp else 0
    periods = torch.logspace(math.log10(shortest_period), math.log10(longest_period), (width - ramped) // 2)
    angle = 2 * math.pi * value / periods
    code = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)
    code = code / code.norm(dim=1, keepdim=True)
    code = F.pad(code, (0, width - ramped - code.shape[1]))
    if ramp:
        u = 2 * value / (len(rows) - 1) - 1
        code = torch.cat([code, ramp * u, ramp * (2 * u**2 - 1)], dim=1)
    with torch.no_grad():
        scale = embeddings.std().item() * math.sqrt(width)
        code = code * scale
        embeddings[rows] = code.to(embeddings.dtype)
        head = lm.get_output_embeddings().weight
        if head.data_ptr() != embeddings.data_ptr():
            head[rows] = code.to(head.dtype)


def process_group() -> tuple[int, int]:
    """``(rank, world size)`` of the ``torch.distributed`` group this process is in, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _distributed(module: nn.Module) -> nn.Module:
    """``module`` under DDP when this process is in a group of several (gradients averaged across
    the group in backward), else ``module`` itself."""
    if process_group()[1] == 1:
        return module
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # every process builds the same buffers from the same seed: no broadcast of them before each forward
    # (torch 2.13 renamed the switch; the old name still works there, with a deprecation warning)
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    name = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return DistributedDataParallel(module, **{name: False})


# =============================================================================================
# 2. the vision encoder and the Q-Former
# =============================================================================================


def init_sincos_positions(vision) -> None:
    """Set the ViT's learned position table to MAE's fixed 2-D sine-cosine code (the class token's
    row to zero). It stays a trainable parameter; only its starting point changes: with BLIP-2's
    random init (std 0.02) positions are a whisper against the patch contents and boxes come late."""
    table = vision.model.embeddings.position_embedding  # (1, 1 + G*G, C)
    width = table.shape[-1]
    side = vision.cfg.image_size // vision.cfg.patch_size
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij")
    parts = []
    for coord in (xs.reshape(-1), ys.reshape(-1)):
        angle = coord[:, None] * omega[None]  # (G*G, C/4)
        parts += [torch.sin(angle), torch.cos(angle)]
    code = torch.cat(parts, dim=1)  # (G*G, 4 * C/4)
    with torch.no_grad():
        table.zero_()
        table[0, 1:, : code.shape[1]] = code


class ImageBank:
    """A split's images as uint8 (N, S, S, 3) in memory with their scenes, normalised on demand
    exactly as :class:`~tinygptv.data.image_processing.ImageProcessor` does at the world's size."""

    def __init__(self, root: str | Path, split: str, limit: int | None = None):
        import numpy as np
        from PIL import Image

        from ..data.shapes import load_scenes

        self.scenes = load_scenes(root, split)[:limit]  # the first ``limit`` (None: all)
        folder = Path(root) / "images" / "224"
        self.pixels = torch.from_numpy(
            np.stack([np.asarray(Image.open(folder / s.file_name).convert("RGB")) for s in self.scenes])
        )

    def normalized(self, indices: Sequence[int]) -> torch.Tensor:
        """Images ``indices`` as (N, 3, H, W) CLIP-normalised floats."""
        return normalize_pixels(self.pixels[list(indices)])


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) images as (N, 3, H, W) CLIP-normalised floats, as
    :class:`~tinygptv.data.image_processing.ImageProcessor` makes them at the image's own size."""
    from ..data.image_processing import CLIP_MEAN, CLIP_STD

    x = pixels.float() * (1 / 255)
    x = (x - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    return x.permute(0, 3, 1, 2).contiguous()


VISION_IMAGE_IDS = 2_000_000_000
"""Scene ids of the vision pretraining's fresh images (``fresh_images``), apart from the drills'."""


def fresh_scenes(seed: int, indices: Sequence[int], held_out: Sequence[tuple[str, str]]):
    """New scenes ``indices`` of the world (training-split rules), rendered at the world's size:
    ``(scenes with measured boxes, uint8 (N, S, S, 3) pixels)``."""
    import numpy as np

    from ..data import shapes as world

    scenes, pixels = [], []
    for index in indices:
        scene = world.generate_scene(seed, VISION_IMAGE_IDS + index, "train", held_out)
        image = world.render(scene)
        world.measure_boxes(scene, image)
        scenes.append(scene)
        pixels.append(np.asarray(image))
    return scenes, torch.from_numpy(np.stack(pixels))


def reading_order(scene):
    """The scene with its objects sorted left to right by box centre (top to bottom on a tie):
    the order in which the Q-Former's queries write them."""
    import dataclasses

    objects = sorted(scene.objects, key=lambda o: (o.box[0] + o.box[2], o.box[1] + o.box[3]))
    return dataclasses.replace(scene, objects=objects)


PATCH_LABELS = {"color": 8, "shape": 6, "size": 2, "rank": SCENE_OBJECTS}
"""Per-patch classes of the ViT's dense targets (each with one more class: no object)."""


class DenseTargets:
    """The ViT's dense targets of one scene: per patch, the colour, shape, size and reading-order
    rank of the object whose box holds the patch centre (or "none"), and that object's box
    (0-1 corners); the background and its texture for the class token."""

    def __init__(self, scene, grid: int, patch: int):
        from ..data.shapes import BACKGROUNDS, COLORS, SHAPES, SIZES, TEXTURES

        centres = (torch.arange(grid, dtype=torch.float32) + 0.5) * patch
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        cx, cy = cx.reshape(-1), cy.reshape(-1)
        size = grid * patch
        self.labels = torch.tensor([n for n in PATCH_LABELS.values()]).repeat(grid * grid, 1)  # "none"
        self.boxes = torch.zeros(grid * grid, 4)
        self.mask = torch.zeros(grid * grid)
        vocab = (list(COLORS), list(SHAPES), list(SIZES))
        for rank, obj in enumerate(reading_order(scene).objects):
            x1, y1, x2, y2 = obj.box
            inside = (cx >= x1) & (cx < x2) & (cy >= y1) & (cy < y2)
            if not inside.any():  # a box between patch centres: its nearest patch
                inside[int(((cy - (y1 + y2) / 2) ** 2 + (cx - (x1 + x2) / 2) ** 2).argmin())] = True
            codes = [names.index(v) for names, v in zip(vocab, (obj.color, obj.shape, obj.size))]
            self.labels[inside] = torch.tensor([*codes, rank])
            self.boxes[inside] = torch.tensor([x1, y1, x2, y2], dtype=torch.float32) / size
            self.mask[inside] = 1.0
        self.scene_labels = torch.tensor([list(BACKGROUNDS).index(scene.background), list(TEXTURES).index(scene.texture)])


class VisionHeads(nn.Module):
    """Temporary heads of the vision pretraining, thrown away afterwards:

    * ``dense``: per ViT patch token, :data:`PATCH_LABELS` and a box; ``scene``: background and
      texture from the class token (the ViT's own targets, like a detector's);
    * ``to_lm``: a linear map of each Q-Former output into the language model's embedding space,
      scored against the frozen LM's input embeddings (the BLIP-2 projection's role)."""

    def __init__(
        self,
        vision_width: int,
        qformer_width: int,
        lm_width: int,
        object_weight: float = 0.0,
        set_matching: bool = False,
        attention_weight: float = 0.0,
        coordinate_ids: Sequence[int] = (),
        coordinate_sigma: float = 0.0,
    ):
        super().__init__()
        self.coordinate_sigma = coordinate_sigma
        """Standard deviation of the coordinates' soft targets in :meth:`token_loss` (0: one-hot)."""
        self.register_buffer("coordinate_ids", torch.tensor(list(coordinate_ids), dtype=torch.long), persistent=False)
        """Token ids of ``<0>`` ... ``<SCALE>``, in value order."""
        self.attention_weight = attention_weight
        """Weight of :meth:`attention_loss` (0: none)."""
        self.object_weight = object_weight
        """Weight of a second dense cross-entropy over the object patches only (0: none)."""
        self.set_matching = set_matching
        """Score the object groups against the best assignment of the scene's objects (:meth:`match`)."""
        self.dense = nn.Linear(vision_width, sum(n + 1 for n in PATCH_LABELS.values()) + 4)
        self.scene = nn.Linear(vision_width, 8)
        self.to_lm = nn.Linear(qformer_width, lm_width)

    def dense_loss(self, hidden: torch.Tensor, targets: Sequence[DenseTargets]) -> torch.Tensor:
        out = self.dense(hidden[:, 1:])  # (N, P, classes + 4)
        labels = torch.stack([t.labels for t in targets])  # (N, P, 4)
        boxes, mask = torch.stack([t.boxes for t in targets]), torch.stack([t.mask for t in targets])
        on_object = mask.flatten() > 0
        loss = hidden.new_zeros(())
        start = 0
        for k, n in enumerate(PATCH_LABELS.values()):
            logits, wanted = out[..., start : start + n + 1].flatten(0, 1), labels[..., k].flatten()
            loss = loss + F.cross_entropy(logits, wanted)
            if self.object_weight and on_object.any():
                # object patches are few: without this, "none" drowns what each object is
                loss = loss + self.object_weight * F.cross_entropy(logits[on_object], wanted[on_object])
            start += n + 1
        box_err = F.smooth_l1_loss(out[..., start:], boxes, reduction="none", beta=0.02).sum(-1)
        loss = loss + 5.0 * (box_err * mask).sum() / mask.sum().clamp(min=1)
        scene = self.scene(hidden[:, 0])
        scene_labels = torch.stack([t.scene_labels for t in targets])
        return loss + F.cross_entropy(scene[:, :4], scene_labels[:, 0]) + F.cross_entropy(scene[:, 4:], scene_labels[:, 1])

    @staticmethod
    def attention_loss(attention: torch.Tensor, targets: Sequence[DenseTargets]) -> torch.Tensor:
        """``attention`` (N, heads, Q, 1 + P): one cross-attention layer's weights over the class
        token and the P patches. The queries of object group ``k`` (:func:`scene_tokens`' layout)
        should spread their attention over the patches of the ``k``-th object in reading order: the
        cross-entropy of the heads' mean against the uniform distribution over those patches, averaged
        over the groups that have an object."""
        start = SCENE_LENGTH - 1 - SCENE_OBJECTS * len(GROUP)
        rank = torch.stack([t.labels[:, list(PATCH_LABELS).index("rank")] for t in targets])  # (N, P)
        wanted = torch.stack([rank == k for k in range(SCENE_OBJECTS)], dim=1).float()  # (N, G, P)
        present = wanted.sum(-1) > 0  # (N, G)
        wanted = wanted / wanted.sum(-1, keepdim=True).clamp(min=1)
        looked = attention.mean(1)[:, start : start + SCENE_OBJECTS * len(GROUP), 1:]  # patches only
        looked = looked.unflatten(1, (SCENE_OBJECTS, len(GROUP)))  # (N, G, W, P)
        cross_entropy = -(wanted[:, :, None] * torch.log(looked + 1e-8)).sum(-1).mean(-1)  # (N, G)
        return (cross_entropy * present).sum() / present.sum().clamp(min=1)

    def token_loss(self, queries: torch.Tensor, ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """Query ``k`` must become token ``ids[:, k]``: cross-entropy of its image in the LM's
        space against every embedding, plus its squared distance to the token's embedding."""
        mapped = self.to_lm(queries)  # (N, Q, C)
        logits = mapped @ embeddings.T
        if self.set_matching:
            ids = self.match(logits.detach(), mapped.detach(), ids, embeddings)
        return F.cross_entropy(logits.flatten(0, 1), self.targets(ids.flatten(), logits.shape[-1])) + F.mse_loss(mapped, embeddings[ids])

    def targets(self, ids: torch.Tensor, vocab: int) -> torch.Tensor:
        """``ids`` (M,) as cross-entropy targets: the ids themselves, or with ``coordinate_sigma``
        (M, vocab) distributions, one-hot except at coordinates, which get a Gaussian over the
        coordinate tokens centred on their value."""
        if not self.coordinate_sigma or not len(self.coordinate_ids):
            return ids
        wanted = F.one_hot(ids, vocab).float()
        hit = ids[:, None] == self.coordinate_ids[None]  # (M, values): which coordinate each id is
        rows = hit.any(-1).nonzero().squeeze(1)
        if len(rows):
            at = hit[rows].float().argmax(-1).float()  # their values
            grid = torch.arange(len(self.coordinate_ids), dtype=torch.float32, device=ids.device)
            soft = torch.exp(-0.5 * ((grid[None] - at[:, None]) / self.coordinate_sigma) ** 2)
            wanted[rows[:, None], self.coordinate_ids[None]] = soft / soft.sum(-1, keepdim=True)
        return wanted

    @staticmethod
    def match(logits: torch.Tensor, mapped: torch.Tensor, ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """``ids`` (N, Q) with each image's object groups reordered to the assignment of groups to
        query groups that costs the least (the token loss: cross-entropy plus squared distance,
        summed over a group's tokens). Every assignment is tried: 4 groups make 24."""
        import itertools

        start, width = SCENE_LENGTH - 1 - SCENE_OBJECTS * len(GROUP), len(GROUP)
        span = slice(start, start + SCENE_OBJECTS * width)
        out_logits = logits[:, span].unflatten(1, (SCENE_OBJECTS, width))  # (N, G, W, V): query groups
        out_mapped = mapped[:, span].unflatten(1, (SCENE_OBJECTS, width))  # (N, G, W, C)
        groups = ids[:, span].unflatten(1, (SCENE_OBJECTS, width))  # (N, G, W): target groups
        log_probs = out_logits.log_softmax(-1)
        # cost[n, q, t]: query group q written as target group t
        index = groups[:, None].expand(-1, SCENE_OBJECTS, -1, -1)  # (N, Gq, Gt, W)
        nll = -log_probs.gather(-1, index.transpose(2, 3)).sum(2)  # (N, Gq, Gt)
        wanted = embeddings[groups]  # (N, Gt, W, C)
        distance = ((out_mapped[:, :, None] - wanted[:, None]) ** 2).mean(-1).sum(-1)  # (N, Gq, Gt)
        cost = nll + distance
        orders = torch.tensor(list(itertools.permutations(range(SCENE_OBJECTS))))  # (P, G)
        totals = cost[:, torch.arange(SCENE_OBJECTS), orders].sum(-1)  # (N, P)
        best = orders[totals.argmin(-1)]  # (N, G): target group of each query group
        matched = groups.gather(1, best[..., None].expand(-1, -1, width))
        return torch.cat([ids[:, :start], matched.flatten(1), ids[:, span.stop :]], dim=1)


def factor_projection(head: nn.Linear, first: nn.Linear, second: nn.Linear, seed: int) -> None:
    """Set ``second(first(x)) == head(x)`` for every ``x``: ``first`` an isometry (its weight a random
    matrix with orthonormal columns, drawn from ``seed``; bias 0) into its wider space, ``second``
    the head's weight read back from there (``W A^T``; the head's bias). ``first`` must be at least
    as wide as its input."""
    out_width, in_width = first.weight.shape
    if out_width < in_width:
        raise ValueError(f"cannot factor a {in_width}-wide input through a {out_width}-wide projection")
    if (head.in_features, head.out_features) != (in_width, second.out_features) or second.in_features != out_width:
        raise ValueError(
            f"head {head.in_features}->{head.out_features} does not match projections "
            f"{first.in_features}->{first.out_features}->{second.out_features}"
        )
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(out_width, in_width, generator=generator, dtype=torch.float64))
    with torch.no_grad():
        first.weight.copy_(basis.to(first.weight.dtype))
        first.bias.zero_()
        second.weight.copy_((head.weight.double() @ basis.T).to(second.weight.dtype))
        second.bias.copy_(head.bias)


def fit_readout(
    model,
    root: str | Path,
    images: int,
    seed: int,
    object_tokens: bool = False,
    object_positions: bool = False,
    rtol: float = 1e-10,
) -> float:
    """Set ``model``'s two projections to the least-squares read-out of its Q-Former: the linear map
    (with bias) that puts each query's output, on the first ``images`` training images of the world
    at ``root``, nearest to the embedding row of the scene token it stands for (:func:`scene_tokens`,
    objects in reading order), factored exactly into ``vision_proj`` and ``lm_proj``
    (:func:`factor_projection`, ``seed``); directions of the normal matrix below ``rtol`` of its
    largest eigenvalue are left out (minimum-norm least squares). Returns the fit's error,
    ``|read-out - row| / |row|`` averaged over the queries of the last 64 images fitted.

    Why: the vision pretraining's read-out (``VisionHeads.to_lm``) is trained by a cross-entropy
    over the rows, which a query wins by pointing the right way at any length: its outputs end up
    ~10x as long as the rows, at a cosine of ~0.8, and the LM, which reads vectors, not their
    nearest rows, misreads them (the micro LM given the Q-Former's tokens snapped to their nearest
    rows answers nearly as well as given the true scene; given the raw read-out, far worse; docs/micro-recipe.md).
    A least-squares fit keeps what the queries hold and puts it where the LM looks."""
    was_training = model.training
    model.eval()
    bank = ImageBank(root, "train", limit=images)
    count = len(bank.scenes)
    tokenizer = model.tokenizer
    embeddings = model.language_model.get_input_embeddings().weight.detach().double()
    vocab = embeddings.shape[0]
    if object_tokens:
        embeddings = scene_table(embeddings, object_parts(tokenizer, object_positions))
    order = list(range(SCENE_OBJECTS))
    normal = rhs = None
    with torch.no_grad():
        for start in range(0, count, 64):
            chunk = range(start, min(start + 64, count))
            queries = model.encode_queries(bank.normalized(chunk)).double().flatten(0, 1)
            x = torch.cat([queries, queries.new_ones(len(queries), 1)], dim=1)  # the bias as a column
            rows = [scene_tokens(reading_order(bank.scenes[k]), tokenizer, order, object_tokens, object_positions) for k in chunk]
            y = embeddings[scene_table_ids(torch.tensor(rows), vocab).flatten()]
            normal = x.T @ x if normal is None else normal + x.T @ x
            rhs = x.T @ y if rhs is None else rhs + x.T @ y
        if normal is None:
            raise ValueError(f"no training images in {root} to fit the read-out on")
        width = normal.shape[0] - 1
        # the minimum-norm solution: a Q-Former's last LayerNorm makes its outputs' features sum to
        # about the same in every row, nearly a copy of the bias column
        solution = torch.linalg.pinv(normal, hermitian=True, rtol=rtol) @ rhs  # (width + 1, lm width)
        head = nn.Linear(width, solution.shape[1])
        head.weight.copy_(solution[:width].T.float())
        head.bias.copy_(solution[width].float())
        factor_projection(head, model.vision_proj, model.lm_proj, seed)
        # the fit's error on the last chunk (cheap, and a check that the factoring kept the map)
        mapped = model.lm_proj(model.vision_proj(queries.float())).double()
        error = float(((mapped - y).norm(dim=-1) / y.norm(dim=-1).clamp(min=1e-12)).mean())
    model.train(was_training)
    return error


class _VisionPretraining(nn.Module):
    """The ViT, the Q-Former and the temporary heads as one module (what DDP wraps): images in, loss out."""

    def __init__(self, vision: nn.Module, qformer: nn.Module, heads: VisionHeads):
        super().__init__()
        self.vision, self.qformer, self.heads = vision, qformer, heads

    def forward(self, pixels: torch.Tensor, dense: Sequence[DenseTargets], ids: torch.Tensor, embeddings: torch.Tensor):
        hidden = self.vision(pixels)
        loss = self.heads.dense_loss(hidden, dense)
        if self.heads.attention_weight:
            queries, attentions = self.qformer(hidden, output_cross_attentions=True)
            loss = loss + self.heads.attention_weight * self.heads.attention_loss(attentions[0], dense)
        else:
            queries = self.qformer(hidden)
        return loss + self.heads.token_loss(queries, ids, embeddings)


def pretrain_vision(model, root: str | Path, settings: PretrainSettings, seed: int, log: Logger | None = None) -> list[float]:
    """Train ``model.vision`` and ``model.qformer`` (of a :class:`~tinygptv.TinyGPTV` holding the
    pretrained, frozen micro LM) on the world's training images:

    * the ViT gets dense targets (:class:`DenseTargets`): every patch learns what it belongs to,
      as a detector's backbone does; this is what makes a ViT from scratch see shapes in minutes;
    * the Q-Former's 32 queries learn to become the image's scene tokens (:func:`scene_tokens`,
      objects in reading order) in the LM's embedding space, the form in which the LM read
      images during its own pretraining.

    Returns the per-step losses."""
    import json
    import random

    cfg = model.config.vision
    grid = cfg.image_size // cfg.patch_size
    held_out = []  # the pairs fresh images must not show
    if settings.fresh_images:
        held_out = [tuple(pair) for pair in json.loads((Path(root) / "shapes.json").read_text())["held_out_pairs"]]
    tokenizer = model.tokenizer
    embeddings = model.language_model.get_input_embeddings().weight.detach()
    vocab = embeddings.shape[0]
    if settings.object_tokens:  # the vectors a query may become: every token and every object token
        embeddings = scene_table(embeddings, object_parts(tokenizer, settings.object_positions))
    heads = VisionHeads(
        cfg.hidden_size,
        model.config.qformer.hidden_size,
        embeddings.shape[1],
        settings.object_weight,
        settings.set_matching,
        settings.attention_weight,
        coordinate_ids=coordinate_token_ids(tokenizer) if settings.coordinate_sigma else (),
        coordinate_sigma=settings.coordinate_sigma,
    )
    attention_kind = model.qformer.model.config._attn_implementation
    if settings.attention_weight:
        model.qformer.model.set_attn_implementation("eager")  # the one that returns attention weights
    init_sincos_positions(model.vision)
    identity = list(range(SCENE_OBJECTS))
    objects, positions = settings.object_tokens, settings.object_positions

    def scene_ids(scenes) -> torch.Tensor:  # rows of the embedding table, objects in reading order
        rows = [scene_tokens(reading_order(s), tokenizer, identity, objects, positions) for s in scenes]
        return scene_table_ids(torch.tensor(rows), vocab)

    if settings.fresh_images:  # the training split is never read: no bank, no targets of its images
        bank = targets = None
        ids = scene_ids(fresh_scenes(seed, [0], held_out)[0])
    else:
        bank = ImageBank(root, "train")
        targets = [DenseTargets(scene, grid, cfg.patch_size) for scene in bank.scenes]
        ids = scene_ids(bank.scenes)
    if ids.shape[1] != model.num_image_tokens:
        raise ValueError(f"a scene is {ids.shape[1]} tokens but the Q-Former has {model.num_image_tokens} queries")
    model.requires_grad_(False)
    for part in (model.vision, model.qformer):
        part.requires_grad_(True)
        part.train()
    rank, world_size = process_group()
    trained = _distributed(_VisionPretraining(model.vision, model.qformer, heads))
    rng = random.Random(seed)
    order: list[int] = []

    def step_loss(step: int) -> torch.Tensor:
        nonlocal order
        if settings.fresh_images:
            mine = list(range(step * settings.batch_size, (step + 1) * settings.batch_size))[rank::world_size]
            scenes, pixels = fresh_scenes(seed, mine, held_out)
            dense = [DenseTargets(s, grid, cfg.patch_size) for s in scenes]
            return trained(normalize_pixels(pixels), dense, scene_ids(scenes), embeddings)
        if len(order) < settings.batch_size:
            order += rng.sample(range(len(bank.scenes)), len(bank.scenes))
        picked, order = order[: settings.batch_size], order[settings.batch_size :]
        mine = picked[rank::world_size]  # this process's images of the batch
        return trained(bank.normalized(mine), [targets[i] for i in mine], ids[mine], embeddings)

    params = [*model.vision.parameters(), *model.qformer.parameters(), *heads.parameters()]
    try:
        losses = _fit(step_loss, params, settings, "vision", log if rank == 0 else None)
    finally:
        model.qformer.model.set_attn_implementation(attention_kind)
    if settings.pretrained_projections:
        factor_projection(heads.to_lm, model.vision_proj, model.lm_proj, seed)
    model.requires_grad_(False)
    model.eval()
    return losses


__all__ = [
    "DOCUMENT_RATIOS",
    "DenseTargets",
    "ImageBank",
    "PretrainSettings",
    "TargetPositionsLoss",
    "VisionHeads",
    "init_coordinate_embeddings",
    "init_sincos_positions",
    "pack_documents",
    "pretrain_language_model",
    "pretrain_vision",
    "drill_document",
    "embed_scene_ids",
    "factor_projection",
    "fit_readout",
    "object_parts",
    "object_words",
    "reading_order",
    "scene_tokens",
    "segment_mask",
    "world_documents",
]
