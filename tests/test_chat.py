"""Conversations: cached prefixes give the same answers as recomputing, images are encoded once,
context overflow drops old turns with a warning, boxes come back in pixels."""

import io

import pytest
import torch
from PIL import Image

from tinygptv.chat import Conversation, load_image, parse_answer
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.testing import word_tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyGPTV("tinygptv-tiny", tokenizer=word_tokenizer()).eval()


def _image(color=(200, 30, 30), size=(40, 30)):
    return Image.new("RGB", size, color)


def test_second_turn_reuses_the_cache_and_equals_a_fresh_computation(model):
    calls = []
    hook = model.lm.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(
            (kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]).shape[1]
        ),
        with_kwargs=True,
    )
    encodes = []
    original = model.encode_images
    model.encode_images = lambda px: encodes.append(1) or original(px)
    try:
        conv = Conversation(model)
        conv.add_image(_image())
        first = conv.ask("what color is the circle ?", max_new_tokens=5)
        cached_after_first = conv.cached_tokens
        calls.clear()
        second = conv.ask("what shape is it ?", max_new_tokens=5)
    finally:
        hook.remove()
        model.encode_images = original
    assert len(encodes) == 1  # the image was encoded once for both turns
    prompt_tokens = len(conv._prompt_ids("what shape is it ?", None, 5))
    assert calls[0] < prompt_tokens - model.num_image_tokens  # only the new suffix was run
    assert cached_after_first > model.num_image_tokens
    # a fresh conversation that recomputes everything gives the same second answer
    fresh = Conversation(model)
    fresh.add_image(_image())
    fresh.history = [("what color is the circle ?", first.text)]
    assert fresh.ask("what shape is it ?", max_new_tokens=5).text == second.text


def test_streaming_pieces_join_to_the_answer(model):
    conv = model.chat(max_new_tokens=8)
    conv.add_image(_image())
    pieces = list(conv.stream("describe the image"))
    assert "".join(pieces).strip() == conv.last_answer.text
    assert conv.history[-1][1] == conv.last_answer.text


def test_context_overflow_drops_oldest_turn_with_warning(model):
    conv = Conversation(model)
    conv.add_image(_image())
    question = "what is the color of the large circle on the left of the image ?"
    with pytest.warns(UserWarning, match="dropped the oldest turn"):
        for _ in range(8):  # the tiny model's context is 128 tokens
            conv.ask(question, max_new_tokens=4)
    assert len(conv.history) < 8


def test_adding_an_image_after_a_turn_starts_over(model):
    conv = Conversation(model)
    conv.add_image(_image())
    conv.ask("what color ?", max_new_tokens=2)
    conv.add_image(_image((0, 0, 255)))
    assert conv.history == [] and len(conv.images) == 1 and conv.cached_tokens == 0


def test_parse_answer_gives_pixel_boxes():
    ans = parse_answer("<p>a red circle</p> {<10><20><50><100>}", (200, 100), "grounding")
    assert ans.boxes == [{"phrase": "a red circle", "box_norm": [10, 20, 50, 100], "box": [20.0, 20.0, 100.0, 100.0]}]
    ans = parse_answer("{<0><0><25><50>}", (400, 400), "refer", query="the small star")
    assert ans.boxes[0]["phrase"] == "the small star" and ans.boxes[0]["box"] == [0.0, 0.0, 100.0, 200.0]
    assert parse_answer("no boxes here", (10, 10)).boxes == []


def test_bad_images_and_questions_are_clear_errors(model, tmp_path):
    with pytest.raises(ValueError, match="cannot read an image"):
        load_image(b"not an image")
    with pytest.raises(FileNotFoundError, match="image not found"):
        load_image(tmp_path / "missing.png")
    buf = io.BytesIO()
    _image().save(buf, format="PNG")
    assert load_image(buf.getvalue()).size == (40, 30)
    conv = Conversation(model)
    with pytest.raises(ValueError, match="unknown task 'segment'"):
        conv.ask("hi", task="segment")
    with pytest.raises(ValueError, match="empty"):
        conv.ask("   ")


def test_model_ask_one_shot(model):
    answer = model.ask(_image(), "what color is it ?", task="vqa", max_new_tokens=3)
    assert isinstance(answer.text, str) and answer.to_dict()["answer"] == answer.text


def test_batched_generate_agrees_with_the_conversation_engine(model):
    images = [_image(), _image((0, 200, 0), (30, 50))]
    questions = ["what color is it ?", "how many objects are there ?"]
    batched = model.generate(images, questions, task="vqa", max_new_tokens=6)
    for image, question, text in zip(images, questions, batched):
        assert model.ask(image, question, task="vqa", max_new_tokens=6).text == text
    beams = model.generate(images, questions, task="vqa", max_new_tokens=6, num_beams=3)
    assert len(beams) == 2 and all(isinstance(t, str) for t in beams)
    sampled = [model.generate(images, questions, max_new_tokens=6, temperature=1.0, seed=5) for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_batched_generation_stops_each_row_at_the_stop_string(model):
    images = [_image(), _image((0, 0, 255))]
    free = model.generate(images, ["describe the image", "what color ?"], max_new_tokens=12)
    assert all(isinstance(t, str) for t in free)
    # pick a word the model does produce for row 0, and make it a stop string
    words = free[0].split()
    assert words, "the tiny model should say something in 12 tokens"
    calls = []
    hook = model.lm.register_forward_hook(lambda *a: calls.append(1))
    try:
        stopped = model.generate(images, ["describe the image", "what color ?"], max_new_tokens=12, stop=(words[0],))
    finally:
        hook.remove()
    assert words[0] not in stopped[0]
    assert len(stopped[0]) <= len(free[0])
    if words[0] in free[1]:  # both rows stop early: generation ends before the token limit
        assert len(calls) < 12
