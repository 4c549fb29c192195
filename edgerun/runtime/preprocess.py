"""Image preprocessing that reproduces the training side (PIL resize + transformers' image processors).

``resize`` re-implements Pillow's ``Image.resize`` for 8-bit images in numpy: the same tap weights
(support widened by the scale factor when downscaling, so it antialiases), the same 22-bit
fixed-point coefficients and rounding, horizontal pass first. The result is the same byte for byte.
``preprocess`` then does transformers' crop, rescale and normalise in the same float32 arithmetic.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgerun.errors import InputError, OptionError

RESAMPLE_MODES = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
RESIZE_MODES = ("exact", "shortest_edge")
CHANNEL_ORDERS = ("rgb", "bgr")
LAYOUTS = ("nchw", "nhwc")
# PIL.Image.Resampling codes, as Hugging Face processor configs store them
PIL_RESAMPLE_CODES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

_PRECISION_BITS = 22  # Pillow's fixed-point coefficients for 8-bit images: 32 - 8 - 2


# --- resize ---------------------------------------------------------------------------------------


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _box(x: np.ndarray) -> np.ndarray:
    return np.where((x > -0.5) & (x <= 0.5), 1.0, 0.0)


def _sinc(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(x == 0.0, 1.0, np.sin(x * math.pi) / (x * math.pi))


def _lanczos(x: np.ndarray) -> np.ndarray:
    return np.where((x >= -3.0) & (x < 3.0), _sinc(x) * _sinc(x / 3), 0.0)


def _hamming(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    # Pillow writes the window's constants as C floats: 0.54f and 0.46f
    c54, c46 = float(np.float32(0.54)), float(np.float32(0.46))
    with np.errstate(invalid="ignore", divide="ignore"):
        px = x * math.pi
        window = np.sin(px) / px * (c54 + c46 * np.cos(px))
    return np.where(x == 0.0, 1.0, np.where(x >= 1.0, 0.0, window))


# filter function and its support (in source pixels at scale 1), as Pillow defines them
_FILTERS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
    "box": (_box, 0.5),
    "bilinear": (_bilinear, 1.0),
    "hamming": (_hamming, 1.0),
    "bicubic": (_bicubic, 2.0),
    "lanczos": (_lanczos, 3.0),
}


def _tap_weights(in_size: int, out_size: int, resample: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-output source window and fixed-point weights along one axis, as Pillow precomputes them.

    returns : (first, weights); first: int64 (out_size,), the first source index of each window;
        weights: int32 (out_size, taps), 22-bit fixed-point, zero past the end of a window.
    """
    kernel, base_support = _FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = base_support * filterscale
    taps = math.ceil(support) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C casts truncate
    stop = np.minimum((center + support + 0.5).astype(np.int64), in_size)
    offsets = np.arange(taps)
    inside = offsets[None, :] < (stop - first)[:, None]
    source = (first[:, None] + offsets[None, :]).astype(np.float64)
    weights = np.where(inside, kernel((source - center[:, None] + 0.5) * (1.0 / filterscale)), 0.0)
    total = np.zeros((out_size, 1))
    for tap in range(taps):  # summed in order, as Pillow does, so the weights match to the last bit
        total[:, 0] += weights[:, tap]
    weights = np.divide(weights, total, out=weights, where=total != 0.0)
    scaled = weights * (1 << _PRECISION_BITS)
    fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5))
    return first, fixed.astype(np.int32)


def _resample_rows(image: np.ndarray, out_size: int, resample: str) -> np.ndarray:
    """Resample axis 0 of a uint8 array (rows, ...) to out_size rows with Pillow's 8-bit arithmetic."""
    in_size = image.shape[0]
    first, weights = _tap_weights(in_size, out_size, resample)
    acc = np.full((out_size,) + image.shape[1:], 1 << (_PRECISION_BITS - 1), dtype=np.int32)
    product = np.empty_like(acc)
    trailing = (1,) * (image.ndim - 1)
    for tap in range(weights.shape[1]):
        column = weights[:, tap]
        if not column.any():
            continue
        rows = np.minimum(first + tap, in_size - 1)  # clamped rows carry a zero weight
        np.multiply(image[rows], column.reshape((out_size,) + trailing), out=product)
        acc += product
    np.right_shift(acc, _PRECISION_BITS, out=acc)
    return np.clip(acc, 0, 255).astype(np.uint8)


