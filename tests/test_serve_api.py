"""The HTTP API through the official ``openai`` client, on a real server on a free loopback port:
answers equal the model's own, streaming equals non-streaming, conversations map to the template,
every bad input gets its status and OpenAI error body, and the server keeps serving."""

from __future__ import annotations

import concurrent.futures
import http.server
import threading

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image
from serve_helpers import circle_image, data_url, grounding_model, png_bytes, random_model_dir, torch_threads

from tinygptv.data.encoding import encode_chunks
from tinygptv.data.templates import get_template
from tinygptv.serve.api import create_app
from tinygptv.serve.background import BackgroundServer
from tinygptv.serve.settings import ServeSettings

KEY = "test-key"
LIMITS = dict(
    max_body_bytes=1_000_000, max_image_bytes=300_000, max_image_pixels=512 * 512, max_images=2, max_tokens_limit=100
)


@pytest.fixture(scope="module")
def model():
    with torch_threads(1):
        yield grounding_model()


@pytest.fixture(scope="module")
def server(model):
    settings = ServeSettings(api_key=KEY, batch_wait_ms=50, **LIMITS)
    with BackgroundServer(create_app(model, settings)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def ask(text, image=True, **kwargs):
    content = [{"type": "text", "text": text}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": data_url(circle_image())}})
    return [{"role": "user", "content": content}]


def prompt_tokens(model, question, task=None, history=(), images=1):
    prompt = get_template("stage4").prompt(question, images, task, list(history))
    return len(encode_chunks(model.tokenizer, [(prompt, False)], model.num_image_tokens).input_ids)


def create(client, messages, **kwargs):
    return client.chat.completions.create(model="tinygptv-tiny", messages=messages, **kwargs)


# --- answers -------------------------------------------------------------------------------------
def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tinygptv-tiny"]
    assert client.models.retrieve("tinygptv-tiny").id == "tinygptv-tiny"
    health = httpx.get(server.url + "/health").json()  # open without the key
    assert health["status"] == "ok" and health["model"] == "tinygptv-tiny"


def test_completion_with_an_image_answers_like_the_model(client, model):
    reply = create(client, ask("what color is the circle ?"), max_tokens=20)
    assert reply.model == "tinygptv-tiny" and reply.object == "chat.completion"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == "red"
    assert choice.message.content == model.ask(circle_image(), "what color is the circle ?", max_new_tokens=20).text
    assert choice.finish_reason == "stop" and choice.message.boxes == []
    # usage: the prompt as the template renders it (4 image slots included); "red###" is 6 characters
    assert reply.usage.prompt_tokens == prompt_tokens(model, "what color is the circle ?")
    assert reply.usage.completion_tokens == 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 6


def test_grounding_answer_carries_its_boxes_in_pixels(client):
    expected = [{"phrase": "red circle", "box_norm": [10, 20, 60, 70], "box": [22.4, 44.8, 134.4, 156.8]}]
    by_tag = create(client, ask("[grounding] describe the image"), max_tokens=60)
    by_field = create(client, ask("describe the image"), max_tokens=60, extra_body={"task": "grounding"})
    for reply in (by_tag, by_field):
        assert reply.choices[0].message.content == "<p>red circle</p> {<10><20><60><70>}"
        assert reply.choices[0].message.boxes == expected
    caption = create(client, ask("[caption] describe the image"), max_tokens=60)
    assert caption.choices[0].message.content == "a red circle on a white background"


def test_streaming_gives_the_same_answer_piece_by_piece(client):
    messages = ask("[grounding] describe the image")
    whole = create(client, messages, max_tokens=60)
    chunks = list(create(client, messages, max_tokens=60, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3  # it really streamed
    assert "".join(pieces).strip() == whole.choices[0].message.content
    last = [c for c in chunks if c.choices][-1].choices[0]
    assert last.finish_reason == "stop" and last.delta.boxes == whole.choices[0].message.boxes
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert len({c.id for c in chunks}) == 1


def test_multi_turn_conversation_maps_to_the_template_history(client, model):
    first = "describe the image"
    answer = "a red circle on a white background"
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},  # ignored: TinyGPT-V has no system prompt
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(circle_image())}}]},
        {"role": "user", "content": first},  # joined with the message before into the first turn
        {"role": "assistant", "content": answer},
        {"role": "user", "content": [{"type": "text", "text": "what color is the circle ?"}]},
    ]
    reply = create(client, messages, max_tokens=20)
    conversation = model.chat()
    conversation.add_image(circle_image())
    conversation.history = [(first, answer)]
    expected = conversation.ask("what color is the circle ?", max_new_tokens=20)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == prompt_tokens(model, "what color is the circle ?", history=[(first, answer)])
    without_system = create(client, messages[1:], max_tokens=20)
    assert without_system.usage.prompt_tokens == reply.usage.prompt_tokens


