"""The demo's answering step without a browser: streaming, the task buttons' instructions, the boxes
handed to the drawing, conversations that go on; and the page builds with its controls."""

from __future__ import annotations

import pytest
from serve_helpers import circle_image, grounding_model, torch_threads

from tinygptv.serve.demo import TASK_BUTTONS, annotated_boxes, create_demo, respond


@pytest.fixture(scope="module")
def model():
    with torch_threads(1):
        yield grounding_model()


def test_an_answer_streams_into_the_chat(model):
    steps = list(respond(model, "stage4", None, circle_image(), "describe the image", None, [], max_new_tokens=60))
    texts = [history[-1]["content"] for _, history, _ in steps]
    assert len(steps) > 3 and all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # it grew piece by piece
    assert texts[-1] == model.ask(circle_image(), "describe the image", max_new_tokens=60).text
    conversation, history, boxes = steps[-1]
    assert history[0] == {"role": "user", "content": "describe the image"} and boxes is None


def test_grounding_button_draws_the_boxes_and_the_conversation_goes_on(model):
    *_, (conversation, history, boxes) = respond(
        model, "stage4", None, circle_image(), "describe the image", "grounding", [], max_new_tokens=60
    )
    assert history[-2]["content"] == "[grounding] describe the image"
    assert (
        history[-1]["content"] == "&lt;p&gt;red circle&lt;/p&gt; {&lt;10&gt;&lt;20&gt;&lt;60&gt;&lt;70&gt;}"
    )  # shown as text
    image, marks = boxes
    assert image.size == (224, 224) and marks == [((22, 45, 134, 157), "red circle")]
    encoded = conversation._image_embeds
    *_, (again, history, _) = respond(
        model, "stage4", conversation, None, "what color is the circle ?", None, history, max_new_tokens=20
    )
    assert again is conversation and len(history) == 4 and len(conversation.history) == 2
    assert conversation._image_embeds is encoded  # the image was not encoded again


def test_task_buttons_without_text(model):
    *_, (conversation, history, _) = respond(model, "stage4", None, circle_image(), "", "caption", [], max_new_tokens=5)
    assert history[0]["content"] == "[caption] Briefly describe this image."
    for task in ("vqa", "refer", "identify", None):
        with pytest.raises(ValueError, match="Type"):
            next(respond(model, "stage4", None, circle_image(), "  ", task, []))


def test_boxes_without_an_image_draw_nothing(model):
    conversation = model.chat()
    assert annotated_boxes(conversation, [{"phrase": "x", "box": [1, 2, 3, 4]}]) is None
    conversation.add_image(circle_image())
    assert annotated_boxes(conversation, [{"phrase": "", "box": [1.4, 2, 1.2, 4]}])[1] == [((1, 2, 2, 4), "box 1")]


def test_the_page_has_its_controls(model):
    demo = create_demo(model)
    ids = {block.elem_id for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert {"image-input", "boxes", "chatbot", "question", "ask-button", "clear-button"} <= ids
    assert {f"task-{task}" for task in TASK_BUTTONS} <= ids
    assert create_demo(lambda: model) is not None  # a loader is called when the page is built


def test_demo_command_serves_the_page(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx
    from serve_helpers import random_model_dir

    model_dir = random_model_dir(tmp_path / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinygptv", "demo", "--model", str(model_dir), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"},
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the demo did not come up"
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert page.status_code == 200
        config = httpx.get(f"http://127.0.0.1:{port}/config", timeout=10).json()
        assert config["title"] == "TinyGPT-V"
        assert {"ask-button", "task-grounding"} <= {c["props"].get("elem_id") for c in config["components"]}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
