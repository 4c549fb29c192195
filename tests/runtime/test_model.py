import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import edgerun
from edgerun.errors import BundleError, EdgeRunError, InputError, OptionError
from edgerun.runtime.onnxrt import OnnxRuntimeRunner


@pytest.fixture(scope="module")
def model(blip_bundle):
    return edgerun.load(blip_bundle, threads=1)


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory):
    import cv2
    from skimage import data

    path = tmp_path_factory.mktemp("img") / "chelsea.png"
    cv2.imwrite(str(path), cv2.cvtColor(data.chelsea(), cv2.COLOR_RGB2BGR))
    return path


def test_path_array_and_pixel_values_give_the_same_caption(model, photo_path):
    from skimage import data

    by_path = model.caption(photo_path, num_beams=3, max_new_tokens=8)
    by_array = model.caption(data.chelsea(), num_beams=3, max_new_tokens=8)
    pixels = model.pixel_values([data.chelsea()])
    by_pixels = model.caption(pixel_values=pixels, num_beams=3, max_new_tokens=8)
    assert by_path == by_array == by_pixels
    assert isinstance(by_path, edgerun.Caption) and by_path.token_ids[0] == 118


def test_caption_matches_hf_generate_on_a_real_photo(model, blip_torch, blip_checkpoint):
    """The whole path: OpenCV preprocessing + ONNX against BlipImageProcessorPil + generate()."""
    import torch
    from PIL import Image
    from skimage import data
    from transformers import BlipImageProcessorPil

    proc = BlipImageProcessorPil.from_pretrained(blip_checkpoint)
    pixels = proc(images=Image.fromarray(data.astronaut()), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = blip_torch.generate(pixel_values=pixels, num_beams=3, max_new_tokens=10)[0].tolist()
    got = model.caption(data.astronaut(), num_beams=3, max_new_tokens=10)
    stop = want.index(3) + 1 if 3 in want[1:] else len(want)
    assert got.token_ids == want[:stop]


def test_caption_batch_and_return_sequences(model, photo_path):
    from skimage import data

    out = model.caption_batch([photo_path, data.coffee()], num_beams=3, num_return_sequences=2, max_new_tokens=5)
    assert len(out) == 2 and all(len(r) == 2 for r in out)
    assert out[0][0].score >= out[0][1].score
    single = model.caption(data.coffee(), num_beams=3, max_new_tokens=5)
    # one image decodes through the beam-heads variant, a batch through the general decoder: the
    # same tokens, the scores within float rounding
    assert out[1][0].token_ids == single.token_ids and out[1][0].text == single.text
    assert out[1][0].score == pytest.approx(single.score, abs=1e-5)


def test_defaults_come_from_the_generation_config(model):
    opts = model.decoding_options(1)
    assert opts.max_new_tokens == 20 and opts.num_beams == 1
    assert model.decoding_options(1, num_beams=4).num_beams == 4


def test_timings_are_recorded(model, photo_path):
    model.caption(photo_path, num_beams=2, max_new_tokens=4)
    t = model.last_timings
    assert t["preprocess"] > 0 and t["vision"] > 0 and t["decoder"] > 0
    assert t["decoder_calls"] == 4
    # the decoding loop splits into the graph, the cache's upkeep around it and choosing tokens
    assert t["kv_cache"] > 0 and t["beam_bookkeeping"] > 0
    assert t["decoder"] + t["kv_cache"] + t["beam_bookkeeping"] == pytest.approx(t["decode"])


def test_cache_upkeep_is_timed_apart_from_bookkeeping(model, photo_path, monkeypatch):
    """Time spent in the cache's reorder lands in kv_cache, not in beam_bookkeeping."""
    import time as _time

    from edgerun.runtime.kvcache import DecoderInference

    slow = DecoderInference.rearrange_kv_cache

    def rearrange(self, source_indices):
        _time.sleep(0.02)
        slow(self, source_indices)

    model.caption(photo_path, num_beams=3, max_new_tokens=6)
    base = dict(model.last_timings)
    monkeypatch.setattr(DecoderInference, "rearrange_kv_cache", rearrange)
    model.caption(photo_path, num_beams=3, max_new_tokens=6)
    t = model.last_timings
    assert t["kv_cache"] >= base["kv_cache"] + 0.02  # at least one reorder slept
    assert t["beam_bookkeeping"] < base["beam_bookkeeping"] + 0.02


@pytest.mark.parametrize("options, match", [
    ({"num_beams": 0}, "num_beams must be >= 1, got 0"),
    ({"max_new_tokens": -1}, "max_new_tokens must be >= 1, got -1"),
    ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
    ({"early_stopping": "sometimes"}, "early_stopping"),
    ({"num_beam": 3}, "unknown option.*num_beam; valid: num_beams"),
    ({"max_new_tokens": 100}, "exceeds the model's 64 positions"),
])
def test_bad_options(model, photo_path, options, match):
    with pytest.raises(OptionError, match=match):
        model.caption(photo_path, **options)


def test_bad_inputs(model, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="missing.png"):
        model.caption(tmp_path / "missing.png")
    with pytest.raises(InputError, match="notes.txt"):
        model.caption(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="exactly one of image or pixel_values"):
        model.caption()
    with pytest.raises(InputError, match=r"pixel_values must be float32 of shape \(n, 3, 32, 32\)"):
        model.caption(pixel_values=np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(InputError, match="batch of 1"):
        model.caption(pixel_values=np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(InputError, match="non-empty list"):
        model.caption_batch([])


def test_truncated_image(model, photo_path, tmp_path):
    data = photo_path.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.png"):
        model.caption(cut)


def test_bad_backend_and_threads(blip_bundle):
    with pytest.raises(OptionError, match="unknown backend 'tpu'; valid: cpu, cuda, ort-trt"):
        edgerun.load(blip_bundle, backend="tpu")
    with pytest.raises(OptionError, match="threads must be a positive integer"):
        edgerun.load(blip_bundle, threads=0)


@pytest.mark.parametrize("content", [b"", b"\x08\x07garbage that is not protobuf"])
def test_empty_or_corrupt_onnx_file_is_refused(tmp_path, content):
    path = tmp_path / "m.onnx"
    path.write_bytes(content)
    with pytest.raises(BundleError, match="not a loadable ONNX model"):
        OnnxRuntimeRunner(path)


def test_corrupted_bundle_file_never_runs(blip_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(blip_bundle, copy)
    path = copy / "decoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="decoder.onnx"):
        edgerun.load(copy)


def test_every_error_is_an_edgerun_error():
    for cls in (BundleError, InputError, OptionError):
        assert issubclass(cls, EdgeRunError)


def test_runtime_never_imports_torch(blip_bundle, photo_path, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import edgerun
        model = edgerun.load({str(blip_bundle)!r}, threads=1)
        caption = model.caption({str(photo_path)!r}, num_beams=3, max_new_tokens=5)
        assert caption.text is not None
        banned = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'PIL'))
        print('BANNED', banned)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                         env={"EDGERUN_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "BANNED []" in out.stdout


def test_warm_makes_the_sessions_of_a_task_at_once(blip_bundle):
    import edgerun
    from edgerun.errors import OptionError

    model = edgerun.load(blip_bundle)
    assert model._runners == {}
    model.warm(["caption"])
    assert set(model._runners) == set(model.manifest.tasks["caption"].modules)
    made = dict(model._runners)
    model.warm()  # nothing left to make: the same sessions
    assert model._runners == made
    with pytest.raises(OptionError, match="does not serve vqa"):
        model.warm(["vqa"])


@pytest.mark.parametrize("sources,copies", [([0, 0, 1], 1), ([1, 0, 2], 0), ([2, 0, 1], 0), ([0, 1, 2], 0),
                                            ([2, 2, 2], 2), ([1, 2, 0, 0], 1)])
def test_cache_reorder_is_a_gather_that_copies_only_duplicated_rows(sources, copies):
    from edgerun.runtime.kvcache import DecoderInference

    rows = len(sources)
    dims = {"layers": 2, "heads": 3, "head_dim": 4}
    inference = DecoderInference(None, {}, rows, 6, dims)
    rng = np.random.default_rng(len(sources))
    inference._key[:5] = rng.standard_normal(inference._key[:5].shape)
    inference._value[:5] = rng.standard_normal(inference._value[:5].shape)
    inference.length = 5
    want_key, want_value = inference._key[:5][:, :, sources].copy(), inference._value[:5][:, :, sources].copy()
    inference.rearrange_kv_cache(np.array(sources))
    assert inference.copies == copies  # a permutation moves nothing; a row two beams continue, once
    np.testing.assert_array_equal(inference._key[:5][:, :, inference._phys], want_key)
    np.testing.assert_array_equal(inference._value[:5][:, :, inference._phys], want_value)
    # twice more: the map composes (row r continues what logical row sources[r] held)
    for _ in range(2):
        want_key = want_key[:, :, sources]
        inference.rearrange_kv_cache(np.array(sources))
    np.testing.assert_array_equal(inference._key[:5][:, :, inference._phys], want_key)


class _EchoRunner:
    """A decoder whose logits say which ids it was fed, row by row, and whose new K/V carry them."""

    inputs = ()
    last_time = 0.0

    def infer(self, feeds, check=False):
        ids = feeds["input_ids"][:, -1].astype(np.float32)
        rows, new = feeds["input_ids"].shape
        logits = np.stack([ids, ids * 2], axis=1)
        kv = np.broadcast_to(ids[None, None, :, None, None], (new, 1, rows, 1, 2)).copy()
        return {"logits": logits, "new_key": kv, "new_value": kv + 1}


def test_mapped_rows_are_fed_and_returned_in_logical_order():
    from edgerun.runtime.kvcache import DecoderInference

    inference = DecoderInference(_EchoRunner(), {}, 4, 5, {"layers": 1, "heads": 1, "head_dim": 2}, group=2)
    inference.logits(np.array([[10], [11], [12], [13]]))
    inference.rearrange_kv_cache(np.array([1, 1, 3, 2]))  # group 0: row 1 twice; group 1: swapped
    assert inference.copies == 1 and sorted(inference._phys[:2]) == [0, 1] and sorted(inference._phys[2:]) == [2, 3]
    logits = inference.logits(np.array([[20], [21], [22], [23]]))
    np.testing.assert_array_equal(logits[:, 0], [20, 21, 22, 23])  # logical order, whatever the map
    history = inference._key[:2, 0, :, 0, 0][:, inference._phys]  # (time, logical row)
    np.testing.assert_array_equal(history, [[11, 11, 13, 12], [20, 21, 22, 23]])
    with pytest.raises(Exception, match="groups of 3"):
        DecoderInference(_EchoRunner(), {}, 4, 5, {"layers": 1, "heads": 1, "head_dim": 2}, group=3)


def test_a_reorder_copies_only_the_steps_where_the_rows_histories_differ():
    from edgerun.runtime.kvcache import DecoderInference

    inference = DecoderInference(_EchoRunner(), {}, 2, 6, {"layers": 1, "heads": 1, "head_dim": 2}, group=2)
    for tokens in ([[7], [7]], [[8], [8]], [[1], [2]], [[3], [4]]):  # shared for two steps, then not
        inference.logits(np.array(tokens))
    inference.rearrange_kv_cache(np.array([1, 1]))  # both beams continue row 1
    assert inference.copies == 1 and inference.copied_steps == 2  # steps 0 and 1 were equal already
    history = inference._key[:4, 0, :, 0, 0][:, inference._phys]  # (time, logical row)
    np.testing.assert_array_equal(history, [[7, 7], [8, 8], [2, 2], [4, 4]])
    inference.logits(np.array([[5], [6]]))
    inference.rearrange_kv_cache(np.array([0, 0]))  # histories differ from step 4 only
    assert inference.copies == 2 and inference.copied_steps == 3
    history = inference._key[:5, 0, :, 0, 0][:, inference._phys]
    np.testing.assert_array_equal(history, [[7, 7], [8, 8], [2, 2], [4, 4], [5, 5]])


def test_the_float_decoder_computes_a_row_the_same_wherever_it_sits(blip_bundle):
    """What the reorder's partial copies rely on for token-exact float captions: equal inputs in
    rows 0 and 2 of one call give bit-identical logits and K/V."""
    model = edgerun.load(blip_bundle)
    runner = OnnxRuntimeRunner(model.bundle.file(model.manifest.modules["decoder"].file))  # the time-major graph
    rng = np.random.default_rng(3)
    feeds = {}
    for spec in runner.inputs:
        shape = [{"rows": 3, "past": 4, "batch": 1, "new": 1}.get(d, d) for d in spec.shape]
        feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
    feeds["input_ids"] = np.array([[5], [9], [5]])
    for name in ("past_key", "past_value"):
        feeds[name][:, :, 2] = feeds[name][:, :, 0]
    out = runner.infer(feeds)
    for name in ("logits", "new_key", "new_value"):
        row = (slice(None), slice(None), 0) if name != "logits" else 0
        other = (slice(None), slice(None), 2) if name != "logits" else 2
        np.testing.assert_array_equal(out[name][row], out[name][other])
