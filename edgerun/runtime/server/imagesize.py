"""An image's width and height from its header, without decoding it: the server refuses a
decompression bomb (a small file that decodes to gigapixels) before OpenCV allocates for it."""
from __future__ import annotations

import struct

_PNG = b"\x89PNG\r\n\x1a\n"
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def image_format(data: bytes) -> str | None:
    """jpeg, png, webp, bmp or tiff by the file's signature; None for anything else."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == _PNG:
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of a jpeg, png, webp, bmp or tiff file; None where the header
    is missing, cut short or not one of those."""
    reader = {"jpeg": _jpeg, "png": _png, "webp": _webp, "bmp": _bmp, "tiff": _tiff}.get(image_format(data))
    if reader is None:
        return None
    try:
        return reader(data)
    except (struct.error, IndexError):
        return None


def _png(data: bytes):
    if data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


def _jpeg(data: bytes):
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            pos += 1
            continue
        marker = data[pos + 1]
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 1 if marker == 0xFF else 2
            continue
        if marker in _SOF:
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return width, height
        if marker in (0xD9, 0xDA):  # end of image, or image data before any frame header
            return None
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    return None


def _webp(data: bytes):
    kind = data[12:16]
    if kind == b"VP8X":
        width = 1 + int.from_bytes(data[24:27], "little")
        return width, 1 + int.from_bytes(data[27:30], "little")
    if kind == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if kind == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    return None


def _bmp(data: bytes):
    if struct.unpack("<I", data[14:18])[0] == 12:  # OS/2 core header: 16-bit sizes
        return struct.unpack("<HH", data[18:22])
    width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height)


def _tiff(data: bytes):
    order = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack(order + "I", data[4:8])[0]
    count = struct.unpack(order + "H", data[ifd:ifd + 2])[0]
    found = {}
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        tag, kind = struct.unpack(order + "HH", data[entry:entry + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength
            fmt = "H" if kind == 3 else "I"
            found[tag] = struct.unpack(order + fmt, data[entry + 8:entry + 8 + struct.calcsize(fmt)])[0]
    return (found[256], found[257]) if len(found) == 2 else None
