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
    _int4_scale_zero,
    int4_group_size,
    int8_linear_names,
    language_model_linear_names,
    quantize_language_model,
    quantize_linear_layers,
    store_token_embedding_in_bf16,
)


def _linear(k=256, n=96, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(k, n)
    return layer


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_matmul_with_dequantized_weights(cls, dtype):
    """The CPU kernels compute x @ dequantize().T up to how they round the activations: fbgemm (int8,
    fp32 in) quantizes them to 8 bits per token (7 without VNNI), onnxruntime's int4 (the default
    where installed) to 8 bits per group, torch's int4 and the bf16 paths work in bf16."""
    layer = _linear()
    q = cls.from_linear(layer) if cls is Int8Linear else cls.from_linear(layer, group_size=64)
    x = torch.randn(2, 5, 256)
    expected = x @ q.dequantize().t() + layer.bias
    got = q(x.to(dtype))
    assert got.dtype == dtype
    bound = 0.02 if (cls is Int8Linear and dtype == torch.float32) else 0.01
    assert ((got.float() - expected).norm() / expected.norm()).item() < bound


def test_int8_rounds_each_token_on_its_own_range():
    """A token 1,000x smaller than another in the same call (a text token beside image tokens, or a
    short sequence in a batch) keeps its precision, a row with an offset too, and no row's result
    depends on the other rows of the call: fbgemm's one scale for the whole matrix would round the
    small row to nothing and tie each row's result to the others."""
    layer = _linear()
    q = Int8Linear.from_linear(layer)
    x = torch.randn(5, 256)
    x[0] *= 1000.0
    x[2] *= 1e-3
    x[3] += 50.0  # all positive: the range is [~47, ~53], not [-53, 53]
    x[4] = 0.25  # constant
    got = q(x) - layer.bias
    expected = x @ q.dequantize().t()
    for row in range(4):
        error = (got[row] - expected[row]).norm() / expected[row].norm()
        assert error.item() < 0.03, (row, error.item())
    assert torch.allclose(got[4], expected[4], rtol=1e-5, atol=1e-6)  # a constant row is exact
    for row in range(5):  # bitwise the same beside any other row
        assert torch.equal(q(x[[row, (row + 1) % 5]])[0] - layer.bias, got[row]), row
    assert torch.equal(q(x.flip(0)).flip(0) - layer.bias, got)


def test_int8_language_model_answers_each_sequence_of_a_batch_as_alone():
    """With an int8 language model, a batch's logits are each sequence's alone (the rows of one call
    share no rounding), and so are batched greedy answers."""
    from PIL import Image

    from tinygptv.testing import word_tokenizer

    model = _float_model()
    quantize_language_model(model, "int8")
    ids = torch.randint(4, 1000, (3, 24), generator=torch.Generator().manual_seed(2))
    ids[1] = ids[1] % 7 + 4  # other tokens, so other activation ranges
    with torch.no_grad():
        together = model(ids).logits
        for row in range(3):
            assert torch.equal(model(ids[row : row + 1]).logits, together[row : row + 1]), row

    torch.manual_seed(0)
    model = TinyGPTV("tinygptv-tiny", tokenizer=word_tokenizer()).eval()
    model.merge_lora()
    quantize_language_model(model, "int8")
    images = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (30, 50), (0, 200, 0))]
    questions = ["what color is it ?", "how many objects are there in the picture ?"]
    batched = model.generate(images, questions, task="vqa", max_new_tokens=8)
    alone = [model.generate([image], [question], task="vqa", max_new_tokens=8)[0] for image, question in zip(images, questions)]
    assert batched == alone and all(batched)


@pytest.mark.parametrize("cls,kernel", [(Int8Linear, "torch"), (Int4Linear, "torch"), (Int4Linear, "onnxruntime")])
def test_kernel_layout_replaces_the_codes_and_converts_back(cls, kernel, monkeypatch):
    """After the first CPU call the codes live only in the kernel's layout (no second copy of the
    weights); the state dict, dequantize and a device move still see the portable codes."""
    monkeypatch.setenv("TINYGPTV_INT4_KERNEL", kernel)
    layer = _linear(k=256, n=192)
    q = cls.from_linear(layer)
    state = {k: v.clone() for k, v in q.state_dict().items()}
    weight = q.dequantize()
    out = q(torch.randn(3, 256))
    assert q.qweight is None and q._packed is not None
    after = q.state_dict()
    assert after.keys() == state.keys()
    for name in state:
        assert torch.equal(after[name], state[name]), name
    assert torch.equal(q.dequantize(), weight)
    fresh = cls.from_linear(_linear(k=256, n=192, seed=1))
    fresh.load_state_dict(after)
    assert torch.equal(fresh(torch.ones(1, 256)), q(torch.ones(1, 256)))
    if cls is Int4Linear:  # scale and zero hold bf16 numbers, so the kernel's bf16 copy replaces them
        assert q.scale is None and q.zero is None
    q.to(torch.device("cpu"))  # a move restores the portable codes
    assert q._packed is None and torch.equal(q.qweight, state["qweight"])
    assert torch.equal(q.dequantize(), weight)
    assert out.shape == (3, 192)


