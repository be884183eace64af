"""The trainer on real data readers: the shapes world (tinygptv.data.shapes) as a ``shapes`` stream
and as a ``mix`` of named readers with paths under ``data.root``."""

import math

import pytest
from train_helpers import losses, tiny_config

from tinygptv.train import build_reader, train
from tinygptv.train_config import MixEntry

MIX = {
    "detail": {"ratio": 3, "reader": "cc_sbu_align", "args": {"root": "align/train", "image_dir": "images/224", "image_ext": ".png"}},
    "text": {"ratio": 1, "reader": "unnatural_instructions", "args": {"data_file": "text/train.jsonl"}},
}  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tinygptv.data.shapes import make_shapes

    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, n=24, seed=0)
    return root


def test_shapes_world_stage3(world, tmp_path):
    cfg = tiny_config(
        tmp_path / "run",
        {"stage": 3, "data": {"kind": "shapes", "root": str(world), "max_length": 120, "val_batches": 2},
         "epochs": 2, "iters_per_epoch": 3, "schedule.warmup_steps": 1},
    )  # fmt: skip
    out = train(cfg)
    assert sorted(losses(out)) == list(range(1, 7))
    assert all(math.isfinite(v) for v in losses(out).values())
    assert set(losses(out, "val_loss")) == {3, 6}


def test_mix_reads_paths_under_data_root(world):
    source = build_reader("detail", MixEntry(**MIX["detail"]), str(world))
    assert source.name == "detail" and len(source) == 20  # the 20 training images of the world
    with pytest.raises(ValueError, match="unknown reader 'nope'"):
        build_reader("x", MixEntry(reader="nope"), str(world))


def test_mix_resumes_at_the_same_draw(world, tmp_path):
    """A run continued from its checkpoint sees the mixture's next draws: same losses as one run."""
    common = {"stage": 3, "data": {"kind": "mix", "root": str(world), "datasets": MIX, "max_length": 120},
              "iters_per_epoch": 3, "schedule.kind": "constant", "tensorboard": False}  # fmt: skip
    whole = losses(train(tiny_config(tmp_path / "whole", {**common, "epochs": 2})))
    first = train(tiny_config(tmp_path / "parts", {**common, "epochs": 1}))
    train(tiny_config(tmp_path / "parts", {**common, "epochs": 2}), resume=True)
    parts = losses(first)
    assert sorted(parts) == sorted(whole) == list(range(1, 7))
    assert all(abs(parts[s] - whole[s]) <= 1e-6 for s in whole), (parts, whole)


def test_mix_validation_needs_val_datasets(world, tmp_path):
    cfg = tiny_config(
        tmp_path / "run",
        {"stage": 3, "data": {"kind": "mix", "root": str(world), "datasets": MIX, "val_batches": 1, "max_length": 120},
         "epochs": 1, "iters_per_epoch": 1, "schedule.kind": "constant"},
    )  # fmt: skip
    with pytest.raises(ValueError, match="val_datasets is empty"):
        train(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before training, not after an epoch


def test_image_feature_cache_gives_the_same_losses_and_hits(world, tmp_path):
    from tinygptv.train import fit, setup

    settings = {"stage": 4, "data": {"kind": "shapes", "root": str(world), "max_length": 120},
                "epochs": 1, "iters_per_epoch": 6, "batch_size": 4, "schedule.warmup_steps": 1}  # fmt: skip
    plain = losses(train(tiny_config(tmp_path / "plain", settings)))
    run = setup(tiny_config(tmp_path / "cached", {**settings, "image_feature_cache": 100}))
    try:
        fit(run)
    finally:
        run.log.close()
    cache = run.module.feature_cache
    assert cache.hits > 0 and cache.misses == len(cache) <= 24  # 24 images, each encoded once
    assert losses(tmp_path / "cached") == pytest.approx(plain, abs=1e-6)


def test_image_feature_cache_looks_up_repeats_and_refuses_a_trainable_encoder():
    import torch

    from tinygptv.model.tinygptv import TinyGPTV
    from tinygptv.model.feature_cache import ImageFeatureCache

    torch.manual_seed(0)
    model = TinyGPTV("tinygptv-tiny").eval()
    model.requires_grad_(False)
    size = model.config.vision.image_size
    images = torch.randn(3, 3, size, size)
    expected = model.encode_images(images)
    model.feature_cache = ImageFeatureCache(max_images=2)
    first = model.encode_images(images)  # 3 misses; the cache keeps the last 2
    again = model.encode_images(images[1:])  # both hits
    assert torch.allclose(first, expected, atol=1e-6) and torch.allclose(again, expected[1:], atol=1e-6)
    assert (model.feature_cache.misses, model.feature_cache.hits, len(model.feature_cache)) == (3, 2, 2)
    changed = images.clone()
    changed[1, 0, 0, 0] += 1.0  # one pixel differs: a new image
    model.encode_images(changed[1:2])
    assert model.feature_cache.misses == 4
    model.qformer.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen encoder.*trainable"):
        model.encode_images(images)
    with pytest.raises(ValueError, match="at least one image"):
        ImageFeatureCache(0)


def test_shapes_ratios_override_the_worlds_mix(world, tmp_path):
    """``data.ratios`` re-weights named sets of a shapes stage (the rest keep the world's ratios);
    a name that is not a set of the stage is refused before training."""
    from tinygptv.data.shapes import STAGE4_RATIOS
    from tinygptv.stages import get_stage
    from tinygptv.train import build_model, build_stream

    settings = {"stage": 4, "data": {"kind": "shapes", "root": str(world), "max_length": 120,
                                     "ratios": {"shapes_refer": 0, "shapes_vqa": 60}}}  # fmt: skip
    cfg = tiny_config(tmp_path / "run", settings)
    model = build_model(cfg, get_stage(4))
    mixture = build_stream(cfg, model, 0, 1).mixture
    assert mixture.ratios == {**STAGE4_RATIOS, "shapes_refer": 0.0, "shapes_vqa": 60.0}
    drawn = {mixture.locate(k)[0] for k in range(200)}
    assert "shapes_refer" not in drawn and "shapes_vqa" in drawn
    cfg.data.ratios = {"shapes_nope": 1.0}
    with pytest.raises(ValueError, match=r"data.ratios names \['shapes_nope'\], not sets of stage 4"):
        build_stream(cfg, model, 0, 1)
