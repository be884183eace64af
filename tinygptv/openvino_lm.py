"""The language model as an OpenVINO model: an experimental CPU path for its weight-compressed kernels.

``export_language_model`` traces one step of our Phi LM (TinyGPT-V's QK LayerNorm and
post-attention RMSNorm included: the step calls the model's own modules) into OpenVINO, with the KV
cache held inside the compiled model as state (``ReadValue`` / ``Assign``), optionally compresses
its Linear weights with NNCF (int8 per channel, or int4 per group), and saves the IR
(``.xml`` + ``.bin``). :class:`OpenVINOLanguageModel` loads it and runs prompt chunks and single
tokens as embeddings, returning the last position's logits.

What it is for, measured (``benchmarks/bench_openvino.py``, docs/cpu-inference.md): OpenVINO's
compressed FullyConnected kernels against ours (fbgemm int8, torch's int4 kernel) at real
``tinygptv-phi2`` size on this CPU. It is not wired into ``TinyGPTV.from_pretrained`` / chat:
the engine's conversations crop and reuse a transformers KV cache, which this state does not do.

Requires ``pip install 'tinygptv[openvino]'`` (openvino, nncf).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZE_MODES = ("int8", "int4")


class LanguageModelStep(nn.Module):
    """One forward of a Phi LM after a KV cache given as tensors, written out so that it traces:
    ``(inputs_embeds (1, T, C), keys / values of each layer (1, H, P, D))`` ->
    ``(last position's logits (1, V), keys / values (1, H, P + T, D))``. The new tokens take
    positions P .. P + T - 1 and attend causally to everything before them."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        from .model.language import TinyGPTVPhiForCausalLM

        if not isinstance(lm, TinyGPTVPhiForCausalLM):
            raise ValueError(f"the OpenVINO export supports the Phi language model, got {type(lm).__name__}")
        self.lm = lm

    def forward(self, inputs_embeds: torch.Tensor, *past: torch.Tensor):
        from transformers.models.phi.modeling_phi import apply_rotary_pos_emb

        model = self.lm.model
        h = inputs_embeds
        new, before = h.shape[1], past[0].shape[2]
        positions = torch.arange(new, dtype=torch.int64)[None] + before
        cos, sin = model.rotary_emb(h, positions)
        mask = torch.arange(before + new, dtype=torch.int64)[None, :] <= positions[0][:, None]  # (T, P + T)
        presents = []
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            normed = layer.input_layernorm(h)
            shape = (1, new, -1, attn.head_dim)
            q = attn.q_proj(normed).view(shape).transpose(1, 2)
            k = attn.k_proj(normed).view(shape).transpose(1, 2)
            v = attn.v_proj(normed).view(shape).transpose(1, 2)
            if attn.qk_layernorm:  # TinyGPT-V's QK norm
                q, k = attn.q_layernorm(q), attn.k_layernorm(k)
            r = attn.rotary_ndims  # Phi's partial rotary embedding
            q_rot, k_rot = apply_rotary_pos_emb(q[..., :r], k[..., :r], cos, sin)
            q = torch.cat((q_rot, q[..., r:]), dim=-1)
            k = torch.cat((past[2 * i], torch.cat((k_rot, k[..., r:]), dim=-1)), dim=2)
            v = torch.cat((past[2 * i + 1], v), dim=2)
            presents += [k, v]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
            o = attn.dense(o.transpose(1, 2).reshape(1, new, -1))
            if layer.post_attention_norm is not None:  # TinyGPT-V's post-attention RMSNorm
                o = layer.post_attention_norm(o)
            h = h + o + layer.mlp(normed)  # Phi's parallel block
        logits = self.lm.lm_head(model.final_layernorm(h[:, -1]))
        return (logits, *presents)


def _state_names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return past, [name.replace("past.", "present.") for name in past]


def export_language_model(lm: nn.Module, path: str | Path, quantize: str | None = None, group_size: int = 64) -> Path:
    """Trace ``lm`` (float32) into OpenVINO with a stateful KV cache, compress its weights with NNCF
    (``quantize``: ``"int8"``: asymmetric per output channel; ``"int4"``: asymmetric per group of
    ``group_size``, NNCF's int8 for the layers it keeps at 8 bits), and save the IR to ``path``
    (``.xml``; the weights go to the ``.bin`` beside it). Returns the ``.xml`` path.

    Peak memory is the float model plus OpenVINO's copy of it (~14.5 GB at Phi-2 size): export
    once, then load the IR."""
    import openvino as ov
    from openvino._offline_transformations import apply_make_stateful_transformation

    if quantize not in (None, *QUANTIZE_MODES):
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES} or None, got {quantize!r}")
    if next(lm.parameters()).dtype != torch.float32:
        raise ValueError("export a float32 language model (the weights are compressed from it)")
    cfg = lm.config
    heads, layers = cfg.num_attention_heads, cfg.num_hidden_layers
    head_dim = cfg.hidden_size // heads
    step = LanguageModelStep(lm).eval()
    example = (torch.zeros(1, 3, cfg.hidden_size), *[torch.zeros(1, heads, 2, head_dim) for _ in range(2 * layers)])
    with torch.no_grad():
        model = ov.convert_model(step, example_input=example)
    past, present = _state_names(layers)
    for port, name in zip(model.inputs, ["inputs_embeds", *past]):
        port.get_tensor().set_names({name})
    for port, name in zip(model.outputs, ["logits", *present]):
        port.get_tensor().set_names({name})
    shapes = {"inputs_embeds": ov.PartialShape([1, -1, cfg.hidden_size])}
    shapes.update({name: ov.PartialShape([1, heads, -1, head_dim]) for name in past})
    model.reshape(shapes)
    if quantize:
        import nncf

        if quantize == "int8":
            model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        else:
            model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=group_size, ratio=1.0)
    apply_make_stateful_transformation(model, dict(zip(past, present)))
    path = Path(path).with_suffix(".xml")
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(path), compress_to_fp16=False)
    return path


class OpenVINOLanguageModel:
    """A compiled IR from :func:`export_language_model`: call it with embeddings (1, T, C) to run
    them after everything run since the last :meth:`reset`; returns the last position's logits (1, V)."""

    def __init__(self, path: str | Path, threads: int | None = None, precision: str = "f32"):
        import openvino as ov

        path = Path(path)
        if not path.is_file() or not path.with_suffix(".bin").is_file():
            raise FileNotFoundError(f"no OpenVINO model at {path} (an .xml with its .bin beside it)")
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.length = 0
        """Tokens the state holds."""

    def reset(self) -> None:
        """Forget every token run so far."""
        self.request.reset_state()
        self.length = 0

    def __call__(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[0] != 1:
            raise ValueError(f"inputs_embeds must be (1, T, C), got {tuple(inputs_embeds.shape)}")
        self.request.infer({"inputs_embeds": inputs_embeds.detach().float().contiguous().numpy()})
        self.length += inputs_embeds.shape[1]
        return torch.from_numpy(self.request.get_tensor("logits").data.copy())


__all__ = ["LanguageModelStep", "OpenVINOLanguageModel", "QUANTIZE_MODES", "export_language_model"]