def test_int4_scales_that_are_not_bf16_numbers_stay_exact():
    """A state dict whose scales bf16 cannot hold exactly (older files) keeps them in full beside the
    kernel's bf16 copy, so that saving gives back exactly what was loaded."""
    q = Int4Linear.from_linear(_linear(k=256, n=192))
    state = {k: v.clone() for k, v in q.state_dict().items()}
    state["scale"] = state["scale"] * (1 + 2**-12)
    q.load_state_dict(state)
    q(torch.randn(2, 256))
    assert q._packed is not None and q.scale is not None
    for name, value in q.state_dict().items():
        assert torch.equal(value, state[name]), name


@pytest.mark.parametrize("cls,bound", [(Int8Linear, 0.01), (Int4Linear, 0.15)])
def test_quantization_error_is_small_relative_to_weights(cls, bound):
    layer = _linear()
    q = cls.from_linear(layer)
    rel = (q.dequantize() - layer.weight).norm() / layer.weight.norm()
    assert rel < bound
    x = torch.randn(4, 256)
    out_rel = (q(x) - layer(x)).norm() / layer(x).norm()
    # fbgemm rounds int8 activations to 7 bits on CPUs without VNNI: twice the activation error
    from tinygptv.quantize import _needs_reduced_range

    assert out_rel < bound * (2 if cls is Int8Linear and _needs_reduced_range() else 1)