def _swap_rows_and_columns(image: np.ndarray) -> np.ndarray:
    """(H, W[, C]) -> contiguous (W, H[, C]); cv2.transpose is several times faster than numpy's copy."""
    if image.ndim == 2 or image.shape[2] <= 4:
        return cv2.transpose(image).reshape((image.shape[1], image.shape[0]) + image.shape[2:])
    return np.ascontiguousarray(image.swapaxes(0, 1))


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    # Pillow's nearest resize is an affine scale: it starts at scale / 2 and adds scale per pixel
    scale = in_size / out_size
    steps = np.full(out_size, scale)
    steps[0] = scale * 0.5
    return np.minimum(np.add.accumulate(steps).astype(np.int64), in_size - 1)


def resize(image: np.ndarray, size: tuple[int, int], resample: str = "bicubic") -> np.ndarray:
    """Resize like Pillow's ``Image.resize(size[::-1], resample)`` on an 8-bit image.

    image : ndarray, shape = (H, W) or (H, W, C), uint8
    size : (height, width) of the result
    resample : one of bicubic, bilinear, nearest, lanczos, box, hamming (Pillow's filters)
    returns : ndarray, shape = (height, width[, C]), uint8
    """
    if resample not in RESAMPLE_MODES:
        raise OptionError(f"resample {resample!r} is not supported; valid: {', '.join(RESAMPLE_MODES)}")
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3):
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InputError(f"resize needs a uint8 array of shape (H, W) or (H, W, C), got {got}")
    height, width = _check_size(size, "size")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"resize needs a non-empty image, got shape {image.shape}")
    if resample == "nearest":
        rows = _nearest_indices(image.shape[0], height)
        cols = _nearest_indices(image.shape[1], width)
        return np.ascontiguousarray(image[rows][:, cols])
    out = image
    if _vertical_first(image.shape[:2], (height, width)):
        out = _resample_rows(out, height, resample)
    if width != image.shape[1]:
        # columns are moved to axis 0 for contiguous gathers
        out = _swap_rows_and_columns(_resample_rows(_swap_rows_and_columns(np.ascontiguousarray(out)), width,
                                                    resample))
    if height != out.shape[0]:
        out = _resample_rows(np.ascontiguousarray(out), height, resample)
    return out.copy() if out is image else np.ascontiguousarray(out)


