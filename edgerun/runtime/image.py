"""Image loading for the runtime: files, bytes and arrays to HxWx3 uint8 RGB, with numpy and OpenCV only.

Files are decoded with ``cv2.imdecode`` on bytes read by Python (so non-ASCII paths work) and
``IMREAD_UNCHANGED`` (so alpha and 16-bit survive), then normalised the way the training side
(PIL + transformers' ``convert_to_rgb``) sees them: EXIF orientation applied like
``PIL.ImageOps.exif_transpose``, transparency composited onto white like ``PIL.Image.alpha_composite``.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Union

import cv2
import numpy as np

from edgerun.errors import InputError

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, np.ndarray]

SUPPORTED_FORMATS = "jpg, png, webp, bmp, tiff"
_ARRAY_DTYPES = "uint8, uint16, or float in [0, 1]"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EXIF_PREFIX = b"Exif\x00\x00"
_ORIENTATION_TAG = 0x0112


def load_image(src: ImageSource) -> np.ndarray:
    """Load an image as RGB.

    src : a path (str or PathLike), the encoded file's bytes, or an array that is already decoded:
        RGB (H, W, 3), grayscale (H, W) or (H, W, 1), RGBA (H, W, 4); uint8, uint16 or float in [0, 1].
    returns : ndarray, shape = (H, W, 3), uint8, C-contiguous. Alpha is composited onto white.
    """
    if isinstance(src, np.ndarray):
        return to_rgb8(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return decode_image(bytes(src), name="bytes")
    if isinstance(src, (str, os.PathLike)):
        return decode_image(_read_file(Path(src)), name=str(src))
    raise InputError(
        f"image source of type {type(src).__name__} is not supported "
        "(supported: a path, the file's bytes, or a numpy array)"
    )


def decode_image(data: bytes, name: str = "bytes") -> np.ndarray:
    """Decode an encoded image file to (H, W, 3) uint8 RGB, honouring its EXIF orientation."""
    label = f"image {name}"
    if not data:
        raise InputError(f"{label} is empty (supported: {SUPPORTED_FORMATS})")
    orientation = _check_container(data, label)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.size == 0:
        raise InputError(
            f"{label} could not be decoded: not an image file, or a damaged one (supported: {SUPPORTED_FORMATS})"
        )
    if decoded.ndim == 3 and decoded.shape[2] == 3:
        decoded = decoded[..., ::-1]
    elif decoded.ndim == 3 and decoded.shape[2] == 4:
        decoded = decoded[..., [2, 1, 0, 3]]
    try:
        rgb = to_rgb8(decoded)
    except InputError as exc:
        raise InputError(f"{label}: {exc}") from None
    return np.ascontiguousarray(apply_orientation(rgb, orientation))


def to_rgb8(array: np.ndarray) -> np.ndarray:
    """Convert a decoded array (gray, RGB or RGBA; uint8, uint16 or float in [0, 1]) to (H, W, 3) uint8 RGB."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InputError(
            f"image array has shape {array.shape}; expected (H, W), (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"image array has shape {array.shape}; height and width must be at least 1")
    pixels = _to_uint8(array)
    if pixels.ndim == 2:
        return np.ascontiguousarray(np.repeat(pixels[..., None], 3, axis=2))
    if pixels.shape[2] == 4:
        return composite_on_white(pixels)
    return np.ascontiguousarray(pixels)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        # round(v / 257) with integers: v / 257 never ends in exactly .5
        return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        low, high = float(np.min(array)), float(np.max(array))
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0.0 or high > 1.0:
            raise InputError(
                f"float image array has values in [{low}, {high}]; float images must lie in [0, 1]"
            )
        return np.round(array.astype(np.float64) * 255.0).astype(np.uint8)
    raise InputError(f"image array has dtype {array.dtype}; supported: {_ARRAY_DTYPES}")


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Blend (H, W, 4) uint8 RGBA onto an opaque white background -> (H, W, 3) uint8 RGB.

    The integer arithmetic of Pillow's ``Image.alpha_composite(white, image)``, which transformers'
    ``convert_to_rgb`` uses for PIL images, so the result is the same byte for byte.
    """
    src_a = rgba[..., 3:4].astype(np.uint32)
    blend = 255 * (255 - src_a)  # destination alpha is 255
    out_a255 = src_a * 255 + blend
    coef1 = src_a * 255 * 255 * 128 // out_a255
    coef2 = 255 * 128 - coef1
    tmp = rgba[..., :3].astype(np.uint32) * coef1 + 255 * coef2 + (0x80 << 7)
    rgb = (((tmp >> 8) + tmp) >> 8) >> 7
    return np.where(src_a == 0, np.uint8(255), rgb.astype(np.uint8))


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Turn an image stored with EXIF orientation 1..8 upright, as ``PIL.ImageOps.exif_transpose`` does."""
    if orientation == 2:
        return image[:, ::-1]
    if orientation == 3:
        return image[::-1, ::-1]
    if orientation == 4:
        return image[::-1]
    if orientation == 5:
        return image.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(image, -1)
    if orientation == 7:
        return image.swapaxes(0, 1)[::-1, ::-1]
    if orientation == 8:
        return np.rot90(image, 1)
    return image


