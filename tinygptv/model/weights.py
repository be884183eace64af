"""Weights: every public TinyGPT-V ingredient into our model, our own format, and loud failures.

Sources (key names and shapes: ``shared/reference/ORIGINAL-NOTES.md``, "Checkpoints as released"
and "Key names in the public ingredient files"):

* the language model from a Hugging Face directory: Phi-2 or Phi-1.5 (current transformers
  layout, the TinyGPT-V authors' fused-qkv copy, or Microsoft's first remote-code layout) and
  TinyLlama;
* the vision encoder, ``ln_vision``, Q-Former and query tokens from a Hugging Face BLIP-2
  directory, or from LAVIS' ``eva_vit_g.pth`` + ``blip2_pretrained_flant5xxl.pth``;
* MiniGPT-4's projection (``pretrained_minigpt4*.pth``) as the start of our ``vision_proj``;
* the authors' released ``TinyGPT-V_for_Stage{1,2,3,4}.pth`` (trainable parameters only);
* our own format, written by :func:`save_pretrained` and read by :func:`load_pretrained`.

Every source goes through an explicit name map (a list of :class:`Rule`, all in this file) into
*canonical* keys: our state-dict keys without peft's wrapping, e.g.
``language_model.model.layers.0.self_attn.q_proj.lora_A.weight`` for
``language_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``, so one
map serves a model with or without LoRA. :func:`assemble` checks every shape, fills a
:class:`LoadReport` and refuses to return a half-initialised model: a parameter may be absent from
the sources only when the load mode says why (a new LoRA before stage 2, TinyGPT-V's new norms on
top of a plain Phi-2, ...). The original's most reported failure was garbage output from a
silently half-loaded or mismatched checkpoint; here every such case raises :class:`WeightLoadError`
naming the likely cause.

Files are read memory-mapped (``safetensors`` and ``torch.load(weights_only=True, mmap=True)``)
and tensors are assigned into a model built on the meta device, so loading needs about the
memory of the weights themselves.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TinyGPTVConfig


class WeightLoadError(ValueError):
    """Weights that do not fit the model. The message lists the offending keys and the likely cause."""


# =============================================================================================
# Reading files
# =============================================================================================

# Weight files of a Hugging Face model directory, in order of preference.
HF_WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    """Raise :class:`WeightLoadError` unless ``path`` hashes to ``expected``."""
    actual = file_sha256(path)
    if actual != expected.strip().lower():
        raise WeightLoadError(
            f"{path}: sha256 {actual} does not match the expected {expected.strip().lower()}: "
            "the file is corrupt, truncated, or a different release"
        )


def read_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", sha256: str | None = None
) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` or a torch ``.pth``/``.pt``/``.bin`` file, memory-mapped.

    Torch files are read with ``weights_only=True`` (no arbitrary unpickling); a LAVIS / MiniGPT-4
    checkpoint dict ``{"model": state_dict, "optimizer": ..., ...}`` is unwrapped to its ``model``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if sha256:
        verify_sha256(path, sha256)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path, device=str(device))
    try:
        try:
            obj = torch.load(path, map_location=device, weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = torch.load(path, map_location=device, weights_only=True)  # legacy (pre-zip) format
    except pickle.UnpicklingError as err:
        raise WeightLoadError(
            f"{path}: holds Python objects other than tensors and plain containers, which "
            f"torch.load(weights_only=True) refuses to unpickle ({str(err).splitlines()[0]}); "
            "re-save its state dict with torch.save(state_dict) from a trusted environment"
        ) from None
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        non_tensors = [k for k, v in obj.items() if not torch.is_tensor(v)]
        if not non_tensors:
            return dict(obj)
        raise WeightLoadError(f"{path}: not a state dict: entries {non_tensors[:5]} are not tensors")
    raise WeightLoadError(f"{path}: expected a state dict, found a {type(obj).__name__}")


def read_hf_weights(directory: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face model directory (single or sharded, safetensors or .bin)."""
    for name in HF_WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return read_checkpoint(path, device)
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(path.read_text())["weight_map"].values())):
            state.update(read_checkpoint(directory / shard, device))
        return state
    raise FileNotFoundError(f"{directory}: no weights found (looked for {', '.join(HF_WEIGHT_FILES)})")


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    return json.loads(path.read_text())


def load_tokenizer(directory: Path, config: TinyGPTVConfig | None = None):
    """The tokenizer saved in ``directory`` (None when it holds no tokenizer files); checked against
    the model's vocabulary when ``config`` is given."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    if config is not None and len(tokenizer) > config.language.vocab_size:
        raise WeightLoadError(
            f"{directory}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary holds "
            f"{config.language.vocab_size} rows: a tokenizer of another model?"
        )
    return tokenizer


# =============================================================================================
# Name maps
# =============================================================================================


@dataclass(frozen=True)
class Rule:
    """One line of a name map.

    A source key that fully matches ``pattern`` becomes ``target`` (a template using the pattern's
    groups, ``\\1``...). A tuple of targets takes the tensors ``split`` returns, one per target.
    ``target=None`` marks the key as expected-unused, for the reason ``why``.
    """

    pattern: str
    target: str | tuple[str, ...] | None
    why: str = ""
    split: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None


def _unused(pattern: str, why: str) -> Rule:
    return Rule(pattern, None, why)


def _prefixed(prefix: str, rules: Iterable[Rule]) -> list[Rule]:
    """The same rules for keys under ``prefix`` (a regex without capturing groups)."""
    return [Rule(prefix + r.pattern, r.target, r.why, r.split) for r in rules]


class _SplitError(ValueError):
    pass


def split_fused_qkv_per_head(tensor: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, ...]:
    """The TinyGPT-V authors' Phi port: fused rows viewed as (heads, 3, head_dim), BLOOM style.

    Applies to the fused weight (3C, C), bias (3C,) and LoRA B (3C, r) alike.
    """
    rows = tensor.shape[0]
    if rows % (3 * num_heads):
        raise _SplitError(f"{rows} rows do not split into q, k, v of {num_heads} heads")
    head_dim = rows // (3 * num_heads)
    per_head = tensor.reshape(num_heads, 3, head_dim, *tensor.shape[1:])
    return tuple(per_head[:, j].reshape(num_heads * head_dim, *tensor.shape[1:]).contiguous() for j in range(3))


def split_fused_qkv_blocks(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Microsoft's remote-code Phi (``Wqkv``): rows are three contiguous blocks [q; k; v]."""
    if tensor.shape[0] % 3:
        raise _SplitError(f"{tensor.shape[0]} rows do not split into q, k, v")
    return tuple(t.contiguous() for t in tensor.chunk(3, dim=0))


