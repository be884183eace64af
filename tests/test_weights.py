"""Loading every public TinyGPT-V ingredient, and our own format.

Each public format gets a fixture written here with the documented key names (ORIGINAL-NOTES, "Key
names in the public ingredient files" and "Checkpoints as released") at tiny sizes, from a reference
model whose every parameter is random. A load must put every tensor exactly where the reference had
it. The writers below are the test's own, independent statement of each format: they share no code
with the loaders' name maps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tinygptv import TinyGPTV
from tinygptv.config import get_preset
from tinygptv.model.weights import Ingredients, canonical_key, trainable_keys
from tinygptv.testing import word_tokenizer

# ---------------------------------------------------------------------------------------------
# A reference model and the public formats written from it
# ---------------------------------------------------------------------------------------------


def tiny(**overrides):
    return get_preset("tinygptv-tiny").replace(**overrides)


def tiny_llama():
    return tiny(
        **{
            "language.arch": "llama",
            "language.num_kv_heads": 1,
            "language.hidden_act": "silu",
            "language.partial_rotary_factor": 1.0,
        }
    )


def reference_model(config=None, seed=0) -> TinyGPTV:
    """Every parameter random (none equal to any initial value), within what the public formats can
    express: EVA has no k bias, and LoRA on a fused qkv has one A shared by q, k and v."""
    torch.manual_seed(seed)
    model = TinyGPTV(config or tiny(), tokenizer=word_tokenizer())
    width = model.config.vision.hidden_size
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
        for layer in model.vision.model.encoder.layers:
            layer.self_attn.qkv.bias[width : 2 * width] = 0
        if model.config.lora.enabled:
            for layer in model.lm.model.layers:
                shared = layer.self_attn.q_proj.lora_A.default.weight
                layer.self_attn.k_proj.lora_A.default.weight.copy_(shared)
                layer.self_attn.v_proj.lora_A.default.weight.copy_(shared)
    return model.eval()


def canonical_state(model) -> dict[str, torch.Tensor]:
    return {canonical_key(k): v.detach().clone() for k, v in model.state_dict().items()}


def interleave_per_head(q, k, v, heads):
    """The authors' fused layout: rows of (heads, 3, head_dim)."""
    return torch.stack([t.reshape(heads, -1, *t.shape[1:]) for t in (q, k, v)], dim=1).reshape(-1, *q.shape[1:])


