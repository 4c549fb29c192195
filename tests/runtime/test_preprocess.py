import json
import time

import numpy as np
import pytest

from edgerun.errors import InputError, OptionError
from edgerun.runtime.preprocess import (
    PreprocessConfig,
    center_crop,
    preprocess,
    resize,
    shortest_edge_size,
)

Image = pytest.importorskip("PIL.Image")
skdata = pytest.importorskip("skimage.data")

PIL_CODES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PHOTOS = ("astronaut", "chelsea", "coffee")  # 512x512, 300x451, 400x600


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {name: getattr(skdata, name)() for name in PHOTOS}


def _transformers():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "BlipImageProcessorPil"):
        pytest.skip("needs transformers 5 (BlipImageProcessorPil)")
    return transformers


def _pil_resize(array: np.ndarray, size: tuple[int, int], resample: str) -> np.ndarray:
    return np.array(Image.fromarray(array).resize(size[::-1], PIL_CODES[resample]))


# --- resize against Pillow --------------------------------------------------------------------------


@pytest.mark.parametrize("resample", sorted(PIL_CODES))
@pytest.mark.parametrize("size", [(384, 384), (480, 480), (224, 320), (613, 97), (7, 5)])
def test_resize_matches_pil(photos, resample, size):
    image = photos["chelsea"]
    ours, theirs = resize(image, size, resample), _pil_resize(image, size, resample)
    assert ours.shape == theirs.shape == size + (3,)
    diff = np.abs(ours.astype(int) - theirs)
    assert diff.max() <= 1
    if resample in ("lanczos", "hamming"):  # sin/cos may differ from C's libm in the last bit
        assert np.count_nonzero(diff) <= diff.size // 1000
    else:
        assert np.count_nonzero(diff) == 0


def test_resize_grayscale_and_single_axis_match_pil(photos):
    gray = photos["coffee"][..., 1].copy()
    for size in [(400, 211), (123, 600), (1000, 1000)]:
        np.testing.assert_array_equal(resize(gray, size, "bicubic"), _pil_resize(gray, size, "bicubic"))


def test_resize_to_the_same_size_is_a_copy(photos):
    image = photos["astronaut"]
    out = resize(image, image.shape[:2], "bicubic")
    np.testing.assert_array_equal(out, image)
    assert out is not image


def test_resize_keeps_other_channel_counts():
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 5), dtype=np.uint8)
    out = resize(image, (12, 9), "bilinear")
    assert out.shape == (12, 9, 5)
    np.testing.assert_array_equal(out[..., 2], resize(image[..., 2].copy(), (12, 9), "bilinear"))


def test_resize_of_a_large_photo_is_fast():
    image = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    start = time.perf_counter()
    resize(image, (384, 384), "bicubic")
    assert time.perf_counter() - start < 2.0  # about 0.2 s on two CPU cores


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((np.zeros((4, 4, 3), np.uint8), (2, 2), "cubic"), OptionError, "valid: bicubic, bilinear, nearest"),
        ((np.zeros((4, 4, 3), np.float32), (2, 2), "bicubic"), InputError, "uint8 array"),
        ((np.zeros((4,), np.uint8), (2, 2), "bicubic"), InputError, r"shape \(H, W\) or \(H, W, C\)"),
        ((np.zeros((4, 4, 3), np.uint8), (0, 2), "bicubic"), OptionError, "two positive integers"),
        ((np.zeros((4, 4, 3), np.uint8), (2,), "bicubic"), OptionError, r"size must be \(height, width\)"),
    ],
)
def test_resize_rejects_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        resize(*args)


# --- the pipeline against transformers --------------------------------------------------------------


