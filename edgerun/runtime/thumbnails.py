"""Index thumbnails: small JPEGs made once, at index time, so a gallery page never decodes full photos.

An index keeps them in one file, `thumbs-<gen>.jpgs`: the JPEGs end to end. Row i's bytes are
`[offset, offset + size)`, recorded as `"thumb": [offset, size]` on line i of the items file
(absent where the image could not be made into one).
"""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from ..errors import InputError, OptionError
from .image import load_image

DEFAULT_SIZE = 160  # longest side, pixels
QUALITY = 80  # JPEG quality: ~3-6 KB for a 160 px photo
MAX_SIZE = 1024


def check_size(size) -> int:
    """A thumbnail size (longest side in pixels), validated."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 16 <= size <= MAX_SIZE:
        raise OptionError(f"thumbnail size must be an integer from 16 to {MAX_SIZE} pixels, got {size!r}")
    return int(size)


def make_thumbnail(image: np.ndarray, size: int) -> bytes:
    """(H, W, 3) uint8 RGB -> JPEG bytes, longest side at most `size` (never enlarged)."""
    h, w = image.shape[:2]
    scale = min(1.0, size / max(h, w))
    if scale < 1.0:
        dims = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = cv2.resize(image, dims, interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, QUALITY])
    if not ok:
        raise InputError(f"could not encode a {image.shape} thumbnail as JPEG")
    return data.tobytes()


def thumbnails_of(paths: Sequence[str], size: int) -> list[bytes | None]:
    """Thumbnails of image files (an index's older rows); None for a file that cannot be read now."""
    out: list[bytes | None] = []
    for path in paths:
        try:
            out.append(make_thumbnail(load_image(path), size))
        except InputError:
            out.append(None)
    return out


def pack(thumbs: Sequence[bytes | None]) -> tuple[bytes, list[list[int] | None]]:
    """JPEGs -> (their bytes end to end, [offset, size] per row or None where there is none)."""
    blob, places, offset = [], [], 0
    for data in thumbs:
        if data is None:
            places.append(None)
            continue
        blob.append(data)
        places.append([offset, len(data)])
        offset += len(data)
    return b"".join(blob), places


def unpack(blob, place) -> bytes | None:
    """One row's JPEG from a packed blob (bytes or a memory map) and its [offset, size]."""
    if place is None:
        return None
    offset, size = place
    return bytes(blob[offset:offset + size])
