"""Typed configuration for every TinyGPT-V model size, and presets by name.

One config type (:class:`TinyGPTVConfig`) describes the paper's model and every smaller one: the
micro model trained on the synthetic world and the tiny ones the tests build are the same
architecture with other numbers. Sizes come from ``shared/reference/ORIGINAL-NOTES.md``
("Architecture, exactly") and the Hugging Face configs of Phi-2, Phi-1.5 and TinyLlama.

Importing this module does no work; presets are built on request by :func:`get_preset`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal


@dataclass
class VisionConfig:
    """The frozen ViT (EVA-ViT-g in the paper) and the ``ln_vision`` LayerNorm after it."""

    image_size: int = 224
    """Input resolution in pixels (square). 224 for stages 1-3, 448 for stage 4."""
    patch_size: int = 14
    """Side of one square patch in pixels."""
    hidden_size: int = 1408
    """Token width of the ViT."""
    num_layers: int = 39
    """Transformer blocks. EVA-CLIP-g has 40; BLIP-2 drops the last one."""
    num_heads: int = 16
    """Attention heads per block."""
    intermediate_size: int = 6144
    """MLP hidden width (ratio 4.3637 of 1408)."""
    layer_norm_eps: float = 1e-6
    """Epsilon of every LayerNorm in the ViT and of ``ln_vision``."""
    qkv_bias: bool = True
    """EVA-ViT-g has q and v biases (k has none; loaders write zeros there)."""
    conv_stem: tuple[int, ...] = ()
    """Channels of stride-2 3x3 convolutions (each followed by a GroupNorm and a GELU) that replace
    the linear patch embedding's input, as in hybrid ViTs (Xiao et al. 2021, "Early convolutions
    help transformers see better"); a ``patch / 2**len`` convolution then makes the tokens. Empty:
    EVA-ViT-g's plain linear patch embedding. Only for models trained from scratch (no pretrained
    ViT has one); ``patch_size`` must be divisible by ``2**len(conv_stem)``."""

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class QFormerConfig:
    """The frozen BLIP-2 Q-Former (BERT-base with cross-attention) and its learned queries."""

    hidden_size: int = 768
    """Width of the Q-Former (BERT-base)."""
    num_layers: int = 12
    """BERT layers."""
    num_heads: int = 12
    """Attention heads per layer."""
    intermediate_size: int = 3072
    """FFN hidden width."""
    cross_attention_frequency: int = 2
    """A cross-attention into the image features every this many layers (layers 0, 2, 4, ...)."""
    num_query_tokens: int = 32
    """Learned query tokens; each becomes one image token of the LM's soft prompt."""
    layer_norm_eps: float = 1e-12
    """BERT's LayerNorm epsilon."""


