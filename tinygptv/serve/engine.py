"""Running prepared chats through the model: a batch at once, or one chat streamed.

Both paths use the decoding of :mod:`tinygptv.generate`: a batch goes through transformers'
``generate`` (left padding; :func:`~tinygptv.generate.generate_batch`), a stream through our
KV-cached single-stream loop (:func:`~tinygptv.generate.stream_tokens`), the loop behind
``Conversation.stream``. The server is stateless, so a stream starts from an empty cache (a
:class:`~tinygptv.chat.Conversation` would keep it only for its own next turn) and we count its
tokens and read its finish reason here, which ``Conversation`` does not report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from ..chat import parse_answer
from ..generate import StopChecker, generate_batch, new_cache, stream_tokens

if TYPE_CHECKING:
    from ..model.tinygptv import TinyGPTV
    from .messages import PreparedChat


@dataclass
class Completion:
    """One answer and what it cost."""

    text: str
    """The answer, without the stop string that ended it."""
    finish_reason: str
    """``stop`` (a stop string or EOS) or ``length`` (``max_new_tokens`` reached)."""
    prompt_tokens: int
    completion_tokens: int
    """Generated tokens, the one that completed a stop string or EOS included."""
    boxes: list[dict[str, Any]]
    """Parsed boxes (see :class:`~tinygptv.chat.Answer`)."""
    batch_size: int = 1
    """How many requests were decoded together with this one (itself included)."""


def complete_batch(model: TinyGPTV, chats: Sequence[PreparedChat], stops: Sequence[str]) -> list[Completion]:
    """Answer ``chats`` together. They must share their sampling settings (the batcher groups them so);
    ``stops`` are the template's stop strings, added to each chat's own."""
    params = chats[0].params
    params = replace(params, stop=tuple(params.stop) + tuple(stops))
    inputs_embeds, attention_mask = _embed_left_padded(model, chats)
    eos = _eos(model)
    out = generate_batch(
        model.lm, inputs_embeds, attention_mask, params, eos, model.pad_token_id, tokenizer=model.tokenizer
    )
    results = []
    for chat, row in zip(chats, out.tolist()):
        text, n_tokens, finish = _read_row(model.tokenizer, row, eos, params.stop)
        results.append(_completion(chat, text, finish, n_tokens, len(chats)))
    return results


def stream_chat(
    model: TinyGPTV,
    chat: PreparedChat,
    stops: Sequence[str],
    on_piece: Callable[[str], None],
    cancelled: Callable[[], bool] = lambda: False,
) -> Completion:
    """Answer one chat, calling ``on_piece`` with each piece of text as soon as it is final.
    ``cancelled()`` is checked after every token: a client that went away stops the decoding."""
    params = replace(chat.params, stop=tuple(chat.params.stop) + tuple(stops))
    inputs_embeds, _ = _embed_left_padded(model, [chat])
    eos = _eos(model)
    checker = StopChecker(model.tokenizer, params.stop)
    n_tokens = 0
    for token in stream_tokens(model.lm, inputs_embeds, new_cache(model.lm), params, eos):
        n_tokens += 1
        piece = checker.push(token)
        if piece:
            on_piece(piece)
        if checker.stopped or cancelled():
            break
    tail = checker.flush()
    if tail and not cancelled():
        on_piece(tail)
    ended_by_eos = not checker.stopped and not cancelled() and n_tokens < params.max_new_tokens
    finish = "stop" if checker.stopped or ended_by_eos else "length"
    return _completion(chat, _cut_at_stop(checker.text(), params.stop), finish, n_tokens + ended_by_eos, 1)


# --- internals ----------------------------------------------------------------------------------
def _embed_left_padded(model: TinyGPTV, chats: Sequence[PreparedChat]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, C) input embeddings, images spliced in, rows left-padded; and the (B, T) attention mask."""
    from ..data.image_processing import image_processor_for

    pad = model.pad_token_id
    width = max(len(c.prompt_ids) for c in chats)
    input_ids = torch.tensor([[pad] * (width - len(c.prompt_ids)) + c.prompt_ids for c in chats])  # (B, T)
    attention_mask = torch.tensor([[0] * (width - len(c.prompt_ids)) + [1] * len(c.prompt_ids) for c in chats])
    images = [image for c in chats for image in c.images]  # row by row: the order of the slots
    image_embeds = None
    with torch.inference_mode():
        if images:
            pixels = image_processor_for(model.config.vision.image_size).batch(images)  # (N, 3, S, S)
            image_embeds = model.encode_images(pixels.to(model.device, model.lm_proj.weight.dtype))  # (N, Q, C)
        inputs_embeds = model.embed(input_ids.to(model.device), image_embeds)  # (B, T, C)
    return inputs_embeds, attention_mask.to(model.device)


def _eos(model: TinyGPTV) -> list[int]:
    eos = model.tokenizer.eos_token_id
    return [eos] if eos is not None else []


def _read_row(tokenizer, row: list[int], eos: list[int], stops: Sequence[str]) -> tuple[str, int, str]:
    """A batch row of new tokens -> (answer text, tokens the row generated, finish reason).

    A finished row is followed by padding until the whole batch ends; where it finished is the
    first EOS, or the shortest prefix whose text holds a stop string (found by bisection: a
    prefix's text only grows with its length)."""
    end = next((k for k, t in enumerate(row) if t in eos), None)
    body = row if end is None else row[:end]
    text = tokenizer.decode(body, skip_special_tokens=True)
    if any(stop in text for stop in stops):
        lo, hi = 1, len(body)
        while lo < hi:
            mid = (lo + hi) // 2
            if any(stop in tokenizer.decode(body[:mid], skip_special_tokens=True) for stop in stops):
                hi = mid
            else:
                lo = mid + 1
        return _cut_at_stop(text, stops), lo, "stop"
    if end is not None:
        return text.strip(), end + 1, "stop"
    return text.strip(), len(body), "length"  # unfinished rows run to max_new_tokens


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cut = min((k for k in (text.find(s) for s in stops) if k != -1), default=len(text))
    return text[:cut].strip()


def _completion(chat: PreparedChat, text: str, finish: str, n_tokens: int, batch_size: int) -> Completion:
    size = chat.images[0].size if chat.images else None
    answer = parse_answer(text, size, chat.turns.task, query=chat.turns.question)
    return Completion(
        text=text,
        finish_reason=finish,
        prompt_tokens=len(chat.prompt_ids),
        completion_tokens=n_tokens,
        boxes=answer.boxes,
        batch_size=batch_size,
    )
