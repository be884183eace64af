"""`tinygptv ask` and `tinygptv chat` on a tiny model saved by the test."""

import json
import os
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


def _png_header(width, height):
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, with no pixel data: what a
    decompression bomb looks like before decoding."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bad_images(saved):
    root, _ = saved
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    (bad / "notes.jpg").write_text("these are words, not pixels\n")
    (bad / "truncated.png").write_bytes(_png_header(64, 64)[:40])
    (bad / "directory.png").mkdir()  # exists, but cannot be read as a file
    (bad / "bomb.png").write_bytes(_png_header(100_000, 100_000))  # over Pillow's own limit
    (bad / "huge.png").write_bytes(_png_header(10_000, 10_000))  # under Pillow's limit, over ours
    return bad


@pytest.mark.parametrize(
    "name,message",
    [
        ("empty.png", "the file is empty"),
        ("notes.jpg", "cannot read an image"),
        ("truncated.png", "cannot read an image"),
        ("directory.png", "cannot read an image"),
        ("bomb.png", "has too many pixels"),
        ("huge.png", "has too many pixels: 10000x10000"),
        ("missing.png", "image not found"),
    ],
)
def test_ask_bad_image_exits_2_with_one_clear_line(saved, bad_images, capsys, name, message):
    from tinygptv.cli import main

    root, _ = saved
    code = main(["ask", str(bad_images / name), "what color ?", "--model", str(root / "model")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("tinygptv ask: error: ") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_ask_unreadable_file_exits_2(saved, tmp_path, capsys):
    from tinygptv.cli import main

    root, _ = saved
    path = tmp_path / "locked.png"
    Image.new("RGB", (8, 8)).save(path)
    path.chmod(0)
    assert main(["ask", str(path), "what ?", "--model", str(root / "model")]) == 2
    assert "cannot read an image" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["ask", "chat"])
def test_unknown_task_exits_2(saved, command, capsys):
    from tinygptv.cli import main

    root, _ = saved
    args = [command, str(root / "red.png")] + (["what ?"] if command == "ask" else [])
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--task", "segment", "--model", str(root / "model")])
    assert exit_info.value.code == 2
    assert "invalid choice: 'segment'" in capsys.readouterr().err


def test_bad_images_through_the_real_command(saved, bad_images):
    """End to end in a subprocess: exit code 2 and no traceback from `ask`; `chat` reports each bad
    `/image` and `/task` and carries on; `chat` with a bad first image exits 2."""
    root, _ = saved
    out = _run("ask", str(bad_images / "bomb.png"), "what ?", "--model", str(root / "model"))
    assert out.returncode == 2 and "has too many pixels" in out.stderr and "Traceback" not in out.stderr
    names = ["empty.png", "notes.jpg", "directory.png", "bomb.png", "huge.png"]
    script = "".join(f"/image {bad_images / n}\n" for n in names) + "/task segment\nwhat color is it ?\n/quit\n"
    out = _run("chat", str(root / "red.png"), "--model", str(root / "model"), "--max-new-tokens", "2", stdin=script)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert out.stdout.count("error: ") == len(names) + 1 and "unknown task 'segment'" in out.stdout
    assert out.stdout.count("tinygptv> ") == 1  # the red image is still the one talked about
    out = _run("chat", str(bad_images / "empty.png"), "--model", str(root / "model"), stdin="/quit\n")
    assert out.returncode == 2 and "the file is empty" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("kernel", ["torch", "onnxruntime"])
def test_bench_json_has_the_documented_fields(kernel, monkeypatch):
    """`tinygptv bench --json` on the micro preset: one JSON object with the issue's fields, positive
    figures, the int4 kernel it ran, and its LM's layers really quantized (a small preset is built
    as one piece) (a micro LM reads well under 1 MB a token: the limit is still computed, not
    divided by a rounded zero)."""
    monkeypatch.setenv("TINYGPTV_INT4_KERNEL", kernel)
    out = _run("bench", "--preset", "tinygptv-micro", "--quantize", "int4", "--threads", "1",
               "--new-tokens", "2", "--text-tokens", "4", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    required = {"preset", "quantize", "encode_s", "ttft_s", "decode_tok_s", "peak_rss_gb", "baseline_decode_tok_s",
                "bandwidth_gbs", "limit_decode_tok_s"}
    assert required <= set(data)
    assert data["preset"] == "tinygptv-micro" and data["quantize"] == "int4" and data["int4_kernel"] == kernel
    assert data["quantized_linears"] == 4 * 6 + 1  # every decoder projection and the LM head
    assert data["decode_tok_s"] > 0 and data["limit_decode_tok_s"] > 0 and data["peak_rss_gb"] > 0


def test_stream_timing_takes_prefill_and_decode_from_one_stream(tiny_model, monkeypatch):
    """The decode rate is timed within the stream it reports on: a prefill that happens to run slowly in
    another call (a busy machine) cannot make it negative, as subtracting a prefill timed on its own did."""
    import time

    from tinygptv.bench import _time_stream

    lm = tiny_model.lm
    forward, calls = lm.forward, {"prefills": 0}

    def uneven(*args, **kwargs):
        if kwargs.get("inputs_embeds") is not None:  # a prefill
            calls["prefills"] += 1
            if calls["prefills"] == 2:  # the second prefill (the first after the warm-up) is slow
                time.sleep(0.3)
        return forward(*args, **kwargs)

    monkeypatch.setattr(lm, "forward", uneven)
    embeds = torch.randn(1, 6, tiny_model.config.language.hidden_size)
    with torch.inference_mode():
        row = _time_stream(lm, embeds, 4, 0.5)
    assert row["decode_tok_s"] > 0
    assert row["prefill_s"] >= 0.3 and row["ttft_s"] == round(row["prefill_s"] + 0.5, 3)