def shared_lora_a(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """LoRA on a fused qkv has one A for all three outputs: each of q, k, v gets its own copy."""
    return tensor, tensor.clone(), tensor.clone()


_LM = "language_model."
_LAYER = r"model\.layers\.(\d+)\."  # a decoder layer in a Hugging Face file
_OUT = _LM + "model.layers.\\1."  # the same layer in our model
_QKV = tuple(f"{_OUT}self_attn.{x}_proj." for x in "qkv")  # fused qkv -> these three
_LORA = r"lora_(A|B)(?:\.default)?\.weight"  # peft 0.2.0 wrote lora_A.weight, later versions lora_A.default.weight
_ROTARY_WHY = "rotary inverse frequencies written by old transformers versions; recomputed from the config"


def phi_rules(num_heads: int) -> list[Rule]:
    """Phi-2 / Phi-1.5 in any of its three public layouts, plus TinyGPT-V's norms and LoRA.

    Keys are relative to the causal LM (``model.layers.{i}...``, ``lm_head``).
    """
    per_head = partial(split_fused_qkv_per_head, num_heads=num_heads)
    attn = _LAYER + r"self_attn\."
    msft = r"transformer\.h\.(\d+)\."
    # fmt: off
    return [
        # transformers' layout (separate q/k/v); the other layouts share its remaining names
        Rule(r"model\.embed_tokens\.weight",                       f"{_LM}model.embed_tokens.weight"),
        Rule(attn + r"(q_proj|k_proj|v_proj|dense)\.(weight|bias)", _OUT + "self_attn.\\2.\\3"),
        Rule(attn + r"(q_layernorm|k_layernorm)\.(weight|bias)",    _OUT + "self_attn.\\2.\\3"),
        Rule(_LAYER + r"mlp\.(fc1|fc2)\.(weight|bias)",             _OUT + "mlp.\\2.\\3"),
        Rule(_LAYER + r"input_layernorm\.(weight|bias)",            _OUT + "input_layernorm.\\2"),
        Rule(r"model\.final_layernorm\.(weight|bias)",              f"{_LM}model.final_layernorm.\\1"),
        Rule(r"lm_head\.(weight|bias)",                             f"{_LM}lm_head.\\1"),
        # the TinyGPT-V authors' port: fused per-head-interleaved qkv; post_layernorm = our post_attention_norm
        Rule(attn + r"query_key_value\.(weight|bias)",              tuple(t + "\\2" for t in _QKV), split=per_head),
        Rule(_LAYER + r"post_layernorm\.weight",                    _OUT + "post_attention_norm.weight"),
        # LoRA on the fused qkv (one A shared by q, k, v; B rows interleaved per head), or on one projection
        Rule(attn + r"query_key_value\.lora_A(?:\.default)?\.weight",
             tuple(t + "lora_A.weight" for t in _QKV), split=shared_lora_a),
        Rule(attn + r"query_key_value\.lora_B(?:\.default)?\.weight",
             tuple(t + "lora_B.weight" for t in _QKV), split=per_head),
        Rule(attn + r"(q_proj|k_proj|v_proj|dense)\." + _LORA,      _OUT + "self_attn.\\2.lora_\\3.weight"),
        # Microsoft's first remote-code release (Wqkv is three contiguous blocks [q; k; v])
        Rule(r"transformer\.embd\.wte\.weight",                     f"{_LM}model.embed_tokens.weight"),
        Rule(msft + r"ln\.(weight|bias)",                           _OUT + "input_layernorm.\\2"),
        Rule(msft + r"mixer\.Wqkv\.(weight|bias)",                  tuple(t + "\\2" for t in _QKV),
             split=split_fused_qkv_blocks),
        Rule(msft + r"mixer\.out_proj\.(weight|bias)",              _OUT + "self_attn.dense.\\2"),
        Rule(msft + r"mlp\.(fc1|fc2)\.(weight|bias)",               _OUT + "mlp.\\2.\\3"),
        Rule(r"lm_head\.ln\.(weight|bias)",                         f"{_LM}model.final_layernorm.\\1"),
        Rule(r"lm_head\.linear\.(weight|bias)",                     f"{_LM}lm_head.\\1"),
        _unused(r"(?:model\.layers\.\d+\.self_attn\.|model\.)?rotary_emb\.inv_freq", _ROTARY_WHY),
    ]
    # fmt: on


def llama_rules() -> list[Rule]:
    """TinyLlama (transformers' Llama layout), plus TinyGPT-V's norms and LoRA."""
    attn = _LAYER + r"self_attn\."
    # fmt: off
    return [
        Rule(r"model\.embed_tokens\.weight",                      f"{_LM}model.embed_tokens.weight"),
        Rule(attn + r"(q_proj|k_proj|v_proj|o_proj)\.weight",      _OUT + "self_attn.\\2.weight"),
        Rule(attn + r"(q_layernorm|k_layernorm)\.(weight|bias)",   _OUT + "self_attn.\\2.\\3"),
        Rule(_LAYER + r"mlp\.(gate_proj|up_proj|down_proj)\.weight", _OUT + "mlp.\\2.weight"),
        # Llama's post_attention_layernorm is its pre-MLP norm; post_attention_norm is TinyGPT-V's
        Rule(_LAYER + r"(input_layernorm|post_attention_layernorm|post_attention_norm)\.weight", _OUT + "\\2.weight"),
        Rule(r"model\.norm\.weight",                               f"{_LM}model.norm.weight"),
        Rule(r"lm_head\.weight",                                   f"{_LM}lm_head.weight"),
        Rule(attn + r"(q_proj|k_proj|v_proj|o_proj)\." + _LORA,    _OUT + "self_attn.\\2.lora_\\3.weight"),
        _unused(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", _ROTARY_WHY),
    ]
    # fmt: on


def language_rules(config: TinyGPTVConfig) -> list[Rule]:
    lang = config.language
    return phi_rules(lang.num_heads) if lang.arch == "phi" else llama_rules()


_VIT = "vision.model."
_QF = "qformer.model."


def eva_vit_rules() -> list[Rule]:
    """LAVIS ``eva_vit_g.pth`` -> transformers' Blip2VisionModel (without its post_layernorm)."""
    block = r"blocks\.(\d+)\."
    out = f"{_VIT}encoder.layers.\\1."
    return [
        Rule(r"cls_token", f"{_VIT}embeddings.class_embedding"),
        Rule(r"pos_embed", f"{_VIT}embeddings.position_embedding"),
        Rule(r"patch_embed\.proj\.(weight|bias)", f"{_VIT}embeddings.patch_embedding.\\1"),
        Rule(block + r"norm1\.(weight|bias)", out + "layer_norm1.\\2"),
        Rule(block + r"attn\.qkv\.weight", out + "self_attn.qkv.weight"),
        # q_bias and v_bias, fused with a zero k bias by _fuse_eva_qv_bias (EVA has no k bias)
        Rule(block + r"attn\.q_bias\+v_bias", out + "self_attn.qkv.bias"),
        Rule(block + r"attn\.proj\.(weight|bias)", out + "self_attn.projection.\\2"),
        Rule(block + r"norm2\.(weight|bias)", out + "layer_norm2.\\2"),
        Rule(block + r"mlp\.(fc1|fc2)\.(weight|bias)", out + "mlp.\\2.\\3"),
    ]


_QF_TEXT_WHY = "Q-Former text side (word/position embeddings, text FFN, LM head): unused by TinyGPT-V"


def lavis_blip2_rules() -> list[Rule]:
    """LAVIS ``blip2_pretrained_flant5xxl.pth`` -> query tokens, ln_vision and the Q-Former."""
    layer = r"Qformer\.bert\.encoder\.layer\.(\d+)\."
    attn = layer + r"(attention|crossattention)\."
    out = f"{_QF}encoder.layer.\\1."
    return [
        Rule(r"query_tokens", "qformer.query_tokens"),
        Rule(r"ln_vision\.(weight|bias)", f"{_VIT}post_layernorm.\\1"),
        Rule(r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)", f"{_QF}layernorm.\\1"),
        Rule(attn + r"self\.(query|key|value)\.(weight|bias)", out + "\\2.attention.\\3.\\4"),
        Rule(attn + r"output\.(dense|LayerNorm)\.(weight|bias)", out + "\\2.output.\\3.\\4"),
        Rule(layer + r"(intermediate_query|output_query)\.(dense|LayerNorm)\.(weight|bias)", out + "\\2.\\3.\\4"),
        _unused(r"Qformer\.bert\.embeddings\.(word_embeddings\..*|position_embeddings\..*|position_ids)", _QF_TEXT_WHY),
        _unused(r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\..*", _QF_TEXT_WHY),
        _unused(r"Qformer\.cls\..*", _QF_TEXT_WHY),
        _unused(r"(t5_model|t5_proj)\..*", "BLIP-2's Flan-T5 side: TinyGPT-V uses Phi-2 instead"),
        _unused(r"(vision_proj|text_proj|itm_head)\..*|temp", "BLIP-2 stage-1 contrastive / matching heads: unused"),
    ]


def hf_blip2_rules() -> list[Rule]:
    """A Hugging Face BLIP-2 checkpoint -> vision encoder (+ post_layernorm = ln_vision), Q-Former, queries."""
    layer = r"qformer\.encoder\.layer\.(\d+)\."
    attn = layer + r"(attention|crossattention)\."
    out = f"{_QF}encoder.layer.\\1."
    vit_layer = r"vision_model\.encoder\.layers\.(\d+)\."
    parts = r"(self_attn\.qkv|self_attn\.projection|layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2)"
    return [
        Rule(r"vision_model\.embeddings\.(class_embedding|position_embedding)", f"{_VIT}embeddings.\\1"),
        Rule(r"vision_model\.embeddings\.patch_embedding\.(weight|bias)", f"{_VIT}embeddings.patch_embedding.\\1"),
        Rule(vit_layer + parts + r"\.(weight|bias)", f"{_VIT}encoder.layers.\\1.\\2.\\3"),
        Rule(r"vision_model\.post_layernorm\.(weight|bias)", f"{_VIT}post_layernorm.\\1"),
        Rule(r"query_tokens", "qformer.query_tokens"),
        Rule(r"qformer\.layernorm\.(weight|bias)", f"{_QF}layernorm.\\1"),
        Rule(attn + r"attention\.(query|key|value)\.(weight|bias)", out + "\\2.attention.\\3.\\4"),
        Rule(attn + r"output\.(dense|LayerNorm)\.(weight|bias)", out + "\\2.output.\\3.\\4"),
        Rule(layer + r"(intermediate_query|output_query)\.(dense|LayerNorm)\.(weight|bias)", out + "\\2.\\3.\\4"),
        _unused(r"qformer\.embeddings\..*", _QF_TEXT_WHY),
        _unused(r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\..*", _QF_TEXT_WHY),
        _unused(
            r"(language_model|language_projection)\..*",
            "BLIP-2's own language model and its projection: TinyGPT-V uses Phi-2",
        ),
        _unused(r"(vision_projection|text_projection|itm_head)\..*", "BLIP-2 retrieval heads: unused"),
    ]


def minigpt4_rules() -> list[Rule]:
    """``pretrained_minigpt4*.pth``: its Vicuna projection starts our first projection (paper, stage 1)."""
    return [
        Rule(r"llama_proj\.(weight|bias)", "vision_proj.\\1"),
        _unused(r"llama_model\..*", "MiniGPT-4's language-model weights: only its projection is used"),
    ]


def released_rules(config: TinyGPTVConfig) -> list[Rule]:
    """The authors' ``TinyGPT-V_for_Stage{N}.pth``: projections, LM norms and LoRA.

    LM keys sit under ``llama_model.base_model.model.`` (peft-wrapped) or ``llama_model.`` (no LoRA).
    """
    return [
        Rule(r"llama_proj\.(weight|bias)", "vision_proj.\\1"),
        Rule(r"llama_proj2\.(weight|bias)", "lm_proj.\\1"),
        *_prefixed(r"llama_model\.(?:base_model\.model\.)?", language_rules(config)),
    ]


# =============================================================================================
# Applying a name map: one Part per source
# =============================================================================================


@dataclass
class Part:
    """Tensors of one source under canonical keys, plus what the source held that was not used."""

    source: str
    """Where they came from (a path or hub id), for the report."""
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    """Canonical key -> the source key it came from."""
    ignored: dict[str, str] = field(default_factory=dict)
    """Source key -> why it is expected to be unused."""
    unexpected: list[str] = field(default_factory=list)
    """Source keys no rule knows, or that cannot be converted."""
    problems: list[str] = field(default_factory=list)
    """Failures found before shapes are compared (e.g. a config.json that disagrees)."""
    notes: list[str] = field(default_factory=list)


def apply_rules(state: Mapping[str, torch.Tensor], rules: list[Rule], source: str) -> Part:
    """Rename ``state`` by ``rules`` (first full match wins) into a :class:`Part`."""
    part = Part(source)
    compiled = [(re.compile(rule.pattern), rule) for rule in rules]
    for key, tensor in state.items():
        match, rule = next(((m, r) for rx, r in compiled if (m := rx.fullmatch(key))), (None, None))
        if rule is None:
            part.unexpected.append(key)
            continue
        if rule.target is None:
            part.ignored[key] = rule.why
            continue
        targets = (rule.target,) if isinstance(rule.target, str) else rule.target
        try:
            values = (tensor,) if rule.split is None else rule.split(tensor)
        except _SplitError as err:
            part.problems.append(f"{source}: {key} {tuple(tensor.shape)}: {err}")
            continue
        for template, value in zip(targets, values):
            name = match.expand(template)
            if name in part.tensors:
                part.problems.append(f"{source}: {key} and {part.origin[name]} both map onto {name}")
                continue
            part.tensors[name] = value
            part.origin[name] = key
    return part


def canonical_key(key: str) -> str:
    """Our state-dict key without peft's wrapping (the form every name map targets and our files hold)."""
    if key.startswith("language_model.base_model.model."):
        key = "language_model." + key[len("language_model.base_model.model.") :]
    key = key.replace(".base_layer.", ".")
    return re.sub(r"\.(lora_[AB])\.default\.", r".\1.", key)


def model_keys(model: nn.Module) -> dict[str, str]:
    """Canonical key -> the model's actual state-dict key."""
    return {canonical_key(k): k for k in model.state_dict(keep_vars=True)}


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Canonical keys that name one shared parameter (e.g. ``tie_word_embeddings``); a file holds
    only one of each group (safetensors refuses shared tensors)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(canonical_key(name))
    return [group for group in names.values() if len(group) > 1]


def _retie(model: nn.Module, keys: Mapping[str, str], groups: list[list[str]]) -> None:
    """After an assigning load, make each tied group one parameter object again."""
    for first, *others in groups:
        shared = model.get_parameter(keys[first])
        for name in others:
            owner, _, leaf = keys[name].rpartition(".")
            model.get_submodule(owner)._parameters[leaf] = shared


# =============================================================================================
# The load report
# =============================================================================================


@dataclass
class Mismatch:
    key: str
    expected: tuple[int, ...]
    found: tuple[int, ...]
    origin: str

    def __str__(self) -> str:
        return f"{self.key}: checkpoint {self.found} vs model {self.expected} ({self.origin})"


@dataclass
class LoadReport:
    """What a load did: every model tensor's origin, and everything that did not fit."""

    loaded: dict[str, str] = field(default_factory=dict)
    """Canonical key -> ``"source: source key"``."""
    initialised: dict[str, str] = field(default_factory=dict)
    """Canonical key -> why it starts from its initial value (missing by design)."""
    replaced: dict[str, str] = field(default_factory=dict)
    """Canonical key -> the earlier source a later one overrode (e.g. Phi-2's norms by a stage checkpoint)."""
    ignored: dict[str, str] = field(default_factory=dict)
    """``"source: key"`` -> why it is expected to be unused."""
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[Mismatch] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    causes: list[str] = field(default_factory=list)
    """Likely causes of the failures, in words."""

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.missing or self.mismatched or self.problems)

    def add_cause(self, cause: str) -> None:
        if cause not in self.causes:
            self.causes.append(cause)

    def raise_for_errors(self) -> None:
        if self.ok:
            return
        counts = (
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.mismatched)} shape-mismatched key(s), {len(self.problems)} other problem(s)"
        )
        lines = [f"refusing to load these weights: {counts}"]
        lines += [f"  likely cause: {c}" for c in self.causes]
        lines += _listing("problem", self.problems)
        lines += _listing("missing", _grouped(self.missing))
        lines += _listing("unexpected", _grouped(self.unexpected))
        lines += _listing("shape mismatch", [str(m) for m in self.mismatched])
        raise WeightLoadError("\n".join(lines))

    def summary(self) -> str:
        """A readable account: what came from where, what was initialised and ignored, and why."""
        lines = [f"loaded {len(self.loaded)} tensors"]
        by_source: dict[str, int] = {}
        for origin in self.loaded.values():
            src = origin.rsplit(": ", 1)[0]
            by_source[src] = by_source.get(src, 0) + 1
        lines += [f"  {n:>6} from {src}" for src, n in by_source.items()]
        if self.replaced:
            lines.append(f"{len(self.replaced)} tensors taken from a later source over an earlier one:")
            lines += [f"  {g}" for g in _grouped([f"{k} (was {v})" for k, v in self.replaced.items()])]
        if self.initialised:
            lines.append(f"initialised by design ({len(self.initialised)} tensors):")
            lines += _by_reason({k: ("", why) for k, why in self.initialised.items()})
        if self.ignored:
            lines.append(f"unused by design ({len(self.ignored)} keys):")
            lines += _by_reason({k.rsplit(": ", 1)[1]: (k.rsplit(": ", 1)[0], why) for k, why in self.ignored.items()})
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "loaded": self.loaded,
            "initialised": self.initialised,
            "replaced": self.replaced,
            "ignored": self.ignored,
            "notes": self.notes,
        }


