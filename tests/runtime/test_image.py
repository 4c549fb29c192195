import io
import struct

import cv2
import numpy as np
import pytest

from edgerun.errors import InputError
from edgerun.runtime.image import composite_on_white, exif_orientation, load_image

Image = pytest.importorskip("PIL.Image")
ImageOps = pytest.importorskip("PIL.ImageOps")
skdata = pytest.importorskip("skimage.data")


def _encode(array: np.ndarray, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **save_args)
    return buffer.getvalue()


def _hf_convert_to_rgb(pil_image) -> np.ndarray:
    """What transformers' PIL image processors see: convert_to_rgb(PIL image) as an array."""
    image_transforms = pytest.importorskip("transformers.image_transforms")
    return image_transforms.convert_to_rgb(pil_image, return_numpy=True)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return skdata.chelsea()  # 300 x 451 RGB


@pytest.fixture(scope="module")
def marked() -> np.ndarray:
    """A small non-square image whose every pixel differs, so any flip or rotation shows."""
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)


# --- arrays -----------------------------------------------------------------------------------------


def test_rgb_uint8_array_is_returned_unchanged(photo):
    out = load_image(photo)
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, photo)


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1)])
def test_grayscale_array_is_repeated_to_three_channels(shape):
    gray = np.arange(35, dtype=np.uint8).reshape(shape)
    out = load_image(gray)
    assert out.shape == (5, 7, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], gray.reshape(5, 7))


def test_rgba_array_matches_pil_composite_on_white():
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (33, 17, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0
    rgba[1, :, 3] = 255
    expected = _hf_convert_to_rgb(Image.fromarray(rgba, "RGBA"))
    np.testing.assert_array_equal(load_image(rgba), expected)


def test_composite_matches_pil_for_every_value_and_alpha():
    value, alpha = np.meshgrid(np.arange(256), np.arange(256))
    rgba = np.stack([value, 255 - value, value, alpha], axis=-1).astype(np.uint8)
    white = Image.new("RGBA", (256, 256), (255, 255, 255, 255))
    expected = np.array(Image.alpha_composite(white, Image.fromarray(rgba, "RGBA")).convert("RGB"))
    np.testing.assert_array_equal(composite_on_white(rgba), expected)


def test_uint16_array_is_scaled_to_8_bit():
    values = np.array([[0, 128, 129, 257, 385, 386, 65535]], dtype=np.uint16)
    out = load_image(values)
    np.testing.assert_array_equal(out[..., 0], np.round(values / 257).astype(np.uint8))


def test_float_array_is_scaled_and_rounded():
    values = np.array([[[0.0, 0.5, 1.0], [0.2, 0.0019, 0.998]]], dtype=np.float32)
    np.testing.assert_array_equal(load_image(values), np.round(values.astype(np.float64) * 255).astype(np.uint8))


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((4, 4, 2), np.uint8), r"shape \(4, 4, 2\); expected"),
        (np.zeros((4, 4, 3, 1), np.uint8), r"shape \(4, 4, 3, 1\); expected"),
        (np.zeros((0, 4, 3), np.uint8), "at least 1"),
        (np.zeros((4, 4, 3), np.int32), "dtype int32; supported: uint8, uint16, or float"),
        (np.zeros((4, 4, 3), bool), "dtype bool"),
        (np.full((4, 4, 3), 1.5, np.float32), r"values in \[1.5, 1.5\]; float images must lie in \[0, 1\]"),
        (np.full((4, 4, 3), np.nan), "float images must lie in"),
    ],
)
def test_unusable_arrays_raise(array, match):
    with pytest.raises(InputError, match=match):
        load_image(array)


def test_unsupported_source_type_raises():
    with pytest.raises(InputError, match="type int is not supported.*path.*bytes.*numpy"):
        load_image(3)


# --- files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, suffix", [("PNG", "png"), ("BMP", "bmp"), ("TIFF", "tiff"), ("WEBP", "webp")])
def test_lossless_files_decode_to_the_pixels_written(tmp_path, photo, fmt, suffix):
    path = tmp_path / f"cat.{suffix}"
    extra = {"lossless": True} if fmt == "WEBP" else {}
    path.write_bytes(_encode(photo, fmt, **extra))
    np.testing.assert_array_equal(load_image(path), photo)
    np.testing.assert_array_equal(load_image(str(path)), photo)


def test_jpeg_decodes_like_pil(tmp_path, photo):
    data = _encode(photo, "JPEG", quality=90)
    expected = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    diff = np.abs(load_image(data).astype(int) - expected)
    assert diff.max() <= 1  # both use libjpeg-turbo; equal in practice
    np.testing.assert_array_equal(load_image(bytearray(data)), load_image(memoryview(data)))


def test_jpeg_with_data_after_its_end_marker_loads(photo):
    data = _encode(photo, "JPEG") + b"\x00\xff\xda trailing bytes such as an appended video"
    assert load_image(data).shape == photo.shape


