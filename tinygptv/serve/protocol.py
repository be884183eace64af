"""The OpenAI Chat Completions wire format: the request we accept, the errors, the responses.

Shapes follow OpenAI's API reference for ``POST /v1/chat/completions`` (``chat.completion`` and
``chat.completion.chunk`` objects, ``{"error": {"message", "type", "param", "code"}}`` errors).
Our additions, which OpenAI clients pass through untouched (``extra_body=`` to send them, the
response objects keep unknown fields):

* request ``task``: a MiniGPT-v2 task (``vqa``, ``caption``, ``refer``, ``grounding``,
  ``identify``, ``detection``) whose identifier the template writes; ``top_k``;
* response ``choices[i].message.boxes`` (and the last stream chunk's ``delta.boxes``): the boxes
  of the answer, ``{"phrase", "box" (pixels of the first image, x1 y1 x2 y2), "box_norm" (0-100)}``;
* response header ``x-tinygptv-batch-size``: how many requests were decoded together with this one.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered with ``status`` and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 503: "server_overloaded"}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields of a chat completion request that we read; messages are checked by
    :func:`tinygptv.serve.messages.read_messages` for errors that name the exact part."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Any] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    seed: int | None = None
    task: str | None = None

    @classmethod
    def parse(cls, data: Any) -> ChatCompletionRequest:
        """Validate a decoded JSON body; the first problem becomes a 400 naming its field."""
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            request = cls.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise APIError(400, f"invalid {param or 'request'}: {first['msg']}", param=param) from None
        request.check_supported()
        return request

    def check_supported(self) -> None:
        if self.n != 1:
            raise APIError(400, f"n must be 1 (one answer per request), got {self.n}", param="n")
        for name in ("tools", "functions"):
            if (self.model_extra or {}).get(name):
                raise APIError(400, f"{name} are not supported by this model", param=name)
        if (self.model_extra or {}).get("logprobs"):
            raise APIError(400, "logprobs are not supported", param="logprobs")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes at most 4 non-empty strings", param="stop")

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# --- responses -----------------------------------------------------------------------------------
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    cid: str, model: str, text: str, finish_reason: str, boxes: list, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "boxes": boxes},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(
    cid: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage_counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``delta=None`` makes the usage-only chunk (no choices)."""
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    body["choices"] = (
        [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    )
    if usage_counts is not None:
        body["usage"] = usage_counts
    return body


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "tinygptv"}
