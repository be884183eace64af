"""OpenAI messages -> template pieces, and image decoding under limits (no server, no model)."""

from __future__ import annotations

import time

import pytest
from PIL import Image
from serve_helpers import circle_image, data_url, png_bytes

from tinygptv.serve.images import decode_data_url, open_image
from tinygptv.serve.messages import read_messages
from tinygptv.serve.protocol import APIError, ChatCompletionRequest
from tinygptv.serve.settings import ServeSettings

SETTINGS = ServeSettings(max_image_pixels=1000 * 1000, max_image_bytes=100_000)


def image_part(url="data:image/png;base64,AAAA"):
    return {"type": "image_url", "image_url": {"url": url}}


def test_turns_history_images_and_ignored_system():
    turns = read_messages(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [image_part(), {"type": "text", "text": "describe"}]},
            {"role": "user", "content": "the image"},
            {"role": "assistant", "content": [{"type": "text", "text": "a red"}, {"type": "text", "text": "circle"}]},
            {"role": "developer", "content": "ignored too"},
            {"role": "user", "content": "what color ?"},
        ],
        None,
        SETTINGS,
    )
    assert turns.history == [("describe the image", "a red circle")]
    assert turns.question == "what color ?" and turns.task is None
    assert [ref.param for ref in turns.images] == ["messages[1].content[0].image_url.url"]


@pytest.mark.parametrize(
    "field, first, last, task, question",
    [
        (None, "describe", "[grounding] where is it ?", "grounding", "where is it ?"),
        (None, "[refer] the circle", "and now ?", "refer", "and now ?"),
        ("vqa", "[caption] describe", "[grounding] where ?", "vqa", "where ?"),
        (None, "hi", "[note] keep me", None, "[note] keep me"),  # not a task: stays text
    ],
)
def test_task_from_the_field_else_the_last_tag_else_the_first(field, first, last, task, question):
    messages = [
        {"role": "user", "content": first},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": last},
    ]
    turns = read_messages(messages, field, SETTINGS)
    assert turns.task == task and turns.question == question
    assert not turns.history[0][0].startswith("[refer]")  # tags are removed from the text


def test_image_limits_are_checked_before_decoding():
    huge = png_bytes(Image.new("1", (20000, 20000)))  # 400 MP (a 50 MB bitmap) in a small file
    start = time.perf_counter()
    with pytest.raises(APIError) as caught:
        open_image(huge, ServeSettings(max_image_bytes=10**7, max_image_pixels=10**6), "p")
    assert caught.value.code == "image_too_large" and "400000000" in caught.value.message
    assert time.perf_counter() - start < 1.0  # refused from the header, never decoded
    with pytest.raises(APIError, match="3000x2000 = 6000000 pixels"):
        open_image(png_bytes(Image.new("1", (3000, 2000))), SETTINGS, "p")
    with pytest.raises(APIError, match="larger than the limit"):
        decode_data_url(data_url(b"x" * 200_000), SETTINGS, "p")


def test_a_good_image_decodes_to_rgb():
    img = open_image(png_bytes(circle_image().convert("RGBA")), SETTINGS, "p")
    assert img.mode == "RGB" and img.size == (224, 224)
    raw = decode_data_url(data_url(circle_image()).replace("base64,", "base64,\n"), SETTINGS, "p")
    assert raw == png_bytes(circle_image())  # whitespace in base64 is tolerated


def test_truncated_image_is_a_400():
    data = png_bytes(circle_image())
    with pytest.raises(APIError) as caught:
        open_image(data[: len(data) // 2], SETTINGS, "messages[0].content[0].image_url.url")
    assert caught.value.status == 400 and caught.value.code == "invalid_image"
    assert caught.value.param == "messages[0].content[0].image_url.url"


def test_request_fields_are_validated_with_their_names():
    with pytest.raises(APIError) as caught:
        ChatCompletionRequest.parse({"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": 0})
    assert caught.value.param == "top_p"
    with pytest.raises(APIError, match="stop"):
        ChatCompletionRequest.parse({"model": "m", "messages": [{}], "stop": ["a", "b", "c", "d", "e"]})
    request = ChatCompletionRequest.parse({"model": "m", "messages": [{}], "max_completion_tokens": 9, "stop": "x"})
    assert request.requested_max_tokens == 9 and request.stops == ("x",)
