"""Mixture sampler (ratios, determinism, resuming, workers, bad samples) and the model-ready batch."""

import logging
import random
from collections import Counter

import pytest
import torch
from PIL import Image

from tinygptv.data.batching import Collator
from tinygptv.data.encoding import IGNORE_INDEX, IMAGE_TOKEN_ID
from tinygptv.data.image_processing import ImageProcessor
from tinygptv.data.mixture import DataError, Mixture, MixtureLoader
from tinygptv.data.sample import BadSample, Sample, Turn
from tinygptv.data.sources import RecordSource
from tinygptv.testing import word_tokenizer

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


class Numbers(RecordSource):
    """Text-only samples "say N" -> "N"; negative records are bad."""

    def build(self, record, rng):
        if record < 0:
            raise BadSample(f"record {record} is broken")
        return Sample(turns=[Turn(f"say {record}", str(record))], task="text", id=str(record))


class Swatches(RecordSource):
    """One plain-colour image per sample; the answer names the colour index."""

    def build(self, record, rng):
        image = Image.new("RGB", (12, 12), COLORS[record % len(COLORS)])
        return Sample(turns=[Turn("what color", str(record % len(COLORS)))], images=[image], task="vqa", id=str(record))


@pytest.fixture(scope="module")
def collator():
    return Collator(word_tokenizer(), "stage4", ImageProcessor(28, train=True), num_image_tokens=4, max_length=64)


def test_empirical_mix_matches_ratios():
    sources = {"a": Numbers(range(7), "a"), "b": Numbers(range(50), "b"), "c": Numbers(range(3), "c")}
    ratios = {"a": 115, "b": 14, "c": 30}  # the paper's 115:14, plus a third set
    mixture = Mixture(sources, ratios, seed=0)
    draws = Counter(mixture.locate(g)[0] for g in range(10_000))
    total = sum(ratios.values())
    for name, ratio in ratios.items():
        assert abs(draws[name] / 10_000 - ratio / total) < 0.02


def test_positions_count_each_source_in_order():
    mixture = Mixture({"a": Numbers(range(5), "a"), "b": Numbers(range(5), "b")}, {"a": 1, "b": 3}, seed=4)
    seen = {"a": [], "b": []}
    for g in range(3 * Mixture.BLOCK + 17):  # across block boundaries
        name, position = mixture.locate(g)
        seen[name].append(position)
    for positions in seen.values():
        assert positions == list(range(len(positions)))
    # a fresh mixture jumping straight to a late draw agrees
    late = Mixture({"a": Numbers(range(5), "a"), "b": Numbers(range(5), "b")}, {"a": 1, "b": 3}, seed=4)
    assert late.locate(3 * Mixture.BLOCK + 16) == mixture.locate(3 * Mixture.BLOCK + 16)


def test_deterministic_by_seed_and_epochs_are_permutations():
    def stream(seed):
        mixture = Mixture([Numbers(range(10), "n")], seed=seed)
        return [mixture.load(g).id for g in range(30)]

    assert stream(1) == stream(1)
    assert stream(1) != stream(2)
    s = stream(1)
    assert sorted(s[:10]) == sorted(s[10:20]) == sorted(str(i) for i in range(10))
    assert s[:10] != s[10:20]  # a fresh permutation per epoch


def test_ratio_validation():
    sources = {"a": Numbers([1], "a")}
    with pytest.raises(ValueError, match="missing"):
        Mixture(sources, {})
    with pytest.raises(ValueError, match="unknown"):
        Mixture(sources, {"a": 1, "z": 1})
    with pytest.raises(ValueError, match="non-negative"):
        Mixture(sources, {"a": 0})
    with pytest.raises(ValueError):
        Mixture({})
    with pytest.raises(ValueError, match="no records"):
        Mixture({"a": Numbers([1], "a"), "b": Numbers([], "b")})


def _same_batch(x, y):
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _mixture(seed=0):
    return Mixture(
        {"numbers": Numbers(range(20), "numbers"), "swatches": Swatches(range(9), "swatches")},
        {"numbers": 1, "swatches": 2},
        seed=seed,
    )


