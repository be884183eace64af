"""The built-in model shipped inside the package (tinygptv/assets/tinygptv-micro-shapes)."""

from __future__ import annotations

import hashlib
import json

import pytest

from tinygptv import TinyGPTV
from tinygptv.inference import builtin_model_dir
from tinygptv.quantize import Int4Linear, Int8Linear


@pytest.fixture(scope="module")
def builtin():
    return TinyGPTV.from_pretrained()


def test_shipped_files_match_their_manifest():
    folder = builtin_model_dir()
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert manifest["sha256"], "empty manifest"
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name


def test_from_pretrained_without_a_path_is_the_builtin_model(builtin):
    assert builtin.config.name == "tinygptv-micro"
    assert builtin.num_image_tokens == 32
    assert not any("lora_" in name for name, _ in builtin.named_parameters())  # shipped merged


@pytest.mark.parametrize("mode, layer", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_from_pretrained_quantizes_the_language_model(mode, layer, builtin):
    from importlib.resources import files

    quantized = TinyGPTV.from_pretrained(quantize=mode)
    assert any(isinstance(m, layer) for m in quantized.language_model.modules())
    image = str(files("tinygptv") / "assets" / "example.png")
    questions = ["How many objects are there?", "What color is the triangle?", "Is there a red star?"]
    reference = [builtin.ask(image, q, task="vqa").text for q in questions]
    answers = [quantized.ask(image, q, task="vqa").text for q in questions]
    assert all(isinstance(a, str) and a for a in answers)
    assert answers == reference  # short greedy answers survive weight-only quantization


def test_from_pretrained_rejects_an_unknown_quantization():
    with pytest.raises(ValueError, match="unknown quantization"):
        TinyGPTV.from_pretrained(quantize="int3")


def test_build_script_installs_only_a_run_of_the_default_recipe(tmp_path, capsys):
    import dataclasses
    import importlib.util
    from pathlib import Path

    from tinygptv.recipes.micro import MicroRecipe

    path = Path(__file__).resolve().parents[1] / "scripts" / "build_builtin_model.py"
    spec = importlib.util.spec_from_file_location("build_builtin_model", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    recipe = MicroRecipe()
    recipe.vision = dataclasses.replace(recipe.vision, set_matching=True)
    record = recipe.to_dict()
    del record["lm"]["set_matching"]  # a setting newer than the run's code: it ran as its default
    (tmp_path / "report.json").write_text(json.dumps({"recipe": record}))
    assert script.main(["--from-run", str(tmp_path), "--install"]) == 1
    assert "vision.set_matching=True (default False)" in capsys.readouterr().err
    assert script._differences(MicroRecipe().to_dict(), MicroRecipe().to_dict()) == []
    old = MicroRecipe().to_dict()
    del old["lm_seed"]  # a run from before lm_seed: it drew its LM with the seed, not the default's 3
    assert script._differences(old, MicroRecipe().to_dict()) == ["lm_seed=None (default 3)"]
