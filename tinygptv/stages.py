"""The four TinyGPT-V training stages, and the one place that decides what trains in each.

Paper section 4.1 and ORIGINAL-NOTES ("Training recipe"):

=====  ==============  =======================================  =====
stage  name            trainable                                image
=====  ==============  =======================================  =====
1      warm-up         both projections + all LM norms          224
2      pre-train       + LoRA                                   224
3      instruct        + LoRA                                   224
4      multi-task      + LoRA                                   448
=====  ==============  =======================================  =====

"All LM norms" are the input LayerNorms (unless ``train_input_layernorm`` is off, the Table 4
ablation), the QK LayerNorms, the post-attention RMSNorms and the final norm. The vision encoder,
Q-Former, embeddings, LM linear weights and LM head stay frozen in every stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm


@dataclass(frozen=True)
class Stage:
    """What distinguishes one training stage (the trainer adds data and schedules)."""

    number: int
    """1-4."""
    name: str
    """Paper's name for the stage."""
    image_size: int
    """Input resolution of the stage."""
    train_lora: bool
    """Whether LoRA weights train (stage 1: no, as the paper says; see ORIGINAL-NOTES on issue #13)."""


STAGES: dict[int, Stage] = {
    1: Stage(1, "warm-up", 224, train_lora=False),
    2: Stage(2, "pre-train", 224, train_lora=True),
    3: Stage(3, "instruction tuning", 224, train_lora=True),
    4: Stage(4, "multi-task learning", 448, train_lora=True),
}


def get_stage(number: int | str) -> Stage:
    try:
        return STAGES[int(number)]
    except (KeyError, ValueError):
        raise ValueError(f"unknown stage {number!r}; stages are 1, 2, 3, 4") from None


_NORM_TYPES = (nn.LayerNorm, LlamaRMSNorm)


def is_trainable(model, name: str, stage: Stage) -> bool:
    """Whether parameter ``name`` of ``model`` (a :class:`~tinygptv.TinyGPTV`) trains in ``stage``."""
    return name in trainable_parameter_names(model, stage)


def trainable_parameter_names(model, stage: Stage | int) -> set[str]:
    """The exact set of parameter names of ``model`` that train in ``stage``."""
    stage = stage if isinstance(stage, Stage) else get_stage(stage)
    names: set[str] = set()
    for prefix in ("vision_proj", "lm_proj"):
        names.update(f"{prefix}.{n}" for n, _ in getattr(model, prefix).named_parameters())
    for module_name, module in model.language_model.named_modules():
        if isinstance(module, _NORM_TYPES):
            if module_name.endswith("input_layernorm") and not model.config.train_input_layernorm:
                continue
            names.update(f"language_model.{module_name}.{n}" for n, _ in module.named_parameters())
    if stage.train_lora:
        names.update(n for n, _ in model.named_parameters() if ".lora_" in n)
    return names


def apply_stage(model, stage: Stage | int) -> set[str]:
    """Set ``requires_grad`` for ``stage``: exactly the stage's parameters train. Returns their names."""
    names = trainable_parameter_names(model, stage)
    model.requires_grad_(False)
    for name, param in model.named_parameters():
        if name in names:
            param.requires_grad_(True)
    return names
