"""The language model exported to OpenVINO (stateful KV cache) against transformers' own forward."""

import dataclasses

import pytest
import torch
from transformers import DynamicCache

pytest.importorskip("openvino")

from tinygptv.config import get_preset  # noqa: E402
from tinygptv.model.language import build_language_model  # noqa: E402
from tinygptv.openvino_lm import OpenVINOLanguageModel, export_language_model  # noqa: E402


def _lm(qk_norm=True, post_attention_rmsnorm=True, seed=0):
    cfg = dataclasses.replace(
        get_preset("tinygptv-tiny").language, qk_norm=qk_norm, post_attention_rmsnorm=post_attention_rmsnorm
    )
    torch.manual_seed(seed)
    lm = build_language_model(cfg).eval()
    with torch.no_grad():  # every weight random, the norms' too: a wrong norm or a skipped one shows
        for p in lm.parameters():
            p.normal_(0, 0.3)
    return lm


def _reference(lm, chunks):
    """Last-position logits after each chunk, through transformers' forward and its KV cache."""
    cache, out = DynamicCache(config=lm.config), []
    with torch.no_grad():
        for chunk in chunks:
            out.append(lm(inputs_embeds=chunk, cache=cache, use_cache=True).logits[:, -1])
    return out


@pytest.mark.parametrize("qk_norm,post_norm", [(True, True), (False, False)])
def test_exported_model_equals_transformers_through_prompt_tokens_and_a_second_chunk(tmp_path, qk_norm, post_norm):
    lm = _lm(qk_norm, post_norm)
    width = lm.config.hidden_size
    g = torch.Generator().manual_seed(1)
    # a prompt, three single tokens, then a chunk of four after the cache (the causal mask's offset)
    chunks = [torch.randn(1, 7, width, generator=g)] + [torch.randn(1, 1, width, generator=g) for _ in range(3)]
    chunks.append(torch.randn(1, 4, width, generator=g))
    want = _reference(lm, chunks)
    ov_lm = OpenVINOLanguageModel(export_language_model(lm, tmp_path / "lm.xml"), threads=1)
    for _ in range(2):  # and again after a reset: the state starts empty
        ov_lm.reset()
        got = [ov_lm(chunk) for chunk in chunks]
        assert ov_lm.length == 14
        for g_, w in zip(got, want):
            assert g_.shape == w.shape
            torch.testing.assert_close(g_, w, atol=1e-4, rtol=1e-4)
    # the norms matter here: the same weights without them give other logits
    if qk_norm:
        plain = _lm(False, False)
        plain.load_state_dict({k: v for k, v in lm.state_dict().items() if k in plain.state_dict()})
        assert (_reference(plain, chunks[:1])[0] - want[0]).abs().max() > 1e-2


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_compressed_export_is_close_to_float_and_smaller(tmp_path, mode):
    pytest.importorskip("nncf")
    lm = _lm()
    with torch.no_grad():
        for p in lm.parameters():
            p.mul_(0.3)  # a scale at which the logits do not saturate, as in a trained model
    width = lm.config.hidden_size
    x = torch.randn(1, 9, width, generator=torch.Generator().manual_seed(2))
    float_path = export_language_model(lm, tmp_path / "float.xml")
    path = export_language_model(lm, tmp_path / f"{mode}.xml", quantize=mode, group_size=8)  # the tiny widths (40, 80) in groups
    want = OpenVINOLanguageModel(float_path, threads=1)(x)
    got = OpenVINOLanguageModel(path, threads=1)(x)
    cosine = torch.nn.functional.cosine_similarity(got, want).item()
    assert cosine > (0.99 if mode == "int8" else 0.95), cosine
    assert (got - want).abs().max() > 0  # compressed: not the float weights
    assert path.with_suffix(".bin").stat().st_size < 0.5 * float_path.with_suffix(".bin").stat().st_size


def test_export_rejects_what_it_cannot_run(tmp_path):
    lm = _lm()
    with pytest.raises(ValueError, match="quantize must be one of"):
        export_language_model(lm, tmp_path / "x.xml", quantize="int3")
    with pytest.raises(ValueError, match="float32"):
        export_language_model(lm.to(torch.bfloat16), tmp_path / "x.xml")
    llama = build_language_model(dataclasses.replace(get_preset("tinygptv-tiny").language, arch="llama"))
    with pytest.raises(ValueError, match="supports the Phi language model"):
        export_language_model(llama, tmp_path / "x.xml")
    with pytest.raises(FileNotFoundError, match="no OpenVINO model"):
        OpenVINOLanguageModel(tmp_path / "missing.xml")
    with pytest.raises(ValueError, match=r"\(1, T, C\)"):
        path = export_language_model(_lm(), tmp_path / "ok.xml")
        OpenVINOLanguageModel(path, threads=1)(torch.zeros(2, 3, lm.config.hidden_size))