def test_sampling_settings_are_applied(client):
    messages = ask("describe the image")
    short = create(client, messages, max_tokens=3)
    assert short.choices[0].message.content == "a r" and short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 3
    stopped = create(client, messages, max_tokens=60, stop=["circle"])
    assert stopped.choices[0].message.content == "a red" and stopped.choices[0].finish_reason == "stop"
    sampled = [
        create(client, messages, max_tokens=30, temperature=1.5, top_p=0.9, seed=7).choices[0].message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]  # a seed makes a sample reproducible


def test_concurrent_requests_are_batched_without_changing_answers(client, model):
    questions = [
        ("what color is the circle ?", None),
        ("[grounding] describe the image", "grounding"),
        ("[caption] describe the image", "caption"),
        ("describe the image", None),
    ] * 2
    alone = {q: create(client, ask(q), max_tokens=60).choices[0].message.content for q, _ in questions[:4]}
    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
        raws = list(
            pool.map(
                lambda qt: client.chat.completions.with_raw_response.create(
                    model="tinygptv-tiny", messages=ask(qt[0]), max_tokens=60
                ),
                questions,
            )
        )
    sizes = [int(raw.headers["x-tinygptv-batch-size"]) for raw in raws]
    assert max(sizes) > 1, sizes  # they were decoded together
    for (q, _), raw in zip(questions, raws):
        assert raw.parse().choices[0].message.content == alone[q]


def test_32_clients_5_requests_each_all_answered(client, server):
    before = httpx.get(server.url + "/health").json()

    def client_session(k):
        question, expected = [
            ("what color is the circle ?", "red"),
            ("[caption] describe the image", "a red circle on a white background"),
        ][k % 2]
        return [create(client, ask(question), max_tokens=40).choices[0].message.content == expected for _ in range(5)]

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        outcomes = [ok for session in pool.map(client_session, range(32)) for ok in session]
    assert len(outcomes) == 160 and all(outcomes)
    after = httpx.get(server.url + "/health").json()
    assert after["requests"] - before["requests"] == 160
    assert after["batches"] - before["batches"] < 160  # batched, not one by one


# --- bad input: status, OpenAI error body, and the server goes on -------------------------------------
def _bomb_png() -> bytes:
    return png_bytes(Image.new("1", (4000, 4000)))  # 16 MP of zeros: a few KB compressed


def _noise_png() -> bytes:
    import numpy as np

    return png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)))


def _with_image(url):
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "what color is the circle ?"},
            ],
        }
    ]