def _grouped(keys: Iterable[str]) -> list[str]:
    """Keys with layer numbers folded (``layers.*.``), each pattern once with its count; a key that
    is alone in its pattern is shown as it is."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", key), []).append(key)
    return [found[0] if len(found) == 1 else f"{pattern}  [x{len(found)}]" for pattern, found in groups.items()]


def _by_reason(entries: Mapping[str, tuple[str, str]], examples: int = 3) -> list[str]:
    """``key -> (source, why)`` as one line per (source, why): count, a few key patterns, reason."""
    groups: dict[tuple[str, str], list[str]] = {}
    for key, source_why in entries.items():
        groups.setdefault(source_why, []).append(key)
    lines = []
    for (source, why), keys in groups.items():
        patterns = [g.split("  [x")[0] for g in _grouped(keys)]
        shown = ", ".join(patterns[:examples]) + (", ..." if len(patterns) > examples else "")
        lines.append(f"  {why}: {len(keys)} {'in ' + source + ' ' if source else ''}({shown})")
    return lines


def _listing(label: str, items: list[str], limit: int = 25) -> list[str]:
    out = [f"  {label}: {item}" for item in items[:limit]]
    if len(items) > limit:
        out.append(f"  ... and {len(items) - limit} more {label} entries")
    return out


# The stacks whose depth a checkpoint can disagree with: (key regex, config attribute, name).
_STACKS = (
    (r"language_model\.model\.layers\.(\d+)\.", lambda c: c.language.num_layers, "language-model layers"),
    (r"vision\.model\.encoder\.layers\.(\d+)\.", lambda c: c.vision.num_layers, "ViT blocks"),
    (r"qformer\.model\.encoder\.layer\.(\d+)\.", lambda c: c.qformer.num_layers, "Q-Former layers"),
)


def _diagnose(report: LoadReport, config: TinyGPTVConfig, seen: Iterable[str]) -> None:
    """Name the likely causes of the report's failures (one line each)."""
    lang = config.language
    for m in report.mismatched:
        if m.key.endswith(("embed_tokens.weight", "lm_head.weight", "lm_head.bias")) and m.found[0] != m.expected[0]:
            report.add_cause(
                f"vocab size {m.found[0]} vs {m.expected[0]}: wrong Phi-2 revision (or another model's checkpoint)?"
            )
        elif ".lora_A." in m.key and m.found[0] != m.expected[0]:
            report.add_cause(f"LoRA rank {m.found[0]} in the checkpoint vs {m.expected[0]} in the config (lora.r)")
        elif ".lora_B." in m.key and m.found[1:] != m.expected[1:]:
            report.add_cause(f"LoRA rank {m.found[1]} in the checkpoint vs {m.expected[1]} in the config (lora.r)")
        elif m.key.startswith("vision_proj."):
            report.add_cause(
                f"the projection in the checkpoint is {m.found}, the config expects {m.expected} "
                f"(Q-Former width {config.qformer.hidden_size} -> projection_hidden_size {config.projection_hidden_size}; "
                "MiniGPT-4's is 768 -> 4096)"
            )
        elif m.key.startswith(_LM) and lang.hidden_size in m.expected and lang.hidden_size not in m.found:
            report.add_cause(
                f"language-model width {max(m.found)} in the checkpoint vs {lang.hidden_size} in the config: "
                "a checkpoint of another backbone (Phi-2 2560, Phi-1.5 2048, TinyLlama 2048)?"
            )
    seen = list(seen)
    for pattern, depth, name in _STACKS:
        indices = {int(m.group(1)) for k in seen if (m := re.match(pattern, k))}
        if indices and max(indices) + 1 != depth(config):
            report.add_cause(f"the checkpoint has {max(indices) + 1} {name}, the config {depth(config)}: wrong preset?")
    if not config.lora.enabled and any(".lora_" in k for k in report.unexpected):
        report.add_cause("the checkpoint holds LoRA weights but the config has lora.enabled=False")