def save_torch(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def write_phi_dir(ref, directory: Path, layout="hf", file="safetensors", **config_overrides) -> Path:
    """A Hugging Face Phi directory: transformers' layout ("hf"), the authors' fused copy ("fused")
    or Microsoft's remote-code layout ("msft"), with config.json and the tokenizer."""
    s, lang = canonical_state(ref), ref.config.language
    g = lambda k: s["language_model." + k]
    out = {}
    if layout == "msft":
        out["transformer.embd.wte.weight"] = g("model.embed_tokens.weight")
        for i in range(lang.num_layers):
            a, h = f"model.layers.{i}.self_attn.", f"transformer.h.{i}."
            for p in ("weight", "bias"):
                out[h + f"ln.{p}"] = g(f"model.layers.{i}.input_layernorm.{p}")
                out[h + f"mixer.Wqkv.{p}"] = torch.cat([g(a + f"{x}_proj.{p}") for x in "qkv"])
                out[h + f"mixer.out_proj.{p}"] = g(a + f"dense.{p}")
                for fc in ("fc1", "fc2"):
                    out[h + f"mlp.{fc}.{p}"] = g(f"model.layers.{i}.mlp.{fc}.{p}")
                out[f"lm_head.ln.{p}"] = g(f"model.final_layernorm.{p}")
                out[f"lm_head.linear.{p}"] = g(f"lm_head.{p}")
        config = {
            "model_type": "phi-msft",
            "vocab_size": lang.vocab_size,
            "n_embd": lang.hidden_size,
            "n_layer": lang.num_layers,
            "n_head": lang.num_heads,
            "rotary_dim": int(lang.head_dim * lang.partial_rotary_factor),
            "layer_norm_epsilon": lang.layer_norm_eps,
        }
    else:
        out["model.embed_tokens.weight"] = g("model.embed_tokens.weight")
        for i in range(lang.num_layers):
            a = f"model.layers.{i}.self_attn."
            for p in ("weight", "bias"):
                if layout == "fused":
                    out[a + f"query_key_value.{p}"] = interleave_per_head(
                        *(g(a + f"{x}_proj.{p}") for x in "qkv"), lang.num_heads
                    )
                else:
                    for x in "qkv":
                        out[a + f"{x}_proj.{p}"] = g(a + f"{x}_proj.{p}")
                out[a + f"dense.{p}"] = g(a + f"dense.{p}")
                out[f"model.layers.{i}.input_layernorm.{p}"] = g(f"model.layers.{i}.input_layernorm.{p}")
                for fc in ("fc1", "fc2"):
                    out[f"model.layers.{i}.mlp.{fc}.{p}"] = g(f"model.layers.{i}.mlp.{fc}.{p}")
        for p in ("weight", "bias"):
            out[f"model.final_layernorm.{p}"] = g(f"model.final_layernorm.{p}")
            out[f"lm_head.{p}"] = g(f"lm_head.{p}")
        config = {
            "model_type": "phi",
            "vocab_size": lang.vocab_size,
            "hidden_size": lang.hidden_size,
            "intermediate_size": lang.intermediate_size,
            "num_hidden_layers": lang.num_layers,
            "num_attention_heads": lang.num_heads,
            "partial_rotary_factor": lang.partial_rotary_factor,
            "rope_theta": lang.rope_theta,
            "layer_norm_eps": lang.layer_norm_eps,
            "hidden_act": lang.hidden_act,
        }
    config.update(config_overrides)
    return _write_hf_dir(directory, out, config, file)


def write_llama_dir(ref, directory: Path) -> Path:
    s, lang = canonical_state(ref), ref.config.language
    g = lambda k: s["language_model." + k]
    out = {k: g(k) for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")}
    for i in range(lang.num_layers):
        names = [f"self_attn.{x}_proj" for x in "qkvo"] + [f"mlp.{x}_proj" for x in ("gate", "up", "down")]
        names += ["input_layernorm", "post_attention_layernorm"]
        for n in names:
            out[f"model.layers.{i}.{n}.weight"] = g(f"model.layers.{i}.{n}.weight")
    config = {
        "model_type": "llama",
        "vocab_size": lang.vocab_size,
        "hidden_size": lang.hidden_size,
        "num_hidden_layers": lang.num_layers,
        "num_attention_heads": lang.num_heads,
        "num_key_value_heads": lang.num_kv_heads,
        "rope_theta": lang.rope_theta,
        "rms_norm_eps": lang.layer_norm_eps,
    }
    return _write_hf_dir(directory, out, config, "safetensors")


def _write_hf_dir(directory: Path, state, config, file) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in state.items()}
    if file == "safetensors":
        save_file(state, directory / "model.safetensors")
    else:
        torch.save(state, directory / "pytorch_model.bin")
    word_tokenizer().save_pretrained(directory)
    return directory


def write_hf_blip2_dir(ref, directory: Path, drop: tuple[str, ...] = ()) -> Path:
    """A Hugging Face BLIP-2 checkpoint: vision_model.*, qformer.*, query_tokens, plus its own LM side."""
    s = canonical_state(ref)
    out = {"vision_model." + k[len("vision.model.") :]: v for k, v in s.items() if k.startswith("vision.model.")}
    out.update({"qformer." + k[len("qformer.model.") :]: v for k, v in s.items() if k.startswith("qformer.model.")})
    out["query_tokens"] = s["qformer.query_tokens"]
    out["language_projection.weight"] = torch.randn(8, ref.config.qformer.hidden_size)
    out["language_model.model.decoder.embed_tokens.weight"] = torch.randn(16, 8)
    for key in drop:
        del out[key]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(
        json.dumps({"model_type": "blip-2", "num_query_tokens": ref.config.qformer.num_query_tokens})
    )
    save_file({k: v.contiguous() for k, v in out.items()}, directory / "model.safetensors")
    return directory


def eva_state(ref, extra_blocks=1) -> dict[str, torch.Tensor]:
    """LAVIS ``eva_vit_g.pth`` names: EVA-CLIP's blocks (one more than BLIP-2 uses), q/v biases only."""
    s, vis = canonical_state(ref), ref.config.vision
    g = lambda k: s["vision.model." + k]
    out = {
        "cls_token": g("embeddings.class_embedding"),
        "pos_embed": g("embeddings.position_embedding"),
        "patch_embed.proj.weight": g("embeddings.patch_embedding.weight"),
        "patch_embed.proj.bias": g("embeddings.patch_embedding.bias"),
    }
    width = vis.hidden_size
    for i in range(vis.num_layers):
        e = f"encoder.layers.{i}."
        b = f"blocks.{i}."
        out[b + "attn.qkv.weight"] = g(e + "self_attn.qkv.weight")
        out[b + "attn.q_bias"] = g(e + "self_attn.qkv.bias")[:width].clone()
        out[b + "attn.v_bias"] = g(e + "self_attn.qkv.bias")[2 * width :].clone()
        for p in ("weight", "bias"):
            out[b + f"norm1.{p}"] = g(e + f"layer_norm1.{p}")
            out[b + f"norm2.{p}"] = g(e + f"layer_norm2.{p}")
            out[b + f"attn.proj.{p}"] = g(e + f"self_attn.projection.{p}")
            out[b + f"mlp.fc1.{p}"] = g(e + f"mlp.fc1.{p}")
            out[b + f"mlp.fc2.{p}"] = g(e + f"mlp.fc2.{p}")
    for i in range(vis.num_layers, vis.num_layers + extra_blocks):
        out[f"blocks.{i}.norm1.weight"] = torch.randn(width)
        out[f"blocks.{i}.attn.qkv.weight"] = torch.randn(3 * width, width)
    return out


def blip2_lavis_state(ref, visual_encoder=False) -> dict[str, torch.Tensor]:
    """LAVIS ``blip2_pretrained_flant5xxl.pth`` ``model`` names, text side and T5 side included."""
    s, qf = canonical_state(ref), ref.config.qformer
    out = {
        "query_tokens": s["qformer.query_tokens"],
        "ln_vision.weight": s["vision.model.post_layernorm.weight"],
        "ln_vision.bias": s["vision.model.post_layernorm.bias"],
        "Qformer.bert.embeddings.LayerNorm.weight": s["qformer.model.layernorm.weight"],
        "Qformer.bert.embeddings.LayerNorm.bias": s["qformer.model.layernorm.bias"],
        "Qformer.bert.embeddings.word_embeddings.weight": torch.randn(30, qf.hidden_size),
        "Qformer.bert.embeddings.position_embeddings.weight": torch.randn(12, qf.hidden_size),
        "Qformer.bert.embeddings.position_ids": torch.arange(12)[None],
        "Qformer.cls.predictions.bias": torch.randn(30),
        "t5_proj.weight": torch.randn(8, qf.hidden_size),
        "t5_model.shared.weight": torch.randn(16, 8),
    }
    for i in range(qf.num_layers):
        src, dst = f"Qformer.bert.encoder.layer.{i}.", f"qformer.model.encoder.layer.{i}."
        kinds = ["attention", "crossattention"] if i % qf.cross_attention_frequency == 0 else ["attention"]
        for p in ("weight", "bias"):
            for kind in kinds:
                for x in ("query", "key", "value"):
                    out[src + f"{kind}.self.{x}.{p}"] = s[dst + f"{kind}.attention.{x}.{p}"]
                for x in ("dense", "LayerNorm"):
                    out[src + f"{kind}.output.{x}.{p}"] = s[dst + f"{kind}.output.{x}.{p}"]
            out[src + f"intermediate_query.dense.{p}"] = s[dst + f"intermediate_query.dense.{p}"]
            for x in ("dense", "LayerNorm"):
                out[src + f"output_query.{x}.{p}"] = s[dst + f"output_query.{x}.{p}"]
        out[src + "intermediate.dense.weight"] = torch.randn(qf.intermediate_size, qf.hidden_size)
        out[src + "output.dense.weight"] = torch.randn(qf.hidden_size, qf.intermediate_size)
        out[src + "output.LayerNorm.weight"] = torch.randn(qf.hidden_size)
    if visual_encoder:
        out.update({"visual_encoder." + k: v for k, v in eva_state(ref, extra_blocks=0).items()})
    return out


def write_lavis_files(ref, directory: Path, visual_encoder=False):
    directory.mkdir(parents=True, exist_ok=True)
    eva = save_torch(eva_state(ref), directory / "eva_vit_g.pth")
    # as LAVIS' runner saves it: the state dict under "model", next to plain training state
    blip2 = save_torch(
        {"model": blip2_lavis_state(ref, visual_encoder), "config": {"arch": "blip2"}, "epoch": 9},
        directory / "blip2_pretrained_flant5xxl.pth",
    )
    return eva, blip2


def write_minigpt4(proj_weight, proj_bias, path: Path) -> Path:
    return save_torch({"model": {"llama_proj.weight": proj_weight, "llama_proj.bias": proj_bias}}, path)


def stage_state(ref, lora=True, peft_default_names=False) -> dict[str, torch.Tensor]:
    """The authors' ``TinyGPT-V_for_Stage{N}.pth`` ``model``: trainable tensors only, LoRA on the fused qkv."""
    s, lang = canonical_state(ref), ref.config.language
    g = lambda k: s["language_model." + k]
    prefix = "llama_model.base_model.model." if lora else "llama_model."
    lora_suffix = ".default.weight" if peft_default_names else ".weight"
    out = {
        "llama_proj.weight": s["vision_proj.weight"],
        "llama_proj.bias": s["vision_proj.bias"],
        "llama_proj2.weight": s["lm_proj.weight"],
        "llama_proj2.bias": s["lm_proj.bias"],
    }
    for p in ("weight", "bias"):
        out[prefix + f"model.final_layernorm.{p}"] = g(f"model.final_layernorm.{p}")
    for i in range(lang.num_layers):
        layer, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        for p in ("weight", "bias"):
            out[prefix + layer + f"input_layernorm.{p}"] = g(layer + f"input_layernorm.{p}")
            out[prefix + a + f"q_layernorm.{p}"] = g(a + f"q_layernorm.{p}")
            out[prefix + a + f"k_layernorm.{p}"] = g(a + f"k_layernorm.{p}")
        out[prefix + layer + "post_layernorm.weight"] = g(layer + "post_attention_norm.weight")
        if lora:
            out[prefix + a + "query_key_value.lora_A" + lora_suffix] = g(a + "q_proj.lora_A.weight")
            out[prefix + a + "query_key_value.lora_B" + lora_suffix] = interleave_per_head(
                *(g(a + f"{x}_proj.lora_B.weight") for x in "qkv"), lang.num_heads
            )
            out[prefix + a + "dense.lora_A" + lora_suffix] = g(a + "dense.lora_A.weight")
            out[prefix + a + "dense.lora_B" + lora_suffix] = g(a + "dense.lora_B.weight")
    return out


def write_stage(ref, path: Path, **kwargs) -> Path:
    return save_torch({"model": stage_state(ref, **kwargs), "epoch": 4}, path)


def batch(model, image_size=None):
    torch.manual_seed(1)
    size = image_size or model.config.vision.image_size
    return model.prepare(
        ["<Img><ImageHere></Img> what color is the circle", "describe this picture"],
        images=[torch.randn(3, size, size), None],
        answers=["red", "a dog on the left"],
    )


def assert_equal_where(model, expected: dict[str, torch.Tensor], prefixes: tuple[str, ...]):
    """Every tensor of ``model`` under ``prefixes`` equals ``expected`` exactly; returns how many."""
    got = canonical_state(model)
    names = [k for k in expected if k.startswith(prefixes)]
    assert names
    for name in names:
        assert torch.equal(got[name], expected[name]), name
    return len(names)


PRETRAINED_LM = ("language_model.model.embed_tokens", "language_model.lm_head", "language_model.model.final_layernorm")


def pretrained_lm_keys(state):
    """The LM tensors a plain Hugging Face checkpoint provides (not TinyGPT-V's new norms or LoRA)."""
    new = (".q_layernorm.", ".k_layernorm.", ".post_attention_norm.", ".lora_")
    return {k for k in state if k.startswith("language_model.") and not any(n in k for n in new)}


# ---------------------------------------------------------------------------------------------
# Fixtures shared by the tests
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref():
    return reference_model()


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory):
    """Every public format written once from ``ref``."""
    root = tmp_path_factory.mktemp("public")
    eva, blip2 = write_lavis_files(ref, root / "lavis")
    return {
        "root": root,
        "phi": write_phi_dir(ref, root / "phi-2"),
        "phi_fused": write_phi_dir(ref, root / "phi-2-fused", layout="fused", file="bin"),
        "blip2": write_hf_blip2_dir(ref, root / "blip2"),
        "eva": eva,
        "blip2_lavis": blip2,
        "stage4": write_stage(ref, root / "TinyGPT-V_for_Stage4.pth"),
    }


