"""Images sent to the server: base64 data URLs (and, when allowed, http(s) URLs), decoded under limits.

Every failure is an :class:`~tinygptv.serve.protocol.APIError` (400) naming the message part it
came from, so a client can see which image was wrong and why.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from typing import TYPE_CHECKING

from .protocol import APIError

if TYPE_CHECKING:
    from PIL.Image import Image

    from .settings import ServeSettings

_DATA_URL = re.compile(
    r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,(?P<data>.*)", re.DOTALL
)
_WHITESPACE = re.compile(rb"\s+")


def is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def decode_data_url(url: str, settings: ServeSettings, param: str) -> bytes:
    """The bytes of a ``data:image/...;base64,...`` URL, or a 400 saying what is wrong with it."""
    m = _DATA_URL.fullmatch(url)
    if not m:
        raise APIError(
            400,
            "image_url must be a base64 data URL (data:image/png;base64,...)"
            + ("" if is_remote(url) else f"; got one starting {url[:30]!r}"),
            param=param,
            code="invalid_image_url",
        )
    mime = (m.group("mime") or "").lower()
    if not mime.startswith("image/"):
        raise APIError(
            400,
            f"the data URL's media type must be image/*, got {mime or 'none'!r}",
            param=param,
            code="invalid_image_format",
        )
    if not m.group("b64"):
        raise APIError(
            400,
            "the image data URL must be base64 encoded (data:image/...;base64,...)",
            param=param,
            code="invalid_image_url",
        )
    payload = _WHITESPACE.sub(b"", m.group("data").encode("ascii", errors="replace"))
    if len(payload) * 3 // 4 > settings.max_image_bytes:  # refuse before decoding
        raise APIError(
            400,
            f"the image is larger than the limit of {settings.max_image_bytes} bytes",
            param=param,
            code="image_too_large",
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise APIError(400, f"the image's base64 data is corrupt: {err}", param=param, code="invalid_base64") from None
    if not data:
        raise APIError(400, "the image data is empty", param=param, code="invalid_image")
    return data


async def fetch_remote_image(url: str, settings: ServeSettings, param: str) -> bytes:
    """Download an http(s) image (``allow_remote_images``), at most ``max_image_bytes``."""
    import httpx

    limit = settings.max_image_bytes
    try:
        async with httpx.AsyncClient(timeout=settings.remote_image_timeout, follow_redirects=True) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise APIError(
                        400,
                        f"fetching the image failed: HTTP {response.status_code} from {url}",
                        param=param,
                        code="image_fetch_failed",
                    )
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > limit:
                        raise APIError(
                            400,
                            f"the image at {url} is larger than the limit of {limit} bytes",
                            param=param,
                            code="image_too_large",
                        )
                    chunks.append(chunk)
    except httpx.HTTPError as err:
        raise APIError(
            400, f"fetching the image failed: {type(err).__name__}: {err}", param=param, code="image_fetch_failed"
        ) from None
    return b"".join(chunks)


def open_image(data: bytes, settings: ServeSettings, param: str) -> Image:
    """An RGB image from encoded bytes. The size is read from the header and checked against
    ``max_image_pixels`` before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > settings.max_image_bytes:
        raise APIError(
            400,
            f"the image is larger than the limit of {settings.max_image_bytes} bytes",
            param=param,
            code="image_too_large",
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own, lower limit
        try:
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > settings.max_image_pixels:
                raise _too_many_pixels(width, height, settings, param)
            img.load()
            return img.convert("RGB")
        except Image.DecompressionBombError as err:  # Pillow's own, larger limit, raised on open
            raise APIError(
                400,
                f"the image has more pixels than the limit of {settings.max_image_pixels} ({err})",
                param=param,
                code="image_too_large",
            ) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
            raise APIError(
                400, f"the data is not an image this server can read: {err}", param=param, code="invalid_image"
            ) from None


def _too_many_pixels(width: int, height: int, settings: ServeSettings, param: str) -> APIError:
    return APIError(
        400,
        f"the image is {width}x{height} = {width * height} pixels, more than the limit of {settings.max_image_pixels}",
        param=param,
        code="image_too_large",
    )
