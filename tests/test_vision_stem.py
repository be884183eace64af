"""The optional convolutional stem of a ViT trained from scratch (the micro recipe's ``conv_stem``)."""

import json

import pytest
import torch

from conftest import random_pixels
from tinygptv.config import VisionConfig, get_preset
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.model.vision import ConvStem, VisionEncoder
from tinygptv.testing import word_tokenizer


def stem_config(**overrides) -> VisionConfig:
    values = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    values["conv_stem"] = (8, 16)
    values.update(overrides)
    return VisionConfig(**values)


def test_stem_keeps_the_patch_grid_at_any_size():
    torch.manual_seed(0)
    with_stem = VisionEncoder(stem_config())
    torch.manual_seed(0)
    plain = VisionEncoder(stem_config(conv_stem=()))
    pixels = random_pixels(3, 32)
    out = with_stem(pixels)
    assert out.shape == plain(pixels).shape == (3, 1 + 16, 32)
    assert isinstance(with_stem.model.embeddings.patch_embedding, ConvStem)
    names = [n for n, _ in with_stem.named_parameters() if "patch_embedding" in n]
    assert "model.embeddings.patch_embedding.layers.0.weight" in names
    assert "model.embeddings.patch_embedding.proj.weight" in names  # kernel 8 / 2**2 = 2
    assert with_stem.model.embeddings.patch_embedding.proj.kernel_size == (2, 2)
    # a larger square image: the conv stem runs at any size, the position table is interpolated
    assert with_stem(random_pixels(1, 64)).shape == (1, 1 + 64, 32)


def test_stem_tokens_of_an_image_do_not_depend_on_its_batch():
    torch.manual_seed(0)
    encoder = VisionEncoder(stem_config()).train()  # GroupNorm: no batch statistics even in training
    pixels = random_pixels(4, 32, seed=1)
    together = encoder(pixels)
    for i in range(4):
        torch.testing.assert_close(encoder(pixels[i : i + 1])[0], together[i], rtol=1e-5, atol=1e-5)


def test_stem_that_does_not_divide_the_patch_is_refused():
    with pytest.raises(ValueError, match="not divisible"):
        VisionEncoder(stem_config(patch_size=14))  # 14 / 2**2


def test_stem_gets_gradients():
    encoder = VisionEncoder(stem_config())
    encoder(random_pixels(2, 32)).square().mean().backward()
    for name, param in encoder.named_parameters():
        if "patch_embedding" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_model_with_a_stem_saves_and_loads_bit_exact(tmp_path):
    config = get_preset("tinygptv-tiny").replace(**{"vision.conv_stem": (8,)})  # patch 14: one layer, kernel 7
    torch.manual_seed(0)
    model = TinyGPTV(config, tokenizer=word_tokenizer()).eval()
    loaded = TinyGPTV.from_pretrained(model.save_pretrained(tmp_path / "stem"))
    assert loaded.config.vision.conv_stem == (8,)
    pixels = random_pixels(2, config.vision.image_size)
    assert torch.equal(loaded.encode_images(pixels), model.encode_images(pixels))


def test_micro_recipe_switch_and_state_inference():
    from tinygptv.recipes.micro import CONV_STEM, MicroRecipe, micro_config, stem_channels

    recipe = MicroRecipe()
    recipe.set("conv_stem", "false")
    assert micro_config(recipe).vision.conv_stem == ()
    recipe.set("conv_stem", "true")
    config = micro_config(recipe)
    assert config.vision.conv_stem == CONV_STEM
    encoder = VisionEncoder(config.vision)
    state = {f"vision.{k}": v for k, v in encoder.state_dict().items()}
    assert stem_channels(state) == CONV_STEM
    assert stem_channels({k: v for k, v in state.items() if "layers" not in k}) == ()


def test_stage_configs_take_the_stem_from_the_base_not_the_recipe_flag(tmp_path):
    """An ablation reuses a stem run's base with the default recipe: its stages must still build the stem."""
    from pathlib import Path

    from tinygptv.recipes.micro import MicroRecipe, stage_config

    configs = Path(__file__).resolve().parents[1] / "configs" / "micro"
    torch.manual_seed(0)
    for stem in ((8,), ()):
        config = get_preset("tinygptv-tiny").replace(**{"vision.conv_stem": stem})
        base = TinyGPTV(config, tokenizer=word_tokenizer()).save_pretrained(tmp_path / f"base{len(stem)}")
        stage = stage_config(configs, 1, tmp_path / "run", tmp_path / "world", Path(base), MicroRecipe())
        assert stage.model_overrides.get("vision.conv_stem", ()) == stem


@pytest.mark.parametrize("patch", [8, 4])  # the last convolution's kernel: 2x2, and 1x1
def test_channels_last_stem_matches_the_default_layout(patch):
    # the stem computes in channels-last (faster on oneDNN): the same values and gradients as the
    # default layout up to rounding, with gradients in the parameters' own strides (DDP's buckets)
    torch.manual_seed(0)
    stem = ConvStem((8, 16), 32, patch)
    assert stem.channels_last
    layouts = []
    channels_last = torch.channels_last
    stem.layers[1].register_forward_hook(lambda m, args, out: layouts.append(args[0].is_contiguous(memory_format=channels_last)))
    pixels = random_pixels(2, 32, seed=3)
    out = stem(pixels)
    stem.channels_last = False
    reference = stem(pixels)
    assert layouts == [True, False]  # what the GroupNorm after the first convolution got
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in stem.named_parameters()}
    for name, param in stem.named_parameters():
        assert grads[name].stride() == param.stride(), name
    stem.zero_grad()
    reference.square().mean().backward()
    for name, param in stem.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6)


def test_stem_benchmark_runs_both_layouts(capsys):
    from conftest import load_benchmark

    load_benchmark("bench_conv_stem").main(["--rounds", "1", "--batch", "1", "--image-size", "32"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["medians"]) >= {"default_train_s", "channels_last_train_s", "train_speedup"}
    assert result["max_abs_difference"] < 1e-4