# ---------------------------------------------------------------------------------------------
# Public formats
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout,file", [("hf", "safetensors"), ("fused", "bin"), ("msft", "safetensors")])
def test_phi_directory_every_layout(ref, files, tmp_path, layout, file):
    lm_dir = write_phi_dir(ref, tmp_path / "phi", layout=layout, file=file)
    model = TinyGPTV.from_ingredients(tiny(), Ingredients(language=str(lm_dir), blip2=str(files["blip2"])))
    expected = canonical_state(ref)
    got = canonical_state(model)
    for key in pretrained_lm_keys(expected):
        assert torch.equal(got[key], expected[key]), key
        assert model.load_report.loaded[key].startswith(str(lm_dir))
    # TinyGPT-V's additions start from their documented initial values, and the report says so
    layer = model.lm.model.layers[0]
    assert torch.equal(layer.self_attn.q_layernorm.weight, torch.ones(ref.config.language.head_dim))
    assert torch.equal(layer.self_attn.k_layernorm.bias, torch.zeros(ref.config.language.head_dim))
    assert torch.equal(layer.post_attention_norm.weight, torch.ones(ref.config.language.hidden_size))
    assert torch.count_nonzero(layer.self_attn.q_proj.lora_B.default.weight) == 0
    assert torch.count_nonzero(layer.self_attn.q_proj.lora_A.default.weight) > 0
    kinds = {k.split("layers.0.")[-1] for k in model.load_report.initialised if "layers.0." in k}
    assert "self_attn.q_layernorm.weight" in kinds and "post_attention_norm.weight" in kinds
    assert "lm_proj.weight" in model.load_report.initialised
    assert model.tokenizer is not None and model.tokenizer("a red circle")["input_ids"]
    assert torch.isfinite(model(**batch(model)).loss)