def test_non_ascii_file_name(tmp_path, marked):
    path = tmp_path / "фото_猫 é.png"
    path.write_bytes(_encode(marked, "PNG"))
    np.testing.assert_array_equal(load_image(path), marked)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_png_matches_transformers_convert_to_rgb(tmp_path, mode):
    rng = np.random.default_rng(1)
    if mode == "P":
        image = Image.fromarray(rng.integers(0, 4, (20, 30), dtype=np.uint8), "P")
        image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 90, 90, 90])
        save_args = {"transparency": 1}
    else:
        channels = 4 if mode == "RGBA" else 2
        image = Image.fromarray(rng.integers(0, 256, (20, 30, channels), dtype=np.uint8), mode)
        save_args = {}
    path = tmp_path / f"{mode}.png"
    image.save(path, **save_args)
    np.testing.assert_array_equal(load_image(path), _hf_convert_to_rgb(Image.open(path)))


def test_16_bit_png(tmp_path):
    rng = np.random.default_rng(2)
    rgb16 = rng.integers(0, 65536, (9, 11, 3), dtype=np.uint16)
    gray16 = rgb16[..., 0].copy()
    for name, array in (("rgb.png", rgb16), ("gray.png", gray16)):
        path = tmp_path / name
        written = array[..., ::-1] if array.ndim == 3 else array  # cv2 writes BGR
        assert cv2.imwrite(str(path), np.ascontiguousarray(written))
        expected = np.round(array / 257).astype(np.uint8)
        out = load_image(path)
        np.testing.assert_array_equal(out, expected if array.ndim == 3 else np.stack([expected] * 3, -1))


def _tiff_with_orientation(orientation: int, order: str) -> bytes:
    """A minimal TIFF/EXIF block: header, IFD0 with one SHORT entry, no next IFD."""
    mark = b"II" if order == "<" else b"MM"
    header = mark + struct.pack(order + "HI", 42, 8)
    entry = struct.pack(order + "HHI", 0x0112, 3, 1) + struct.pack(order + "H", orientation) + b"\x00\x00"
    return header + struct.pack(order + "H", 1) + entry + struct.pack(order + "I", 0)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil_exif_transpose(tmp_path, marked, fmt, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    extra = {"lossless": True} if fmt == "WEBP" else {}
    path = tmp_path / f"o{orientation}.{fmt.lower()}"
    Image.fromarray(marked).save(path, fmt, exif=exif.tobytes(), **extra)
    expected = np.array(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    out = load_image(path)
    assert out.shape == expected.shape
    assert np.abs(out.astype(int) - expected).max() <= 1
    if orientation in (5, 6, 7, 8):
        assert out.shape[:2] == marked.shape[1::-1]


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_in_both_byte_orders(marked, order, orientation):
    data = _encode(marked, "JPEG", exif=b"Exif\x00\x00" + _tiff_with_orientation(orientation, order))
    expected = np.array(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert np.abs(load_image(data).astype(int) - expected).max() <= 1


@pytest.mark.parametrize(
    "block, expected",
    [
        (_tiff_with_orientation(6, "<"), 6),
        (_tiff_with_orientation(8, ">"), 8),
        (_tiff_with_orientation(9, "<"), 1),
        (_tiff_with_orientation(0, ">"), 1),
        (b"II*\x00\xff\xff\xff\x00", 1),
        (b"not a tiff block", 1),
        (b"", 1),
    ],
)
def test_exif_orientation_parser(block, expected):
    assert exif_orientation(block) == expected


# --- unusable files ---------------------------------------------------------------------------------


def test_missing_path_raises(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(InputError, match=f"image {path} does not exist"):
        load_image(path)


def test_directory_raises(tmp_path):
    with pytest.raises(InputError, match=f"image {tmp_path} is a directory"):
        load_image(tmp_path)


def test_empty_file_raises(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(InputError, match=f"image {path} is empty"):
        load_image(path)


def test_text_file_raises(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not a picture\n")
    match = f"image {path} could not be decoded: not an image file.*supported: jpg, png, webp, bmp, tiff"
    with pytest.raises(InputError, match=match):
        load_image(path)


def test_garbage_bytes_raise():
    with pytest.raises(InputError, match="image bytes could not be decoded"):
        load_image(b"\x00\x01\x02garbage" * 10)


@pytest.mark.parametrize(
    "fmt, match",
    [
        ("JPEG", "truncated: the JPEG data ends"),
        ("PNG", "truncated: the PNG data ends before its IEND chunk"),
        ("WEBP", "truncated: the WebP data has"),
        ("BMP", "truncated: the BMP data has"),
    ],
)
def test_file_cut_in_half_raises(tmp_path, photo, fmt, match):
    data = _encode(photo, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=f"image {path} is {match}"):
        load_image(path)


def test_jpeg_missing_only_its_end_marker_raises(photo):
    data = _encode(photo, "JPEG")
    assert data.endswith(b"\xff\xd9")
    with pytest.raises(InputError, match="image bytes is truncated: the JPEG data"):
        load_image(data[:-2])


def test_truncated_tiff_raises(tmp_path, photo):
    data = _encode(photo, "TIFF")
    path = tmp_path / "cut.tiff"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=f"image {path}"):
        load_image(path)