def test_restart_at_step_k_gives_the_same_stream(collator):
    full = MixtureLoader(_mixture(), collator, batch_size=3)
    batches, states = [], []
    for _ in range(8):
        batches.append(full.next_batch())
        states.append(full.state_dict())
    assert states[-1]["step"] == 24
    # resume from the state after batch 3, and from a bare start_step
    resumed = MixtureLoader(_mixture(), collator, batch_size=3)
    resumed.load_state_dict(states[3])
    started = MixtureLoader(_mixture(), collator, batch_size=3, start_step=states[3]["step"])
    for k in range(4, 8):
        assert _same_batch(resumed.next_batch(), batches[k])
        assert _same_batch(started.next_batch(), batches[k])
    # a different seed is a different stream
    other = MixtureLoader(_mixture(seed=1), collator, batch_size=3)
    assert not all(_same_batch(other.next_batch(), b) for b in batches[:3])


def test_state_from_another_mixture_is_refused(collator):
    state = MixtureLoader(_mixture(seed=0), collator).state_dict()
    with pytest.raises(ValueError, match="seed"):
        MixtureLoader(_mixture(seed=1), collator).load_state_dict(state)


def test_workers_give_the_same_stream(collator):
    single = MixtureLoader(_mixture(), collator, batch_size=4, num_workers=0)
    multi = MixtureLoader(_mixture(), collator, batch_size=4, num_workers=2)
    try:
        for _ in range(5):
            assert _same_batch(single.next_batch(), multi.next_batch())
    finally:
        multi.close()


def test_data_parallel_ranks_split_the_draws():
    mixture = Mixture([Numbers(range(1000), "n")], seed=3)
    rank0 = MixtureLoader(mixture, batch_size=5, rank=0, world_size=2).next_batch()
    rank1 = MixtureLoader(mixture, batch_size=5, rank=1, world_size=2).next_batch()
    both = MixtureLoader(mixture, batch_size=10).next_batch()
    assert [s.id for s in both] == [s.id for pair in zip(rank0, rank1) for s in pair]


def test_bad_samples_are_skipped_counted_and_reported(caplog):
    records = [0, -1, 2, 3, -4, 5, 6, 7, 8, 9]  # two bad of ten
    mixture = Mixture({"n": Numbers(records, "n"), "ok": Numbers(range(5), "ok")}, {"n": 1, "ok": 1}, seed=0)
    loader = MixtureLoader(mixture, batch_size=4, max_bad_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="tinygptv.data"):
        batches = list(loader.epoch(10))
    assert all(len(b) == 4 for b in batches)  # bad draws are replaced by the next ones
    assert all(int(s.id) >= 0 for b in batches for s in b)
    # the expected count: draws that landed on a bad record
    expected_bad = sum(
        1
        for g in range(loader.step)
        if mixture.locate(g)[0] == "n" and records[mixture.sources["n"].index_at(mixture.locate(g)[1], 0)] < 0
    )
    assert expected_bad > 0
    assert loader.stats.skipped == {"n": expected_bad}
    assert loader.stats.drawn == loader.step == 40 + expected_bad
    assert sum("skipped a bad sample" in r.message for r in caplog.records) == expected_bad
    assert f"{expected_bad} of {loader.step} drawn samples skipped" in loader.last_report
    assert any("data epoch done" in r.message and "broken" in r.message for r in caplog.records)
    # counts survive a resume
    resumed = MixtureLoader(mixture, batch_size=4, max_bad_fraction=0.5)
    resumed.load_state_dict(loader.state_dict())
    assert resumed.stats.skipped == {"n": expected_bad} and resumed.step == loader.step