def test_phi15_directory(tmp_path):
    """Phi-1.5 shares Phi-2's layout; its rotary covers half of each head (0.5 instead of 0.4)."""
    config = tiny(**{"language.partial_rotary_factor": 0.5})
    ref = reference_model(config)
    lm_dir = write_phi_dir(ref, tmp_path / "phi-1_5")
    model = TinyGPTV.from_ingredients(
        config, Ingredients(language=str(lm_dir), blip2=str(write_hf_blip2_dir(ref, tmp_path / "blip2")))
    )
    expected, got = canonical_state(ref), canonical_state(model)
    for key in pretrained_lm_keys(expected):
        assert torch.equal(got[key], expected[key]), key
    assert model.lm.model.rotary_emb.inv_freq.numel() == ref.config.language.head_dim // 4  # 10 of 20 dims, in pairs


def test_tinyllama_directory(tmp_path, files):
    ref = reference_model(tiny_llama())
    lm_dir = write_llama_dir(ref, tmp_path / "tinyllama")
    blip2 = write_hf_blip2_dir(ref, tmp_path / "blip2")
    model = TinyGPTV.from_ingredients(tiny_llama(), Ingredients(language=str(lm_dir), blip2=str(blip2)))
    expected = canonical_state(ref)
    got = canonical_state(model)
    keys = pretrained_lm_keys(expected)
    assert any("mlp.gate_proj" in k for k in keys) and any("post_attention_layernorm" in k for k in keys)
    for key in keys:
        assert torch.equal(got[key], expected[key]), key
    assert torch.equal(model.lm.model.layers[1].post_attention_norm.weight, torch.ones(ref.config.language.hidden_size))


