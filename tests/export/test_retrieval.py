"""Retrieval bundles (CLIP, BLIP image-text retrieval) against the torch models they came from."""
import json
import subprocess
import sys
import warnings

import cv2
import numpy as np
import pytest
import torch
from torch.nn import functional as F

import edgerun
from edgerun.bundle import open_bundle
from edgerun.errors import ExportError, InputError, OptionError
from edgerun.export.pipeline import export
from edgerun.export.retrieval import check_embeddings
from edgerun.models.tiny_retrieval import save_blip_retrieval, save_clip
from edgerun.runtime import retrieval

MIN_COSINE = 0.9999
TEXTS = ["a dog", "a picture of a red car on the street near the large tree", "two cats", "sky",
         "café über Zürich — 東京 🙂"]


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    """RGB images of different sizes and aspect ratios (CLIP resizes the short side, then crops)."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 57), (32, 32), (45, 71), (50, 50), (33, 90)]
    return [rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(n)]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


class Family:
    """One tiny checkpoint, its bundle, the torch model and HF tokenizer, exported once per module."""

    def __init__(self, folder, bundle, torch_model, tokenizer):
        self.folder, self.bundle, self.torch, self.tokenizer = folder, bundle, torch_model, tokenizer
        self.model = edgerun.load(bundle, threads=1)

    def hf_text(self, texts, **kw):
        enc = self.tokenizer(list(texts), padding=True, return_tensors="pt", **kw)
        return enc["input_ids"], enc["attention_mask"]


def _family(tmp_path_factory, name, save, cls):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp(name)
    folder = save(root / "ckpt", seed=1)
    report = export(f"hf:{folder}", task="retrieval", output=root / "bundle")
    torch.set_num_threads(1)
    return Family(folder, report.path, cls.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from transformers import CLIPModel

    return _family(tmp_path_factory, "clip", save_clip, CLIPModel)


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    from transformers import BlipForImageTextRetrieval

    return _family(tmp_path_factory, "blip-itr", save_blip_retrieval, BlipForImageTextRetrieval)


def _torch_image_embeds(fam: Family, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        px = torch.from_numpy(pixels)
        if fam.model.manifest.model["family"] == "clip":
            feats = fam.torch.get_image_features(pixel_values=px).pooler_output
        else:
            feats = fam.torch.vision_proj(fam.torch.vision_model(pixel_values=px).last_hidden_state[:, 0])
        return F.normalize(feats, dim=-1).numpy()


def _torch_text_embeds(fam: Family, ids, mask) -> np.ndarray:
    with torch.no_grad():
        if fam.model.manifest.model["family"] == "clip":
            feats = fam.torch.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        else:
            feats = fam.torch.text_proj(fam.torch.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0])
        return F.normalize(feats, dim=-1).numpy()


# --- the bundles ---------------------------------------------------------------------------------------


def test_bundle_layout_and_manifest(clip, blip):
    c = open_bundle(clip.bundle, verify="full").manifest
    assert c.tasks["retrieval"].modules == ("image_embed", "text_embed")
    assert c.modules["text_embed"].inputs[0].shape == ("batch", "seq")
    assert c.model["embedding_dim"] == 16 and c.model["has_itm"] is False
    assert c.model["max_text_length"] == 32 and c.model["pad_id"] == clip.tokenizer.pad_token_id
    assert c.preprocess["resize_mode"] == "shortest_edge" and c.preprocess["crop_size"] == [32, 32]
    b = open_bundle(blip.bundle, verify="full").manifest
    assert b.tasks["retrieval"].modules == ("vision", "image_proj", "text_embed", "itm")
    assert {k: m.extra["role"] for k, m in b.modules.items()} == {
        "vision": "image_encoder", "image_proj": "image_embedder", "text_embed": "text_embedder", "itm": "itm",
        "vision@cpu": "image_encoder"}  # its attention fused for onnxruntime's CPU provider
    itm = b.modules["itm"]
    assert [t.name for t in itm.inputs] == ["image_features", "input_ids", "attention_mask"]
    assert itm.inputs[0].shape[0] == "batch" and itm.inputs[1].shape == ("rows", "seq")
    assert b.model["has_itm"] is True and b.model["itm_first_token_id"] is None and b.model["pad_id"] == 0
    for m in (c, b):
        assert all(0 <= mod.extra["max_abs_diff"] < 1e-4 for mod in m.modules.values())


# --- parity with torch -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["clip", "blip"])
def test_image_embeddings_match_torch_and_hf_processor(name, request):
    import transformers

    fam = request.getfixturevalue(name)
    images = _images(5)
    pixels = fam.model.pixel_values(images)
    proc_cls = getattr(transformers, "CLIPImageProcessorPil" if name == "clip" else "BlipImageProcessorPil")
    from PIL import Image

    ref_pixels = proc_cls.from_pretrained(fam.folder)(images=[Image.fromarray(im) for im in images],
                                                      return_tensors="np")["pixel_values"]
    assert np.abs(pixels - ref_pixels).max() < 1e-5
    got = fam.model.embed_images(images)
    assert got.dtype == np.float32 and got.shape == (5, 16)
    assert _cosines(got, _torch_image_embeds(fam, pixels)).min() >= MIN_COSINE
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", ["clip", "blip"])
def test_text_embeddings_match_torch_with_padding_and_non_ascii(name, request):
    fam = request.getfixturevalue(name)
    ids, mask = fam.hf_text(TEXTS)
    assert mask.sum(1).min() < ids.shape[1]  # the batch is padded
    assert [retrieval.encode_texts(fam.model, [t])[0] for t in TEXTS] == [
        row[m.bool()].tolist() for row, m in zip(ids, mask)]
    got = fam.model.embed_texts(TEXTS)
    want = _torch_text_embeds(fam, ids, mask)
    assert _cosines(got, want).min() >= MIN_COSINE
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # one text alone (no padding) gives the same embedding as inside the padded batch
    assert _cosines(fam.model.embed_texts([TEXTS[0]]), got[:1]).min() >= MIN_COSINE


def test_blip_itm_scores_match_torch(blip):
    images = _images(2, seed=4)
    ids, mask = blip.hf_text(TEXTS)
    worst = 0.0
    for image in images:
        pixels = blip.model.pixel_values([image])
        got = blip.model.itm_scores(image, TEXTS)
        with torch.no_grad():
            out = blip.torch(input_ids=ids, pixel_values=torch.from_numpy(pixels).repeat(len(TEXTS), 1, 1, 1),
                             attention_mask=mask, use_itm_head=True)
        want = out.itm_score.softmax(-1)[:, 1].numpy()
        assert got.shape == (len(TEXTS),) and got.dtype == np.float32
        worst = max(worst, float(np.abs(got - want).max()))
        np.testing.assert_array_equal(blip.model.itm_scores(pixel_values=pixels, texts=TEXTS), got)
    assert worst <= 1e-4


def test_blip_itc_similarity_matches_hf_forward(blip):
    images = _images(3, seed=5)
    ids, mask = blip.hf_text(TEXTS)
    pixels = blip.model.pixel_values(images)
    with torch.no_grad():
        sim = blip.torch(input_ids=ids, pixel_values=torch.from_numpy(pixels), attention_mask=mask,
                         use_itm_head=False).itm_score.numpy()
    got = blip.model.embed_images(pixel_values=pixels) @ blip.model.embed_texts(TEXTS).T
    assert np.abs(got - sim).max() < 1e-4


def test_clip_legacy_eos_config_pools_at_highest_id(tmp_path):
    from transformers import CLIPModel

    folder = save_clip(tmp_path / "ckpt", legacy_eos=True, seed=2)
    path = export(f"hf:{folder}", task="retrieval", output=tmp_path / "bundle").path
    fam = Family(folder, path, CLIPModel.from_pretrained(folder).eval(), None)
    assert fam.torch.config.text_config.eos_token_id == 2
    assert fam.model.manifest.model["text_pooling"] == "max_id"
    from transformers import AutoTokenizer

    fam.tokenizer = AutoTokenizer.from_pretrained(folder)
    got = fam.model.embed_texts(TEXTS)
    assert _cosines(got, _torch_text_embeds(fam, *fam.hf_text(TEXTS))).min() >= MIN_COSINE


# --- inputs ------------------------------------------------------------------------------------------


def test_paths_bytes_arrays_and_pixel_values_give_the_same_embeddings(clip, tmp_path):
    images = _images(3, seed=7)
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"ïmage {i}.png")
        assert cv2.imwrite(str(tmp_path / f"tmp{i}.png"), im[..., ::-1])
        (tmp_path / f"tmp{i}.png").rename(paths[-1])
    from_arrays = clip.model.embed_images(images)
    np.testing.assert_array_equal(clip.model.embed_images(paths), from_arrays)
    np.testing.assert_array_equal(clip.model.embed_images([str(p) for p in paths]), from_arrays)
    np.testing.assert_array_equal(clip.model.embed_images([p.read_bytes() for p in paths]), from_arrays)
    np.testing.assert_array_equal(clip.model.embed_images(iter(images)), from_arrays)
    pixels = clip.model.pixel_values(images)
    np.testing.assert_allclose(clip.model.embed_images(pixel_values=pixels), from_arrays, atol=1e-6)


def test_batches_give_the_same_results_as_one_call(blip, monkeypatch):
    images = _images(5, seed=8)
    texts = TEXTS * 2
    whole = blip.model.embed_images(images), blip.model.embed_texts(texts), blip.model.itm_scores(images[0], texts)
    monkeypatch.setattr(retrieval, "IMAGE_BATCH", 2)
    monkeypatch.setattr(retrieval, "TEXT_BATCH", 3)
    parts = blip.model.embed_images(images), blip.model.embed_texts(texts), blip.model.itm_scores(images[0], texts)
    for a, b in zip(whole, parts):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name", ["clip", "blip"])
def test_long_text_is_truncated_like_hf_with_a_warning(name, request):
    fam = request.getfixturevalue(name)
    limit = fam.model.manifest.model["max_text_length"]
    long = "a picture of a dog sitting on the grass near the red car " * 6
    with pytest.warns(UserWarning, match=f"1 text\\(s\\) longer than the model's {limit} tokens were truncated"):
        got = fam.model.embed_texts([long, "a dog"])
    ids, mask = fam.hf_text([long, "a dog"], truncation=True, max_length=limit)
    assert ids.shape[1] == limit
    with pytest.warns(UserWarning, match="truncated"):
        assert retrieval.encode_texts(fam.model, [long])[0] == ids[0].tolist()  # the end token is kept
    assert _cosines(got, _torch_text_embeds(fam, ids, mask)).min() >= MIN_COSINE
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fam.model.embed_texts(["a dog"])


# --- errors ------------------------------------------------------------------------------------------


def test_errors_name_what_is_wrong(clip, blip, blip_bundle):
    caption = edgerun.load(blip_bundle, threads=1)
    with pytest.raises(OptionError, match="does not serve retrieval; it serves: caption"):
        caption.embed_texts(["a dog"])
    with pytest.raises(OptionError, match="no image-text matching head"):
        clip.model.itm_scores(_images(1)[0], ["a dog"])
    m = blip.model
    image = _images(1)[0]
    cases = [
        (lambda: m.embed_texts([]), "at least one text"),
        (lambda: m.embed_texts("a dog"), "list of strings"),
        (lambda: m.embed_texts(["a dog", 3]), "text 1 is int"),
        (lambda: m.embed_texts([b"a dog"]), "text 0 is bytes"),
        (lambda: m.embed_images([]), "at least one image"),
        (lambda: m.embed_images(), "exactly one of images or pixel_values"),
        (lambda: m.embed_images([image], pixel_values=m.pixel_values([image])), "exactly one"),
        (lambda: m.embed_images("photo.jpg"), "list of images"),
        (lambda: m.embed_images(image), "list of images"),
        (lambda: m.embed_images(pixel_values=np.zeros((1, 3, 8, 8), np.float32)), r"\(n, 3, 32, 32\)"),
        (lambda: m.embed_images(pixel_values=np.zeros((2, 3, 32, 32))), "float32"),
        (lambda: m.itm_scores(image, []), "at least one text"),
        (lambda: m.itm_scores([image, image], ["a dog"]), "one image, not a list"),
        (lambda: m.itm_scores(pixel_values=m.pixel_values([image, image]), texts=["a dog"]), "holds 2"),
        (lambda: m.itm_scores(texts=["a dog"]), "exactly one of image or pixel_values"),
    ]
    for call, message in cases:
        with pytest.raises(InputError, match=message):
            call()


def test_parity_check_refuses_a_wrong_embedding():
    want = np.eye(3, 8, dtype=np.float32)
    assert check_embeddings("x", want + 1e-7, want, None) < 1e-6
    with pytest.raises(ExportError, match="min cosine"):
        check_embeddings("x", np.roll(want, 1, axis=1), want, None)


def test_runtime_retrieval_imports_no_torch(blip, clip):
    code = f"""
import sys, json
import numpy as np
import edgerun
image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
for path in {json.dumps([str(clip.bundle), str(blip.bundle)])}:
    m = edgerun.load(path, threads=1)
    assert m.embed_images([image]).shape == (1, 16)
    assert m.embed_texts(["a dog", "café"]).shape == (2, 16)
    if m.manifest.model["has_itm"]:
        assert m.itm_scores(image, ["a dog"]).shape == (1,)
print(json.dumps(sorted(k for k in ("torch", "transformers") if k in sys.modules)))
"""
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