def _read_file(path: Path) -> bytes:
    if not path.exists():
        raise InputError(f"image {path} does not exist")
    if path.is_dir():
        raise InputError(f"image {path} is a directory, not an image file (supported: {SUPPORTED_FORMATS})")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"image {path} could not be read: {exc.strerror or exc}") from None


# --- container checks: completeness and the EXIF orientation, per format ---------------------------


def _check_container(data: bytes, label: str) -> int:
    """Raise InputError when a known container is cut short; return its EXIF orientation (1 if none)."""
    if data[:3] == b"\xff\xd8\xff":
        tiff = _scan_jpeg(data, label)
    elif data[:8] == _PNG_SIGNATURE:
        tiff = _scan_png(data, label)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        tiff = _scan_webp(data, label)
    elif data[:4] in (b"II*\x00", b"MM\x00*"):
        tiff = data
    else:
        if data[:2] == b"BM" and len(data) >= 6:
            declared = struct.unpack("<I", data[2:6])[0]
            if len(data) < declared:
                raise _truncated(label, "BMP", f"has {len(data)} of its {declared} bytes")
        return 1
    return exif_orientation(tiff) if tiff else 1


def _truncated(label: str, fmt: str, detail: str) -> InputError:
    return InputError(f"{label} is truncated: the {fmt} data {detail}; the file is incomplete or damaged")


def _scan_jpeg(data: bytes, label: str) -> bytes | None:
    """Walk the JPEG markers up to EOI; return the first APP1 Exif payload (a TIFF block)."""
    buf = np.frombuffer(data, np.uint8)
    after_ff = buf[1:]
    # positions of real markers inside entropy-coded data: FF not followed by 00, RSTn or another FF
    is_marker = (buf[:-1] == 0xFF) & (after_ff != 0x00) & (after_ff != 0xFF)
    is_marker &= (after_ff < 0xD0) | (after_ff > 0xD7)
    markers = np.flatnonzero(is_marker)
    exif, pos, size = None, 2, len(data)
    while True:
        pos = data.find(b"\xff", pos)  # skips stray bytes between segments, as libjpeg does
        while 0 <= pos < size - 1 and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes
        if pos < 0 or pos + 2 > size:
            raise _truncated(label, "JPEG", "ends before its end-of-image marker (FFD9)")
        marker = data[pos + 1]
        if marker == 0xD9:
            return exif
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if pos + 4 > size:
            raise _truncated(label, "JPEG", "ends inside a marker segment")
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if end > size:
            raise _truncated(label, "JPEG", "ends inside a marker segment")
        if marker == 0xE1 and exif is None and data[pos + 4:pos + 10] == _EXIF_PREFIX:
            exif = data[pos + 10:end]
        pos = end
        if marker == 0xDA:  # start of scan: entropy-coded data runs to the next real marker
            found = int(np.searchsorted(markers, pos))
            if found == len(markers):
                raise _truncated(label, "JPEG", "ends inside the image data, before its end-of-image marker")
            pos = int(markers[found])


def _scan_png(data: bytes, label: str) -> bytes | None:
    """Walk the PNG chunks up to IEND; return the eXIf payload (a TIFF block)."""
    exif, pos, size = None, len(_PNG_SIGNATURE), len(data)
    while pos + 8 <= size:
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        if end > size:
            break
        if kind == b"IEND":
            return exif
        if kind == b"eXIf" and exif is None:
            exif = _strip_exif_prefix(data[pos + 8:pos + 8 + length])
        pos = end
    raise _truncated(label, "PNG", "ends before its IEND chunk")


def _scan_webp(data: bytes, label: str) -> bytes | None:
    """Check the RIFF size of a WebP file; return its EXIF chunk payload (a TIFF block)."""
    declared = 8 + struct.unpack("<I", data[4:8])[0]
    if len(data) < declared:
        raise _truncated(label, "WebP", f"has {len(data)} of its {declared} bytes")
    pos = 12
    while pos + 8 <= declared:
        kind, length = struct.unpack("<4sI", data[pos:pos + 8])
        if kind == b"EXIF":
            return _strip_exif_prefix(data[pos + 8:pos + 8 + length])
        pos += 8 + length + (length & 1)
    return None


def _strip_exif_prefix(block: bytes) -> bytes:
    return block.removeprefix(_EXIF_PREFIX)


def exif_orientation(tiff: bytes) -> int:
    """The Orientation tag (0x0112) of IFD0 in a TIFF-structured block (EXIF), or 1 when absent or invalid."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "<" if tiff[:2] == b"II" else ">"
    if struct.unpack(order + "H", tiff[2:4])[0] != 42:
        return 1
    ifd = struct.unpack(order + "I", tiff[4:8])[0]
    if ifd + 2 > len(tiff):
        return 1
    count = struct.unpack(order + "H", tiff[ifd:ifd + 2])[0]
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        tag, kind = struct.unpack(order + "HH", tiff[entry:entry + 4])
        if tag != _ORIENTATION_TAG:
            continue
        if kind == 3:  # SHORT
            value = struct.unpack(order + "H", tiff[entry + 8:entry + 10])[0]
        elif kind == 4:  # LONG
            value = struct.unpack(order + "I", tiff[entry + 8:entry + 12])[0]
        else:
            return 1
        return value if 1 <= value <= 8 else 1
    return 1
