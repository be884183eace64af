"""Hub ids resolved through a Hugging Face cache written by the test (offline: no network), and the
``tinygptv convert`` command end to end."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_weights import (
    canonical_state,
    reference_model,
    write_lavis_files,
    write_minigpt4,
    write_phi_dir,
    write_stage,
)

from tinygptv import TinyGPTV
from tinygptv.cli import main
from tinygptv.model.weights import Ingredients, file_sha256

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache, repo_id, files):
    """Put ``files`` (a directory or a list of paths) into ``cache`` the way huggingface_hub lays out a
    downloaded snapshot: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    if isinstance(files, list):
        snapshot.mkdir(parents=True)
        for f in files:
            shutil.copy(f, snapshot / f.name)
    else:
        shutil.copytree(files, snapshot)
    return snapshot


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="module")
def ref():
    return reference_model()


@pytest.fixture(scope="module")
def public(ref, tmp_path_factory):
    root = tmp_path_factory.mktemp("public")
    eva, blip2 = write_lavis_files(ref, root / "lavis")
    mg4 = write_minigpt4(
        torch.randn_like(ref.vision_proj.weight), torch.randn_like(ref.vision_proj.bias), root / "mg4.pth"
    )
    return {
        "phi_fused": write_phi_dir(ref, root / "phi-2", layout="fused", file="bin"),
        "eva": eva,
        "blip2_lavis": blip2,
        "minigpt4": mg4,
        "stage4": write_stage(ref, root / "TinyGPT-V_for_Stage4.pth"),
    }


def assert_same_weights(model, ref):
    expected, got = canonical_state(ref), canonical_state(model)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_hub_id_from_the_cache_offline(ref, tmp_path, offline_cache):
    cache_repo(offline_cache, "someone/tinygptv-tiny", ref.save_pretrained(tmp_path / "out"))
    model = TinyGPTV.from_pretrained("someone/tinygptv-tiny")
    assert_same_weights(model, ref)
    assert model.tokenizer is not None


def test_hub_id_not_in_the_cache_offline(offline_cache):
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache .* offline mode is on"):
        TinyGPTV.from_pretrained("someone/never-downloaded")


def test_local_paths_win_and_nonsense_is_refused(ref, tmp_path, offline_cache):
    assert_same_weights(TinyGPTV.from_pretrained(ref.save_pretrained(tmp_path / "someone" / "name")), ref)
    with pytest.raises(FileNotFoundError, match="no directory"):
        TinyGPTV.from_pretrained(tmp_path / "no" / "such" / "dir")


def test_ingredients_from_the_hub_cache(ref, public, offline_cache):
    """A language model by hub id and a stage checkpoint by hf:// file, all from the cache."""
    cache_repo(offline_cache, "microsoft/phi-2", public["phi_fused"])
    cache_repo(offline_cache, "someone/TinyGPT-V", [public["stage4"]])
    ingredients = Ingredients(
        language="microsoft/phi-2",
        eva_vit=str(public["eva"]),
        blip2_lavis=str(public["blip2_lavis"]),
        stage_checkpoint="hf://someone/TinyGPT-V/TinyGPT-V_for_Stage4.pth",
    )
    assert_same_weights(TinyGPTV.from_ingredients("tinygptv-tiny", ingredients), ref)


def convert_args(public, out, *extra):
    return [
        "convert",
        "--preset", "tinygptv-tiny",
        "--language", str(public["phi_fused"]),
        "--eva-vit", str(public["eva"]),
        "--blip2-lavis", str(public["blip2_lavis"]),
        "--minigpt4", str(public["minigpt4"]),
        "--stage-checkpoint", str(public["stage4"]),
        "--out", str(out),
        *extra,
    ]  # fmt: skip


def test_convert_writes_the_released_model(ref, public, tmp_path, capsys):
    digest = file_sha256(public["stage4"])
    assert main(convert_args(public, tmp_path / "out", "--sha256", f"stage_checkpoint={digest}")) == 0
    printed = capsys.readouterr().out
    assert f"from {public['stage4']}" in printed and f"from {public['eva']}" in printed
    assert "EVA-CLIP's last block" in printed and "Flan-T5 side" in printed
    assert "mg4.pth" in printed  # its projection was replaced by the stage checkpoint's
    assert_same_weights(TinyGPTV.from_pretrained(tmp_path / "out"), ref)


def test_convert_trainable_only_refers_to_the_ingredients(ref, public, tmp_path):
    assert main(convert_args(public, tmp_path / "out", "--trainable-only")) == 0
    out = tmp_path / "out"
    assert (out / "trainable.safetensors").exists() and not (out / "model.safetensors").exists()
    loaded = TinyGPTV.from_pretrained(out)
    assert_same_weights(loaded, ref)
    assert loaded.load_report.loaded["vision.model.embeddings.class_embedding"].endswith("eva_vit_g.pth: cls_token")


def test_convert_reports_a_bad_checkpoint_in_one_error(public, tmp_path, capsys):
    assert main(convert_args(public, tmp_path / "out", "--sha256", "stage_checkpoint=00ff")) == 2
    err = capsys.readouterr().err
    assert err.startswith("tinygptv convert: error:") and "does not match the expected 00ff" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv,preset",
    [
        (["--stage-checkpoint", "TinyGPT-V_for_Stage4.pth"], "tinygptv-phi2-448"),
        (["--stage-checkpoint", "TinyGPT-V_for_Stage2.pth"], "tinygptv-phi2"),
        (["--stage", "4"], "tinygptv-phi2-448"),
        (["--stage", "4", "--preset", "tinygptv-phi1.5"], "tinygptv-phi1.5"),
    ],
)
def test_convert_picks_the_448_px_preset_for_stage4(argv, preset):
    """Stage 4 trains at 448 px (paper section 4.1): the default preset follows the stage."""
    from tinygptv.cli import build_parser
    from tinygptv.commands.convert import _config

    args = build_parser().parse_args(["convert", "--language", "x", "--out", "y", *argv])
    assert _config(args).name == preset
