"""A KV cache whose layers append into preallocated room instead of concatenating.

transformers' :class:`~transformers.DynamicCache` appends a token to each layer with
``torch.cat([keys, new])``: every decode step copies the whole cache of every layer anew (at
Phi-2 size in float32, 655 KB per token of context per step, ~74 MB a step at ~113 tokens), the
largest cost of a CPU decode step after the weight matmuls (``benchmarks/profile_decode.py``).
:class:`GrowingLayer` keeps each layer's keys and values in a buffer with room to spare and writes
new tokens into it; ``keys`` / ``values`` are views of the filled part, so attention reads exactly
the tensors a :class:`DynamicLayer` would hold (same values, same order). When the room runs out
the buffer is reallocated with a quarter more (at least :data:`GROWTH_TOKENS` tokens), so a long
conversation copies its cache O(log n) times instead of once per token, and a short one holds at
most :data:`GROWTH_TOKENS` tokens more than it needs.

Everything else (cropping for a conversation's shared prefix, beam reordering, batch selection)
is :class:`DynamicLayer`'s: where one of those replaces ``keys`` / ``values`` with new tensors,
the next update takes them over as its buffer.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

GROWTH_TOKENS = 64
"""Least number of tokens of room a layer adds when it grows (42 MB of float32 keys and values
over Phi-2's 32 layers)."""


class GrowingLayer(DynamicLayer):
    """A :class:`DynamicLayer` that appends in place into a buffer with spare room (module doc)."""

    def __init__(self, growth_tokens: int = GROWTH_TOKENS, **kwargs):
        super().__init__(**kwargs)
        if growth_tokens < 1:
            raise ValueError(f"growth_tokens must be >= 1, got {growth_tokens}")
        self.growth_tokens = growth_tokens
        self._key_room: torch.Tensor | None = None
        self._value_room: torch.Tensor | None = None
        self._length = 0

    @property
    def capacity(self) -> int:
        """Tokens the buffer holds before it must grow (0 before the first update)."""
        return 0 if self._key_room is None else self._key_room.shape[-2]

    def _holds_views(self) -> bool:
        """Whether ``keys`` / ``values`` are still the views this layer made (nothing replaced them)."""
        return (
            self._key_room is not None
            and self.keys is not None
            and self.keys.shape[-2] == self._length
            and self.keys.data_ptr() == self._key_room.data_ptr()
            and self.values.data_ptr() == self._value_room.data_ptr()
        )

    def _reserve(self, keys: torch.Tensor, values: torch.Tensor, length: int, needed: int) -> None:
        """New room for ``needed`` tokens and more, holding the first ``length`` tokens of ``keys`` /
        ``values``."""
        room = needed + max(self.growth_tokens, needed // 4)
        shape_k = (*keys.shape[:-2], room, keys.shape[-1])
        shape_v = (*values.shape[:-2], room, values.shape[-1])
        key_room = torch.empty(shape_k, dtype=keys.dtype, device=keys.device)
        value_room = torch.empty(shape_v, dtype=values.dtype, device=values.device)
        if length:
            key_room[..., :length, :].copy_(keys[..., :length, :])
            value_room[..., :length, :].copy_(values[..., :length, :])
        self._key_room, self._value_room = key_room, value_room

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.keys if self.keys is not None and self.keys.numel() else None
        if held is not None and not self._holds_views():
            # keys were replaced from outside (beam reordering, batch selection): take them over
            self._length = held.shape[-2]
            self._reserve(held, self.values, self._length, self._length + key_states.shape[-2])
        elif held is None:
            self._length = 0
        new = key_states.shape[-2]
        end = self._length + new
        room = self._key_room
        fits = (
            room is not None
            and end <= room.shape[-2]
            and room.shape[:-2] == key_states.shape[:-2]
            and room.dtype == key_states.dtype
            and room.device == key_states.device
            # a buffer made under torch.inference_mode cannot be written outside it: copy it out once
            and not (room.is_inference() and not torch.is_inference_mode_enabled())
        )
        if not fits:
            if not self._length:  # nothing held (new, reset or cropped to nothing): room shaped like the new states
                self._reserve(key_states, value_states, 0, end)
            elif room.shape[:-2] != key_states.shape[:-2]:
                raise ValueError(
                    f"cache holds batch/heads {tuple(room.shape[:-2])}, the new states have {tuple(key_states.shape[:-2])}"
                )
            else:
                self._reserve(room, self._value_room, self._length, end)
        self._key_room[..., self._length : end, :].copy_(key_states)
        self._value_room[..., self._length : end, :].copy_(value_states)
        self._length = end
        self.keys = self._key_room[..., :end, :]
        self.values = self._value_room[..., :end, :]
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:  # DynamicLayer's own check and message
            return super().crop(tokens_to_remove)
        if tokens_to_remove == 0 or not self.is_initialized or self.keys is None:
            return
        if not self._holds_views():
            return super().crop(tokens_to_remove)
        self._length = max(0, self._length + tokens_to_remove)
        self.keys = self._key_room[..., : self._length, :]
        self.values = self._value_room[..., : self._length, :]

    def reset(self) -> None:
        self._key_room = self._value_room = None
        self._length = 0
        super().reset()


def growing_cache(config) -> DynamicCache:
    """A :class:`DynamicCache` for ``config``'s decoder whose every layer is a :class:`GrowingLayer`.

    For models whose layers all use full attention (Phi, the micro LM): a sliding-window or other
    special layer type in ``config`` is refused rather than silently treated as full attention."""
    cache = DynamicCache(config=config)
    kinds = {type(layer) for layer in cache.layers}
    if kinds - {DynamicLayer}:
        raise ValueError(f"growing_cache supports full-attention layers only, this config has {sorted(k.__name__ for k in kinds)}")
    cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache


__all__ = ["GROWTH_TOKENS", "GrowingLayer", "growing_cache"]