def test_hf_blip2_directory(ref, files):
    model = TinyGPTV.from_ingredients(tiny(), Ingredients(language=str(files["phi"]), blip2=str(files["blip2"])))
    n = assert_equal_where(model, canonical_state(ref), ("vision.", "qformer."))
    assert n == sum(1 for k in model.state_dict() if k.startswith(("vision.", "qformer.")))
    ignored = " ".join(model.load_report.ignored)
    assert "language_projection.weight" in ignored and "language_model.model.decoder" in ignored


def test_lavis_eva_and_blip2_files(ref, files):
    ingredients = Ingredients(
        language=str(files["phi"]), eva_vit=str(files["eva"]), blip2_lavis=str(files["blip2_lavis"])
    )
    model = TinyGPTV.from_ingredients(tiny(), ingredients)
    assert_equal_where(model, canonical_state(ref), ("vision.", "qformer."))
    # k has no bias in EVA: the fused bias is (q_bias, 0, v_bias)
    width = ref.config.vision.hidden_size
    assert torch.count_nonzero(model.vision.model.encoder.layers[0].self_attn.qkv.bias[width : 2 * width]) == 0
    report = model.load_report
    ignored = report.ignored
    n_vit = ref.config.vision.num_layers
    assert any(f"blocks.{n_vit}.attn.qkv.weight" in k and "drops" in why for k, why in ignored.items())
    assert any("t5_model.shared.weight" in k for k in ignored)
    assert any("Qformer.bert.encoder.layer.0.intermediate.dense.weight" in k for k in ignored)
    assert any("word_embeddings" in k and "text side" in why for k, why in ignored.items())
    assert report.loaded["vision.model.post_layernorm.weight"].endswith("ln_vision.weight")
    assert report.loaded["vision.model.encoder.layers.0.self_attn.qkv.bias"].endswith("attn.q_bias+v_bias")


def test_lavis_vit_from_the_blip2_file(ref, tmp_path, files):
    """Without eva_vit_g.pth, the ViT copy (visual_encoder.*) inside the BLIP-2 file is used."""
    path = save_torch({"model": blip2_lavis_state(ref, visual_encoder=True)}, tmp_path / "blip2.pth")
    model = TinyGPTV.from_ingredients(tiny(), Ingredients(language=str(files["phi"]), blip2_lavis=str(path)))
    assert_equal_where(model, canonical_state(ref), ("vision.", "qformer."))
    assert model.load_report.loaded["vision.model.embeddings.class_embedding"].endswith("visual_encoder.cls_token")


def test_lavis_visual_encoder_copy_is_unused_when_eva_given(ref, tmp_path, files):
    path = save_torch({"model": blip2_lavis_state(ref, visual_encoder=True)}, tmp_path / "blip2.pth")
    ingredients = Ingredients(language=str(files["phi"]), eva_vit=str(files["eva"]), blip2_lavis=str(path))
    model = TinyGPTV.from_ingredients(tiny(), ingredients)
    assert model.load_report.loaded["vision.model.embeddings.class_embedding"].endswith("eva_vit_g.pth: cls_token")
    assert any("visual_encoder.cls_token" in k for k in model.load_report.ignored)