@pytest.mark.parametrize("size", [(384, 384), (480, 480), (224, 320)])
@pytest.mark.parametrize("name", PHOTOS)
def test_matches_blip_image_processor_pil(photos, name, size):
    transformers = _transformers()
    processor = transformers.BlipImageProcessorPil(size={"height": size[0], "width": size[1]})
    image = photos[name]
    pil = Image.fromarray(image)

    raw_ref = processor(images=pil, do_normalize=False, return_tensors="np")["pixel_values"]
    raw = preprocess([image], PreprocessConfig(size=size))
    assert raw.shape == raw_ref.shape == (1, 3) + size
    assert np.abs(raw - raw_ref).max() * 255 <= 1.0  # 0 in practice: the same bytes

    ref = processor(images=pil, return_tensors="np")["pixel_values"]
    cfg = PreprocessConfig(size=size, mean=tuple(processor.image_mean), std=tuple(processor.image_std))
    out = preprocess([image], cfg)
    assert out.dtype == np.float32
    std = np.asarray(processor.image_std, np.float32).reshape(1, 3, 1, 1)
    assert (np.abs(out - ref) * std * 255).max() <= 1.0 + 1e-4


def test_from_hf_folder_saved_by_blip_processor_matches_it(tmp_path, photos):
    transformers = _transformers()
    processor = transformers.BlipImageProcessorPil()
    processor.save_pretrained(tmp_path)
    cfg = PreprocessConfig.from_hf(tmp_path)
    assert cfg == PreprocessConfig(size=(384, 384), mean=CLIP_MEAN, std=CLIP_STD)
    images = [photos["coffee"], photos["chelsea"]]
    ref = processor(images=[Image.fromarray(i) for i in images], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(preprocess(images, cfg), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", PHOTOS)
def test_shortest_edge_and_crop_match_clip_image_processor_pil(photos, name):
    transformers = _transformers()
    processor = transformers.CLIPImageProcessorPil()  # shortest_edge 224, centre crop 224
    cfg = PreprocessConfig.from_hf(processor.to_dict())
    assert cfg.resize_mode == "shortest_edge" and cfg.crop_size == (224, 224)
    ref = processor(images=Image.fromarray(photos[name]), return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(preprocess([photos[name]], cfg), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("height, width", [(300, 451), (451, 300), (224, 224), (100, 1000), (7, 3)])
def test_shortest_edge_size_matches_transformers(height, width):
    image_transforms = pytest.importorskip("transformers.image_transforms")
    image = np.zeros((height, width, 3), np.uint8)
    for edge in (224, 384, 5):
        expected = image_transforms.get_resize_output_image_size(image, edge, default_to_square=False)
        assert shortest_edge_size(height, width, edge) == tuple(expected)


@pytest.mark.parametrize("shape", [(10, 12), (3, 12), (10, 4), (2, 3), (9, 9)])
def test_center_crop_pads_like_transformers(shape):
    image_transforms = pytest.importorskip("transformers.image_transforms")
    image = np.random.default_rng(3).integers(1, 256, shape + (3,), dtype=np.uint8)
    for size in [(5, 7), (6, 6), (11, 3)]:
        expected = image_transforms.center_crop(image, size, input_data_format="channels_last")
        np.testing.assert_array_equal(center_crop(image, size), expected)


def test_layout_and_channel_order(photos):
    image = photos["chelsea"]
    base = preprocess([image], PreprocessConfig(size=(64, 48), mean=CLIP_MEAN, std=CLIP_STD))
    nhwc = preprocess([image], PreprocessConfig(size=(64, 48), mean=CLIP_MEAN, std=CLIP_STD, layout="nhwc"))
    bgr = preprocess([image], PreprocessConfig(size=(64, 48), mean=CLIP_MEAN, std=CLIP_STD, channel_order="bgr"))
    assert base.shape == (1, 3, 64, 48) and nhwc.shape == (1, 64, 48, 3)
    np.testing.assert_array_equal(nhwc, base.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(bgr, base[:, ::-1])


def test_rescale_and_normalise_arithmetic():
    image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    cfg = PreprocessConfig(size=(16, 16), rescale_factor=1 / 255, mean=(0.5, 0.25, 0.0), std=(0.5, 2.0, 1.0))
    out = preprocess([image], cfg)[0]
    rescaled = (image[..., 0].astype(np.float64) / 255).astype(np.float32)
    expected = (rescaled - np.float32(0.25)) / np.float32(2.0)
    np.testing.assert_array_equal(out[1], expected)
    unscaled = preprocess([image], PreprocessConfig(size=(16, 16), rescale_factor=1.0))[0]
    np.testing.assert_array_equal(unscaled[0], image[..., 0].astype(np.float32))


@pytest.mark.parametrize(
    "images, match",
    [
        ([], "at least one image"),
        (np.zeros((8, 8, 3), np.uint8), "wrap a single"),
        ([np.zeros((8, 8), np.uint8)], r"image 0 must be an \(H, W, 3\) uint8 RGB array"),
        ([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)], "image 1 must be"),
    ],
)
def test_preprocess_rejects_bad_images(images, match):
    with pytest.raises(InputError, match=match):
        preprocess(images, PreprocessConfig(size=(4, 4)))


def test_preprocess_rejects_mixed_shapes_without_crop():
    cfg = PreprocessConfig(size=(4, 4), resize_mode="shortest_edge")
    images = [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 16, 3), np.uint8)]
    with pytest.raises(InputError, match="different shapes.*crop_size"):
        preprocess(images, cfg)
    assert preprocess(images, PreprocessConfig(size=(4, 4), resize_mode="shortest_edge", crop_size=(4, 4))).shape == (
        2, 3, 4, 4)


# --- the config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"size": (0, 4)}, "size must be"),
        ({"size": (4.0, 4)}, "size must be"),
        ({"size": 224}, "size must be"),
        ({"crop_size": (4, -1)}, "crop_size must be"),
        ({"resize_mode": "longest_edge"}, "valid: exact, shortest_edge"),
        ({"resample": "cubic"}, "valid: bicubic, bilinear, nearest, lanczos, box, hamming"),
        ({"channel_order": "RGB"}, "valid: rgb, bgr"),
        ({"layout": "chw"}, "valid: nchw, nhwc"),
        ({"rescale_factor": 0}, "positive finite"),
        ({"rescale_factor": "1/255"}, "positive finite"),
        ({"mean": (0.5, 0.5)}, "three finite numbers"),
        ({"mean": (0.5,) * 3, "std": (1.0, 0.0, 1.0)}, "three positive finite numbers"),
        ({"mean": (0.5,) * 3}, "mean and std must be given together"),
    ],
)
def test_config_validation(changes, match):
    settings = {"size": (8, 8), **changes}
    with pytest.raises(OptionError, match=match):
        PreprocessConfig(**settings)