def test_int4_codes_round_trip_through_nibbles():
    """The stored codes are each weight's nearest code under the stored (bf16-exact) scale and zero."""
    layer = _linear(k=64, n=8)
    q = Int4Linear.from_linear(layer, group_size=32)
    codes = q.unpack()
    assert codes.min() >= 0 and codes.max() <= 15
    for t in (q.scale, q.zero):
        assert torch.equal(t.bfloat16().float(), t)
    w = layer.weight.detach().view(8, 2, 32)
    expected = (torch.round((w - q.zero[..., None]) / q.scale[..., None]) + 8).clamp(0, 15).view(8, 64)
    assert torch.equal(codes, expected.to(torch.int32))


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_scale_search_beats_min_max(group_size):
    """The least-squares refits of scale and zero lower the rounding error below the min / max fit
    (by ~12% on Gaussian weights) and never raise it for a group."""
    torch.manual_seed(0)
    w = torch.randn(64, 512 // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).bfloat16().float()
    zero = (lo + 8 * scale).bfloat16().float()

    def group_error(s, z):
        q = (torch.round((w - z[..., None]) / s[..., None]) + 8).clamp(0, 15)
        return ((q - 8) * s[..., None] + z[..., None] - w).square().sum(-1)

    min_max = group_error(scale, zero)
    searched = group_error(*_int4_scale_zero(w))
    assert searched.sum() < 0.92 * min_max.sum()
    assert (searched <= min_max * (1 + 1e-3)).float().mean() > 0.99  # bf16 rounding aside


def test_bf16_activations():
    layer = _linear()
    for q in (Int8Linear.from_linear(layer), Int4Linear.from_linear(layer)):
        x = torch.randn(3, 256)
        out = q(x.bfloat16())
        assert out.dtype == torch.bfloat16
        assert ((out.float() - q(x)).norm() / q(x).norm()) < 0.02


def test_group_size_choice():
    assert int4_group_size(2560) == 64 and int4_group_size(2560, 128) == 128
    assert int4_group_size(160) == 32 and int4_group_size(192, 128) == 64
    with pytest.raises(ValueError, match="divides in_features=40"):
        int4_group_size(40)


def test_int8_linear_names_pick_the_first_layers_and_the_head():
    names = [f"model.layers.{i}.{p}" for i in range(32) for p in ("self_attn.q_proj", "mlp.fc2")] + ["lm_head"]
    assert int8_linear_names(names) == ["lm_head"]
    kept = int8_linear_names(names, 3 / 16)
    assert kept == [n for n in names if n == "lm_head" or int(n.split(".")[2]) < 6]
    assert int8_linear_names(names[:8], 3 / 16) == names[:2]  # 4 layers: the first one


def test_bf16_token_embedding_returns_float32_rows_of_the_rounded_table():
    model = _float_model()
    lm = model.lm
    table = lm.get_input_embeddings().weight.detach().clone()
    store_token_embedding_in_bf16(lm)
    embedding = lm.get_input_embeddings()
    assert embedding.weight.dtype == torch.bfloat16 and lm.dtype == torch.float32
    ids = torch.tensor([[0, 5, 17]])
    out = embedding(ids)
    assert out.dtype == torch.float32 and torch.equal(out, table[ids].bfloat16().float())


def _float_model():
    cfg = get_preset("tinygptv-micro").replace(**{"lora.enabled": False})
    torch.manual_seed(0)
    return TinyGPTV(cfg).eval()


# int8 on fp32 activations also rounds them to 8 bits (fbgemm): ~2.5% here against 1% weights-only
@pytest.mark.parametrize("mode,bound", [("int8", 0.04), ("int4", 0.2)])
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


@pytest.mark.parametrize("mode,gate", [("int8", 0.99), ("int4", 0.98)])
def test_quality_gate_on_last_token_logits(mode, gate):
    """Issue 6's gate (benchmarks/bench_quantize_quality.py at real size), on a small random model:
    quantized as ``load_model`` does on a CPU (LM int8 / int4, vision encoder and Q-Former int8
    dynamic), the last-token logits keep a cosine similarity to fp32 of at least the gate."""
    from tinygptv.quantize import quantize_vision_dynamic

    model = _float_model()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 1000, (1, 48), generator=g)
    ids[0, 1:33] = -200  # one image's 32 slots, then 15 text tokens
    pixels = random_pixels(1, 224)
    with torch.no_grad():
        ref = model(ids, pixel_values=pixels).logits[0, -1]
        quantize_language_model(model, mode)
        quantize_vision_dynamic(model, min_width=0)  # this model is narrower than where int8 pays
        got = model(ids, pixel_values=pixels).logits[0, -1]
    assert torch.nn.functional.cosine_similarity(got, ref, dim=0).item() >= gate


def test_vision_int8_only_where_it_pays():
    from tinygptv.quantize import VISION_INT8_MIN_WIDTH, quantize_vision_dynamic

    def dynamic(part):
        return sum(type(m).__module__.startswith("torch.ao.nn.quantized") for m in part.modules())

    model = _float_model()
    assert model.config.vision.hidden_size < VISION_INT8_MIN_WIDTH
    quantize_vision_dynamic(model)
    assert dynamic(model.vision) == dynamic(model.qformer) == 0
    quantize_vision_dynamic(model, min_width=0)
    assert dynamic(model.vision) > 0 and dynamic(model.qformer) > 0


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
            # exact in the fp32 fallback; fbgemm (int8, every width) rounds fp32 activations to 8 bits
            exact = dtype == torch.float32 and isinstance(q, Int4Linear) and n % 16
            assert ((q(x).float() - expected).norm() / expected.norm()) < (1e-5 if exact else 2e-2)