# =============================================================================================
# Assembling a model from parts
# =============================================================================================


def parameter_kind(key: str) -> str:
    """Which kind of parameter a canonical key is, for deciding what may be missing by design."""
    if ".lora_A." in key or ".lora_B." in key:
        return "lora"
    if re.search(r"\.self_attn\.[qk]_layernorm\.|\.post_attention_norm\.", key):
        return "new_norm"  # TinyGPT-V's additions to the language model
    if key.startswith(("vision_proj.", "lm_proj.")):
        return key.split(".", 1)[0]
    return "pretrained"


def initial_value(key: str, shape: torch.Size, config: TinyGPTVConfig) -> torch.Tensor:
    """The value a parameter that is missing by design starts from (fp32, CPU)."""
    value = torch.empty(shape)
    kind = parameter_kind(key)
    if kind == "lora" and ".lora_A." in key:
        nn.init.kaiming_uniform_(value, a=math.sqrt(5))  # peft's default LoRA init: A like nn.Linear...
    elif kind == "lora":
        nn.init.zeros_(value)  # ...and B zero, so a new adapter starts as the identity
    elif kind == "new_norm":
        nn.init.ones_(value) if key.endswith(".weight") else nn.init.zeros_(value)
    elif kind in ("vision_proj", "lm_proj"):
        nn.init.normal_(value, std=config.initializer_range) if key.endswith(".weight") else nn.init.zeros_(value)
    else:
        raise WeightLoadError(f"{key}: a pretrained weight has no initial value; it must be loaded")
    return value


