"""Request bodies to checked inputs: size limit, multipart or JSON, known fields, image header.

Every failure is a `RequestError` carrying the HTTP status and a message that names the field and
what would be valid: 413 (body or pixels too large), 415 (not multipart/JSON, or not an image),
400 (everything else: a missing or unknown field, a wrong type, base64 that does not decode).
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from dataclasses import dataclass

from ..decoding import DecodingOptions
from ..image import SUPPORTED_FORMATS
from .config import ServerConfig
from .imagesize import image_format, image_size

# the decoding keyword options of caption()/answer(), typed by their defaults (early_stopping: bool or "never")
DECODING_FIELDS = {f.name: type(f.default) for f in dataclasses.fields(DecodingOptions)}
TASK_FIELDS = {
    "caption": {"image": bytes, "prompt": str, **DECODING_FIELDS},
    "vqa": {"image": bytes, "question": str, **DECODING_FIELDS},
    "search": {"image": bytes, "text": str, "k": int, "exact": bool},
}
REQUIRED = {"caption": ("image",), "vqa": ("image", "question"), "search": ()}


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Fields:
    """A request's fields, checked: `image` (the encoded file's bytes) or None, and the others typed."""

    image: bytes | None
    values: dict


async def read_body(request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> RequestError:
    return RequestError(413, f"the request body has {'more than ' if size > limit else ''}{size} bytes; "
                             f"the limit is {limit} bytes ({limit / 2**20:.1f} MiB)")


async def parse_request(request, task: str, config: ServerConfig) -> Fields:
    """Read and check a `task` request (caption, vqa, search) sent as multipart/form-data or JSON."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/json"):
        raise RequestError(415, f"content type {kind or '(none)'!r} is not accepted: send multipart/form-data "
                                "with the image in the field 'image', or application/json with it base64-encoded")
    body = await read_body(request, config.max_upload_bytes)
    raw = await _multipart(request.headers, body) if kind == "multipart/form-data" else _json(body)
    values = check_fields(raw, task, from_text=kind != "application/json")
    image = values.pop("image", None)
    if image is not None:
        check_image(image, config.max_pixels)
    _check_limits(values, config)
    return Fields(image, values)


async def _multipart(headers, body: bytes) -> dict:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body
        yield b""

    try:
        form = await MultiPartParser(headers, stream(), max_files=1, max_fields=32,
                                     max_part_size=64 * 1024).parse()
    except MultiPartException as exc:
        raise RequestError(400, f"the multipart body could not be read: {exc.message}") from None
    out = {}
    for name, value in form.multi_items():
        if name in out:
            raise RequestError(400, f"field {name!r} is given more than once")
        if isinstance(value, UploadFile):
            out[name] = await value.read()
            await value.close()
        else:
            out[name] = value
    return out


def _json(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the JSON body must be an object of fields, got {type(data).__name__}")
    if "image" in data:
        data["image"] = _base64(data["image"])
    return data


def _base64(value) -> bytes:
    if not isinstance(value, str):
        raise RequestError(400, f"field 'image' must be a base64 string in JSON, got {type(value).__name__}")
    if value.startswith("data:") and "," in value:  # a data URL
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "field 'image' is not valid base64") from None


def check_fields(raw: dict, task: str, from_text: bool) -> dict:
    """Field names and types for `task`; multipart fields arrive as text and are converted."""
    allowed = TASK_FIELDS[task]
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise RequestError(400, f"unknown field(s) {', '.join(map(repr, unknown))} for /v1/{task}; "
                                f"valid: {', '.join(allowed)}")
    missing = [name for name in REQUIRED[task] if raw.get(name) in (None, b"", "")]
    if missing:
        raise RequestError(400, f"field {missing[0]!r} is required for /v1/{task}")
    return {name: _typed(name, value, allowed[name], from_text) for name, value in raw.items()}


def _typed(name: str, value, kind: type, from_text: bool):
    if kind is bytes:
        if not isinstance(value, bytes):
            raise RequestError(400, f"field {name!r} must be an uploaded file (multipart) or base64 (JSON)")
        return value
    if isinstance(value, bytes):
        raise RequestError(400, f"field {name!r} must be a plain value, not a file")
    if from_text and kind is not str:
        return _from_text(name, value, kind)
    if kind is bool and name == "early_stopping" and value == "never":
        return value
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise RequestError(400, f"field {name!r} must be {_KIND_NAMES[kind]}, got {value!r}")
    return value


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _from_text(name: str, text: str, kind: type):
    if kind is bool:
        choices = {"true": True, "false": False, **({"never": "never"} if name == "early_stopping" else {})}
        if text.strip().lower() not in choices:
            raise RequestError(400, f"field {name!r} must be one of {', '.join(choices)}, got {text!r}")
        return choices[text.strip().lower()]
    try:
        return kind(text.strip())
    except ValueError:
        raise RequestError(400, f"field {name!r} must be {_KIND_NAMES[kind]}, got {text!r}") from None


def _check_limits(values: dict, config: ServerConfig) -> None:
    limits = {"num_beams": config.max_num_beams, "max_new_tokens": config.max_new_tokens,
              "num_return_sequences": config.max_num_beams, "k": config.max_k}
    for name, limit in limits.items():
        if name in values and values[name] > limit:
            raise RequestError(400, f"field {name!r} is {values[name]}; this server allows at most {limit}")


def check_image(data: bytes, max_pixels: int) -> tuple[int, int]:
    """Refuse what is not a supported image (415) or has too many pixels (413), before decoding."""
    if image_format(data) is None:
        raise RequestError(415, f"field 'image' is not a supported image file (supported: {SUPPORTED_FORMATS})")
    size = image_size(data)
    if size is None:
        raise RequestError(400, "field 'image': its header could not be read; the file is damaged or cut short")
    width, height = size
    if width * height > max_pixels:
        raise RequestError(413, f"field 'image' is {width}x{height} = {width * height} pixels; "
                                f"the limit is {max_pixels} pixels")
    if width < 1 or height < 1:
        raise RequestError(400, f"field 'image' says it is {width}x{height} pixels")
    return size
