"""The language model against transformers' own Phi and Llama, and TinyGPT-V's changes by formula."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM

from tinygptv.config import LanguageConfig, get_preset
from tinygptv.model.language import TinyGPTVPhiDecoderLayer, build_language_model


def _randomise_norms(model: nn.Module, seed: int = 0) -> None:
    # Norms start at weight 1 / bias 0; random values make a wrong wiring visible.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g) if name.endswith("weight") else 0.3 * torch.randn(p.shape, generator=g))


def _phi_reference(cfg: LanguageConfig, qk: bool) -> PhiForCausalLM:
    return PhiForCausalLM(
        PhiConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            hidden_act=cfg.hidden_act,
            max_position_embeddings=cfg.max_position_embeddings,
            layer_norm_eps=cfg.layer_norm_eps,
            qk_layernorm=qk,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": cfg.partial_rotary_factor},
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attention_dropout=0.0,
            tie_word_embeddings=False,
        )
    ).eval()


@pytest.mark.parametrize("qk_norm", [False, True])
def test_phi_matches_transformers_when_rmsnorm_off(qk_norm):
    cfg = get_preset("tinygptv-tiny").language
    cfg.qk_norm, cfg.post_attention_rmsnorm = qk_norm, False
    torch.manual_seed(0)
    ours = build_language_model(cfg).eval()
    _randomise_norms(ours)
    ref = _phi_reference(cfg, qk_norm)
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).logits
        b = ref(input_ids=ids, attention_mask=mask).logits
    assert (a - b).abs().max().item() < 1e-5


def test_llama_matches_transformers_when_changes_off():
    cfg = LanguageConfig(
        arch="llama", vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=64, hidden_act="silu", partial_rotary_factor=1.0, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, qk_norm=False, post_attention_rmsnorm=False,
    )
    torch.manual_seed(0)
    ours = build_language_model(cfg).eval()
    _randomise_norms(ours)
    ref = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=cfg.layer_norm_eps, tie_word_embeddings=False,
        )
    ).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (ours(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-5


def test_post_attention_rmsnorm_is_applied_to_attention_output_only():
    """h = x + RMSNorm(attn(LN(x))) + mlp(LN(x)), computed here from the layer's own sub-modules."""
    cfg = get_preset("tinygptv-tiny").language
    lm = build_language_model(cfg).eval()
    _randomise_norms(lm, seed=3)
    layer = lm.model.layers[0]
    assert isinstance(layer, TinyGPTVPhiDecoderLayer)
    x = torch.randn(1, 6, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    pos = torch.arange(6)[None]
    rope = lm.model.rotary_emb(x, pos)
    with torch.no_grad():
        out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=rope)
        normed = layer.input_layernorm(x)
        attn, _ = layer.self_attn(normed, position_embeddings=rope, attention_mask=None)
        rms = attn * torch.rsqrt(attn.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * layer.post_attention_norm.weight
        expected = x + rms + layer.mlp(normed)
    assert (out - expected).abs().max().item() < 1e-5
    # and the switch really changes the computation
    assert (out - (x + attn + layer.mlp(normed))).abs().max().item() > 1e-3


def test_switches_remove_modules():
    cfg = get_preset("tinygptv-tiny").language
    cfg.qk_norm = cfg.post_attention_rmsnorm = False
    names = {n for n, _ in build_language_model(cfg).named_parameters()}
    assert not any("q_layernorm" in n or "k_layernorm" in n or "post_attention_norm" in n for n in names)
    cfg.qk_norm = cfg.post_attention_rmsnorm = True
    names = {n for n, _ in build_language_model(cfg).named_parameters()}
    for i in range(cfg.num_layers):
        assert f"model.layers.{i}.self_attn.q_layernorm.weight" in names
        assert f"model.layers.{i}.self_attn.k_layernorm.bias" in names
        assert f"model.layers.{i}.post_attention_norm.weight" in names


def test_llama_qk_norm_normalises_each_head_before_rope():
    cfg = LanguageConfig(
        arch="llama", vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=4,
        intermediate_size=64, hidden_act="silu", partial_rotary_factor=1.0, max_position_embeddings=32,
        bos_token_id=1, eos_token_id=2,
    )
    lm = build_language_model(cfg).eval()
    attn = lm.model.layers[0].self_attn
    seen = {}
    attn.q_layernorm.register_forward_hook(lambda m, i, o: seen.setdefault("q", o))
    with torch.no_grad():
        lm(input_ids=torch.arange(5)[None])
    q = seen["q"]  # (B, H, T, D): per-head LayerNorm output, zero mean and unit variance per head
    assert q.shape == (1, 4, 5, 8)
    assert q.mean(-1).abs().max().item() < 1e-5
    assert (q.var(-1, unbiased=False) - 1).abs().max().item() < 1e-2  # eps 1e-5 on small activations