def test_config_dict_round_trip_through_json():
    cfg = PreprocessConfig(
        size=(384, 480), resize_mode="shortest_edge", crop_size=(384, 384), resample="lanczos",
        rescale_factor=1 / 255, mean=CLIP_MEAN, std=CLIP_STD, channel_order="bgr", layout="nhwc",
    )
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["size"] == [384, 480]
    assert PreprocessConfig.from_dict(data) == cfg
    assert PreprocessConfig.from_dict(PreprocessConfig(size=(2, 3)).to_dict()) == PreprocessConfig(size=(2, 3))


def test_from_dict_rejects_unknown_and_missing_keys():
    with pytest.raises(OptionError, match=r"unknown preprocessing keys \['sise'\]; valid: size, resize_mode"):
        PreprocessConfig.from_dict({"sise": [8, 8]})
    with pytest.raises(OptionError, match="needs 'size'"):
        PreprocessConfig.from_dict({"layout": "nchw"})


BLIP_HF = {
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(CLIP_MEAN),
    "image_std": list(CLIP_STD), "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"height": 384, "width": 384}, "image_processor_type": "BlipImageProcessor",
}


def test_from_hf_on_both_json_layouts(tmp_path):
    blip = PreprocessConfig(size=(384, 384), mean=CLIP_MEAN, std=CLIP_STD)
    only_processor = tmp_path / "processor_only"
    only_processor.mkdir()
    (only_processor / "processor_config.json").write_text(
        json.dumps({"image_processor": BLIP_HF, "processor_class": "BlipProcessor"})
    )
    assert PreprocessConfig.from_hf(only_processor) == blip

    both = tmp_path / "both"
    both.mkdir()
    (both / "preprocessor_config.json").write_text(json.dumps({**BLIP_HF, "size": {"height": 480, "width": 480}}))
    (both / "processor_config.json").write_text(json.dumps({"image_processor": BLIP_HF}))
    assert PreprocessConfig.from_hf(str(both)).size == (480, 480)
    assert PreprocessConfig.from_hf(BLIP_HF) == blip


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"size": 224, "do_center_crop": True, "crop_size": 224},
         {"size": (224, 224), "resize_mode": "shortest_edge", "crop_size": (224, 224)}),
        ({"size": 384}, {"size": (384, 384), "resize_mode": "exact", "crop_size": None}),
        ({"size": {"shortest_edge": 256}}, {"size": (256, 256), "resize_mode": "shortest_edge"}),
        ({"size": {"shortest_edge": 256}, "do_center_crop": True, "crop_size": {"height": 224, "width": 200}},
         {"resize_mode": "shortest_edge", "crop_size": (224, 200)}),
        ({"do_center_crop": False, "crop_size": {"height": 224, "width": 224}}, {"crop_size": None}),
        ({"size": [320, 240]}, {"size": (320, 240)}),
        ({"resample": 0}, {"resample": "nearest"}),
        ({"resample": 1}, {"resample": "lanczos"}),
        ({"resample": 2}, {"resample": "bilinear"}),
        ({"resample": 4}, {"resample": "box"}),
        ({"resample": 5}, {"resample": "hamming"}),
        ({"do_rescale": False}, {"rescale_factor": 1.0}),
        ({"rescale_factor": 0.5}, {"rescale_factor": 0.5}),
        ({"do_normalize": False}, {"mean": None, "std": None}),
        ({"image_mean": 0.5, "image_std": 0.5}, {"mean": (0.5,) * 3, "std": (0.5,) * 3}),
    ],
)
def test_from_hf_settings(changes, expected):
    cfg = PreprocessConfig.from_hf({**BLIP_HF, **changes})
    for key, value in expected.items():
        assert getattr(cfg, key) == value


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"size": {"shortest_edge": 224, "longest_edge": 1333}}, "size .* is not supported; valid"),
        ({"size": {"max_height": 224, "max_width": 224}}, "size .* is not supported; valid"),
        ({"resample": 7}, "valid PIL codes: 0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming"),
        ({"do_resize": False}, "do_resize false is not supported"),
        ({"do_pad": True}, "do_pad is not supported"),
        ({"image_mean": None}, "image_mean is missing"),
    ],
)
def test_from_hf_rejects_what_it_cannot_honour(changes, match):
    with pytest.raises(OptionError, match=match):
        PreprocessConfig.from_hf({**BLIP_HF, **changes})


def test_from_hf_folder_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist or is not a directory"):
        PreprocessConfig.from_hf(tmp_path / "missing")
    with pytest.raises(InputError, match="neither preprocessor_config.json nor processor_config.json"):
        PreprocessConfig.from_hf(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"tokenizer": {}}))
    with pytest.raises(InputError, match='no image processor settings under "image_processor"'):
        PreprocessConfig.from_hf(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(InputError, match="could not be read as JSON"):
        PreprocessConfig.from_hf(tmp_path)


@pytest.mark.parametrize("in_hw, out_hw", [((90, 30), (40, 60)), ((33, 90), (87, 32)), ((200, 50), (64, 97))])
def test_resize_pass_order_matches_pillow_when_axes_go_opposite_ways(in_hw, out_hw):
    """Pillow shrinks first when one axis shrinks and the other grows; the wrong order is off by up to 17."""
    img = np.random.default_rng(sum(in_hw)).integers(0, 256, (*in_hw, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(img).resize(out_hw[::-1], Image.BICUBIC))
    assert np.array_equal(resize(img, out_hw, "bicubic"), want)