def assemble(
    model: nn.Module,
    parts: list[Part],
    allowed_missing: Mapping[str, str] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    report: LoadReport | None = None,
) -> LoadReport:
    """Materialise every tensor of ``model`` (built on the meta device) from ``parts``.

    Later parts override earlier ones. A model key no part provides is an error unless its
    :func:`parameter_kind` is in ``allowed_missing`` (kind -> why), in which case it gets its
    :func:`initial_value`. Tensors are assigned, not copied: memory-mapped file tensors stay
    memory-mapped unless ``dtype`` or ``device`` asks for a conversion. Raises
    :class:`WeightLoadError` on any missing, unexpected or shape-mismatched key.
    """
    report = report or LoadReport()
    allowed_missing = allowed_missing or {}
    device = torch.device(device or "cpu")
    keys = model_keys(model)
    groups = tied_groups(model)
    twins = {name: group for group in groups for name in group}
    current = model.state_dict(keep_vars=True)
    chosen: dict[str, tuple[torch.Tensor, str]] = {}
    seen: list[str] = []
    for part in parts:
        report.ignored.update({f"{part.source}: {k}": why for k, why in part.ignored.items()})
        report.unexpected += [f"{part.source}: {k}" for k in part.unexpected]
        report.problems += part.problems
        report.notes += part.notes
        for name, tensor in part.tensors.items():
            seen.append(name)
            origin = f"{part.source}: {part.origin[name]}"
            if name not in keys:
                report.unexpected.append(f"{origin} -> {name} (the model has no such tensor)")
                continue
            expected = tuple(current[keys[name]].shape)
            if tuple(tensor.shape) != expected:
                report.mismatched.append(Mismatch(name, expected, tuple(tensor.shape), origin))
                continue
            if name in chosen:
                report.replaced[name] = chosen[name][1]
            chosen[name] = (tensor, origin)
    mismatched = {m.key for m in report.mismatched}
    for name in keys:
        if name in chosen or name in mismatched or any(t in chosen for t in twins.get(name, ())):
            continue
        why = allowed_missing.get(parameter_kind(name))
        if why is None:
            report.missing.append(name)
        else:
            report.initialised[name] = why
    _diagnose(report, model.config, seen)
    report.raise_for_errors()

    staged: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, (tensor, origin) in chosen.items():
        staged[keys[name]] = _placed(tensor, device, dtype, storages)
        report.loaded[name] = origin
    for name in report.initialised:
        value = initial_value(name, current[keys[name]].shape, model.config)
        staged[keys[name]] = value.to(device=device, dtype=dtype or value.dtype)
    for group in groups:
        source = next(name for name in group if keys[name] in staged)
        for name in group:
            staged[keys[name]] = staged[keys[source]]
            report.loaded.setdefault(name, f"tied to {source}")
    model.load_state_dict(staged, strict=True, assign=True)
    _retie(model, keys, groups)
    rebuild_buffers(model, device)
    check_materialised(model)
    return report


def _placed(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None, storages: set[int]) -> torch.Tensor:
    """``tensor`` on ``device`` in ``dtype``; a copy only when it must be one.

    Two parameters must never share memory (an optimizer step on one would change the other, and
    safetensors refuses to save them), so a tensor that is a view into a larger or already used
    storage is cloned.
    """
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    tensor = tensor.to(device)
    storage = tensor.untyped_storage()
    if storage.data_ptr() in storages or storage.nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
        storage = tensor.untyped_storage()
    storages.add(storage.data_ptr())
    return tensor