@pytest.mark.parametrize("source", ["lavis", "hf"])
def test_position_embeddings_interpolated_for_a_larger_image(ref, files, source):
    """Stage 4 runs at 448 px from 224 px checkpoints: the table is resized bicubically, as LAVIS does."""
    big = tiny(**{"vision.image_size": 56})  # 2x2 -> 4x4 patches, like 16x16 -> 32x32
    if source == "lavis":
        ingredients = Ingredients(
            language=str(files["phi"]), eva_vit=str(files["eva"]), blip2_lavis=str(files["blip2_lavis"])
        )
    else:
        ingredients = Ingredients(language=str(files["phi"]), blip2=str(files["blip2"]))
    model = TinyGPTV.from_ingredients(big, ingredients)
    table = ref.vision.model.embeddings.position_embedding.detach()  # (1, 1 + 2*2, C)
    grid = table[:, 1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, -1)
    expected = torch.cat([table[:, :1], grid], dim=1)
    assert torch.allclose(model.vision.model.embeddings.position_embedding, expected, atol=1e-6)
    assert any("interpolated bicubically from 2x2 to 4x4" in n for n in model.load_report.notes)
    assert model.encode_images(torch.randn(1, 3, 56, 56)).shape == (1, 4, ref.config.language.hidden_size)


def test_minigpt4_projection_starts_vision_proj(ref, files, tmp_path):
    weight, bias = torch.randn_like(ref.vision_proj.weight), torch.randn_like(ref.vision_proj.bias)
    path = write_minigpt4(weight, bias, tmp_path / "pretrained_minigpt4_7b.pth")
    ingredients = Ingredients(language=str(files["phi"]), blip2=str(files["blip2"]), minigpt4=str(path))
    model = TinyGPTV.from_ingredients(tiny(), ingredients)
    assert torch.equal(model.vision_proj.weight, weight) and torch.equal(model.vision_proj.bias, bias)
    assert "vision_proj.weight" not in model.load_report.initialised
    assert "lm_proj.weight" in model.load_report.initialised  # the second projection is new (paper)


@pytest.mark.parametrize("peft_default_names", [False, True], ids=["peft-0.2.0-names", "later-peft-names"])
def test_released_stage_checkpoint_completes_the_model(ref, files, tmp_path, peft_default_names):
    """Authors' layout end to end: fused-qkv Phi-2 + LAVIS + MiniGPT-4 + stage 4 = the reference, exactly."""
    stage = write_stage(ref, tmp_path / "TinyGPT-V_for_Stage4.pth", peft_default_names=peft_default_names)
    minigpt4 = write_minigpt4(
        torch.randn_like(ref.vision_proj.weight), torch.randn_like(ref.vision_proj.bias), tmp_path / "mg4.pth"
    )
    ingredients = Ingredients(
        language=str(files["phi_fused"]),
        eva_vit=str(files["eva"]),
        blip2_lavis=str(files["blip2_lavis"]),
        minigpt4=str(minigpt4),
        stage_checkpoint=str(stage),
    )
    model = TinyGPTV.from_ingredients(tiny(), ingredients)
    expected, got = canonical_state(ref), canonical_state(model)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    report = model.load_report
    assert not report.initialised  # nothing left at its initial value
    assert "mg4.pth" in report.replaced["vision_proj.weight"]  # the stage checkpoint's projection wins
    assert report.loaded["language_model.model.layers.1.post_attention_norm.weight"].endswith(
        "layers.1.post_layernorm.weight"
    )
    torch.testing.assert_close(model(**batch(model)).logits, ref(**batch(ref)).logits, rtol=0, atol=0)


def test_stage1_checkpoint_with_lora_loads_it_and_says_why(ref, files, tmp_path):
    """The release's stage-1 file holds LoRA (their issue #13): loaded, with a note."""
    stage = write_stage(ref, tmp_path / "TinyGPT-V_for_Stage1.pth")
    model = TinyGPTV.from_ingredients(
        tiny(), Ingredients(language=str(files["phi"]), blip2=str(files["blip2"]), stage_checkpoint=str(stage))
    )
    assert_equal_where(model, canonical_state(ref), ("language_model.model.layers.0.self_attn.q_proj.lora_",))
    assert any("issue #13" in n for n in model.load_report.notes)


def test_stage1_checkpoint_without_lora_gets_a_new_lora(ref, files, tmp_path):
    stage = write_stage(ref, tmp_path / "TinyGPT-V_for_Stage1.pth", lora=False)
    model = TinyGPTV.from_ingredients(
        tiny(), Ingredients(language=str(files["phi"]), blip2=str(files["blip2"]), stage_checkpoint=str(stage))
    )
    assert_equal_where(
        model, canonical_state(ref), ("vision_proj.", "lm_proj.", "language_model.model.final_layernorm.")
    )
    lora = [k for k in model.load_report.initialised]
    assert lora and all(".lora_" in k for k in lora)
    assert torch.count_nonzero(model.lm.model.layers[0].self_attn.dense.lora_B.default.weight) == 0


