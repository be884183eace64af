"""Every way a load can go wrong raises WeightLoadError naming the likely cause (one test per mode).

The original's most reported failure was garbage output from a mismatched or half-loaded
checkpoint; none of these may load silently.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_weights import (
    blip2_lavis_state,
    reference_model,
    save_torch,
    tiny,
    tiny_llama,
    write_hf_blip2_dir,
    write_lavis_files,
    write_llama_dir,
    write_minigpt4,
    write_phi_dir,
    write_stage,
)

from tinygptv import TinyGPTV
from tinygptv.model.weights import Ingredients, WeightLoadError, file_sha256


@pytest.fixture(scope="module")
def ref():
    return reference_model()


@pytest.fixture(scope="module")
def good(ref, tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    return {"phi": str(write_phi_dir(ref, root / "phi")), "blip2": str(write_hf_blip2_dir(ref, root / "blip2"))}


class TrainingArguments:
    """Stands for any Python object a careless checkpoint pickles next to its tensors."""


def load(config=None, **ingredients):
    return TinyGPTV.from_ingredients(config or tiny(), Ingredients(**ingredients))


def test_load_errors_are_value_errors():
    """So the CLI prints them as one clear error, without a traceback."""
    assert issubclass(WeightLoadError, ValueError)


def test_wrong_vocab_size_names_the_phi2_revision(good, tmp_path):
    other = reference_model(tiny(**{"language.vocab_size": 100}))
    lm = write_phi_dir(other, tmp_path / "phi")
    with pytest.raises(WeightLoadError, match=r"vocab size 100 vs 128: wrong Phi-2 revision"):
        load(language=str(lm), blip2=good["blip2"])


def test_stage1_checkpoint_without_lora_for_a_stage4_model(ref, good, tmp_path):
    stage = write_stage(ref, tmp_path / "TinyGPT-V_for_Stage1.pth", lora=False)
    with pytest.raises(
        WeightLoadError, match="stage-1 checkpoint has no LoRA weights but a stage-4 model was requested"
    ):
        load(language=good["phi"], blip2=good["blip2"], stage_checkpoint=str(stage), stage=4)


def test_checkpoint_of_unknown_stage_without_lora(ref, good, tmp_path):
    stage = write_stage(ref, tmp_path / "checkpoint_9.pth", lora=False)
    with pytest.raises(WeightLoadError, match="does not say its stage: pass stage=1"):
        load(language=good["phi"], blip2=good["blip2"], stage_checkpoint=str(stage))


def test_stage_checkpoint_lacking_a_trained_norm(ref, good, tmp_path):
    path = write_stage(ref, tmp_path / "TinyGPT-V_for_Stage2.pth")
    state = torch.load(path, weights_only=True)
    del state["model"]["llama_model.base_model.model.model.layers.1.post_layernorm.weight"]
    torch.save(state, path)
    with pytest.raises(
        WeightLoadError, match=r"lacks 1 tensors that train in stage 2(.|\n)*layers.1.post_attention_norm"
    ):
        load(language=good["phi"], blip2=good["blip2"], stage_checkpoint=str(path))


def test_missing_tensor_in_a_source(ref, good, tmp_path):
    blip2 = write_hf_blip2_dir(ref, tmp_path / "blip2", drop=("qformer.encoder.layer.1.output_query.dense.weight",))
    with pytest.raises(
        WeightLoadError, match=r"1 missing(.|\n)*missing: qformer.model.encoder.layer.1.output_query.dense.weight"
    ):
        load(language=good["phi"], blip2=str(blip2))


def test_unknown_key_in_a_source(ref, good, tmp_path):
    state = blip2_lavis_state(ref, visual_encoder=True)
    state["Qformer.bert.pooler.dense.weight"] = torch.randn(4, 4)
    path = save_torch({"model": state}, tmp_path / "blip2.pth")
    with pytest.raises(
        WeightLoadError, match=r"1 unexpected(.|\n)*unexpected: .*blip2.pth: Qformer.bert.pooler.dense.weight"
    ):
        load(language=good["phi"], blip2_lavis=str(path))


def test_lora_rank_mismatch(good, tmp_path):
    other = reference_model(tiny(**{"lora.r": 8}))
    stage = write_stage(other, tmp_path / "TinyGPT-V_for_Stage3.pth")
    with pytest.raises(WeightLoadError, match=r"LoRA rank 8 in the checkpoint vs 4 in the config \(lora.r\)"):
        load(language=good["phi"], blip2=good["blip2"], stage_checkpoint=str(stage))


def test_lora_weights_for_a_model_without_lora(ref, good, tmp_path):
    stage = write_stage(ref, tmp_path / "TinyGPT-V_for_Stage2.pth")
    with pytest.raises(WeightLoadError, match="holds LoRA weights but the config has lora.enabled=False"):
        load(tiny(**{"lora.enabled": False}), language=good["phi"], blip2=good["blip2"], stage_checkpoint=str(stage))


def test_more_layers_than_the_config(good, tmp_path):
    deeper = reference_model(tiny(**{"language.num_layers": 3}))
    lm = write_phi_dir(deeper, tmp_path / "phi", num_hidden_layers=2)  # a config.json that lies, too
    with pytest.raises(WeightLoadError, match="the checkpoint has 3 language-model layers, the config 2"):
        load(language=str(lm), blip2=good["blip2"])


def test_another_backbone_width(good, tmp_path):
    wider = reference_model(tiny(**{"language.hidden_size": 80, "language.num_heads": 4}))
    stage = write_stage(wider, tmp_path / "TinyGPT-V_for_Stage4.pth")
    with pytest.raises(WeightLoadError, match="language-model width 80 in the checkpoint vs 40 in the config"):
        load(language=good["phi"], blip2=good["blip2"], stage_checkpoint=str(stage))


def test_config_json_disagrees_on_rotary(ref, good, tmp_path):
    lm = write_phi_dir(ref, tmp_path / "phi", partial_rotary_factor=0.5)
    with pytest.raises(WeightLoadError, match=r"config.json: partial_rotary_factor 0.5 vs 0.4"):
        load(language=str(lm), blip2=good["blip2"])


def test_llama_weights_for_a_phi_config(good, tmp_path):
    lm = write_llama_dir(reference_model(tiny_llama()), tmp_path / "tinyllama")
    with pytest.raises(
        WeightLoadError, match="does not hold a phi language model .*look like: llama.*tinygptv-tinyllama"
    ):
        load(language=str(lm), blip2=good["blip2"])


def test_too_many_vit_blocks(ref, good, tmp_path):
    from test_weights import eva_state

    eva = save_torch(eva_state(ref, extra_blocks=2), tmp_path / "eva_vit_g.pth")
    _, blip2 = write_lavis_files(ref, tmp_path / "lavis")
    with pytest.raises(WeightLoadError, match="the checkpoint has 4 ViT blocks, the config 2"):
        load(language=good["phi"], eva_vit=str(eva), blip2_lavis=str(blip2))


def test_minigpt4_projection_of_another_width(good, tmp_path):
    path = write_minigpt4(torch.randn(64, 32), torch.randn(64), tmp_path / "pretrained_minigpt4.pth")
    with pytest.raises(WeightLoadError, match=r"MiniGPT-4's is 768 -> 4096"):
        load(language=good["phi"], blip2=good["blip2"], minigpt4=str(path))


def test_sha256_mismatch(ref, good, tmp_path):
    stage = write_stage(ref, tmp_path / "TinyGPT-V_for_Stage4.pth")
    right = file_sha256(stage)
    load(language=good["phi"], blip2=good["blip2"], stage_checkpoint=str(stage), sha256={"stage_checkpoint": right})
    with pytest.raises(WeightLoadError, match="sha256 .* does not match the expected 0000"):
        load(
            language=good["phi"], blip2=good["blip2"], stage_checkpoint=str(stage), sha256={"stage_checkpoint": "0000"}
        )


def test_pickled_objects_are_refused(good, tmp_path):
    """.pth files are read with weights_only=True: arbitrary objects are never unpickled."""
    path = tmp_path / "pretrained_minigpt4.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(1)}, "args": TrainingArguments()}, path)
    with pytest.raises(WeightLoadError, match="weights_only=True"):
        load(language=good["phi"], blip2=good["blip2"], minigpt4=str(path))


def test_no_vision_source(good):
    with pytest.raises(ValueError, match="no vision source"):
        load(language=good["phi"])


def test_full_directory_missing_a_tensor(ref, tmp_path):
    directory = ref.save_pretrained(tmp_path / "out")
    state = load_file(directory / "model.safetensors")
    del state["language_model.model.layers.0.mlp.fc2.bias"]
    save_file(state, directory / "model.safetensors")
    with pytest.raises(WeightLoadError, match="missing: language_model.model.layers.0.mlp.fc2.bias"):
        TinyGPTV.from_pretrained(directory)


def test_trainable_only_directory_missing_a_tensor(ref, tmp_path):
    base = ref.save_pretrained(tmp_path / "base")
    directory = ref.save_pretrained(tmp_path / "adapter", trainable_only=True, base=base)
    state = load_file(directory / "trainable.safetensors")
    del state["language_model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(state, directory / "trainable.safetensors")
    meta = json.loads((directory / "config.json").read_text())
    meta["files"]["trainable.safetensors"] = file_sha256(directory / "trainable.safetensors")
    (directory / "config.json").write_text(json.dumps(meta))
    with pytest.raises(WeightLoadError, match=r"layers.1.self_attn.v_proj.lora_B.weight \(trainable, not in adapter\)"):
        TinyGPTV.from_pretrained(directory)


def test_corrupt_file_in_our_format(ref, tmp_path):
    directory = ref.save_pretrained(tmp_path / "out")
    TinyGPTV.from_pretrained(directory, verify=True)
    data = bytearray((directory / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (directory / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(WeightLoadError, match="sha256"):
        TinyGPTV.from_pretrained(directory, verify=True)


def test_trainable_only_save_needs_a_base(ref, tmp_path):
    with pytest.raises(ValueError, match="needs the source of the frozen parts"):
        ref.save_pretrained(tmp_path / "adapter", trainable_only=True)


def test_not_our_format(good):
    with pytest.raises(WeightLoadError, match="not a TinyGPT-V directory.*tinygptv convert"):
        TinyGPTV.from_pretrained(good["phi"])


def test_tokenizer_larger_than_the_vocabulary(good, tmp_path):
    small = reference_model(tiny(**{"language.vocab_size": 64}))
    lm = write_phi_dir(small, tmp_path / "phi")  # the word tokenizer has more than 64 tokens
    with pytest.raises(WeightLoadError, match="the tokenizer has \\d+ tokens but the model's vocabulary holds 64 rows"):
        load(tiny(**{"language.vocab_size": 64}), language=str(lm), blip2=good["blip2"])