@dataclass
class LanguageConfig:
    """The language model and TinyGPT-V's changes to it.

    ``arch`` picks the transformers family the backbone belongs to; the TinyGPT-V switches
    (``qk_norm``, ``post_attention_rmsnorm``) apply to either.
    """

    arch: Literal["phi", "llama"] = "phi"
    """Backbone family: ``phi`` (Phi-2, Phi-1.5) or ``llama`` (TinyLlama)."""
    vocab_size: int = 51200
    """Rows of the embedding and the LM head."""
    hidden_size: int = 2560
    """Model width."""
    num_layers: int = 32
    """Decoder layers."""
    num_heads: int = 32
    """Attention heads."""
    num_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); ``None`` means equal to ``num_heads``."""
    intermediate_size: int = 10240
    """MLP hidden width."""
    hidden_act: str = "gelu_new"
    """MLP activation (transformers' ACT2FN name)."""
    partial_rotary_factor: float = 0.4
    """Fraction of each head's dims that get rotary embeddings (Phi-2: 32 of 80)."""
    rope_theta: float = 10000.0
    """Rotary base."""
    max_position_embeddings: int = 2048
    """Context length in tokens (image tokens included)."""
    layer_norm_eps: float = 1e-5
    """Epsilon of the backbone's own norms (LayerNorm for Phi, RMSNorm for Llama)."""
    tie_word_embeddings: bool = False
    """Whether the LM head shares the embedding matrix (TinyLlama and Phi: no)."""
    bos_token_id: int | None = 50256
    """Beginning-of-sequence id (Phi's ``<|endoftext|>``)."""
    eos_token_id: int | None = 50256
    """End-of-sequence id."""
    # TinyGPT-V: the two architectural changes of the paper (section 3.2, Table 4 ablation).
    qk_norm: bool = True
    """TinyGPT-V: LayerNorm(head_dim) on queries and keys per head, before RoPE."""
    post_attention_rmsnorm: bool = True
    """TinyGPT-V: RMSNorm on the attention output before it joins the residual stream."""
    rms_norm_eps: float = 1e-6
    """Epsilon of the post-attention RMSNorm (LLaMA style)."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class LoraSettings:
    """LoRA on the language model's attention projections (paper section 4.1)."""

    enabled: bool = True
    """TinyGPT-V: add LoRA at all (switch off for the Table 4 "w/o LoRA" ablation)."""
    r: int = 64
    """Rank."""
    alpha: int = 16
    """Scale numerator: the update is multiplied by alpha / r (0.25 for the paper)."""
    dropout: float = 0.05
    """Dropout on LoRA's input."""
    target_modules: tuple[str, ...] | None = None
    """Attention modules that get LoRA; ``None`` means the backbone's q, k, v and output projections."""


@dataclass
class QuantizationSettings:
    """How the weights of a saved inference model are stored (see :mod:`tinygptv.quantize`)."""

    language_model: str | None = None
    """``None`` (float), ``"int8"`` or ``"int4"``: weight-only quantization of the LM's Linear layers."""
    group_size: int = 64
    """int4: input features per scale/zero group (the largest of 128, 64, 32 up to it that divides a layer)."""
    int8_share: float = 0.0
    """int4: the share of decoder layers, the first ones, kept int8 (their error weighs most on the
    logits; :data:`tinygptv.quantize.INT4_INT8_SHARE`). 0 in files saved before it existed."""
    lm_head: bool = True
    """Whether the LM head is quantized too (always int8: 4 bits cost too much accuracy there)."""


@dataclass
class TinyGPTVConfig:
    """The whole model: vision encoder, Q-Former, projections, language model, LoRA, tokenizer."""

    name: str = "tinygptv-phi2"
    """Preset name this config came from (informational)."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    projection_hidden_size: int = 4096
    """Width between the two projections: MiniGPT-4's Vicuna-7B space, so stage 1 can start from
    MiniGPT-4's projection (768 -> 4096), followed by a new 4096 -> LM width."""
    train_input_layernorm: bool = True
    """TinyGPT-V: the LM's input LayerNorms train in every stage (Table 4 "w/o input LayerNorm")."""
    tokenizer: str | None = "microsoft/phi-2"
    """Hub id or local path of the LM tokenizer; ``None`` when the tokenizer ships with the weights."""
    initializer_range: float = 0.02
    """Std of the random init of new weights (projections, and everything in random-weight models)."""
    quantization: QuantizationSettings = field(default_factory=QuantizationSettings)
    """Storage of an inference model's weights; float unless a model was quantized and saved."""

    # --- derived sizes -------------------------------------------------------------------------
    @property
    def num_image_tokens(self) -> int:
        """Image tokens spliced into the LM per image: one per Q-Former query."""
        return self.qformer.num_query_tokens

    # --- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TinyGPTVConfig":
        """Build from a nested dict, rejecting unknown keys with their path."""
        return _from_dict(cls, data, "config")

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "TinyGPTVConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **overrides: Any) -> "TinyGPTVConfig":
        """A copy with dotted overrides, e.g. ``replace(**{"language.qk_norm": False})``."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                if part not in node or not isinstance(node[part], dict):
                    raise KeyError(f"unknown config section {dotted!r}")
                node = node[part]
            if leaf not in node:
                raise KeyError(f"unknown config field {dotted!r}")
            node[leaf] = value
        return TinyGPTVConfig.from_dict(data)


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise TypeError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        sub = _NESTED.get((cls.__name__, name))
        if sub is not None:
            kwargs[name] = _from_dict(sub, value, f"{where}.{name}")
        elif name == "conv_stem":
            kwargs[name] = tuple(value)
        elif name == "target_modules" and value is not None:
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


_NESTED: dict[tuple[str, str], type] = {
    ("TinyGPTVConfig", "vision"): VisionConfig,
    ("TinyGPTVConfig", "qformer"): QFormerConfig,
    ("TinyGPTVConfig", "language"): LanguageConfig,
    ("TinyGPTVConfig", "lora"): LoraSettings,
    ("TinyGPTVConfig", "quantization"): QuantizationSettings,
}


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def _phi2(image_size: int) -> TinyGPTVConfig:
    # Phi-2: hidden 2560, 32 layers, 32 heads of 80, MLP 10240, partial rotary 0.4, vocab 51200.
    return TinyGPTVConfig(
        name="tinygptv-phi2" if image_size == 224 else f"tinygptv-phi2-{image_size}",
        vision=VisionConfig(image_size=image_size),
    )


def _phi15() -> TinyGPTVConfig:
    # Phi-1.5 (Table 6): hidden 2048, 24 layers, 32 heads of 64, MLP 8192, partial rotary 0.5.
    return TinyGPTVConfig(
        name="tinygptv-phi1.5",
        language=LanguageConfig(
            hidden_size=2048, num_layers=24, num_heads=32, intermediate_size=8192, partial_rotary_factor=0.5
        ),
        tokenizer="microsoft/phi-1_5",
    )


def _tinyllama() -> TinyGPTVConfig:
    # TinyLlama-1.1B (Table 6): hidden 2048, 22 layers, 32 heads / 4 kv heads, SwiGLU 5632, vocab 32000.
    return TinyGPTVConfig(
        name="tinygptv-tinyllama",
        language=LanguageConfig(
            arch="llama",
            vocab_size=32000,
            hidden_size=2048,
            num_layers=22,
            num_heads=32,
            num_kv_heads=4,
            intermediate_size=5632,
            hidden_act="silu",
            partial_rotary_factor=1.0,
            layer_norm_eps=1e-5,
            bos_token_id=1,
            eos_token_id=2,
        ),
        tokenizer="TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    )


def _micro() -> TinyGPTVConfig:
    # The CPU-sized model of the synthetic world: same architecture, a few million parameters.
    return TinyGPTVConfig(
        name="tinygptv-micro",
        vision=VisionConfig(
            image_size=224, patch_size=16, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512
        ),
        qformer=QFormerConfig(
            hidden_size=128,
            num_layers=2,
            num_heads=4,
            intermediate_size=512,
            num_query_tokens=32,
            cross_attention_frequency=1,  # two layers: both read the image (BLIP-2: 6 of 12)
        ),
        language=LanguageConfig(
            vocab_size=1024,
            hidden_size=160,
            num_layers=4,
            num_heads=4,
            intermediate_size=640,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
        ),
        lora=LoraSettings(r=16, alpha=16),
        projection_hidden_size=256,
        tokenizer=None,
    )


def _tiny() -> TinyGPTVConfig:
    # The smallest model with every part present, for unit tests (a forward pass in milliseconds).
    # Head dim 20 so that Phi's partial rotary (0.4) covers an even number of dims (8).
    return TinyGPTVConfig(
        name="tinygptv-tiny",
        vision=VisionConfig(
            image_size=28, patch_size=14, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64
        ),
        qformer=QFormerConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, num_query_tokens=4),
        language=LanguageConfig(
            vocab_size=128,
            hidden_size=40,
            num_layers=2,
            num_heads=2,
            intermediate_size=80,
            max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
        ),
        lora=LoraSettings(r=4, alpha=8, dropout=0.0),
        projection_hidden_size=48,
        tokenizer=None,
    )


PRESETS: dict[str, Callable[[], TinyGPTVConfig]] = {
    "tinygptv-phi2": lambda: _phi2(224),
    "tinygptv-phi2-448": lambda: _phi2(448),
    "tinygptv-phi1.5": _phi15,
    "tinygptv-tinyllama": _tinyllama,
    "tinygptv-micro": _micro,
    "tinygptv-tiny": _tiny,
}


def get_preset(name: str) -> TinyGPTVConfig:
    """The config of a preset by name; an unknown name raises ``KeyError`` listing the known ones."""
    try:
        factory = PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
    return factory()
