"""The prompt templates of the four stages, as named objects.

Formats from the authors' release (ORIGINAL-NOTES, "Prompt formats"; their train configs
``tinygptv_stage{1..4}.yaml`` and MiniGPT-4 / MiniGPT-v2, which TinyGPT-V forks):

========  =========================================================================  =========
template  one turn (``|`` separates context from target)                             end symbol
========  =========================================================================  =========
pretrain  ``<Img><ImageHere></Img>`` | ``caption\\n``                                 ``\\n``
stage3    ``###Human: <Img><ImageHere></Img> instruction ###Assistant: `` | ``answer###``  ``###``
stage4    ``[INST] <Img><ImageHere></Img> [vqa] instruction [/INST]`` | ``answer###``  ``###``
========  =========================================================================  =========

* Stages 1-2 (``pretrain``): the image soft prompt, then the caption as target, no instruction.
  MiniGPT-4's default end symbol ``\\n`` (the stage-1/2 configs set none).
* Stage 3: MiniGPT-4's ``###Human: {} ###Assistant: `` with ``end_sym: "###"``. Later turns
  start with ``Human: `` because the previous answer's ``###`` already separates them (the
  MiniGPT-4 conversation format).
* Stage 4: MiniGPT-v2's ``[INST] {} [/INST]``; TinyGPT-V's stage-4 config sets ``end_sym: "###"``.
  The six task identifiers go right after the image; multi-turn samples repeat
  ``[INST] ... [/INST]`` + answer.
* ``stage4-instruct``: the ``Instruct: {} /n Output: `` prompt of the authors' stage-4 eval
  config (``/n`` is literally what that config says).

Only assistant answers (and their end symbol) are targets; everything else is context.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

from .encoding import IMAGE_PLACEHOLDER

if TYPE_CHECKING:
    from .sample import Sample

TASK_IDENTIFIERS: dict[str, str] = {
    "vqa": "[vqa]",
    "caption": "[caption]",
    "refer": "[refer]",
    "grounding": "[grounding]",
    "identify": "[identify]",
    "detection": "[detection]",
}
"""MiniGPT-v2's six task identifiers (stage 4), by task name."""

IMAGE_PROMPT = f"<Img>{IMAGE_PLACEHOLDER}</Img>"
"""How one image appears in a prompt (MiniGPT-4 / MiniGPT-v2)."""