def fused_attention_reference(x, fused_w, fused_b, lora_a, fused_lora_b, dense, dense_lora, q_ln, k_ln, cfg):
    """The authors' Phi attention with LoRA on the fused qkv, written out: qkv -> (T, heads, 3, head_dim)
    -> per-head LayerNorm on q, k -> partial rotary on the first dims -> causal softmax -> dense."""
    lang, scale = cfg.language, cfg.lora.alpha / cfg.lora.r
    heads, head_dim, t = lang.num_heads, lang.head_dim, x.shape[1]
    qkv = x @ fused_w.T + fused_b + scale * (x @ lora_a.T) @ fused_lora_b.T  # (1, T, 3C)
    q, k, v = qkv.view(1, t, heads, 3, head_dim).unbind(3)  # (1, T, H, D) each
    q = F.layer_norm(q, (head_dim,), *q_ln, eps=lang.layer_norm_eps)
    k = F.layer_norm(k, (head_dim,), *k_ln, eps=lang.layer_norm_eps)
    rot = int(head_dim * lang.partial_rotary_factor)
    inv_freq = 1.0 / (lang.rope_theta ** (torch.arange(0, rot, 2).float() / rot))
    angles = torch.outer(torch.arange(t).float(), inv_freq)  # (T, rot/2)
    cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]

    def rotary(u):
        r, rest = u[..., :rot], u[..., rot:]
        half = torch.cat([-r[..., rot // 2 :], r[..., : rot // 2]], -1)
        return torch.cat([r * cos + half * sin, rest], -1)

    q, k = rotary(q).transpose(1, 2), rotary(k).transpose(1, 2)  # (1, H, T, D)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(1, t, -1)  # (1, T, C)
    (wo, bo), (ao, bo_lora) = dense, dense_lora
    return out @ wo.T + bo + scale * (out @ ao.T) @ bo_lora.T


def test_fused_qkv_lora_mapping_matches_the_fused_computation(ref, files):
    model = TinyGPTV.from_ingredients(
        tiny(),
        Ingredients(language=str(files["phi_fused"]), blip2=str(files["blip2"]), stage_checkpoint=str(files["stage4"])),
    )
    lm_file = torch.load(files["phi_fused"] / "pytorch_model.bin", weights_only=True)
    stage = torch.load(files["stage4"], weights_only=True)["model"]
    p = "llama_model.base_model.model.model.layers.0.self_attn."
    torch.manual_seed(3)
    x = torch.randn(1, 7, ref.config.language.hidden_size)
    expected = fused_attention_reference(
        x,
        lm_file["model.layers.0.self_attn.query_key_value.weight"],
        lm_file["model.layers.0.self_attn.query_key_value.bias"],
        stage[p + "query_key_value.lora_A.weight"],
        stage[p + "query_key_value.lora_B.weight"],
        (lm_file["model.layers.0.self_attn.dense.weight"], lm_file["model.layers.0.self_attn.dense.bias"]),
        (stage[p + "dense.lora_A.weight"], stage[p + "dense.lora_B.weight"]),
        (stage[p + "q_layernorm.weight"], stage[p + "q_layernorm.bias"]),
        (stage[p + "k_layernorm.weight"], stage[p + "k_layernorm.bias"]),
        ref.config,
    )
    position_ids = torch.arange(7)[None]
    causal = torch.zeros(7, 7).masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))[None, None]
    with torch.no_grad():
        got, _ = model.lm.model.layers[0].self_attn(
            hidden_states=x,
            attention_mask=causal,
            position_embeddings=model.lm.model.rotary_emb(x, position_ids),
        )
    assert (got - expected).abs().max() < 1e-5


def test_load_released_checkpoint_into_a_loaded_model(ref, files):
    """Copying a stage checkpoint into a live model keeps its parameter objects (an optimizer's refs)."""
    model = TinyGPTV.from_ingredients(tiny(), Ingredients(language=str(files["phi"]), blip2=str(files["blip2"])))
    param = model.lm.model.layers[0].self_attn.q_proj.lora_B.default.weight
    report = model.load_released_checkpoint(files["stage4"])
    assert param is model.lm.model.layers[0].self_attn.q_proj.lora_B.default.weight
    expected = canonical_state(ref)
    for key in report.loaded:
        assert torch.equal(canonical_state(model)[key], expected[key]), key
    # the fused A and the fused B of each layer each become three tensors (q, k, v)
    assert len(report.loaded) == len(stage_state(ref)) + 4 * ref.config.language.num_layers


# ---------------------------------------------------------------------------------------------
# Our format
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_shard_size", ["5GB", 20_000], ids=["single-file", "sharded"])
def test_save_and_load_round_trip_is_bit_exact(ref, tmp_path, max_shard_size):
    directory = ref.save_pretrained(tmp_path / "out", max_shard_size=max_shard_size)
    shards = sorted(p.name for p in directory.glob("*.safetensors"))
    assert (len(shards) > 1) == (max_shard_size != "5GB")
    assert (directory / "model.safetensors.index.json").exists() == (len(shards) > 1)
    loaded = TinyGPTV.from_pretrained(directory)
    expected, got = canonical_state(ref), canonical_state(loaded)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]) and got[key].dtype == expected[key].dtype, key
    # non-persistent buffers, absent from the files, are recomputed after the meta-device build
    for (name, a), (_, b) in zip(ref.named_buffers(), loaded.named_buffers()):
        assert torch.equal(a, b), name
    assert {n: p.requires_grad for n, p in loaded.named_parameters()} == {
        n: p.requires_grad for n, p in ref.named_parameters()
    }
    assert torch.equal(loaded(**batch(loaded)).logits, ref(**batch(ref)).logits)
    assert loaded.generate_greedy(
        ["<Img><ImageHere></Img> what"], [torch.ones(3, 28, 28)], max_new_tokens=4
    ) == ref.generate_greedy(["<Img><ImageHere></Img> what"], [torch.ones(3, 28, 28)], max_new_tokens=4)


