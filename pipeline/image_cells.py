"""Cells of image columns (encoded bytes, Hugging Face ``Image`` structs, or paths/URLs at any fsspec location):
fetched and checked in the prepare step, decoded again in the stage that needs the pixels. Used by variations'
source images and image-to-image's init images."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from .redact import display_url

_FETCH_THREADS = 8
# Decoded images above this many pixels are refused: a decompression bomb must not take an actor's memory.
MAX_PIXELS = 64 * 1024 * 1024


def load_images(values: list[Any], storage_options: dict) -> list[tuple[bytes, str | None, str]]:
    """``load_image`` of each cell, fetched in parallel (paths and URLs wait on storage)."""
    with ThreadPoolExecutor(min(_FETCH_THREADS, max(len(values), 1))) as pool:
        return list(pool.map(lambda v: load_image(v, storage_options), values))


def load_image(value: Any, storage_options: dict) -> tuple[bytes, str | None, str]:
    """(encoded bytes or b"", the path/URL shown in the outputs, the problem or "") for one cell of an image
    column: bytes, a Hugging Face Image struct, or a path/URL; fetched and fully decoded to check it."""
    path = None
    if isinstance(value, dict):  # Hugging Face Image: bytes when embedded, else a path
        data, path = value.get("bytes"), value.get("path")
        if data is None and path is not None:
            value = path
        else:
            value = data
    if value is None:
        return b"", path, "image is null"
    if isinstance(value, str):
        path = display_url(value)
        if "://" not in value and not value.startswith("/"):
            return b"", path, f"image path {path!r} must be absolute or a URL"
        try:
            with fsspec.open(value, "rb", **storage_options) as f:
                value = f.read()
        except (OSError, ValueError) as e:  # FileNotFoundError, permission and connection errors
            return b"", path, f"image {path!r} cannot be read: {type(e).__name__}: {e}"[:1000]
    try:
        decode_image(value)
    except ValueError as e:
        return b"", path, str(e)
    return value, path, ""


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image -> (H, W, 3) uint8 RGB, as the reference processor converts (``convert("RGB")``).
    Raises ValueError naming the problem."""
    if not data:
        raise ValueError("image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size  # from the header: nothing decoded yet
            if width * height <= MAX_PIXELS:
                return np.asarray(im.convert("RGB"))
    except Exception as e:  # Pillow raises UnidentifiedImageError, OSError (truncated), SyntaxError, ...
        raise ValueError(f"image cannot be decoded: {type(e).__name__}: {e}"[:1000]) from None
    raise ValueError(f"image of {width}x{height} pixels exceeds the limit of {MAX_PIXELS} pixels")
