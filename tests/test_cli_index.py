import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from edgerun import cli_index
from edgerun.errors import InputError, OptionError
from edgerun.runtime.image import load_image
from edgerun.runtime.index import IndexFileError, IndexModelError

IDENTITY = {"source": "hf:tiny-clip", "revision": "main", "architecture": "CLIPModel", "weights_sha256": "ab" * 32}
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
PROJECTION = np.random.default_rng(0).standard_normal((4 * 4 * 3, 16)).astype(np.float32)


class FakeModel:
    """Images embed as a random projection of a 4x4 thumbnail; a colour word embeds as that colour."""

    def __init__(self, path, identity):
        self.bundle = SimpleNamespace(path=Path(path))
        self.identity = identity

    def embed_images(self, images=None, *, pixel_values=None):
        thumbs = np.stack([cv2.resize(load_image(im), (4, 4), interpolation=cv2.INTER_AREA) for im in images])
        x = thumbs.reshape(len(images), -1).astype(np.float32) @ PROJECTION
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def embed_texts(self, texts):
        colours = [next((COLOURS[w] for w in t.split() if w in COLOURS), (9, 9, 9)) for t in texts]
        return self.embed_images([np.full((4, 4, 3), c, np.uint8) for c in colours])


@pytest.fixture
def bundles(tmp_path, monkeypatch):
    """Three fake bundles: the model, its quantized twin, and another model; loaded through the seam."""
    models = {"model": IDENTITY, "model-int8": {**IDENTITY, "revision": None},
              "other": {**IDENTITY, "weights_sha256": "cd" * 32}}
    paths = {}
    for name in models:
        (tmp_path / name).mkdir()
        paths[name] = str(tmp_path / name)
    monkeypatch.setattr(cli_index, "load_model",
                        lambda bundle: FakeModel(bundle, models[Path(bundle).name]))
    return paths


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    (root / "more").mkdir(parents=True)
    for name, rgb in COLOURS.items():
        cv2.imwrite(str(root / ("more" if name == "blue" else "") / f"{name}.png"),
                    np.full((12, 12, 3), rgb[::-1], np.uint8))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return root


def invoke(command, *args):
    return CliRunner().invoke(command, [str(a) for a in args])


def test_index_prints_a_summary_with_skipped_images(bundles, photos, tmp_path):
    out = invoke(cli_index.index, bundles["model"], photos / "red.png", photos / "more", photos / "broken.jpg",
                 "-o", tmp_path / "idx", "--batch-size", "1")
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].startswith(f"added 2, skipped 1: 2 images in {tmp_path / 'idx'} (exact search only, ")
    assert lines[1].startswith(f"  skipped {photos / 'broken.jpg'}: ") and "truncated" in lines[1]
    out = invoke(cli_index.index, bundles["model-int8"], photos, "-o", tmp_path / "idx", "--add")
    assert out.exit_code == 0, out.output
    assert out.output.startswith("added 1, skipped 1, 2 already indexed: 3 images in ")


def test_index_refuses_another_model_and_an_existing_index(bundles, photos, tmp_path):
    assert invoke(cli_index.index, bundles["model"], photos, "-o", tmp_path / "idx").exit_code == 0
    out = invoke(cli_index.index, bundles["other"], photos, "-o", tmp_path / "idx", "--add")
    assert isinstance(out.exception, IndexModelError)
    out = invoke(cli_index.index, bundles["model"], photos, "-o", tmp_path / "idx")
    assert isinstance(out.exception, IndexFileError) and "--add" in str(out.exception)
    assert invoke(cli_index.index, bundles["model"], photos, "-o", tmp_path / "idx", "--overwrite").exit_code == 0


@pytest.fixture
def index_dir(bundles, photos, tmp_path):
    out = invoke(cli_index.index, bundles["model"], photos, "-o", tmp_path / "idx")
    assert out.exit_code == 0, out.output
    return tmp_path / "idx"


def test_search_text_prints_ranked_paths(index_dir, photos):
    out = invoke(cli_index.search, index_dir, "a green car", "-k", "2")
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert len(lines) == 2 and lines[0].startswith("  1  1.0000  ") and lines[0].endswith(str(photos / "green.png"))
    assert lines[1].startswith("  2  ")


def test_search_json_image_to_image(index_dir, photos, tmp_path):
    query = tmp_path / "query.jpg"
    cv2.imwrite(str(query), np.full((30, 30, 3), COLOURS["blue"][::-1], np.uint8))
    out = invoke(cli_index.search, index_dir, "--image", query, "--json", "-k", "10")
    assert out.exit_code == 0, out.output
    rec = json.loads(out.output)
    assert rec["query"] == {"image": str(query)} and rec["index"] == str(index_dir)
    assert rec["approximate"] is False and rec["ms"] > 0
    assert [r["rank"] for r in rec["results"]] == [1, 2, 3]
    assert rec["results"][0]["path"] == str(photos / "more" / "blue.png")
    assert rec["results"][0]["score"] == pytest.approx(1, abs=1e-3)


def test_search_image_to_texts(index_dir, photos, tmp_path):
    texts = tmp_path / "captions.txt"
    texts.write_text("a blue boat\n\na red kite\na green hill\n")
    out = invoke(cli_index.search, index_dir, "--image", photos / "red.png", "--texts", texts, "--json", "-k", "2")
    assert out.exit_code == 0, out.output
    results = json.loads(out.output)["results"]
    assert (results[0]["text"], results[0]["line"]) == ("a red kite", 3) and len(results) == 2
    out = invoke(cli_index.search, index_dir, "--image", photos / "red.png", "--texts", texts)
    assert out.output.splitlines()[0].endswith("a red kite")


def test_search_bundle_override(index_dir, bundles):
    out = invoke(cli_index.search, index_dir, "red", "--bundle", bundles["model-int8"], "-k", "1")
    assert out.exit_code == 0 and out.output.strip().endswith("red.png")
    out = invoke(cli_index.search, index_dir, "red", "--bundle", bundles["other"])
    assert isinstance(out.exception, IndexModelError) and "different model" in str(out.exception)


def test_search_when_the_recorded_bundle_moved(index_dir, bundles):
    Path(bundles["model"]).rename(Path(bundles["model"]).with_name("elsewhere"))
    out = invoke(cli_index.search, index_dir, "red")
    assert isinstance(out.exception, InputError) and "pass --bundle" in str(out.exception)


@pytest.mark.parametrize("args, match", [
    (["red", "--image", "q.jpg"], "one query"),
    ([], "one query"),
    (["red", "--texts", "t.txt"], "give --image"),
    (["red", "-k", "0"], "-k must be"),
    (["--image", "q.jpg", "--rerank"], "--rerank re-orders a text query"),
])
def test_search_option_mistakes(index_dir, args, match):
    out = invoke(cli_index.search, index_dir, *args)
    assert isinstance(out.exception, OptionError) and match in str(out.exception)


def test_ann_index_and_exact_search(bundles, photos, tmp_path):
    pytest.importorskip("usearch")
    out = invoke(cli_index.index, bundles["model"], photos, "-o", tmp_path / "idx", "--ann")
    assert out.exit_code == 0 and "HNSW graph (M=" in out.output
    for extra in ([], ["--exact"]):
        out = invoke(cli_index.search, tmp_path / "idx", "blue", "--json", "-k", "1", *extra)
        rec = json.loads(out.output)
        assert rec["approximate"] is not bool(extra) and rec["results"][0]["path"].endswith("blue.png")
