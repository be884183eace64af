"""The OpenAI-compatible HTTP API (FastAPI): ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``.

``create_app(model_or_loader, settings)`` builds the app; nothing is loaded until the server
starts (a loader is called in the app's lifespan, before the first request is accepted). How
messages map to our template: :mod:`tinygptv.serve.messages`; the extra request and response
fields: :mod:`tinygptv.serve.protocol`; batching: :mod:`tinygptv.serve.batcher`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import (
    APIError,
    ChatCompletionRequest,
    chunk_body,
    completion_body,
    completion_id,
    error_body,
    model_card,
    usage,
)
from .settings import ServeSettings

if TYPE_CHECKING:
    from ..model.tinygptv import TinyGPTV
    from .batcher import Batcher

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    """What the routes share once the model is loaded."""

    settings: ServeSettings
    model: TinyGPTV | None = None
    batcher: Batcher | None = None
    name: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)


def create_app(model_or_loader: TinyGPTV | Callable[[], TinyGPTV], settings: ServeSettings | None = None) -> FastAPI:
    """The API app serving a loaded model, or the model a zero-argument ``loader`` returns at startup."""
    settings = settings or ServeSettings()
    settings.validate()
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model = await run_in_threadpool(_resolve_model, model_or_loader)
        state.model, state.name = model, settings.model_name or model.config.name
        state.batcher = _start_batcher(model, settings)
        log.info("serving %s (max batch %d, queue %d)", state.name, settings.max_batch_size, settings.max_queue)
        try:
            yield
        finally:
            state.batcher.stop()

    app = FastAPI(title="TinyGPT-V", lifespan=lifespan)
    app.state.server = state
    _add_error_handlers(app)
    auth = Depends(_auth_checker(settings))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = state.batcher.stats
        return {
            "status": "ok",
            "model": state.name,
            "queue_depth": state.batcher.depth,
            "max_queue": settings.max_queue,
            "max_batch_size": settings.max_batch_size,
            "requests": stats.requests,
            "batches": stats.batches,
            "largest_batch": stats.largest_batch,
        }

    @app.get("/v1/models", dependencies=[auth])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(state.name, state.created)]}

    @app.get("/v1/models/{model_id}", dependencies=[auth])
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != state.name:
            raise _model_not_found(model_id, state.name)
        return model_card(state.name, state.created)

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat_completions(request: Request):
        body = await _read_body(request, settings.max_body_bytes)
        try:
            data = json.loads(body)
        except ValueError as err:
            raise APIError(400, f"the request body is not valid JSON: {err}") from None
        chat_request = ChatCompletionRequest.parse(data)
        if chat_request.model != state.name:
            raise _model_not_found(chat_request.model, state.name)
        chat = await _prepare(chat_request, state)
        if chat_request.stream:
            include_usage = bool(chat_request.stream_options and chat_request.stream_options.include_usage)
            return _stream_response(chat, state, include_usage)
        from .batcher import Job, ShuttingDown

        try:
            completion = await asyncio.wrap_future(_submit(state, Job(chat)))
        except ShuttingDown as err:
            raise APIError(503, str(err), code="shutting_down") from None
        cid = completion_id()
        return JSONResponse(
            completion_body(
                cid,
                state.name,
                completion.text,
                completion.finish_reason,
                completion.boxes,
                completion.prompt_tokens,
                completion.completion_tokens,
            ),
            headers={"x-tinygptv-batch-size": str(completion.batch_size)},
        )

    return app


# --- startup ------------------------------------------------------------------------------------
def _resolve_model(model_or_loader):
    from torch import nn

    model = model_or_loader if isinstance(model_or_loader, nn.Module) else model_or_loader()
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("the model has no tokenizer; the server needs one to read and write text")
    return model.eval()


def _start_batcher(model, settings: ServeSettings) -> Batcher:
    from ..data.templates import get_template
    from . import engine
    from .batcher import Batcher

    stops = get_template(settings.template).stop_strings
    return Batcher(
        run_batch=lambda jobs: engine.complete_batch(model, [job.chat for job in jobs], stops),
        run_stream=lambda job: engine.stream_chat(model, job.chat, stops, job.on_piece, job.cancelled.is_set),
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        batch_wait=settings.batch_wait_ms / 1000,
    ).start()


# --- requests -------------------------------------------------------------------------------------
def _auth_checker(settings: ServeSettings):
    async def check(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(
                401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    return check


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 past ``limit`` bytes. An oversized body is still read (up to twice the
    limit) so that the client, which is still sending it, gets the 413 rather than a broken pipe."""
    declared = request.headers.get("content-length", "")
    body = bytearray()
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            body += chunk
        elif size > 2 * limit:
            break
    if size > limit or (declared.isdigit() and int(declared) > limit):
        raise APIError(
            413, f"the request body is larger than this server's limit of {limit} bytes", code="request_too_large"
        )
    return bytes(body)


