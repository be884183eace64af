"""`tinygptv ask` and `tinygptv chat` on a tiny model saved by the test."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.testing import word_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = TinyGPTV("tinygptv-tiny", tokenizer=word_tokenizer())
    model.save_pretrained(root / "model")
    Image.new("RGB", (60, 40), (250, 0, 0)).save(root / "red.png")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    return root, model


def _run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "tinygptv", *args], input=stdin, capture_output=True, text=True, timeout=300)


def test_ask_json_matches_the_python_api(saved):
    root, model = saved
    out = _run("ask", str(root / "red.png"), "what color is it ?", "--model", str(root / "model"), "--json",
               "--max-new-tokens", "5", "--task", "vqa", "--draw", str(root / "drawn.png"))
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(data) == {"answer", "boxes"}
    expected = model.eval().ask(Image.open(root / "red.png"), "what color is it ?", task="vqa", max_new_tokens=5)
    assert data["answer"] == expected.text
    assert Image.open(root / "drawn.png").size == (60, 40)


def test_ask_int8_runs_and_bad_image_is_a_clear_error(saved):
    root, _ = saved
    out = _run("ask", str(root / "red.png"), "what color ?", "--model", str(root / "model"), "--quantize", "int8",
               "--max-new-tokens", "3")
    assert out.returncode == 0, out.stderr
    out = _run("ask", str(root / "broken.png"), "what color ?", "--model", str(root / "model"))
    assert out.returncode == 2 and "cannot read an image" in out.stderr
    out = _run("ask", str(root / "nope.png"), "what color ?", "--model", str(root / "model"))
    assert out.returncode == 2 and "image not found" in out.stderr


def test_chat_session_with_commands(saved):
    root, _ = saved
    script = "\n".join(["what color is it ?", "/task grounding", "describe the image", "/image " + str(root / "broken.png"),
                        "/reset", "/quit"]) + "\n"
    out = _run("chat", str(root / "red.png"), "--model", str(root / "model"), "--max-new-tokens", "4", stdin=script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("tinygptv> ") == 2
    assert "(task: grounding)" in out.stdout and "cannot read an image" in out.stdout and "(conversation reset)" in out.stdout