def test_load_with_another_dtype(ref, tmp_path):
    loaded = TinyGPTV.from_pretrained(ref.save_pretrained(tmp_path / "out"), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(loaded.lm_proj.weight, ref.lm_proj.weight.to(torch.bfloat16))
    assert loaded.lm.model.rotary_emb.inv_freq.dtype == torch.float32  # rotary tables stay fp32


def test_trainable_only_round_trip_over_a_full_base(ref, tmp_path):
    base = reference_model(seed=1).save_pretrained(tmp_path / "base")
    # the frozen parts equal the base's; the trainable ones are ref's own
    model = TinyGPTV.from_pretrained(base)
    trainable = trainable_keys(model)
    assert any(".lora_" in k for k in trainable) and "lm_proj.weight" in trainable
    assert not any(k.startswith(("vision.", "qformer.")) for k in trainable)
    with torch.no_grad():
        ref_params = dict(ref.named_parameters())
        for name, param in model.named_parameters():
            if canonical_key(name) in trainable:
                param.copy_(ref_params[name])
    directory = model.save_pretrained(tmp_path / "adapter", trainable_only=True)
    meta = json.loads((directory / "config.json").read_text())
    assert meta["kind"] == "trainable" and meta["base"] == {"pretrained": "../base"}
    assert (directory / "trainable.safetensors").stat().st_size < (base / "model.safetensors").stat().st_size / 3
    loaded = TinyGPTV.from_pretrained(directory)
    expected, got = canonical_state(model), canonical_state(loaded)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    origins = loaded.load_report.loaded
    assert origins["language_model.model.layers.0.self_attn.q_proj.lora_A.weight"].startswith(str(directory))
    assert origins["language_model.model.layers.0.self_attn.q_proj.weight"].startswith(str(base))
    # moving the pair together keeps the reference valid
    (tmp_path / "moved").mkdir()
    base.rename(tmp_path / "moved" / "base")
    directory.rename(tmp_path / "moved" / "adapter")
    again = TinyGPTV.from_pretrained(tmp_path / "moved" / "adapter")
    assert torch.equal(again.lm_proj.weight, model.lm_proj.weight)


def test_merge_lora_keeps_the_outputs(ref, tmp_path):
    model = TinyGPTV.from_pretrained(ref.save_pretrained(tmp_path / "out"))
    inputs = batch(model)
    with torch.no_grad():
        before = model(**inputs).logits
        model.merge_lora()
        after = model(**inputs).logits
    assert not model.config.lora.enabled
    assert not any(".lora_" in k for k in model.state_dict())
    assert (before - after).abs().max() < 1e-4
    reloaded = TinyGPTV.from_pretrained(model.save_pretrained(tmp_path / "merged"))
    assert not reloaded.config.lora.enabled
    assert torch.equal(reloaded(**inputs).logits, after)


def test_tied_embeddings_round_trip(tmp_path):
    """safetensors stores a tied matrix once; loading ties it again (one parameter object)."""
    model = reference_model(tiny(**{"language.tie_word_embeddings": True}))
    assert model.lm.lm_head.weight is model.lm.model.embed_tokens.weight
    loaded = TinyGPTV.from_pretrained(model.save_pretrained(tmp_path / "out"))
    assert loaded.lm.lm_head.weight is loaded.lm.model.embed_tokens.weight
    assert torch.equal(loaded.lm.lm_head.weight, model.lm.lm_head.weight)
    assert torch.equal(loaded(**batch(loaded)).logits, model(**batch(model)).logits)


def test_meta_buffers_are_computed_or_refused():
    """Non-persistent buffers are in no file: BERT-style position ids are rebuilt, anything unknown is an error."""
    from torch import nn

    from tinygptv.model.weights import WeightLoadError, rebuild_buffers

    with torch.device("meta"):
        module = nn.Module()
        module.register_buffer("position_ids", torch.arange(6).expand(1, -1), persistent=False)
    rebuild_buffers(module, "cpu")
    assert torch.equal(module.position_ids, torch.arange(6)[None])
    with torch.device("meta"):
        module.register_buffer("mystery", torch.zeros(3), persistent=False)
    with pytest.raises(WeightLoadError, match="buffer mystery has no value after loading"):
        rebuild_buffers(module, "cpu")