@pytest.mark.parametrize("mode,share", [("int8", 0.0), ("int4", 0.0), ("int4", 0.25)])
def test_quantized_model_saves_and_loads_bit_exact(mode, share, tmp_path):
    from tinygptv.testing import word_tokenizer

    torch.manual_seed(0)
    cfg = get_preset("tinygptv-micro").replace(**{"language.vocab_size": 128})
    model = TinyGPTV(cfg, tokenizer=word_tokenizer()).eval()
    model.merge_lora()
    quantize_language_model(model, mode, int8_share=share)
    assert model.config.quantization.language_model == mode
    assert model.config.quantization.int8_share == share
    model.save_pretrained(tmp_path / "q")
    ids = torch.randint(4, 100, (1, 12), generator=torch.Generator().manual_seed(2))
    store_token_embedding_in_bf16(model.lm)  # what loading for CPU inference does (after the save)
    with torch.no_grad():
        expected = model(ids).logits
    # the loader builds the quantized skeleton on the meta device and assigns the saved codes
    loaded = TinyGPTV.from_pretrained(tmp_path / "q")
    assert loaded.config.quantization.language_model == mode
    assert loaded.config.quantization.int8_share == share
    kinds = [type(m).__name__ for m in loaded.lm.model.layers[0].modules() if isinstance(m, (Int8Linear, Int4Linear))]
    assert set(kinds) == {"Int8Linear" if mode == "int8" or share else "Int4Linear"}  # layer 0 of 4: int8 at 1/4
    saved, got = model.lm.state_dict(), loaded.lm.state_dict()
    assert saved.keys() == got.keys() and any(k.endswith("qweight") for k in got)
    for name in saved:
        assert torch.equal(saved[name], got[name]), name
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_load_model_quantizes_vision_dynamically_on_cpu(tmp_path):
    from tinygptv.inference import load_model
    from tinygptv.testing import word_tokenizer

    torch.manual_seed(0)
    # the micro preset, widened to where int8 pays for the vision side (VISION_INT8_MIN_WIDTH)
    wide = {"language.vocab_size": 128, "vision.hidden_size": 256, "qformer.hidden_size": 256}
    model = TinyGPTV(get_preset("tinygptv-micro").replace(**wide), tokenizer=word_tokenizer()).eval()
    model.save_pretrained(tmp_path / "f")
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        reference = model.encode_images(pixels)
    q = load_model(tmp_path / "f", device="cpu", quantize="int8")
    assert not any(isinstance(m, nn.Linear) for m in q.vision.modules())
    assert not any(isinstance(m, nn.Linear) for m in q.qformer.modules())
    assert all(m._packed is not None for m in q.lm.modules() if isinstance(m, Int8Linear))  # packed up front
    with torch.no_grad():
        got = q.encode_images(pixels)
    assert ((got - reference).norm() / reference.norm()).item() < 0.1
    with pytest.raises(ValueError, match="quantized dynamically"):
        q.save_pretrained(tmp_path / "never")
    with pytest.raises(ValueError, match="holds int8 weights; it cannot be loaded as int4"):
        model.merge_lora()
        quantize_language_model(model, "int8")
        model.save_pretrained(tmp_path / "q8")
        load_model(tmp_path / "q8", device="cpu", quantize="int4")