def _vertical_first(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> bool:
    """The pass order Pillow 13 takes, as far as it is known: the shrinking axis first when one axis
    shrinks and the other grows; horizontal first otherwise. Measured on 1,481 random size pairs whose
    two orders differ: exact for every mixed and every enlarging pair. When both axes shrink Pillow
    sometimes goes vertical first by a rule not pinned down (72% of such pairs are horizontal first);
    the two orders then differ only in rounding between the passes, at a few edge pixels."""
    (h, w), (out_h, out_w) = in_hw, out_hw
    return out_h < h and out_w > w


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) with the short side scaled to shortest_edge, computed as transformers'
    ``get_resize_output_image_size(default_to_square=False)`` does (the long side truncated)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def center_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centre crop (H, W, C) to size, zero-padding when the image is smaller, as transformers does."""
    crop_h, crop_w = size
    height, width = image.shape[:2]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return image[top:top + crop_h, left:left + crop_w]
    pad_top, pad_left = max(0, math.ceil((crop_h - height) / 2)), max(0, math.ceil((crop_w - width) / 2))
    canvas = np.zeros((max(crop_h, height), max(crop_w, width)) + image.shape[2:], image.dtype)
    canvas[pad_top:pad_top + height, pad_left:pad_left + width] = image
    top, left = max(0, top + pad_top), max(0, left + pad_left)
    return canvas[top:top + crop_h, left:left + crop_w]


# --- configuration ----------------------------------------------------------------------------------


def _check_size(value: Any, name: str) -> tuple[int, int]:
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    ok = ok and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in value)
    if not ok:
        raise OptionError(f"{name} must be (height, width), two positive integers; got {value!r}")
    return int(value[0]), int(value[1])


def _check_triple(value: Any, name: str, positive: bool = False) -> tuple[float, float, float] | None:
    if value is None:
        return None
    ok = isinstance(value, (tuple, list)) and len(value) == 3
    ok = ok and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in value)
    ok = ok and all(math.isfinite(v) and (v > 0 or not positive) for v in value)
    if not ok:
        kind = "positive finite numbers" if positive else "finite numbers"
        raise OptionError(f"{name} must be None or three {kind} (R, G, B); got {value!r}")
    return tuple(float(v) for v in value)


def _check_choice(value: Any, name: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise OptionError(f"{name} {value!r} is not supported; valid: {', '.join(valid)}")


@dataclass(frozen=True)
class PreprocessConfig:
    """How an RGB uint8 image becomes a model's pixel tensor.

    size : (height, width) for resize_mode "exact"; for "shortest_edge" the short side is scaled to
        size[0] (aspect kept, as transformers computes it) and size[1] is not used.
    crop_size : (height, width) of a centre crop after resizing, or None for no crop.
    resample : Pillow's filter: bicubic, bilinear, nearest, lanczos, box or hamming.
    rescale_factor : multiplies the uint8 values (1.0: no rescaling).
    mean, std : per channel in R, G, B order, or None (both) for no normalisation.
    channel_order : order of the channels in the output tensor, "rgb" or "bgr".
    layout : "nchw" or "nhwc".
    """

    size: tuple[int, int]
    resize_mode: str = "exact"
    crop_size: tuple[int, int] | None = None
    resample: str = "bicubic"
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    channel_order: str = "rgb"
    layout: str = "nchw"

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise lists from JSON to tuples once, here
        set_(self, "size", _check_size(self.size, "size"))
        if self.crop_size is not None:
            set_(self, "crop_size", _check_size(self.crop_size, "crop_size"))
        _check_choice(self.resize_mode, "resize_mode", RESIZE_MODES)
        _check_choice(self.resample, "resample", RESAMPLE_MODES)
        _check_choice(self.channel_order, "channel_order", CHANNEL_ORDERS)
        _check_choice(self.layout, "layout", LAYOUTS)
        factor = self.rescale_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < math.inf:
            raise OptionError(f"rescale_factor must be a positive finite number (1.0 for none); got {factor!r}")
        set_(self, "rescale_factor", float(factor))
        set_(self, "mean", _check_triple(self.mean, "mean"))
        set_(self, "std", _check_triple(self.std, "std", positive=True))
        if (self.mean is None) != (self.std is None):
            raise OptionError("mean and std must be given together, or both None for no normalisation")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (tuples as lists); ``from_dict`` turns it back into an equal config."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise OptionError(f"unknown preprocessing keys {unknown}; valid: {', '.join(valid)}")
        if "size" not in data:
            raise OptionError("preprocessing config needs 'size' (height, width)")
        return cls(**data)

    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> PreprocessConfig:
        """Read a Hugging Face image processor config without importing transformers.

        source : a folder with preprocessor_config.json and/or processor_config.json (settings under
            "image_processor"; preprocessor_config.json wins when both exist), or the settings dict.
        An int ``size`` means shortest_edge when a centre crop follows (CLIP style), else a square.
        """
        settings = source if isinstance(source, dict) else _read_hf_folder(Path(source))
        return cls(**_settings_from_hf(settings))


def _read_hf_folder(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise InputError(f"Hugging Face folder {folder} does not exist or is not a directory")
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path} could not be read as JSON: {exc}") from None
        if key is not None:
            data = data.get(key) if isinstance(data, dict) else None
        if not isinstance(data, dict):
            where = f' under "{key}"' if key else ""
            raise InputError(f"{path} holds no image processor settings{where}")
        return data
    raise InputError(f"{folder} has neither preprocessor_config.json nor processor_config.json")


def _hf_size(value: Any, name: str) -> tuple[int, int] | int:
    """(height, width) from a {"height", "width"} dict or [h, w]; an int from {"shortest_edge"} or an int."""
    if isinstance(value, dict):
        if set(value) >= {"height", "width"}:
            return (value["height"], value["width"])
        if set(value) == {"shortest_edge"}:
            return value["shortest_edge"]
    elif isinstance(value, int) and not isinstance(value, bool):
        return value
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        return tuple(value)
    raise OptionError(
        f'{name} {value!r} is not supported; valid: {{"height": h, "width": w}}, {{"shortest_edge": n}}, an int'
    )


def _settings_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("do_resize", True) is False:
        raise OptionError("do_resize false is not supported: edge-run models take a fixed input size")
    if hf.get("do_pad"):
        raise OptionError("do_pad is not supported; valid image processors resize (and crop) to a fixed size")
    do_crop = bool(hf.get("do_center_crop", False)) and hf.get("crop_size") is not None
    size = _hf_size(hf.get("size"), "size")
    out: dict[str, Any] = {}
    if isinstance(size, tuple):
        out["size"], out["resize_mode"] = size, "exact"
    elif do_crop or isinstance(hf.get("size"), dict):
        out["size"], out["resize_mode"] = (size, size), "shortest_edge"
    else:
        out["size"], out["resize_mode"] = (size, size), "exact"
    if do_crop:
        crop = _hf_size(hf["crop_size"], "crop_size")
        out["crop_size"] = crop if isinstance(crop, tuple) else (crop, crop)
    resample = hf.get("resample", 3)
    if isinstance(resample, str) and resample.lower() in RESAMPLE_MODES:
        out["resample"] = resample.lower()
    elif resample in PIL_RESAMPLE_CODES and not isinstance(resample, bool):
        out["resample"] = PIL_RESAMPLE_CODES[resample]
    else:
        codes = ", ".join(f"{code} {mode}" for code, mode in PIL_RESAMPLE_CODES.items())
        raise OptionError(f"resample {resample!r} is not supported; valid PIL codes: {codes}")
    out["rescale_factor"] = hf.get("rescale_factor", 1 / 255) if hf.get("do_rescale", True) else 1.0
    if hf.get("do_normalize", True):
        out["mean"] = _hf_triple(hf.get("image_mean"), "image_mean")
        out["std"] = _hf_triple(hf.get("image_std"), "image_std")
    return out


def _hf_triple(value: Any, name: str) -> Any:
    if value is None:
        raise OptionError(f"{name} is missing while do_normalize is true; give three numbers (R, G, B)")
    return (value,) * 3 if isinstance(value, (int, float)) else value


# --- the pipeline -----------------------------------------------------------------------------------


def _lookup_tables(cfg: PreprocessConfig) -> np.ndarray:
    """float32 (3, 256): each uint8 value after rescale and normalisation, per RGB channel.

    transformers rescales in float64 and casts to float32, then normalises in float32; doing the same
    per possible value keeps that arithmetic exactly while costing one gather per pixel.
    """
    values = (np.arange(256, dtype=np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.mean is None:
        return np.stack([values] * 3)
    mean = np.asarray(cfg.mean, dtype=np.float32)[:, None]
    std = np.asarray(cfg.std, dtype=np.float32)[:, None]
    return (values[None, :] - mean) / std


def resize_and_crop(image: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """The uint8 stage of preprocessing: (H, W, 3) -> resized and centre-cropped (h, w, 3) uint8."""
    if cfg.resize_mode == "shortest_edge":
        target = shortest_edge_size(image.shape[0], image.shape[1], cfg.size[0])
    else:
        target = cfg.size
    out = resize(image, target, cfg.resample)
    return center_crop(out, cfg.crop_size) if cfg.crop_size is not None else out


def preprocess(images: Sequence[np.ndarray], cfg: PreprocessConfig) -> np.ndarray:
    """Turn RGB images into the model's pixel tensor.

    images : a sequence of ndarray, each shape = (H, W, 3), uint8 RGB (see ``image.load_image``)
    returns : float32, shape = (N, 3, h, w) for layout "nchw", (N, h, w, 3) for "nhwc"
    """
    if isinstance(images, np.ndarray) and images.ndim == 3:
        raise InputError("preprocess takes a sequence of images; wrap a single (H, W, 3) image in a list")
    if len(images) == 0:
        raise InputError("preprocess needs at least one image, got an empty sequence")
    crops = []
    for index, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise InputError(f"image {index} must be an (H, W, 3) uint8 RGB array (see load_image); got {got}")
        crops.append(resize_and_crop(image, cfg))
    shapes = sorted({crop.shape for crop in crops})
    if len(shapes) > 1:
        raise InputError(
            f"images resize to different shapes {shapes}; give crop_size, or use resize_mode 'exact'"
        )
    batch = np.stack(crops)
    tables = _lookup_tables(cfg)
    channels = (2, 1, 0) if cfg.channel_order == "bgr" else (0, 1, 2)
    axis = 1 if cfg.layout == "nchw" else 3
    return np.stack([tables[c][batch[..., c]] for c in channels], axis=axis)
