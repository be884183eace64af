"""The language model: transformers' Phi (or Llama) with TinyGPT-V's changes.

TinyGPT-V changes two things inside each decoder layer (paper section 3.2, eq. 5-7):

* QK norm: a LayerNorm over each head's queries and keys, before the rotary embedding.
  transformers' Phi already has this switch (``PhiConfig.qk_layernorm``); for Llama we add it.
* Post-attention RMSNorm: the attention output is RMS-normalised before it joins the residual,
  ``h = x + RMSNorm(attn(LN(x))) + mlp(LN(x))`` for Phi's parallel block.

Everything else is the upstream model: we subclass and override only what differs, each
difference marked ``# TinyGPT-V:``. The installed package is never patched. Each subclassed model
builds its layers exactly once (constructing the parent and swapping layers would build a 2.7B
model twice).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, PhiConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import (
    ALL_ATTENTION_FUNCTIONS,
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.models.phi.modeling_phi import (
    PhiDecoderLayer,
    PhiForCausalLM,
    PhiModel,
    PhiPreTrainedModel,
    PhiRotaryEmbedding,
)

from ..config import LanguageConfig


# ---------------------------------------------------------------------------------------------
# Phi (Phi-2, Phi-1.5)
# ---------------------------------------------------------------------------------------------


CACHE_NAMES = ("cache", "past_key_values")
"""What transformers calls the KV cache argument: ``past_key_values`` up to 5.23, ``cache`` from 5.24
(the old name deprecated, to go in 5.40). Our layers accept either."""


def kwargs_cache(kwargs: dict):
    """Pop the KV cache out of a layer's keyword arguments, under whichever name it came."""
    found = [kwargs.pop(name) for name in CACHE_NAMES if name in kwargs]
    found = [c for c in found if c is not None]
    return found[0] if found else None