async def _prepare(chat_request: ChatCompletionRequest, state: ServerState):
    """Messages -> images and prompt, every limit checked; image decoding and tokenising off the event loop."""
    from .images import decode_data_url, fetch_remote_image, is_remote, open_image
    from .messages import prepare_chat, read_messages

    settings = state.settings
    turns = read_messages(chat_request.messages, chat_request.task, settings)
    encoded: list[bytes] = []
    for ref in turns.images:
        if is_remote(ref.url):
            if not settings.allow_remote_images:
                raise APIError(
                    400,
                    "remote image URLs are disabled on this server: send the image as a base64 data "
                    "URL (data:image/png;base64,...), or start it with --allow-remote-images",
                    param=ref.param,
                    code="remote_images_disabled",
                )
            encoded.append(await fetch_remote_image(ref.url, settings, ref.param))
        else:
            encoded.append(await run_in_threadpool(decode_data_url, ref.url, settings, ref.param))

    def decode_and_tokenise():
        images = [open_image(data, settings, ref.param) for data, ref in zip(encoded, turns.images)]
        with state.tokenizer_lock:
            return prepare_chat(chat_request, turns, images, state.model, settings)

    return await run_in_threadpool(decode_and_tokenise)


def _submit(state: ServerState, job):
    from .batcher import QueueFull, ShuttingDown

    try:
        return state.batcher.submit(job)
    except QueueFull as err:
        raise APIError(
            503, f"the server is busy: {err}; retry shortly", code="queue_full", headers={"Retry-After": "1"}
        ) from None
    except ShuttingDown as err:
        raise APIError(503, str(err), code="shutting_down") from None


def _stream_response(chat, state: ServerState, include_usage: bool) -> StreamingResponse:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    from .batcher import Job

    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def put(item) -> None:  # worker thread -> event loop
        try:
            loop.call_soon_threadsafe(events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    job = Job(chat, stream=True, on_piece=lambda piece: put(("piece", piece)))
    job.future.add_done_callback(lambda _: put(("done", None)))
    _submit(state, job)  # a full queue is answered 503 here, before the stream starts
    cid, created, name = completion_id(), int(time.time()), state.name

    async def sse() -> AsyncIterator[str]:
        try:
            yield _event(chunk_body(cid, name, created, {"role": "assistant", "content": ""}))
            while True:
                kind, piece = await events.get()
                if kind == "done":
                    break
                yield _event(chunk_body(cid, name, created, {"content": piece}))
            if job.future.cancelled() or job.future.exception() is not None:
                err = None if job.future.cancelled() else job.future.exception()
                yield _event(error_body(f"generation failed: {err or 'cancelled'}", "server_error"))
                return
            done = job.future.result()
            yield _event(chunk_body(cid, name, created, {"boxes": done.boxes}, done.finish_reason))
            if include_usage:
                yield _event(
                    chunk_body(cid, name, created, None, usage_counts=usage(done.prompt_tokens, done.completion_tokens))
                )
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects: stop decoding for nobody
            job.cancelled.set()
            job.future.cancel()

    return StreamingResponse(
        sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _model_not_found(asked: str, served: str) -> APIError:
    return APIError(
        404, f"the model {asked!r} does not exist; this server serves {served!r}", param="model", code="model_not_found"
    )


# --- errors in OpenAI's shape ------------------------------------------------------------------
def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(err.detail), kind), status_code=err.status_code, headers=getattr(err, "headers", None)
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(str(err.errors()[0].get("msg")), "invalid_request_error"), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(err).__name__}: {err}", "server_error"), status_code=500)
