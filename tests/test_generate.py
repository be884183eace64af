"""The decoding loop: greedy parity with transformers, sampling filters, stop strings, cache reuse."""

import pytest
import torch

from tinygptv.model.language import cache_argument
from tinygptv.generate import SamplingParams, StopChecker, new_cache, next_token, stream_tokens
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.testing import word_tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyGPTV("tinygptv-tiny", tokenizer=word_tokenizer()).eval()


def _embeds(model, text):
    ids = torch.tensor([model.tokenizer(text)["input_ids"]])
    return ids, model.embed(ids, None)


def test_greedy_stream_equals_transformers_generate(model):
    ids, embeds = _embeds(model, "what color is the large circle on the left ?")
    ours = list(stream_tokens(model.lm, embeds, new_cache(model.lm), SamplingParams(max_new_tokens=12), eos_token_ids=[]))
    ref = model.lm.generate(input_ids=ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == ref[0, ids.shape[1]:].tolist()


def test_continuing_a_cache_equals_running_from_scratch(model):
    _, first = _embeds(model, "describe the image")
    _, second = _embeds(model, "what shape is it ?")
    cache = new_cache(model.lm)
    list(stream_tokens(model.lm, first, cache, SamplingParams(max_new_tokens=1), []))
    assert cache.get_seq_length() == first.shape[1]
    with torch.no_grad():
        pos = torch.arange(first.shape[1], first.shape[1] + second.shape[1])[None]
        cont = model.lm(inputs_embeds=second, use_cache=True, position_ids=pos, **cache_argument(model.lm, cache)).logits
        full = model.lm(inputs_embeds=torch.cat([first, second], 1)).logits[:, first.shape[1]:]
    assert (cont - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch", ["phi", "llama"])
def test_cached_greedy_equals_uncached_recomputation_for_each_backbone(arch):
    """The KV cache reaches our own decoder layers under whatever name transformers passes it."""
    from tinygptv.config import get_preset

    torch.manual_seed(0)
    m = TinyGPTV(get_preset("tinygptv-tiny").replace(**{"language.arch": arch}), tokenizer=word_tokenizer()).eval()
    ids, embeds = _embeds(m, "what color is the large circle on the left ?")
    cached = list(stream_tokens(m.lm, embeds, new_cache(m.lm), SamplingParams(max_new_tokens=10), eos_token_ids=[]))
    seq = ids
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, m.lm(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert cached == seq[0, ids.shape[1] :].tolist()


def test_top_k_and_top_p_keep_only_the_head_of_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(next_token(logits, SamplingParams(temperature=1.0, top_p=0.7), g)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops there
    draws = {int(next_token(logits, SamplingParams(temperature=1.0, top_k=3), g)) for _ in range(300)}
    assert draws == {0, 1, 2}
    assert int(next_token(logits, SamplingParams(temperature=0.0), g)) == 0


def test_sampling_is_reproducible_with_a_seed(model):
    _, embeds = _embeds(model, "describe the image")
    params = SamplingParams(max_new_tokens=8, temperature=1.5, top_p=0.9, seed=3)
    a = list(stream_tokens(model.lm, embeds, new_cache(model.lm), params, []))
    b = list(stream_tokens(model.lm, embeds, new_cache(model.lm), params, []))
    assert a == b and len(a) == 8


def test_stop_checker_holds_back_partial_stops_and_cuts_at_the_stop():
    tok = word_tokenizer()
    ids = tok("a red circle ### human", add_special_tokens=False)["input_ids"]
    checker = StopChecker(tok, ["# # #"])  # this word-level tokenizer decodes '###' with spaces
    out = ""
    for i in ids:
        out += checker.push(i)
        if checker.stopped:
            break
    assert checker.stopped and out.strip() == "a red circle"
    checker = StopChecker(tok, ["# # x"])
    pieces = [checker.push(i) for i in tok("red # #", add_special_tokens=False)["input_ids"]]
    assert "".join(pieces).strip() == "red"  # '# #' might still become the stop string
    assert checker.flush().strip() == "# #"


def test_invalid_sampling_params():
    for bad in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2)):
        with pytest.raises(ValueError):
            SamplingParams(**bad).validate()
