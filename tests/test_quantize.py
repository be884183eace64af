"""Weight-only int8 / int4 layers: exact against their own dequantized weights, close to float."""

import pytest
import torch
from torch import nn

from conftest import random_pixels
from tinygptv.config import get_preset
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.quantize import (
    Int4Linear,
    Int8Linear,
    int4_group_size,
    language_model_linear_names,
    quantize_language_model,
    quantize_linear_layers,
)


def _linear(k=256, n=96, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(k, n)
    return layer


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_kernel_equals_matmul_with_dequantized_weights(cls):
    layer = _linear()
    q = cls.from_linear(layer) if cls is Int8Linear else cls.from_linear(layer, group_size=64)
    x = torch.randn(2, 5, 256)
    expected = x @ q.dequantize().t() + layer.bias
    assert (q(x) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("cls,bound", [(Int8Linear, 0.01), (Int4Linear, 0.15)])
def test_quantization_error_is_small_relative_to_weights(cls, bound):
    layer = _linear()
    q = cls.from_linear(layer)
    rel = (q.dequantize() - layer.weight).norm() / layer.weight.norm()
    assert rel < bound
    x = torch.randn(4, 256)
    out_rel = (q(x) - layer(x)).norm() / layer(x).norm()
    assert out_rel < bound


def test_int4_codes_round_trip_through_nibbles():
    layer = _linear(k=64, n=8)
    q = Int4Linear.from_linear(layer, group_size=32)
    codes = q.unpack()
    assert codes.min() >= 0 and codes.max() <= 15
    w = layer.weight.detach().view(8, 2, 32)
    expected = torch.round((w - w.amin(-1, keepdim=True)) / q.scale[..., None]).clamp(0, 15).view(8, 64)
    assert torch.equal(codes, expected.to(torch.int32))


def test_bf16_activations():
    layer = _linear()
    for q in (Int8Linear.from_linear(layer), Int4Linear.from_linear(layer)):
        x = torch.randn(3, 256)
        out = q(x.bfloat16())
        assert out.dtype == torch.bfloat16
        assert ((out.float() - q(x)).norm() / q(x).norm()) < 0.02


def test_group_size_choice():
    assert int4_group_size(2560) == 128 and int4_group_size(160) == 32 and int4_group_size(192, 64) == 64
    with pytest.raises(ValueError, match="divides in_features=40"):
        int4_group_size(40)


def _float_model():
    cfg = get_preset("tinygptv-micro").replace(**{"lora.enabled": False})
    torch.manual_seed(0)
    return TinyGPTV(cfg).eval()


@pytest.mark.parametrize("mode,bound", [("int8", 0.02), ("int4", 0.2)])
def test_quantized_language_model_stays_close_and_reloads(mode, bound):
    model = _float_model()
    ids = torch.randint(4, 1000, (1, 40), generator=torch.Generator().manual_seed(1))
    pixels = random_pixels(1, 224)
    ids[0, 3:35] = -200  # one image's 32 slots
    with torch.no_grad():
        ref = model(ids, pixel_values=pixels).logits
        quantize_language_model(model, mode)
        out = model(ids, pixel_values=pixels).logits
    kinds = {type(m).__name__ for m in model.lm.modules()}
    assert "Int8Linear" in kinds and ("Int4Linear" in kinds) == (mode == "int4")
    assert not any(isinstance(m, nn.Linear) for m in model.lm.model.layers.modules())
    assert ((out - ref).norm() / ref.norm()).item() < bound

    # a quantized state dict loads into a fresh quantized skeleton and gives identical outputs
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = _float_model()
    lm = fresh.lm
    quantize_linear_layers(lm, language_model_linear_names(lm), mode)
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(ids, pixel_values=pixels).logits, out)


def test_unmerged_lora_is_refused():
    model = TinyGPTV("tinygptv-tiny")
    with pytest.raises(ValueError, match="merge LoRA"):
        quantize_language_model(model, "int8")
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        quantize_linear_layers(nn.Sequential(nn.Linear(4, 4)), ["0"], "int3")


@pytest.mark.parametrize("k,n", [(40, 24), (48, 40), (64, 64)])
def test_widths_outside_the_kernels_constraints_fall_back_correctly(k, n):
    layer = _linear(k=k, n=n)
    for q in (Int8Linear.from_linear(layer), Int4Linear.from_linear(layer, group_size=int4_group_size(k) if k % 32 == 0 else 8)):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(3, k).to(dtype)
            expected = x.float() @ q.dequantize().t() + layer.bias
            assert ((q(x).float() - expected).norm() / expected.norm()) < (1e-5 if dtype == torch.float32 else 2e-2)
