"""OpenAI chat messages -> what our template renders: images, earlier turns, the question, the task.

The mapping (the only place it is decided):

* ``system`` / ``developer`` messages are accepted (text only) and **ignored**: TinyGPT-V was
  trained without a system prompt (the authors' stage-4 template and demo use an empty one), and
  text before ``[INST]`` would put the model outside what it has seen.
* The remaining messages must start with ``user`` and end with ``user``; consecutive messages of
  one role are joined (with a space) into one turn. Each earlier (user, assistant) pair becomes a
  history turn, the last user turn is the question.
* Images (``image_url`` parts) may come in the user messages before the first assistant message:
  they become the conversation's images, placed by the template at the start of the first turn, as
  in training. An image after an assistant message is refused (400), since the template has no
  place for it: start a new conversation for a new image.
* The task: the request's ``task`` field, else a leading ``[vqa]``/``[caption]``/``[refer]``/
  ``[grounding]``/``[identify]``/``[detection]`` tag of the last user message, else one of the first
  user message. Leading tags are removed from the text; the template writes the identifier itself
  (stage 4: right after the images of the first turn).
* Text may not contain ``<ImageHere>``, the marker the model's image slots are spliced at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .protocol import APIError

if TYPE_CHECKING:
    from PIL.Image import Image

    from ..generate import SamplingParams
    from .protocol import ChatCompletionRequest
    from .settings import ServeSettings

_TASK_TAG = re.compile(r"^\s*\[(?P<task>[a-z]+)\]\s*")
_IGNORED_ROLES = ("system", "developer")


@dataclass
class ImageRef:
    """An image as the request names it, before it is decoded."""

    url: str
    param: str
    """Where it is in the request, e.g. ``messages[0].content[1].image_url.url``."""


@dataclass
class ChatTurns:
    """The request's messages, mapped to our template's pieces."""

    question: str
    history: list[tuple[str, str]] = field(default_factory=list)
    images: list[ImageRef] = field(default_factory=list)
    task: str | None = None


def read_messages(messages: list[Any], task: str | None, settings: ServeSettings) -> ChatTurns:
    """Check ``messages`` and map them (see the module docstring). Raises a 400 naming the bad part."""
    from ..chat import TASKS

    if task is not None and task not in TASKS:
        raise APIError(400, f"unknown task {task!r}; tasks are {', '.join(TASKS)}", param="task")
    turns: list[tuple[str, list[str]]] = []  # (role, texts), consecutive roles merged
    images: list[ImageRef] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object with a role and content", param=where)
        role = message.get("role")
        if role not in ("user", "assistant", *_IGNORED_ROLES):
            raise APIError(
                400,
                f"unsupported role {role!r} in {where}; this server takes system, developer, "
                "user and assistant messages",
                param=f"{where}.role",
                code="unsupported_role",
            )
        texts, refs = _read_content(message.get("content"), role, where)
        if refs and any(r == "assistant" for r, _ in turns):
            raise APIError(
                400,
                f"{where} has an image after an assistant message: TinyGPT-V takes images in the "
                "first user turn only (as trained); start a new conversation for a new image",
                param=f"{where}.content",
                code="image_position",
            )
        images.extend(refs)
        if role in _IGNORED_ROLES:
            continue
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(texts)
        else:
            turns.append((role, list(texts)))
    if len(images) > settings.max_images:
        raise APIError(
            400,
            f"the request has {len(images)} images; the limit is {settings.max_images}",
            param="messages",
            code="too_many_images",
        )
    if not turns or turns[0][0] != "user":
        raise APIError(
            400, "the conversation must start with a user message (after any system message)", param="messages"
        )
    if turns[-1][0] != "user":
        raise APIError(400, "the last message must be a user message: the question to answer", param="messages")
    users = [" ".join(t for t in texts if t) for role, texts in turns if role == "user"]
    answers = [" ".join(t for t in texts if t) for role, texts in turns if role == "assistant"]
    tags = []
    for k, text in enumerate(users):
        users[k], tag = _split_task_tag(text)
        tags.append(tag)
    if not users[-1].strip():
        raise APIError(
            400, "the last user message has no text: ask a question", param="messages", code="empty_question"
        )
    task = task or tags[-1] or tags[0]
    return ChatTurns(question=users[-1], history=list(zip(users[:-1], answers)), images=images, task=task)


def _read_content(content: Any, role: str, where: str) -> tuple[list[str], list[ImageRef]]:
    if isinstance(content, str):
        return [_check_text(content, f"{where}.content")], []
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content parts", param=f"{where}.content")
    texts, refs = [], []
    for k, part in enumerate(content):
        here = f"{where}.content[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise APIError(400, f"{here}.text must be a string", param=f"{here}.text")
            texts.append(_check_text(part["text"], f"{here}.text"))
        elif kind == "image_url":
            if role != "user":
                raise APIError(
                    400,
                    f"{here}: images are accepted in user messages only",
                    param=f"{here}.type",
                    code="unsupported_content_type",
                )
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str) or not url:
                raise APIError(400, f"{here}.image_url.url must be a URL string", param=f"{here}.image_url.url")
            refs.append(ImageRef(url, f"{here}.image_url.url"))
        else:
            raise APIError(
                400,
                f"unsupported content type {kind!r} in {here}; this server takes 'text' and 'image_url' parts",
                param=f"{here}.type",
                code="unsupported_content_type",
            )
    return texts, refs


def _check_text(text: str, param: str) -> str:
    from ..data.encoding import IMAGE_PLACEHOLDER

    if IMAGE_PLACEHOLDER.lower() in text.lower():
        raise APIError(400, f"{IMAGE_PLACEHOLDER} is reserved for images; send images as image_url parts", param=param)
    return text.strip()


def _split_task_tag(text: str) -> tuple[str, str | None]:
    from ..chat import TASKS

    m = _TASK_TAG.match(text)
    if m and m.group("task") in TASKS:
        return text[m.end() :], m.group("task")
    return text, None


# --- the prompt and its limits ------------------------------------------------------------------
@dataclass
class PreparedChat:
    """A request ready for the model: decoded images, the tokenised prompt, the sampling."""

    images: list[Image]
    turns: ChatTurns
    prompt_ids: list[int]
    params: SamplingParams


def prepare_chat(
    request: ChatCompletionRequest, turns: ChatTurns, images: list[Image], model, settings: ServeSettings
) -> PreparedChat:
    """Render and tokenise the prompt, check the token limits, fix the sampling settings."""
    from ..data.encoding import encode_chunks
    from ..data.templates import get_template
    from ..generate import SamplingParams

    template = get_template(settings.template)
    prompt = template.prompt(turns.question, len(images), turns.task, turns.history)
    ids = encode_chunks(model.tokenizer, [(prompt, False)], model.num_image_tokens).input_ids
    context = model.config.language.max_position_embeddings
    prompt_limit = min(settings.max_prompt_tokens or context, context - 1)
    if len(ids) > prompt_limit:
        raise APIError(
            400,
            f"the prompt is {len(ids)} tokens (image slots included), more than the limit of "
            f"{prompt_limit}; shorten the conversation",
            param="messages",
            code="context_length_exceeded",
        )
    room = context - len(ids)
    asked = request.requested_max_tokens
    if asked is None:
        max_new = min(settings.default_max_tokens, settings.max_tokens_limit, room)
    else:
        param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        if asked > settings.max_tokens_limit:
            raise APIError(
                400,
                f"{param} is {asked}, more than this server's limit of {settings.max_tokens_limit}",
                param=param,
                code="max_tokens_too_large",
            )
        if asked > room:
            raise APIError(
                400,
                f"this model's context is {context} tokens; the request asks for {len(ids) + asked} "
                f"({len(ids)} in the messages, {asked} in the completion)",
                param=param,
                code="context_length_exceeded",
            )
        max_new = asked
    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=settings.default_temperature if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=request.top_k or 0,
        stop=request.stops,
        seed=request.seed,
    )
    return PreparedChat(images=images, turns=turns, prompt_ids=ids, params=params)
