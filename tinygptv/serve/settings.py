"""What the server accepts and how it batches: one typed settings object."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeSettings:
    """Settings of ``tinygptv serve`` (each has a command-line option of the same name)."""

    api_key: str | None = None
    """If set, every ``/v1`` request must send ``Authorization: Bearer <api_key>``."""
    model_name: str | None = None
    """Name in ``/v1/models`` and in responses; requests must name it. Default: the model's config name."""
    template: str = "stage4"
    """Prompt template the messages are rendered with."""
    allow_remote_images: bool = False
    """Fetch ``http(s)://`` image URLs. Off by default: the server would otherwise fetch any
    address a client names (server-side request forgery)."""
    remote_image_timeout: float = 10.0
    """Seconds to fetch one remote image."""
    max_body_bytes: int = 20 * 2**20
    """Largest request body (base64 images included): 413 above it."""
    max_image_bytes: int = 10 * 2**20
    """Largest encoded image (after base64 decoding, or as downloaded)."""
    max_image_pixels: int = 4096 * 4096
    """Largest image in pixels (width x height), checked from the header before decoding, so a
    small file that would decode to gigabytes (a decompression bomb) is refused unread."""
    max_images: int = 4
    """Most images in one request."""
    max_prompt_tokens: int | None = None
    """Most prompt tokens (image slots included). Default: the model's context length."""
    max_tokens_limit: int = 1024
    """Largest ``max_tokens`` a request may ask for (the context length bounds it too)."""
    default_max_tokens: int = 256
    """``max_tokens`` of a request that names none (less where the context has less room)."""
    default_temperature: float = 0.0
    """Temperature of a request that names none: greedy, as the CLI (OpenAI's own default is 1)."""
    max_batch_size: int = 16
    """Most requests decoded together in one batch (1: one at a time)."""
    max_queue: int = 64
    """Most requests waiting for the model; one more is answered 503 with Retry-After."""
    batch_wait_ms: float = 5.0
    """How long the worker waits for more compatible requests before starting a batch that is not full."""

    def validate(self) -> None:
        for name in (
            "max_body_bytes",
            "max_image_bytes",
            "max_image_pixels",
            "max_tokens_limit",
            "default_max_tokens",
            "max_batch_size",
            "max_queue",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_images < 0 or self.batch_wait_ms < 0:
            raise ValueError("max_images and batch_wait_ms must be >= 0")