def rebuild_buffers(model: nn.Module, device: str | torch.device) -> None:
    """Give non-persistent buffers left on the meta device their real values.

    They are not in any checkpoint: rotary inverse frequencies are recomputed by building the
    rotary module afresh from its config (cheap; this covers every rope type transformers knows),
    and ``position_ids`` (BERT-style) are ``arange``. Anything else is an error, not a silent zero.
    """
    for module_name, module in model.named_modules():
        metas = [n for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
        if not metas:
            continue
        if "RotaryEmbedding" in type(module).__name__:
            with torch.device(device):
                fresh = type(module)(module.config)
            for name in metas:
                module._buffers[name] = fresh._buffers[name]
            continue
        for name in metas:
            if name != "position_ids":
                where = f"{module_name}.{name}" if module_name else name
                raise WeightLoadError(f"buffer {where} has no value after loading and no known way to compute it")
            shape = module._buffers[name].shape
            module._buffers[name] = torch.arange(shape[-1], device=device).expand(shape)


def check_materialised(model: nn.Module) -> None:
    """Raise if any parameter or buffer is still on the meta device (a loader bug, never silent)."""
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise WeightLoadError(f"{len(left)} tensors were never given values: {left[:10]}")


# =============================================================================================
# Loaders, one per public format
# =============================================================================================


def _hf_config_values(data: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers of a language model's config.json, whichever naming its transformers version used."""
    rope = data.get("rope_parameters") or {}
    hidden = data.get("hidden_size", data.get("n_embd"))
    heads = data.get("num_attention_heads", data.get("n_head"))
    partial_rotary = data.get("partial_rotary_factor", rope.get("partial_rotary_factor"))
    if partial_rotary is None and data.get("rotary_dim") and hidden and heads:
        partial_rotary = data["rotary_dim"] / (hidden // heads)  # Microsoft's remote-code config
    values = {
        "vocab_size": data.get("vocab_size"),
        "hidden_size": hidden,
        "num_layers": data.get("num_hidden_layers", data.get("n_layer")),
        "num_heads": heads,
        "partial_rotary_factor": partial_rotary,
        "rope_theta": data.get("rope_theta", rope.get("rope_theta")),
        "layer_norm_eps": data.get("layer_norm_eps", data.get("rms_norm_eps", data.get("layer_norm_epsilon"))),
    }
    return {k: v for k, v in values.items() if v is not None}


def _lm_layout(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(k.startswith("transformer.h.") for k in keys):
        return "phi"  # Microsoft's remote code
    if any(".mlp.gate_proj." in k for k in keys):
        return "llama"
    if any(".mlp.fc1." in k for k in keys):
        return "phi"
    return "unknown"


def language_model_part(directory: Path, config: TinyGPTVConfig, device: str | torch.device = "cpu") -> Part:
    """Phi-2 / Phi-1.5 / TinyLlama from a local Hugging Face directory (config.json + weights)."""
    lang = config.language
    hf_config = read_json(directory / "config.json")
    state = read_hf_weights(directory, device)
    layout = _lm_layout(state)
    if layout != lang.arch:
        raise WeightLoadError(
            f"{directory} does not hold a {lang.arch} language model (its weights look like: {layout}; "
            f"config.json model_type {hf_config.get('model_type')!r}), but the config's language.arch is "
            f"{lang.arch!r}: pick the matching preset (tinygptv-phi2, tinygptv-phi1.5, tinygptv-tinyllama)"
        )
    part = apply_rules(state, language_rules(config), str(directory))
    expected = {
        "vocab_size": lang.vocab_size,
        "hidden_size": lang.hidden_size,
        "num_layers": lang.num_layers,
        "num_heads": lang.num_heads,
        "rope_theta": lang.rope_theta,
        "layer_norm_eps": lang.layer_norm_eps,
    }
    if lang.arch == "phi":
        expected["partial_rotary_factor"] = lang.partial_rotary_factor
    for name, found in _hf_config_values(hf_config).items():
        if name in expected and not math.isclose(float(found), float(expected[name]), rel_tol=1e-6):
            part.problems.append(f"{directory}/config.json: {name} {found} vs {expected[name]} in the config")
    return part


def _fit_position_embedding(part: Part, config: TinyGPTVConfig) -> None:
    """Interpolate the ViT position table bicubically when the image size differs (224 -> 448 px),
    as LAVIS' ``interpolate_pos_embed`` does for stage 4."""
    key = f"{_VIT}embeddings.position_embedding"
    table = part.tensors.get(key)
    want = config.vision.num_patches + 1
    if table is None or table.ndim != 3 or table.shape[1] == want:
        return
    old, new = math.isqrt(table.shape[1] - 1), math.isqrt(want - 1)
    if old * old != table.shape[1] - 1:
        return  # not a square grid: left to the shape check, which reports it
    grid = table[:, 1:].float().reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, C, old, old)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)  # (1, new*new, C)
    part.tensors[key] = torch.cat([table[:, :1].float(), grid], dim=1).to(table.dtype)
    patch = config.vision.patch_size
    part.notes.append(
        f"{part.source}: ViT position embeddings interpolated bicubically from {old}x{old} to {new}x{new} "
        f"patches ({old * patch} -> {new * patch} px)"
    )


def hf_blip2_part(directory: Path, config: TinyGPTVConfig, device: str | torch.device = "cpu") -> Part:
    """Vision encoder, ln_vision, Q-Former and query tokens from a Hugging Face BLIP-2 directory."""
    part = apply_rules(read_hf_weights(directory, device), hf_blip2_rules(), str(directory))
    _fit_position_embedding(part, config)
    return part


def _fuse_eva_qv_bias(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """EVA's q_bias and v_bias -> one key holding cat(q_bias, 0, v_bias), the fused qkv bias."""
    out = dict(state)
    for key in [k for k in state if re.fullmatch(re.escape(prefix) + r"blocks\.\d+\.attn\.q_bias", k)]:
        base = key[: -len("q_bias")]
        if base + "v_bias" in out:
            q, v = out.pop(key), out.pop(base + "v_bias")
            out[base + "q_bias+v_bias"] = torch.cat([q, torch.zeros_like(q), v])
    return out


def _eva_rules_for(config: TinyGPTVConfig) -> list[Rule]:
    # EVA-CLIP-g has 40 blocks and BLIP-2 uses 39: exactly one extra block is expected and unused.
    extra = config.vision.num_layers
    return [_unused(rf"blocks\.{extra}\..*", "EVA-CLIP's last block, which BLIP-2 drops"), *eva_vit_rules()]


def lavis_parts(
    config: TinyGPTVConfig,
    blip2_lavis: Path,
    eva_vit: Path | None = None,
    sha256: Mapping[str, str] | None = None,
    device: str | torch.device = "cpu",
) -> list[Part]:
    """ViT from ``eva_vit_g.pth`` (or the ``visual_encoder.*`` copy inside the BLIP-2 file when no
    EVA file is given), ln_vision + Q-Former + query tokens from ``blip2_pretrained_flant5xxl.pth``."""
    sha256 = sha256 or {}
    blip2 = read_checkpoint(blip2_lavis, device, sha256.get("blip2_lavis"))
    rules = lavis_blip2_rules()
    parts = []
    if eva_vit is not None:
        vit = _fuse_eva_qv_bias(read_checkpoint(eva_vit, device, sha256.get("eva_vit")))
        parts.append(apply_rules(vit, _eva_rules_for(config), str(eva_vit)))
        rules.append(_unused(r"visual_encoder\..*", f"the ViT copy in this file: the ViT comes from {eva_vit.name}"))
    elif any(k.startswith("visual_encoder.") for k in blip2):
        blip2 = _fuse_eva_qv_bias(blip2, "visual_encoder.")
        rules += _prefixed(r"visual_encoder\.", _eva_rules_for(config))
    else:
        raise WeightLoadError(
            f"{blip2_lavis} holds no ViT (visual_encoder.*): also give the EVA-ViT-g file (eva_vit_g.pth)"
        )
    parts.append(apply_rules(blip2, rules, str(blip2_lavis)))
    for part in parts:
        _fit_position_embedding(part, config)
    return parts


def minigpt4_part(path: Path, sha256: str | None = None, device: str | torch.device = "cpu") -> Part:
    """MiniGPT-4's ``llama_proj`` as our ``vision_proj`` (paper, stage 1 initialisation)."""
    return apply_rules(read_checkpoint(path, device, sha256), minigpt4_rules(), str(path))


def stage_from_filename(path: Path) -> int | None:
    """4 for ``TinyGPT-V_for_Stage4.pth``; None when the name does not say."""
    match = re.search(r"stage[_-]?([1-4])", path.name, flags=re.IGNORECASE)
    return int(match.group(1)) if match else None


def released_checkpoint_part(
    path: Path,
    model: nn.Module,
    stage: int | None = None,
    sha256: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Part, int]:
    """The authors' ``TinyGPT-V_for_Stage{N}.pth`` for ``model``; returns the part and the stage.

    The checkpoint must hold every parameter that trains in the requested stage (by default the
    stage in its file name): projections and norms, and from stage 2 on the LoRA weights. LoRA
    weights in a stage-1 file (the release's known bug, their issue #13) are loaded and noted.
    """
    from ..stages import get_stage, trainable_parameter_names

    part = apply_rules(read_checkpoint(path, device, sha256), released_rules(model.config), str(path))
    file_stage = stage_from_filename(path)
    has_lora = any(parameter_kind(k) == "lora" for k in part.tensors)
    stage = stage or file_stage
    if stage is None:
        if model.config.lora.enabled and not has_lora:
            raise WeightLoadError(
                f"{path} has no LoRA weights and its name does not say its stage: pass stage=1 if it is a "
                "stage-1 checkpoint, or build the model with lora.enabled=False"
            )
        stage = 2 if has_lora else 1
    required = {canonical_key(n) for n in trainable_parameter_names(model, get_stage(stage))}
    lacking = sorted(required - set(part.tensors))
    if lacking:
        lora_lacking = [k for k in lacking if parameter_kind(k) == "lora"]
        if lora_lacking and not has_lora:
            cause = (
                f"stage-{file_stage or '?'} checkpoint has no LoRA weights but a stage-{stage} model was requested "
                "(stages 2-4 train LoRA; use a stage 2-4 checkpoint, or stage=1)"
            )
        else:
            cause = f"the checkpoint lacks {len(lacking)} tensors that train in stage {stage}"
        raise WeightLoadError(f"{path}: {cause}:\n" + "\n".join(f"  missing: {g}" for g in _grouped(lacking)[:25]))
    if stage == 1 and has_lora:
        part.notes.append(
            f"{path.name}: this stage-1 checkpoint holds LoRA weights (the release's stage-1 config trained "
            "LoRA by mistake, authors' issue #13); they are loaded, so the model matches the release"
        )
    return part, stage


# =============================================================================================
# Assembling a model from the public ingredients
# =============================================================================================


@dataclass
class Ingredients:
    """Where the parts of a TinyGPT-V model come from: local paths or Hugging Face Hub ids.

    The vision side comes from ``blip2`` (a Hugging Face BLIP-2 directory) or from ``blip2_lavis``
    (``blip2_pretrained_flant5xxl.pth``) with ``eva_vit`` (``eva_vit_g.pth``). File ingredients may
    be ``hf://owner/repo/path/in/repo``.
    """

    language: str
    """Phi-2 / Phi-1.5 / TinyLlama: a Hugging Face directory or hub id."""
    blip2: str | None = None
    eva_vit: str | None = None
    blip2_lavis: str | None = None
    minigpt4: str | None = None
    """``pretrained_minigpt4*.pth``: starts ``vision_proj`` (paper, stage 1)."""
    stage_checkpoint: str | None = None
    """The authors' ``TinyGPT-V_for_Stage{N}.pth``."""
    stage: int | None = None
    """The stage the model is for; by default the one in the checkpoint's file name."""
    sha256: dict[str, str] = field(default_factory=dict)
    """Expected sha256 per file ingredient name (``eva_vit``, ``blip2_lavis``, ``minigpt4``, ``stage_checkpoint``)."""

    FILES = ("eva_vit", "blip2_lavis", "minigpt4", "stage_checkpoint")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, {})}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Ingredients:
        return cls(**data)

    def frozen_only(self) -> Ingredients:
        """Just the sources of the frozen parts (what a trainable-only save refers to)."""
        return Ingredients(
            self.language,
            self.blip2,
            self.eva_vit,
            self.blip2_lavis,
            sha256={k: v for k, v in self.sha256.items() if k in ("eva_vit", "blip2_lavis")},
        )


def _ingredient_parts(
    ingredients: Ingredients,
    config: TinyGPTVConfig,
    device: str | torch.device,
    offline: bool | None,
    relative_to: Path | None = None,
) -> tuple[list[Part], Path]:
    """Parts for the frozen ingredients (language model, vision side) and the language model's directory."""
    from ..hub import resolve_dir, resolve_file

    unknown = set(ingredients.sha256) - set(Ingredients.FILES)
    if unknown:
        raise ValueError(f"sha256 given for {sorted(unknown)}; file ingredients are {', '.join(Ingredients.FILES)}")
    if ingredients.blip2 and (ingredients.blip2_lavis or ingredients.eva_vit):
        raise ValueError(
            "give the vision side once: blip2 (a Hugging Face BLIP-2 directory) or blip2_lavis (+ eva_vit)"
        )
    if not (ingredients.blip2 or ingredients.blip2_lavis):
        raise ValueError(
            "no vision source: give blip2 (a Hugging Face BLIP-2 directory or hub id) or blip2_lavis "
            "(blip2_pretrained_flant5xxl.pth) with eva_vit (eva_vit_g.pth)"
        )
    lm_dir = resolve_dir(ingredients.language, offline=offline, relative_to=relative_to)
    parts = [language_model_part(lm_dir, config, device)]
    if ingredients.blip2:
        parts.append(
            hf_blip2_part(resolve_dir(ingredients.blip2, offline=offline, relative_to=relative_to), config, device)
        )
    else:
        eva = (
            resolve_file(ingredients.eva_vit, offline=offline, relative_to=relative_to) if ingredients.eva_vit else None
        )
        blip2 = resolve_file(ingredients.blip2_lavis, offline=offline, relative_to=relative_to)
        parts += lavis_parts(config, blip2, eva, ingredients.sha256, device)
    return parts, lm_dir


def load_ingredients(
    config: TinyGPTVConfig,
    ingredients: Ingredients,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = torch.float32,
    offline: bool | None = None,
):
    """A :class:`~tinygptv.TinyGPTV` assembled from public weights; returns ``(model, report)``.

    What may be missing by design: without a stage checkpoint, TinyGPT-V's new norms (weight 1,
    bias 0), a new LoRA (A Kaiming-uniform, B zero) and ``lm_proj`` (Gaussian, paper), and
    ``vision_proj`` when MiniGPT-4's is not given either. With a stage checkpoint, everything that
    trains in its stage must come from it.
    """
    from ..hub import resolve_file
    from .tinygptv import TinyGPTV

    device = device or "cpu"
    parts, lm_dir = _ingredient_parts(ingredients, config, device, offline)
    tokenizer = load_tokenizer(lm_dir, config)
    with torch.device("meta"):
        model = TinyGPTV(config, tokenizer=tokenizer)
    allowed = {
        "new_norm": "TinyGPT-V's new norm, starting as nn.LayerNorm / RMSNorm do (weight 1, bias 0)",
        "lora": "new LoRA (A Kaiming-uniform, B zero: starts as the identity)",
        "lm_proj": "new projection to the LM width, Gaussian init (paper section 3.1)",
        "vision_proj": "no MiniGPT-4 projection given: Gaussian init (the paper starts from MiniGPT-4's)",
    }
    if ingredients.minigpt4:
        path = resolve_file(ingredients.minigpt4, offline=offline)
        parts.append(minigpt4_part(path, ingredients.sha256.get("minigpt4"), device))
        del allowed["vision_proj"]
    if ingredients.stage_checkpoint:
        path = resolve_file(ingredients.stage_checkpoint, offline=offline)
        part, stage = released_checkpoint_part(
            path, model, ingredients.stage, ingredients.sha256.get("stage_checkpoint"), device
        )
        parts.append(part)
        allowed = {"lora": "stage 1 trains no LoRA (paper): new LoRA, B zero"} if stage == 1 else {}
    report = assemble(model, parts, allowed, device, dtype)
    model.weights_source = {"ingredients": ingredients.to_dict()}
    return model.eval(), report


def load_released_checkpoint(
    model: nn.Module, path: str | Path, stage: int | None = None, sha256: str | None = None
) -> LoadReport:
    """Copy the authors' stage checkpoint into an already loaded ``model`` (e.g. to start stage 2
    from their stage 1). Shapes are checked; the model's parameters keep their identity."""
    from ..hub import resolve_file

    path = resolve_file(str(path))
    part, _ = released_checkpoint_part(path, model, stage, sha256)
    report = LoadReport(notes=list(part.notes), ignored={f"{part.source}: {k}": w for k, w in part.ignored.items()})
    report.unexpected += [f"{part.source}: {k}" for k in part.unexpected]
    report.problems += part.problems
    keys = model_keys(model)
    current = model.state_dict(keep_vars=True)
    for name, tensor in part.tensors.items():
        origin = f"{part.source}: {part.origin[name]}"
        if name not in keys:
            report.unexpected.append(f"{origin} -> {name} (the model has no such tensor)")
        elif tuple(tensor.shape) != tuple(current[keys[name]].shape):
            report.mismatched.append(Mismatch(name, tuple(current[keys[name]].shape), tuple(tensor.shape), origin))
        else:
            report.loaded[name] = origin
    _diagnose(report, model.config, part.tensors)
    report.raise_for_errors()
    with torch.no_grad():
        for name in report.loaded:
            current[keys[name]].copy_(part.tensors[name])
    return report


# =============================================================================================
# Our own format
# =============================================================================================

FORMAT_NAME = "tinygptv"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
FULL_PATTERN = "model{suffix}.safetensors"
TRAINABLE_PATTERN = "trainable{suffix}.safetensors"
# What a hub download of a directory in our format fetches: config, weights, tokenizer.
OUR_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]