@dataclass(frozen=True)
class Template:
    """How a conversation becomes prompt text and targets.

    ``user_format`` receives the user's content at ``{}``; the content of the first turn starts
    with the images (``image_format`` each, unless the user text places ``<ImageHere>`` itself)
    and, with ``task_identifiers``, the task's ``[task]`` tag. ``user_format=None`` means no
    instruction at all: the prompt is the images alone and the first answer is the target
    (stages 1-2).
    """

    name: str
    """Name the template is looked up by."""
    user_format: str | None
    """Format of a user turn, ``{}`` = content; None for caption-only pretraining."""
    end_symbol: str = ""
    """Appended to every answer, part of the target: the model learns to stop with it."""
    next_user_format: str | None = None
    """Format of user turns after the first (default: ``user_format``)."""
    image_format: str = IMAGE_PROMPT
    """Text of one image in the prompt; must contain ``<ImageHere>``."""
    task_identifiers: bool = False
    """Whether to write the ``[task]`` identifier of MiniGPT-v2 tasks."""
    system: str = ""
    """Text before everything (a system prompt); context, not target."""

    def __post_init__(self) -> None:
        if IMAGE_PLACEHOLDER not in self.image_format:
            raise ValueError(f"template {self.name}: image_format must contain {IMAGE_PLACEHOLDER}")
        for fmt in (self.user_format, self.next_user_format):
            if fmt is not None and fmt.count("{}") != 1:
                raise ValueError(f"template {self.name}: a user format needs exactly one {{}}, got {fmt!r}")

    # --- training -----------------------------------------------------------------------------
    def chunks(self, sample: "Sample") -> list[tuple[str, bool]]:
        """``(text, is_target)`` chunks of ``sample`` for :func:`~tinygptv.data.encoding.encode_chunks`."""
        if self.user_format is None:
            return self._caption_chunks(sample)
        # Images go before the first user text unless the texts place them themselves.
        auto_images = 0 if any(IMAGE_PLACEHOLDER in t.user for t in sample.turns) else len(sample.images)
        chunks: list[tuple[str, bool]] = []
        for k, turn in enumerate(sample.turns):
            if k == 0:
                content = self.first_content(turn.user, auto_images, sample.task)
                text = self.system + self.user_format.format(content)
            else:
                text = (self.next_user_format or self.user_format).format(turn.user.strip())
            chunks.append((text, False))
            chunks.append((turn.assistant.strip() + self.end_symbol, True))
        return chunks

    def _caption_chunks(self, sample: "Sample") -> list[tuple[str, bool]]:
        if len(sample.turns) != 1:
            raise ValueError(
                f"template {self.name} trains on captions: one answer per sample, got {len(sample.turns)} turns "
                f"from {sample.source or 'a dataset'} (use a conversation template for multi-turn data)"
            )
        if not sample.images:
            raise ValueError(f"template {self.name} needs an image per sample; {sample.source} gave a text-only one")
        return [
            (self.system + self.image_format * len(sample.images), False),
            (sample.turns[0].assistant.strip() + self.end_symbol, True),
        ]

    # --- inference ----------------------------------------------------------------------------
    def first_content(self, text: str, num_images: int, task: str | None = None) -> str:
        """The first user turn's content: ``num_images`` images, the ``[task]`` tag, then the text."""
        parts = []
        if num_images:
            parts.append(self.image_format * num_images)
        if self.task_identifiers and task in TASK_IDENTIFIERS:
            parts.append(TASK_IDENTIFIERS[task])
        parts.append(text.strip())
        return " ".join(p for p in parts if p)

    def prompt(
        self,
        instruction: str,
        num_images: int = 1,
        task: str | None = None,
        history: Sequence[tuple[str, str]] = (),
    ) -> str:
        """The prompt for generating the next answer: earlier ``(user, assistant)`` turns of
        ``history`` (the first of which carries the images), then ``instruction``."""
        if self.user_format is None:
            return self.system + self.image_format * num_images
        text = self.system
        turns = [*history, (instruction, None)]
        placed = any(IMAGE_PLACEHOLDER in user for user, _ in turns)
        for k, (user, answer) in enumerate(turns):
            if k == 0:
                text += self.user_format.format(self.first_content(user, 0 if placed else num_images, task))
            else:
                text += (self.next_user_format or self.user_format).format(user.strip())
            if answer is not None:
                text += answer.strip() + self.end_symbol
        return text

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Strings at which generation should stop (the end symbol, if it is visible text)."""
        return (self.end_symbol,) if self.end_symbol.strip() else ()


TEMPLATES: dict[str, Template] = {}


def register_template(template: Template, overwrite: bool = False) -> Template:
    """Make ``template`` available to :func:`get_template` under its name."""
    if template.name in TEMPLATES and not overwrite:
        raise ValueError(f"a template named {template.name!r} exists; pass overwrite=True to replace it")
    TEMPLATES[template.name] = template
    return template


def get_template(name: str, **overrides) -> Template:
    """The template called ``name`` (``pretrain``, ``stage3``, ``stage4``, ...), with optional field
    overrides, e.g. ``get_template("stage4", end_symbol="</s>")``."""
    try:
        template = TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown template {name!r}; known templates: {', '.join(sorted(TEMPLATES))}") from None
    return replace(template, **overrides) if overrides else template


def template_for_stage(stage: int) -> Template:
    """The training template of a stage number (1-4)."""
    names = {1: "pretrain", 2: "pretrain", 3: "stage3", 4: "stage4"}
    if stage not in names:
        raise ValueError(f"unknown stage {stage!r}; stages are 1, 2, 3, 4")
    return TEMPLATES[names[stage]]


for _template in (
    Template("pretrain", user_format=None, end_symbol="\n"),
    Template(
        "stage3",
        user_format="###Human: {} ###Assistant: ",
        next_user_format="Human: {} ###Assistant: ",
        end_symbol="###",
    ),
    Template("stage4", user_format="[INST] {} [/INST]", end_symbol="###", task_identifiers=True),
    Template("stage4-instruct", user_format="Instruct: {} /n Output: ", end_symbol="###", task_identifiers=True),
):
    register_template(_template)
del _template

__all__ = [
    "IMAGE_PROMPT",
    "TASK_IDENTIFIERS",
    "TEMPLATES",
    "Template",
    "get_template",
    "register_template",
    "template_for_stage",
]
