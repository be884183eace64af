"""GrowingLayer: the same attention inputs as transformers' DynamicLayer, appended in place."""

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tinygptv.generate import SamplingParams, new_cache, stream_tokens
from tinygptv.kv_cache import GrowingLayer, growing_cache
from tinygptv.model.language import cache_argument


@pytest.fixture
def model(tiny_model):
    return tiny_model


def _embeds(model, text):
    return model.embed(torch.tensor([model.tokenizer(text)["input_ids"]]), None)


def _small_growth(cache, tokens=3):
    cache.layers = [GrowingLayer(growth_tokens=tokens) for _ in cache.layers]
    return cache


def test_new_cache_is_made_of_growing_layers(model):
    cache = new_cache(model.lm)
    assert len(cache.layers) == model.lm.config.num_hidden_layers
    assert all(isinstance(layer, GrowingLayer) for layer in cache.layers)


def test_decoding_through_several_growths_equals_dynamic_cache(model):
    embeds = _embeds(model, "what color is the large circle on the left ?")
    params = SamplingParams(max_new_tokens=40)
    reference = DynamicCache(config=model.lm.config)
    ours = _small_growth(growing_cache(model.lm.config))
    want = list(stream_tokens(model.lm, embeds, reference, params, []))
    got = list(stream_tokens(model.lm, embeds, ours, params, []))
    assert got == want and len(got) == 40
    layer = ours.layers[0]
    length = ours.get_seq_length()
    assert length == reference.get_seq_length() == embeds.shape[1] + 39
    assert layer.capacity >= length and layer.capacity <= length + max(3, length // 4)
    for a, b in zip(ours.layers, reference.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_appending_within_room_writes_in_place(model):
    cache = growing_cache(model.lm.config)
    layer = cache.layers[0]
    k = torch.randn(1, 2, 5, 8)
    layer.update(k, k + 1)
    room, capacity = layer.keys.data_ptr(), layer.capacity
    assert capacity == 5 + 64  # GROWTH_TOKENS of room beyond the first update
    steps = [torch.randn(1, 2, 1, 8) for _ in range(capacity - 5)]
    for step in steps:
        keys, values = layer.update(step, step * 2)
        assert keys.data_ptr() == room  # no new buffer while the room lasts
    assert torch.equal(keys, torch.cat([k, *steps], dim=-2))
    assert torch.equal(values, torch.cat([k + 1, *(s * 2 for s in steps)], dim=-2))
    keys, _ = layer.update(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))  # full: grows, keeps the contents
    assert keys.data_ptr() != room and layer.capacity > capacity
    assert torch.equal(keys[..., :-1, :], torch.cat([k, *steps], dim=-2)) and not keys[..., -1, :].any()


def test_crop_then_continue_equals_a_fresh_run_of_the_same_tokens(model):
    """A conversation drops the tokens after the prefix it shares with the next turn, then goes on."""
    first = _embeds(model, "describe the image")
    second = _embeds(model, "what shape is it ?")
    cache = _small_growth(new_cache(model.lm))
    list(stream_tokens(model.lm, torch.cat([first, second], 1), cache, SamplingParams(max_new_tokens=6), []))
    cache.crop(-(cache.get_seq_length() - first.shape[1]))
    assert cache.get_seq_length() == first.shape[1]
    with torch.no_grad():
        pos = torch.arange(first.shape[1], first.shape[1] + second.shape[1])[None]
        cont = model.lm(inputs_embeds=second, use_cache=True, position_ids=pos, **cache_argument(model.lm, cache)).logits
        full = model.lm(inputs_embeds=torch.cat([first, second], 1)).logits[:, first.shape[1] :]
    assert (cont - full).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="positive value"):
        cache.crop(3)


def test_keys_replaced_from_outside_are_taken_over():
    """Beam search reorders (index_select) the cache between steps: the next update starts from those."""
    ours, ref = GrowingLayer(growth_tokens=2), DynamicLayer()
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        k, v = torch.randn(3, 2, 1 + (step == 0) * 4, 4, generator=g), torch.randn(3, 2, 1 + (step == 0) * 4, 4, generator=g)
        a, b = ours.update(k, v), ref.update(k, v)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        beams = torch.tensor([2, 0, 0])
        ours.reorder_cache(beams)
        ref.reorder_cache(beams)
    ours.batch_select_indices(torch.tensor([1]))
    ref.batch_select_indices(torch.tensor([1]))
    k = torch.randn(1, 2, 1, 4, generator=g)
    assert all(torch.equal(x, y) for x, y in zip(ours.update(k, k), ref.update(k, k)))


def test_reset_empties_the_layer_and_it_fills_again():
    layer = GrowingLayer()
    layer.update(torch.ones(1, 1, 4, 2), torch.ones(1, 1, 4, 2))
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.capacity == 0
    keys, _ = layer.update(torch.full((2, 1, 3, 2), 5.0), torch.zeros(2, 1, 3, 2))
    assert keys.shape == (2, 1, 3, 2) and bool((keys == 5).all())


def test_a_layer_cropped_to_nothing_takes_a_new_batch_size_and_refuses_a_mismatch():
    layer = GrowingLayer()
    layer.update(torch.ones(2, 1, 4, 2), torch.ones(2, 1, 4, 2))
    with pytest.raises(ValueError, match="batch/heads"):
        layer.update(torch.ones(3, 1, 1, 2), torch.ones(3, 1, 1, 2))
    layer.crop(-4)
    keys, values = layer.update(torch.full((3, 1, 2, 2), 7.0), torch.zeros(3, 1, 2, 2))
    assert keys.shape == (3, 1, 2, 2) and bool((keys == 7).all()) and not values.any()


def test_growth_needs_at_least_one_token():
    with pytest.raises(ValueError, match="growth_tokens"):
        GrowingLayer(growth_tokens=0)


@pytest.mark.parametrize("beams", [1, 3])
def test_batched_generate_runs_on_our_cache_and_decodes_as_transformers_own(model, monkeypatch, beams):
    from tinygptv.generate import generate_batch

    texts = ["what color is the large circle on the left ?", "describe the image"]
    rows = [_embeds(model, t)[0] for t in texts]
    width = max(r.shape[0] for r in rows)
    embeds = torch.zeros(2, width, rows[0].shape[-1])
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):  # left padding
        embeds[i, width - r.shape[0] :], mask[i, width - r.shape[0] :] = r, 1
    calls = []
    update = GrowingLayer.update
    monkeypatch.setattr(GrowingLayer, "update", lambda self, *a, **k: calls.append(1) or update(self, *a, **k))
    params = SamplingParams(max_new_tokens=8, num_beams=beams)
    ours = generate_batch(model.lm, embeds, mask, params, eos_token_ids=[], pad_token_id=0)
    assert len(calls) >= 8 * model.lm.config.num_hidden_layers
    with torch.inference_mode():
        ref = model.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                num_beams=beams, pad_token_id=0)
    assert torch.equal(ours, ref)