def trainable_keys(model: nn.Module) -> set[str]:
    """Canonical keys of every parameter that trains in some stage: what a trainable-only save holds."""
    from ..stages import STAGES, trainable_parameter_names

    return {canonical_key(n) for stage in STAGES.values() for n in trainable_parameter_names(model, stage)}


def _reference(value: str, directory: Path) -> str:
    """A local path as seen from ``directory`` (so the pair can move together); a hub id as is."""
    path = Path(value).expanduser()
    if path.exists():
        return Path(os.path.relpath(path.resolve(), directory.resolve())).as_posix()
    return value


def _base_reference(base: Any, directory: Path) -> dict[str, Any]:
    if isinstance(base, Ingredients):
        base = {"ingredients": base.to_dict()}
    elif isinstance(base, (str, Path)):
        base = {"pretrained": str(base)}
    if not isinstance(base, Mapping) or not ({"pretrained", "ingredients"} & set(base)):
        raise ValueError(
            "a trainable-only save needs the source of the frozen parts: base= a directory / hub id in our "
            "format, or Ingredients(...) (a model loaded with from_pretrained / from_ingredients knows its own)"
        )
    if "pretrained" in base:
        return {"pretrained": _reference(str(base["pretrained"]), directory)}
    ingredients = dict(base["ingredients"])
    for name in ("language", "blip2", *Ingredients.FILES):
        if ingredients.get(name):
            ingredients[name] = _reference(str(ingredients[name]), directory)
    return {"ingredients": Ingredients.from_dict(ingredients).frozen_only().to_dict()}