def test_load_model_int4_on_cpu_keeps_the_first_layers_int8(tmp_path):
    """CPU float32 int4: the first decoder layer of four (INT4_INT8_SHARE) and the head int8, the
    rest int4, everything packed, the embedding table bf16; the logits stay close to float."""
    from tinygptv.inference import load_model
    from tinygptv.quantize import Bf16Embedding

    model = _float_model()
    model.save_pretrained(tmp_path / "f")
    ids = torch.randint(4, 1000, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits[0, -1]
    q = load_model(tmp_path / "f", device="cpu", quantize="int4")
    layers = q.lm.model.layers
    assert all(isinstance(m, Int8Linear) for m in layers[0].modules() if hasattr(m, "bits"))
    assert all(isinstance(m, Int4Linear) for layer in layers[1:] for m in layer.modules() if hasattr(m, "bits"))
    assert isinstance(q.lm.lm_head, Int8Linear) and isinstance(q.lm.get_input_embeddings(), Bf16Embedding)
    assert all(m._packed is not None for m in q.lm.modules() if hasattr(m, "bits"))
    with torch.no_grad():
        got = q(ids).logits[0, -1]
    assert torch.nn.functional.cosine_similarity(got, reference, dim=0).item() > 0.98



def test_onnxruntime_int4_computes_our_format_and_keeps_no_reference_to_its_inputs():
    """OrtInt4Matmul computes x @ dequantize().T (float zero included) up to its int8 rounding of
    the activations, matches torch's int4 kernel as closely, does not read the codes, scales or
    zeros it was built from once packed (they are overwritten here, as freeing them would), and
    reads the exact codes back."""
    from tinygptv.quantize import OrtInt4Matmul

    layer = _linear(k=256, n=96)
    q = Int4Linear.from_linear(layer, group_size=32)
    codes, scale, zero = q.qweight.clone(), q.scale.clone(), q.zero.clone()
    assert zero.abs().max() > 0  # the zero term is exercised
    kernel = OrtInt4Matmul(codes, scale, zero, group_size=32, threads=1)
    x = torch.randn(7, 256)
    expected = x @ q.dequantize().t()
    got = kernel(x)
    assert ((got - expected).norm() / expected.norm()).item() < 0.01
    one = kernel(x[3:4])
    assert torch.allclose(one[0], got[3], atol=1e-5)  # rows are independent
    for held in (codes, scale, zero):
        held.fill_(7)
    assert torch.equal(kernel(x), got)
    assert torch.equal(kernel.codes(q.scale, q.zero), q.qweight)
    before = q.weight_nbytes()
    q._packed = kernel  # the bytes read per call count the fp32 scales and zeros onnxruntime holds
    assert q.weight_nbytes() == before + 96 * (256 // 32) * 4
    assert got.dtype == torch.float32 and kernel(x.bfloat16()).dtype == torch.bfloat16


def test_int4_kernel_choice_follows_the_environment(monkeypatch):
    """TINYGPTV_INT4_KERNEL picks the kernel a layer packs for (torch's by default); both give the same answers to within
    their activation rounding; a group size MatMulNBits does not take falls back to torch's kernel;
    an unknown name is an error naming the variable."""
    from tinygptv.quantize import INT4_KERNEL_ENV, OrtInt4Matmul, int4_cpu_kernel

    monkeypatch.delenv(INT4_KERNEL_ENV, raising=False)
    assert int4_cpu_kernel() == "torch"
    layer = _linear(k=256, n=96)
    x = torch.randn(4, 256)
    outputs = {}
    for kernel in ("onnxruntime", "torch"):
        monkeypatch.setenv(INT4_KERNEL_ENV, kernel)
        assert int4_cpu_kernel() == kernel
        q = Int4Linear.from_linear(layer, group_size=64)
        outputs[kernel] = q(x)
        assert isinstance(q._packed, OrtInt4Matmul) == (kernel == "onnxruntime")
    diff = (outputs["onnxruntime"] - outputs["torch"]).norm() / outputs["torch"].norm()
    assert 0 < diff.item() < 0.02
    monkeypatch.setenv(INT4_KERNEL_ENV, "onnxruntime")
    odd = Int4Linear.from_linear(_linear(k=48, n=24), group_size=8)  # neither kernel takes it
    assert torch.allclose(odd(torch.ones(1, 48)), torch.ones(1, 48) @ odd.dequantize().t() + odd.bias, atol=1e-5)
    assert odd._packed is None
    monkeypatch.setenv(INT4_KERNEL_ENV, "openvino")
    with pytest.raises(ValueError, match=INT4_KERNEL_ENV):
        int4_cpu_kernel()


def test_int4_kernel_benchmark_runs(capsys):
    from conftest import load_benchmark

    bench = load_benchmark("bench_int4_kernels")
    import sys

    argv = sys.argv
    sys.argv = ["bench_int4_kernels.py", "--layers", "1", "--tokens", "1", "--repeats", "1", "--threads", "1"]
    try:
        bench.main()
    finally:
        sys.argv = argv
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("int")]
    assert [" ".join(r[:2]) for r in rows] == ["int8 fbgemm", "int4 torch", "int4 onnxruntime"]
    assert all(float(r[3]) > 0 for r in rows)


def _micro_int4_model():
    from tinygptv.testing import word_tokenizer

    torch.manual_seed(0)
    cfg = get_preset("tinygptv-micro").replace(**{"language.vocab_size": 128})
    model = TinyGPTV(cfg, tokenizer=word_tokenizer()).eval()
    model.merge_lora()
    return quantize_language_model(model, "int4")


def test_onnxruntime_fuses_the_layers_that_share_an_input(monkeypatch):
    """With onnxruntime's kernel, q, k, v and fc1 of each Phi layer (all read the input LayerNorm's
    output) run as one MatMulNBits call: the same logits as four calls, in prefill and in cached
    decoding; the state dict still holds each layer's own codes; a move unfuses; torch's kernel
    does not fuse."""
    import copy

    from tinygptv.quantize import INT4_KERNEL_ENV, SharedInputGroup, _FusedSlice, fuse_shared_inputs, pack_for_cpu

    monkeypatch.setenv(INT4_KERNEL_ENV, "torch")
    assert fuse_shared_inputs(_micro_int4_model().lm) == 0
    monkeypatch.setenv(INT4_KERNEL_ENV, "onnxruntime")
    fused = _micro_int4_model()
    separate = copy.deepcopy(fused)
    state = {k: v.clone() for k, v in fused.state_dict().items()}
    for m in separate.lm.modules():
        if isinstance(m, Int4Linear):
            m.pack()  # one onnxruntime call per layer
    nbytes = sum(m.weight_nbytes() for m in separate.lm.modules() if isinstance(m, Int4Linear))
    pack_for_cpu(fused.lm)
    layers = fused.lm.model.layers
    for layer in layers:
        members = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.fc1]
        assert all(isinstance(m._packed, _FusedSlice) and m.qweight is None for m in members)
        assert len({id(m._packed.group) for m in members}) == 1
        assert isinstance(layer.self_attn.dense._packed, type(separate.lm.model.layers[0].self_attn.dense._packed))
    assert sum(m.weight_nbytes() for m in fused.lm.modules() if isinstance(m, Int4Linear)) == nbytes
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = separate(ids).logits, fused(ids).logits
    assert ((got - expected).norm() / expected.norm()).item() < 1e-6
    group: SharedInputGroup = layers[0].mlp.fc1._packed.group
    assert group._cache is None  # every member took its columns: nothing held between steps
    prompts = ["what color", "where is"]
    assert fused.generate([None, None], prompts, max_new_tokens=5, template=None) == separate.generate(
        [None, None], prompts, max_new_tokens=5, template=None
    )
    after = fused.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    fused.to(torch.float32)  # a move unfuses: each layer holds its own codes again
    assert all(not isinstance(m._packed, _FusedSlice) for m in fused.lm.modules() if isinstance(m, Int4Linear))
    assert torch.equal(layers[0].self_attn.q_proj.qweight, state["language_model.model.layers.0.self_attn.q_proj.qweight"])


