"""Decoding: a KV-cached loop for one stream (chat, streaming), transformers' ``generate`` for batches
and beam search.

The single-stream loop is ours because a conversation keeps its KV cache between turns: each turn
only the new tokens are run through the model, and each image is encoded once. Sampling follows
the usual order: temperature, then top-k, then nucleus (top-p) filtering.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList
from .kv_cache import growing_cache
from .model.language import cache_argument


@dataclass
class SamplingParams:
    """How to pick tokens."""

    max_new_tokens: int = 256
    """Upper bound on generated tokens."""
    temperature: float = 0.0
    """0 means greedy; otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: no limit)."""
    num_beams: int = 1
    """Beam search width (batched path only)."""
    stop: Sequence[str] = field(default_factory=tuple)
    """Strings that end the answer (not included in it), e.g. a template's end symbol."""
    seed: int | None = None
    """Seed of the sampling generator, for reproducible samples."""

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.num_beams < 1:
            raise ValueError("top_k must be >= 0 and num_beams >= 1")


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class StopChecker:
    """Incremental detokenisation with stop strings: text is released only when it can no longer
    turn out to be the start of a stop string."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.released = 0
        self.stopped = False

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add a token; return the newly releasable text ('' if none yet)."""
        self.ids.append(token_id)
        text = self.text()
        for stop in self.stops:
            k = text.find(stop)
            if k != -1:
                self.stopped = True
                text = text[:k]
        if text.endswith("\ufffd") and not self.stopped:  # an incomplete multi-byte character
            return ""
        safe = len(text)
        if not self.stopped:
            for stop in self.stops:  # hold back a suffix that could begin a stop string
                for n in range(min(len(stop) - 1, len(text)), 0, -1):
                    if text.endswith(stop[:n]):
                        safe = min(safe, len(text) - n)
                        break
        piece = text[self.released : safe]
        self.released = max(self.released, safe)
        return piece

    def flush(self) -> str:
        """Text held back at the end (a partial stop string that never completed)."""
        text = self.text()
        if self.stopped:
            return ""
        piece = text[self.released :]
        self.released = len(text)
        return piece


@torch.inference_mode()
def stream_tokens(
    lm,
    inputs_embeds: torch.Tensor,
    cache: DynamicCache,
    params: SamplingParams,
    eos_token_ids: Sequence[int],
) -> Iterator[int]:
    """Run ``inputs_embeds`` (1, T, C) after what ``cache`` already holds, then decode token by token.

    The cache is extended in place (prompt and every generated token that was fed back), so a
    conversation can continue from it. Yields token ids; EOS ends the stream and is not yielded.
    """
    params.validate()
    generator = torch.Generator(device=inputs_embeds.device).manual_seed(params.seed) if params.seed is not None else None
    start = cache.get_seq_length()
    positions = torch.arange(start, start + inputs_embeds.shape[1], device=inputs_embeds.device)[None]
    cache_arg = cache_argument(lm, cache)
    # logits of the last position only: the LM head over a whole prompt would be wasted work
    logits = lm(inputs_embeds=inputs_embeds, use_cache=True, position_ids=positions, logits_to_keep=1, **cache_arg).logits
    eos = set(int(e) for e in eos_token_ids)
    for step in range(params.max_new_tokens):
        token = next_token(logits[:, -1], params, generator)
        tid = int(token)
        if tid in eos:
            return
        yield tid
        if step + 1 == params.max_new_tokens:
            return
        positions = positions[:, -1:] + 1  # on the device: no host-to-device copy per token
        logits = lm(input_ids=token[:, None], use_cache=True, position_ids=positions, **cache_arg).logits


def new_cache(lm) -> DynamicCache:
    """An empty KV cache for ``lm``: a :class:`~transformers.DynamicCache` whose layers append in
    place (:func:`tinygptv.kv_cache.growing_cache`) instead of concatenating every step."""
    return growing_cache(lm.config)


@torch.inference_mode()
def generate_batch(
    lm,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    params: SamplingParams,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    tokenizer=None,
) -> torch.Tensor:
    """Batched decoding (left-padded ``inputs_embeds`` (B, T, C)) and beam search, through
    transformers' ``generate`` with our KV cache (:func:`new_cache`). Returns the new token ids
    (B, N), padded with ``pad_token_id``.

    With a ``tokenizer``, each row stops at ``params.stop`` (transformers' stop strings; the
    strings themselves are cut from the text by the caller)."""
    params.validate()
    if params.seed is not None:
        torch.manual_seed(params.seed)
    sample = params.temperature > 0
    return lm.generate(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        max_new_tokens=params.max_new_tokens,
        do_sample=sample,
        temperature=params.temperature if sample else None,
        top_p=params.top_p if sample else None,
        top_k=params.top_k if sample else None,
        num_beams=params.num_beams,
        eos_token_id=list(eos_token_ids) or None,
        pad_token_id=pad_token_id,
        stopping_criteria=StoppingCriteriaList([StopOnStrings(tokenizer, params.stop)])
        if params.stop and tokenizer is not None
        else None,
        **cache_argument(lm, new_cache(lm)),
    )


class StopOnStrings(StoppingCriteria):
    """Stop each row of a batched ``generate`` once its decoded text holds one of ``stops``.

    transformers' own ``stop_strings`` builds a token-to-string table that fails on word-level
    tokenizers (it probes the vocabulary with a prefix the tokenizer may not know), so we check the
    decoded text instead: a few short decodes per step, negligible next to the model.
    """

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        # With inputs_embeds, generate's input_ids hold only the generated tokens.
        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        done = [any(stop in text for stop in self.stops) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