def cache_argument(lm: nn.Module, cache) -> dict:
    """``{name: cache}`` for calling ``lm`` (a transformers causal LM) with a KV cache, under the
    name its ``forward`` takes."""
    import inspect

    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # a peft wrapper takes **kwargs
    params = inspect.signature(type(base).forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


class TinyGPTVPhiConfig(PhiConfig):
    """PhiConfig plus TinyGPT-V's post-attention RMSNorm switch (QK norm is Phi's own ``qk_layernorm``)."""

    model_type = "tinygptv_phi"

    def __init__(self, post_attention_rmsnorm: bool = True, rms_norm_eps: float = 1e-6, **kwargs):
        self.post_attention_rmsnorm = post_attention_rmsnorm
        self.rms_norm_eps = rms_norm_eps
        super().__init__(**kwargs)


class TinyGPTVPhiDecoderLayer(PhiDecoderLayer):
    SHARED_INPUT_LINEARS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"),)
    """Linear layers that read the same tensor (the input LayerNorm's output): a quantized model
    may run each group as one matmul (:func:`tinygptv.quantize.fuse_shared_inputs`)."""

    def __init__(self, config: TinyGPTVPhiConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        # TinyGPT-V: RMSNorm on the attention output (LLaMA style: weight only, computed in fp32).
        self.post_attention_norm = (
            LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if config.post_attention_rmsnorm else None
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        # The KV cache arrives in ``kwargs`` under the name this transformers version uses
        # (``past_key_values``, or ``cache`` from 5.24 on) and goes on to the attention unchanged.
        residual = hidden_states  # (B, T, C)
        normed = self.input_layernorm(hidden_states)
        attn_out, _ = self.self_attn(
            hidden_states=normed,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        if self.post_attention_norm is not None:
            attn_out = self.post_attention_norm(attn_out)  # TinyGPT-V: eq. 7 of the paper
        attn_out = self.resid_dropout(attn_out)
        mlp_out = self.resid_dropout(self.mlp(normed))
        return residual + attn_out + mlp_out  # Phi's parallel block


class TinyGPTVPhiModel(PhiModel):
    config_class = TinyGPTVPhiConfig

    def __init__(self, config: TinyGPTVPhiConfig):
        # Build the same modules as PhiModel.__init__, with our decoder layer, exactly once.
        PhiPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [TinyGPTVPhiDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.rotary_emb = PhiRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.embed_dropout = nn.Dropout(config.embd_pdrop)
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()


class TinyGPTVPhiForCausalLM(PhiForCausalLM):
    config_class = TinyGPTVPhiConfig

    def __init__(self, config: TinyGPTVPhiConfig):
        PhiPreTrainedModel.__init__(self, config)
        self.model = TinyGPTVPhiModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.post_init()


# ---------------------------------------------------------------------------------------------
# Llama (TinyLlama, the Table 6 ablation backbone)
# ---------------------------------------------------------------------------------------------


class TinyGPTVLlamaConfig(LlamaConfig):
    """LlamaConfig plus TinyGPT-V's QK LayerNorm and post-attention RMSNorm switches."""

    model_type = "tinygptv_llama"

    def __init__(self, qk_layernorm: bool = True, post_attention_rmsnorm: bool = True, **kwargs):
        self.qk_layernorm = qk_layernorm
        self.post_attention_rmsnorm = post_attention_rmsnorm
        super().__init__(**kwargs)


class TinyGPTVLlamaAttention(LlamaAttention):
    def __init__(self, config: TinyGPTVLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        # TinyGPT-V: per-head LayerNorm on queries and keys (Llama has none upstream).
        self.qk_layernorm = config.qk_layernorm
        if self.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_layernorm = nn.LayerNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        cache = kwargs_cache(kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, T, D)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hkv, T, D)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if self.qk_layernorm:  # TinyGPT-V: before RoPE
            query = self.q_layernorm(query)
            key = self.k_layernorm(key)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


class TinyGPTVLlamaDecoderLayer(LlamaDecoderLayer):
    SHARED_INPUT_LINEARS = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("mlp.gate_proj", "mlp.up_proj"),
    )

    def __init__(self, config: TinyGPTVLlamaConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = TinyGPTVLlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # TinyGPT-V: RMSNorm on the attention output. (Llama's own "post_attention_layernorm" is the
        # pre-MLP norm despite its name.)
        self.post_attention_norm = (
            LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if config.post_attention_rmsnorm else None
        )

    def forward(self, hidden_states, attention_mask=None, position_ids=None, use_cache=False,
                position_embeddings=None, **kwargs):
        residual = hidden_states  # (B, T, C)
        attn_out, _ = self.self_attn(  # the KV cache travels in kwargs, as in the Phi layer
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        if self.post_attention_norm is not None:
            attn_out = self.post_attention_norm(attn_out)  # TinyGPT-V
        hidden_states = residual + attn_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class TinyGPTVLlamaModel(LlamaModel):
    config_class = TinyGPTVLlamaConfig

    def __init__(self, config: TinyGPTVLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [TinyGPTVLlamaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class TinyGPTVLlamaForCausalLM(LlamaForCausalLM):
    config_class = TinyGPTVLlamaConfig

    def __init__(self, config: TinyGPTVLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = TinyGPTVLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


# ---------------------------------------------------------------------------------------------
# Construction from our config
# ---------------------------------------------------------------------------------------------


def hf_language_config(cfg: LanguageConfig, initializer_range: float = 0.02):
    """The transformers config for ``cfg``: a :class:`TinyGPTVPhiConfig` or :class:`TinyGPTVLlamaConfig`."""
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=initializer_range,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        post_attention_rmsnorm=cfg.post_attention_rmsnorm,
    )
    if cfg.arch == "phi":
        return TinyGPTVPhiConfig(
            **common,
            layer_norm_eps=cfg.layer_norm_eps,
            rms_norm_eps=cfg.rms_norm_eps,
            qk_layernorm=cfg.qk_norm,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": cfg.rope_theta,
                "partial_rotary_factor": cfg.partial_rotary_factor,
            },
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attention_dropout=0.0,
        )
    if cfg.arch == "llama":
        return TinyGPTVLlamaConfig(
            **common,
            rms_norm_eps=cfg.layer_norm_eps,
            qk_layernorm=cfg.qk_norm,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            attention_bias=False,
        )
    raise ValueError(f"unknown language model arch {cfg.arch!r}; expected 'phi' or 'llama'")


def build_language_model(cfg: LanguageConfig, initializer_range: float = 0.02) -> nn.Module:
    """A randomly initialised TinyGPT-V language model (build it under ``torch.device('meta')`` to
    allocate nothing)."""
    hf_cfg = hf_language_config(cfg, initializer_range)
    cls = TinyGPTVPhiForCausalLM if cfg.arch == "phi" else TinyGPTVLlamaForCausalLM
    return cls(hf_cfg)


def default_lora_targets(cfg: LanguageConfig) -> list[str]:
    """Attention projections that get LoRA: the fused-qkv-plus-dense pair of the original, split."""
    out = "dense" if cfg.arch == "phi" else "o_proj"
    return ["q_proj", "k_proj", "v_proj", out]


def lora_target_regex(cfg: LanguageConfig, targets: list[str] | tuple[str, ...] | None) -> str:
    """A peft ``target_modules`` regex matching only the LM's self-attention projections.

    A bare name such as ``"dense"`` would also match unrelated modules, so we anchor on
    ``layers.N.self_attn.`` (see PLATFORM-NOTES).
    """
    names = list(targets) if targets else default_lora_targets(cfg)
    return r".*layers\.\d+\.self_attn\.(" + "|".join(names) + r")$"