def save_pretrained(
    model: nn.Module,
    directory: str | Path,
    trainable_only: bool = False,
    base: Any = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write ``model`` in our format: config.json, safetensors (sharded above ``max_shard_size``) and
    the tokenizer.

    ``trainable_only`` writes just the parameters that train in some stage (projections, LM norms,
    LoRA) and records in config.json where the frozen parts come from: ``base`` (our format, as a
    path or hub id, or :class:`Ingredients`), by default the source the model was loaded from.
    """
    from huggingface_hub import save_torch_state_dict

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {canonical_key(k): t.detach() for k, t in model.state_dict().items()}
    meta: dict[str, Any] = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": "full"}
    pattern = FULL_PATTERN
    if trainable_only:
        meta["kind"] = "trainable"
        meta["base"] = _base_reference(base if base is not None else getattr(model, "weights_source", None), directory)
        keep = trainable_keys(model)
        state = {k: t for k, t in state.items() if k in keep}
        pattern = TRAINABLE_PATTERN
    # Both kinds clean their own shards only; a stale file of the other kind would confuse readers.
    for stale in [*directory.glob("model*.safetensors*"), *directory.glob("trainable*.safetensors*")]:
        stale.unlink()
    save_torch_state_dict(
        state, directory, filename_pattern=pattern, max_shard_size=max_shard_size, metadata={"format": "pt"}
    )
    files = sorted(p.name for p in directory.glob(pattern.format(suffix="*")) if p.suffix == ".safetensors")
    meta["files"] = {name: file_sha256(directory / name) for name in files}
    meta["config"] = model.config.to_dict()
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if getattr(model, "tokenizer", None) is not None:
        model.tokenizer.save_pretrained(directory)
    return directory


def read_pretrained_meta(directory: Path) -> dict[str, Any]:
    """config.json of a directory in our format, validated."""
    meta = read_json(directory / CONFIG_FILE)
    if meta.get("format") != FORMAT_NAME:
        raise WeightLoadError(
            f'{directory} is not a TinyGPT-V directory (config.json has no "format": "{FORMAT_NAME}"); '
            "for public checkpoints use TinyGPTV.from_ingredients or `tinygptv convert`"
        )
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise WeightLoadError(
            f"{directory} uses format version {meta['format_version']}; this tinygptv reads up to {FORMAT_VERSION}"
        )
    return meta


def _own_part(directory: Path, meta: Mapping[str, Any], device: str | torch.device, verify: bool) -> Part:
    files = list(meta.get("files", {}))
    if not files:
        raise WeightLoadError(f"{directory}/config.json lists no weight files")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if verify:
            verify_sha256(directory / name, meta["files"][name])
        state.update(read_checkpoint(directory / name, device))
    return Part(str(directory), tensors=state, origin={k: k for k in state})


def _pretrained_parts(
    directory: Path,
    config: TinyGPTVConfig,
    device: str | torch.device,
    offline: bool | None,
    verify: bool,
    depth: int = 0,
) -> tuple[list[Part], list[str]]:
    """The parts of a directory in our format (its base's first) and the keys its own file must hold."""
    from ..hub import resolve_dir

    meta = read_pretrained_meta(directory)
    own = _own_part(directory, meta, device, verify)
    if meta["kind"] == "full":
        return [own], []
    if depth > 8:
        raise WeightLoadError(f"{directory}: trainable-only bases nest too deep (a loop?)")
    base = meta.get("base") or {}
    if "pretrained" in base:
        base_dir = resolve_dir(base["pretrained"], offline=offline, relative_to=directory)
        parts, _ = _pretrained_parts(base_dir, config, device, offline, verify, depth + 1)
    elif "ingredients" in base:
        ingredients = Ingredients.from_dict(base["ingredients"])
        parts, _ = _ingredient_parts(ingredients, config, device, offline, relative_to=directory)
    else:
        raise WeightLoadError(f'{directory}/config.json: a trainable-only save without a "base" reference')
    return [*parts, own], list(own.tensors)


def load_pretrained(
    path_or_hub_id: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    offline: bool | None = None,
    revision: str | None = None,
    verify: bool = False,
):
    """A :class:`~tinygptv.TinyGPTV` from a directory in our format (local, or a hub id downloaded
    into the Hugging Face cache); returns ``(model, report)``.

    Built on the meta device and assigned the memory-mapped safetensors tensors: no second copy of
    the weights. ``dtype`` casts on the way in (tensor by tensor); ``verify`` checks the files'
    sha256 against config.json. A trainable-only directory is reassembled with its base, and must
    hold exactly the parameters that train.
    """
    from ..hub import resolve_dir
    from .tinygptv import TinyGPTV

    device = device or "cpu"
    directory = resolve_dir(path_or_hub_id, offline=offline, revision=revision, allow_patterns=OUR_FILES)
    meta = read_pretrained_meta(directory)
    config = TinyGPTVConfig.from_dict(meta["config"])
    parts, own_keys = _pretrained_parts(directory, config, device, offline, verify)
    with torch.device("meta"):
        model = TinyGPTV(config, tokenizer=load_tokenizer(directory, config))
    report = LoadReport()
    if meta["kind"] == "trainable":
        expected = trainable_keys(model)
        report.missing += [f"{k} (trainable, not in {directory.name})" for k in sorted(expected - set(own_keys))]
        report.unexpected += [f"{directory}: {k} (not a trainable parameter)" for k in sorted(set(own_keys) - expected)]
    assemble(model, parts, {}, device, dtype, report)
    model.weights_source = _absolute_base(meta, directory, str(path_or_hub_id))
    return model.eval(), report


def _absolute_base(meta: Mapping[str, Any], directory: Path, spec: str) -> dict[str, Any]:
    """Where a loaded model's frozen parts come from, with local paths made absolute, so that
    saving it trainable-only anywhere else still finds them."""

    def absolute(ref: str) -> str:
        local = directory / ref
        return str(local.resolve()) if local.exists() else ref

    if meta["kind"] == "full":
        return {"pretrained": str(directory.resolve()) if Path(spec).exists() else spec}
    base = meta["base"]
    if "pretrained" in base:
        return {"pretrained": absolute(base["pretrained"])}
    return {
        "ingredients": {
            k: absolute(v) if isinstance(v, str) and k != "stage" else v for k, v in base["ingredients"].items()
        }
    }


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA into the base weights (peft's ``merge_and_unload``): same outputs, no adapter cost.

    The model keeps working as a TinyGPT-V model whose config says ``lora.enabled=False``.
    """
    if not model.config.lora.enabled:
        return model
    model.language_model = model.language_model.merge_and_unload()
    model.config = model.config.replace(**{"lora.enabled": False})
    return model


__all__ = [
    "Ingredients",
    "LoadReport",
    "Part",
    "Rule",
    "WeightLoadError",
    "apply_rules",
    "assemble",
    "canonical_key",
    "file_sha256",
    "load_ingredients",
    "load_pretrained",
    "load_released_checkpoint",
    "merge_lora",
    "read_checkpoint",
    "save_pretrained",
    "trainable_keys",
    "verify_sha256",
]