def test_too_many_bad_samples_stop_the_run():
    records = [-1, -2, -3, 4, 5]
    loader = MixtureLoader(
        Mixture([Numbers(records, "n")], seed=0), batch_size=2, max_bad_fraction=0.01, grace_draws=100
    )
    with pytest.raises(DataError, match="more than 1.0% of the samples are bad"):
        for _ in range(100):
            loader.next_batch()
    # within the allowance nothing stops: one bad record in 200
    few = [-1] + list(range(1, 200))
    tolerant = MixtureLoader(Mixture([Numbers(few, "n")], seed=0), batch_size=10, max_bad_fraction=0.01)
    for _ in range(40):
        tolerant.next_batch()
    assert tolerant.stats.total_skipped == 2  # two epochs, one bad record each


def test_batch_contract_for_the_model(collator):
    samples = [
        Sample(turns=[Turn("first", "0")], images=[Image.new("RGB", (12, 12), COLORS[0])], task="vqa"),
        Sample(turns=[Turn("text only", "1")], task="text"),
        Sample(
            turns=[Turn("<ImageHere> then <ImageHere>", "2")],
            images=[Image.new("RGB", (12, 12), COLORS[1]), Image.new("RGB", (12, 12), COLORS[2])],
            task="conversation",
        ),
    ]
    batch = collator(samples, random.Random(0))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    B, T = batch["input_ids"].shape
    assert B == 3 and batch["labels"].shape == (B, T) and batch["attention_mask"].shape == (B, T)
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["pixel_values"].shape == (3, 3, 28, 28) and batch["pixel_values"].dtype == torch.float32
    # images in placeholder order: sample 0's red, then sample 2's green and blue
    dominant = batch["pixel_values"].mean(dim=(2, 3)).argmax(dim=1).tolist()
    assert dominant == [0, 1, 2]
    assert (batch["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist() == [4, 0, 8]
    # right padding: padded positions are masked and carry no loss
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == IGNORE_INDEX).all() and (batch["input_ids"][pad] == collator.pad_token_id).all()
    # a batch without images has no pixel_values
    assert "pixel_values" not in collator([samples[1]])


def test_geometry_samples_are_not_cropped(collator):
    image = Image.new("RGB", (40, 20))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    plain = Sample(turns=[Turn("q", "a")], images=[image])
    boxed = Sample(turns=[Turn("q", "a")], images=[image], geometry=True)
    eval_pixels = ImageProcessor(28)(image)
    assert torch.equal(collator.prepare(boxed, random.Random(1)).pixel_values[0], eval_pixels)
    crops = [collator.prepare(plain, random.Random(s)).pixel_values[0] for s in range(5)]
    assert any(not torch.equal(c, eval_pixels) for c in crops)


def test_too_long_sample_is_a_bad_sample_unless_truncated():
    long = Sample(turns=[Turn("what " * 100, "red")], task="text")
    strict = Collator(word_tokenizer(), "stage4", ImageProcessor(28), num_image_tokens=4, max_length=32)
    with pytest.raises(BadSample, match="longer than the context"):
        strict.prepare(long)
    cutting = Collator(word_tokenizer(), "stage4", ImageProcessor(28), num_image_tokens=4, max_length=32, truncate=True)
    with pytest.warns(UserWarning, match="truncated"):
        assert len(cutting.prepare(long).encoded) == 32


def test_placeholder_image_mismatch_is_a_bad_sample(collator):
    sample = Sample(turns=[Turn("<ImageHere> and <ImageHere>", "x")], images=[Image.new("RGB", (4, 4))])
    with pytest.raises(BadSample, match="2 image placeholder"):
        collator.prepare(sample)


def test_batches_train_the_tiny_model(collator):
    """The loader's batches are exactly what TinyGPTV.forward takes, and a step lowers the loss."""
    from tinygptv.model.tinygptv import TinyGPTV

    torch.manual_seed(0)
    model = TinyGPTV("tinygptv-tiny")
    loader = MixtureLoader(_mixture(), collator, batch_size=4)
    batch = loader.next_batch()
    assert "pixel_values" in batch
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        out = model(**batch)
        losses.append(out.loss.item())
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(torch.tensor(losses)).all() and losses[-1] < losses[0]