IMG = {"type": "image_url", "image_url": {"url": data_url(circle_image())}}
BAD_REQUESTS = {  # name: (create() arguments, status, error param, error code)
    "corrupt base64": (
        dict(messages=_with_image("data:image/png;base64,iVBOR@@@not-base64")),
        400,
        "messages[0].content[0].image_url.url",
        "invalid_base64",
    ),
    "not an image": (
        dict(messages=_with_image(data_url(b"just some text, not a picture"))),
        400,
        "messages[0].content[0].image_url.url",
        "invalid_image",
    ),
    "not an image type": (
        dict(messages=_with_image("data:text/plain;base64,aGVsbG8=")),
        400,
        "messages[0].content[0].image_url.url",
        "invalid_image_format",
    ),
    "remote url disabled": (
        dict(messages=_with_image("https://images.invalid/cat.png")),
        400,
        "messages[0].content[0].image_url.url",
        "remote_images_disabled",
    ),
    "decompression bomb": (
        dict(messages=_with_image(data_url(_bomb_png()))),
        400,
        "messages[0].content[0].image_url.url",
        "image_too_large",
    ),
    "image bytes": (
        dict(messages=_with_image(data_url(_noise_png()))),
        400,
        "messages[0].content[0].image_url.url",
        "image_too_large",
    ),
    "too many images": (
        dict(messages=[{"role": "user", "content": [IMG, IMG, IMG, {"type": "text", "text": "hi"}]}]),
        400,
        "messages",
        "too_many_images",
    ),
    "prompt tokens": (dict(messages=ask("what color is it ? " * 30)), 400, "messages", "context_length_exceeded"),
    "max_tokens over the limit": (dict(messages=ask("hi"), max_tokens=101), 400, "max_tokens", "max_tokens_too_large"),
    "max_tokens past the context": (
        dict(messages=ask("what color ? " * 35), max_tokens=100),
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    "tool role": (
        dict(messages=[*ask("hi"), {"role": "tool", "content": "42", "tool_call_id": "x"}]),
        400,
        "messages[1].role",
        "unsupported_role",
    ),
    "audio content": (
        dict(
            messages=[
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}
            ]
        ),
        400,
        "messages[0].content[0].type",
        "unsupported_content_type",
    ),
    "image from the assistant": (
        dict(messages=[*ask("hi"), {"role": "assistant", "content": [IMG]}, {"role": "user", "content": "and ?"}]),
        400,
        "messages[1].content[0].type",
        "unsupported_content_type",
    ),
    "image after an answer": (
        dict(messages=[*ask("hi"), {"role": "assistant", "content": "hello"}, *ask("and this ?")]),
        400,
        "messages[2].content",
        "image_position",
    ),
    "ends with the assistant": (
        dict(messages=[*ask("hi"), {"role": "assistant", "content": "hello"}]),
        400,
        "messages",
        None,
    ),
    "no messages": (dict(messages=[]), 400, "messages", None),
    "empty question": (dict(messages=ask("   ")), 400, "messages", "empty_question"),
    "placeholder in text": (dict(messages=ask("look at <ImageHere> please")), 400, "messages[0].content[1].text", None),
    "n > 1": (dict(messages=ask("hi"), n=2), 400, "n", None),
    "temperature": (dict(messages=ask("hi"), temperature=5), 400, "temperature", None),
    "unknown task": (dict(messages=ask("hi"), extra_body={"task": "dance"}), 400, "task", None),
    "unknown model": (dict(messages=ask("hi"), model="gpt-4o"), 404, "model", "model_not_found"),
    "body size": (dict(messages=ask("a" * 1_200_000)), 413, None, "request_too_large"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_its_error_and_the_server_keeps_serving(client, case):
    kwargs, status, param, code = BAD_REQUESTS[case]
    kwargs = {"model": "tinygptv-tiny", **kwargs}
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**kwargs)
    err = caught.value
    assert err.status_code == status, err.message
    assert err.type in ("invalid_request_error", "not_found_error") and err.message
    assert err.param == param
    if code is not None:
        assert err.code == code
    assert create(client, ask("what color is the circle ?"), max_tokens=10).choices[0].message.content == "red"


def test_wrong_or_missing_api_key_is_401(server):
    wrong = OpenAI(base_url=server.url + "/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.code == "invalid_api_key"
    response = httpx.post(server.url + "/v1/chat/completions", json={"model": "tinygptv-tiny", "messages": ask("hi")})
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"


def test_raw_http_errors_have_the_openai_shape(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    too_big = httpx.post(server.url + "/v1/chat/completions", content=b"x" * 1_500_000, headers=auth, timeout=30)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    not_json = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers=auth)
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["error"]["message"]
    no_route = httpx.get(server.url + "/v1/nothing-here", headers=auth)
    assert no_route.status_code == 404 and set(no_route.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(server.url + "/health").status_code == 200


# --- overload, remote images ------------------------------------------------------------------------
def test_a_full_queue_answers_503_and_the_rest_succeed(tmp_path):
    from tinygptv.inference import load_model

    slow = load_model(random_model_dir(tmp_path / "model"))  # the word-tokenizer model never stops early
    settings = ServeSettings(max_queue=1, max_batch_size=1)
    with torch_threads(1), BackgroundServer(create_app(slow, settings)) as running:

        def post(_):
            return httpx.post(
                running.url + "/v1/chat/completions",
                timeout=120,
                json={"model": "tinygptv-tiny", "max_tokens": 100, "messages": ask("what color is it ?", image=False)},
            )

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(post, range(8)))
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) == {200, 503} and statuses.count(200) >= 2, statuses
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "queue_full"
        assert post(0).status_code == 200  # and it goes on serving


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/circle.png":
            self.send_error(404)
            return
        body = png_bytes(circle_image())
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_remote_images_are_fetched_only_when_allowed(model):
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{images.server_address[1]}"
    try:
        with BackgroundServer(create_app(model, ServeSettings(allow_remote_images=True))) as running:
            remote = OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
            reply = create(remote, _with_image(base + "/circle.png"), max_tokens=10)
            assert reply.choices[0].message.content == "red"
            with pytest.raises(openai.BadRequestError) as caught:
                create(remote, _with_image(base + "/missing.png"), max_tokens=10)
            assert caught.value.code == "image_fetch_failed" and "404" in caught.value.message
    finally:
        images.shutdown()


def test_a_stream_whose_client_leaves_stops_decoding():
    import time

    import torch

    from tinygptv.model.tinygptv import TinyGPTV
    from tinygptv.testing import word_tokenizer

    torch.manual_seed(0)
    long_winded = TinyGPTV("tinygptv-micro", tokenizer=word_tokenizer()).eval()  # random: never stops early
    with torch_threads(1), BackgroundServer(create_app(long_winded)) as running:
        micro = OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "what color is it ?"}]
        start = time.perf_counter()
        whole = micro.chat.completions.create(model="tinygptv-micro", messages=messages, max_tokens=450)
        full = time.perf_counter() - start
        assert whole.usage.completion_tokens == 450
        stream = micro.chat.completions.create(model="tinygptv-micro", messages=messages, max_tokens=450, stream=True)
        assert next(iter(stream)).choices[0].delta.role == "assistant"
        stream.close()  # the client goes away after the first chunk
        start = time.perf_counter()
        micro.chat.completions.create(model="tinygptv-micro", messages=messages, max_tokens=1)
        assert time.perf_counter() - start < full / 2  # the worker was free: the stream stopped
