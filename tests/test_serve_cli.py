"""``tinygptv serve`` as a user runs it: a real process on a free loopback port, asked through the
openai client; and nothing heavy is imported by the serving modules."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from openai import OpenAI
from serve_helpers import random_model_dir

from tinygptv.cli import build_parser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "tinygptv", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            return httpx.get(url + "/health", timeout=2).json()
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail("the server did not come up")


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


def test_serve_command_answers_an_openai_client(tmp_path):
    model_dir = random_model_dir(tmp_path / "model")
    port = free_port()
    proc = start(
        ["--model", str(model_dir), "--port", str(port), "--api-key", "k", "--threads", "1", "--max-batch-size", "4"]
    )
    try:
        health = wait_healthy(proc, f"http://127.0.0.1:{port}")
        assert health["model"] == "tinygptv-tiny" and health["max_batch_size"] == 4
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        reply = client.chat.completions.create(
            model="tinygptv-tiny", max_tokens=5, messages=[{"role": "user", "content": "what color is it ?"}]
        )
        assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"
    finally:
        out = stop(proc)
    assert proc.returncode == 0, out
    assert "Uvicorn running on http://127.0.0.1" in out


def test_serve_without_a_model_uses_the_builtin_one(tmp_path):
    from tinygptv.inference import builtin_model_dir

    try:
        builtin_model_dir()
    except FileNotFoundError:  # not built in this checkout: the command says so in one line
        out = subprocess.run(
            [sys.executable, "-m", "tinygptv", "serve", "--port", str(free_port())],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 2 and "built-in model is missing" in out.stderr and "--model" in out.stderr
        return
    port = free_port()
    proc = start(["--port", str(port), "--threads", "1"])
    try:
        assert wait_healthy(proc, f"http://127.0.0.1:{port}")["status"] == "ok"
    finally:
        stop(proc)


def test_help_and_no_heavy_imports():
    help_text = build_parser().parse_args(["serve", "--model", "m"])
    assert help_text.host == "127.0.0.1" and help_text.port == 8000 and not help_text.allow_remote_images
    code = (
        "import sys; import tinygptv.serve.api, tinygptv.serve.demo, tinygptv.serve.messages, "
        "tinygptv.commands.serve, tinygptv.commands.demo; "
        "print(sorted(m for m in ('torch', 'gradio', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