def test_a_fused_member_called_with_a_new_input_recomputes(monkeypatch):
    """A member recognises the shared input by identity: another tensor, even one with the same
    values and shape, is computed afresh, and a member called twice on one input is too."""
    from tinygptv.quantize import INT4_KERNEL_ENV, SharedInputGroup

    monkeypatch.setenv(INT4_KERNEL_ENV, "onnxruntime")
    layers = [Int4Linear.from_linear(_linear(k=128, n=n, seed=n), group_size=32) for n in (32, 48)]
    xs = [torch.randn(3, 128, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    expected = [[x @ layer.dequantize().t() + layer.bias for layer in layers] for x in xs]
    SharedInputGroup(layers)
    for x, want in zip(xs, expected):
        a = layers[0](x)
        assert torch.allclose(layers[0](x), a)  # the same member again: recomputed, same values
        b = layers[1](x.clone())  # equal values, another tensor: recomputed
        for got, ref in ((a, want[0]), (b, want[1])):
            assert ((got - ref).norm() / ref.norm()).item() < 0.02


def test_int4_fusion_benchmark_runs(capsys, monkeypatch):
    from conftest import load_benchmark

    monkeypatch.setenv("TINYGPTV_INT4_KERNEL", "onnxruntime")
    bench = load_benchmark("bench_int4_fusion")
    assert bench.main(["--preset", "tinygptv-micro", "--rounds", "2", "--new-tokens", "3", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    import json

    summary = json.loads(out.strip().splitlines()[-1])
    assert set(summary) == {"separate", "fused"} and all(v["median_decode_tok_s"] > 0 for v in summary.values())
    assert "fused: 3 groups" in out  # tinygptv-micro: four decoder layers, the first one int8


def test_agreement_benchmark_counts_a_box_one_step_over_as_the_same_object():
    """bench_quantize_agreement's box column: a coordinate one step off names the same object, a box
    around another object or an unreadable answer does not, and text answers get no box column."""
    from conftest import load_benchmark

    bench = load_benchmark("bench_quantize_agreement")
    reference = {"t/refer/1": "{<10><10><40><40>}", "t/refer/2": "{<10><10><40><40>}", "t/refer/3": "{<50><50><90><90>}"}
    answers = {"t/refer/1": "{<10><11><40><40>}", "t/refer/2": "{<60><60><90><90>}", "t/refer/3": "a star"}
    ids = list(reference)
    assert bench.same_boxes(reference, answers, ids) == 1
    assert bench.same_boxes(reference, reference, ids) == 3
    assert bench.same_boxes({"t/vqa/1": "3"}, {"t/vqa/1": "3"}, ["t/vqa/1"]) is None
