import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from edgerun.errors import EdgeRunError, InputError, MissingDependencyError, OptionError
from edgerun.runtime import index as ix
from edgerun.runtime.image import load_image

IDENTITY = {"source": "hf:tiny-clip", "revision": "main", "architecture": "CLIPModel", "weights_sha256": "ab" * 32}
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255),
           "yellow": (255, 255, 0)}
_PROJECTION = np.random.default_rng(0).standard_normal((8 * 8 * 3, 24)).astype(np.float32)


class FakeModel:
    """The retrieval surface of `edgerun.Model`: an image embeds as a fixed random projection of its
    8x8 thumbnail; a text embeds as the solid image of the first colour word in it, else as a hash."""

    def __init__(self, path="bundles/fake", identity=None):
        self.bundle = SimpleNamespace(path=Path(path))
        self.identity = dict(IDENTITY if identity is None else identity)
        self.tasks = ("retrieval",)
        self.images_embedded = 0

    def embed_images(self, images=None, *, pixel_values=None):
        thumbs = [cv2.resize(load_image(im), (8, 8), interpolation=cv2.INTER_AREA) for im in images]
        self.images_embedded += len(thumbs)
        return _unit(np.stack(thumbs).reshape(len(thumbs), -1).astype(np.float32) / 255 @ _PROJECTION)

    def embed_texts(self, texts):
        rows = []
        for text in texts:
            colour = next((COLOURS[w] for w in text.lower().split() if w in COLOURS), None)
            if colour is None:
                rows.append(np.random.default_rng(abs(hash(text)) % 2**32).standard_normal(_PROJECTION.shape[1]))
            else:
                rows.append(self.embed_images([solid(colour)])[0])
        return _unit(np.asarray(rows, np.float32))


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def solid(rgb, size=16):
    return np.full((size, size, 3), rgb, np.uint8)


def save(path: Path, rgb) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = rgb if isinstance(rgb, np.ndarray) else solid(rgb)
    assert cv2.imwrite(str(path), np.ascontiguousarray(image[..., ::-1]))
    return path


@pytest.fixture
def gallery(tmp_path):
    """Five colour images in nested folders with mixed-case suffixes, one corrupt, one truncated,
    one non-image file."""
    root = tmp_path / "photos"
    save(root / "red.jpg", COLOURS["red"])
    save(root / "a" / "green.PNG", COLOURS["green"])
    save(root / "a" / "b" / "blue.Jpeg", COLOURS["blue"])
    save(root / "a" / "white.bmp", COLOURS["white"])
    save(root / "c" / "yellow.TIFF", COLOURS["yellow"])
    (root / "corrupt.jpg").write_bytes(b"not an image at all")
    png = cv2.imencode(".png", solid((1, 2, 3), 64))[1].tobytes()
    (root / "a" / "cut.png").write_bytes(png[: len(png) // 2])
    (root / "notes.md").write_text("not an image")
    return root


def clustered(rng, n, dim=32, centres=20, rank=4):
    """A Gaussian mixture: each cluster varies along its own rank-4 subspace, plus a little noise."""
    c = rng.standard_normal((centres, dim)) / np.sqrt(dim)
    basis = rng.standard_normal((centres, rank, dim)) / np.sqrt(dim)
    label = rng.integers(0, centres, n)
    x = c[label] + np.einsum("nr,nrd->nd", 0.6 * rng.standard_normal((n, rank)), basis[label])
    return _unit(x + 0.05 * rng.standard_normal((n, dim)) / np.sqrt(dim))


def test_round_trip_metadata_and_vectors(gallery, tmp_path):
    model = FakeModel()
    report = ix.build_index(model, [gallery], output=tmp_path / "idx")
    assert (report.added, report.total, report.already, report.ann) == (5, 5, 0, None)
    index = ix.open_index(tmp_path / "idx")
    assert len(index) == 5 and index.dim == 24
    assert [Path(p).name for p in index.items] == ["red.jpg", "green.PNG", "white.bmp", "blue.Jpeg", "yellow.TIFF"]
    np.testing.assert_allclose(index.vectors, model.embed_images(index.items), atol=1e-6)
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert (meta["format"], meta["version"], meta["dim"], meta["count"]) == ("edgerun-index", 1, 24, 5)
    assert meta["identity"] == IDENTITY and meta["bundle"] == os.path.abspath("bundles/fake")
    assert meta["created"] == meta["updated"] and meta["ann"] is None
    assert sorted(os.listdir(tmp_path / "idx")) == sorted(["index.json", *meta["files"].values()])


def test_unreadable_images_are_skipped_and_named(gallery, tmp_path):
    report = ix.build_index(FakeModel(), [gallery, tmp_path / "nowhere.jpg"], output=tmp_path / "idx")
    reasons = {Path(s.path).name: s.reason for s in report.skipped}
    assert set(reasons) == {"corrupt.jpg", "cut.png", "nowhere.jpg"}
    assert "could not be decoded" in reasons["corrupt.jpg"]
    assert "truncated" in reasons["cut.png"] and reasons["nowhere.jpg"] == "does not exist"
    assert report.added == 5


def test_list_file_paths_are_relative_to_it(gallery, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "some.txt").write_text("# chosen photos\n../photos/red.jpg\n\n  ../photos/a/b/blue.Jpeg  \n"
                                    f"{gallery / 'c'}\n../photos/gone.png\n../photos/red.jpg\n")
    report = ix.build_index(FakeModel(), [lists / "some.txt"], output=tmp_path / "idx")
    names = [Path(p).name for p in ix.open_index(tmp_path / "idx").items]
    assert names == ["red.jpg", "blue.Jpeg", "yellow.TIFF"]
    assert [Path(s.path).name for s in report.skipped] == ["gone.png"]


def test_add_appends_and_skips_known_images(gallery, tmp_path):
    model = FakeModel()
    ix.build_index(model, [gallery / "a"], output=tmp_path / "idx")
    created = ix.open_index(tmp_path / "idx").meta.created
    model.images_embedded = 0
    calls = []
    report = ix.build_index(model, [gallery], output=tmp_path / "idx", add=True, batch_size=2,
                            progress=lambda done, total: calls.append((done, total)))
    assert (report.added, report.already, report.total) == (2, 3, 5)
    assert model.images_embedded == 2  # the known images are not embedded again
    assert calls[-1] == (4, 4)  # red, yellow and the two unreadable ones
    index = ix.open_index(tmp_path / "idx")
    assert len(index) == 5 and index.meta.created == created
    assert [Path(p).name for p in index.items[3:]] == ["red.jpg", "yellow.TIFF"]
    again = ix.build_index(model, [gallery], output=tmp_path / "idx", add=True)
    assert (again.added, again.already, again.total) == (0, 5, 5)


def test_add_refuses_another_model_and_accepts_a_quantized_twin(gallery, tmp_path):
    ix.build_index(FakeModel(), [gallery / "a"], output=tmp_path / "idx")
    other = FakeModel(identity={**IDENTITY, "weights_sha256": "cd" * 32})
    with pytest.raises(ix.IndexModelError, match="different model.*weights sha256 abab"):
        ix.build_index(other, [gallery], output=tmp_path / "idx", add=True)
    with pytest.raises(ix.IndexModelError):
        ix.open_index(tmp_path / "idx").search_text(FakeModel(identity={**IDENTITY, "source": "x"}), "red")
    twin = FakeModel("bundles/fake-int8", identity={**IDENTITY, "revision": "other"})
    assert ix.build_index(twin, [gallery], output=tmp_path / "idx", add=True).total == 5
    assert ix.open_index(tmp_path / "idx").meta.bundle == os.path.abspath("bundles/fake")


def test_existing_index_or_foreign_folder_is_not_clobbered(gallery, tmp_path):
    ix.build_index(FakeModel(), [gallery / "a"], output=tmp_path / "idx")
    with pytest.raises(ix.IndexFileError, match="already exists; pass add=True"):
        ix.build_index(FakeModel(), [gallery], output=tmp_path / "idx")
    assert ix.build_index(FakeModel(), [gallery], output=tmp_path / "idx", overwrite=True).total == 5
    assert len(os.listdir(tmp_path / "idx")) == 3  # the old generation is gone
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "thesis.tex").write_text("x")
    with pytest.raises(ix.IndexFileError, match="not an edge-run index"):
        ix.build_index(FakeModel(), [gallery], output=tmp_path / "stuff", overwrite=True)
    with pytest.raises(InputError, match="no image could be indexed"):
        ix.build_index(FakeModel(), [gallery / "corrupt.jpg"], output=tmp_path / "none")
    with pytest.raises(OptionError, match="batch_size"):
        ix.build_index(FakeModel(), [gallery], output=tmp_path / "x", batch_size=0)


def test_search_ranks_text_image_and_texts(gallery, tmp_path):
    model = FakeModel()
    ix.build_index(model, [gallery], output=tmp_path / "idx", batch_size=3)
    index = ix.open_index(tmp_path / "idx")
    for colour in ("red", "green", "blue", "yellow"):
        hits = index.search_text(model, f"a {colour} wall", k=3)
        assert Path(hits[0].item).stem == colour and hits[0].score > hits[1].score >= hits[2].score
    hits = index.search_image(model, solid(COLOURS["white"], 40), k=10)
    assert len(hits) == 5 and Path(hits[0].item).stem == "white" and hits[0].score == pytest.approx(1, abs=1e-5)
    texts = ["a quiet morning", "a green field", "a red door", "the blue sea"]
    ranked = ix.search_texts(model, gallery / "red.jpg", texts, k=2)
    assert (ranked[0].id, ranked[0].item) == (2, "a red door") and len(ranked) == 2
    with pytest.raises(InputError):
        index.search_text(model, "  ")
    with pytest.raises(InputError):
        ix.search_texts(model, gallery / "red.jpg", [])


def test_exact_search_matches_brute_force(tmp_path):
    rng = np.random.default_rng(1)
    vectors = clustered(rng, 300)
    index = ix.write_index(tmp_path / "v", vectors, [f"i{i}" for i in range(300)], bundle="b", identity=IDENTITY)
    queries = clustered(rng, 7)
    scores, ids = index.search_vectors(queries, 5)
    want = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, want, 1), atol=1e-5)
    assert index.search_vectors(queries[:1], 1000)[1].shape == (1, 300)
    with pytest.raises(OptionError, match="k must"):
        index.search_vectors(queries, 0)
    with pytest.raises(InputError, match="dimension 8"):
        index.search_vectors(np.ones((1, 8)), 3)


def test_exact_and_ann_agree_on_a_clustered_gallery(tmp_path):
    pytest.importorskip("usearch")
    rng = np.random.default_rng(2)
    vectors, queries = clustered(rng, 3000), clustered(rng, 100)
    index = ix.write_index(tmp_path / "a", vectors, [str(i) for i in range(3000)], bundle="b", identity=IDENTITY,
                           ann=True)
    assert index.meta.ann == ix.AnnSettings() and index.file("ann").is_file()
    exact_scores, exact = index.search_vectors(queries, 10, exact=True)
    scores, approx = index.search_vectors(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, exact)])
    assert recall >= 0.95 and np.mean(approx[:, 0] == exact[:, 0]) >= 0.95
    found = approx == exact
    np.testing.assert_allclose(scores[found], exact_scores[found], atol=1e-5)
    _, one = index.search_vectors(queries[:1], 10)  # a single query takes usearch's other result type
    np.testing.assert_array_equal(one[0], approx[0])


def test_ann_is_saved_and_extended_on_add(gallery, tmp_path):
    pytest.importorskip("usearch")
    model = FakeModel()
    report = ix.build_index(model, [gallery / "a"], output=tmp_path / "idx", ann=True)
    assert report.ann == ix.AnnSettings()
    reader = ix.open_index(tmp_path / "idx")
    report = ix.build_index(model, [gallery], output=tmp_path / "idx", add=True)  # no ann=: kept anyway
    assert report.ann == ix.AnnSettings() and report.total == 5
    assert not reader.file("ann").exists()  # deleted by the write; the open index still searches it
    assert Path(reader.search_text(model, "green", k=1)[0].item).stem == "green" and len(reader) == 3
    index = ix.open_index(tmp_path / "idx")
    assert len(index._graph()) == 5
    assert Path(index.search_text(model, "yellow", k=1)[0].item).stem == "yellow"
    assert Path(index.search_text(model, "yellow", k=1, exact=True)[0].item).stem == "yellow"


def test_ann_added_to_an_exact_index_on_add(gallery, tmp_path):
    pytest.importorskip("usearch")
    ix.build_index(FakeModel(), [gallery], output=tmp_path / "idx")
    report = ix.build_index(FakeModel(), [gallery], output=tmp_path / "idx", add=True, ann=True)
    assert report.added == 0 and ix.open_index(tmp_path / "idx").meta.ann == ix.AnnSettings()


def test_missing_ann_library_names_the_install_line(gallery, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "usearch", None)
    monkeypatch.setitem(sys.modules, "usearch.index", None)
    model = FakeModel()
    with pytest.raises(MissingDependencyError, match=r"pip install 'edge-run\[ann\]'"):
        ix.build_index(model, [gallery], output=tmp_path / "idx", ann=True)
    assert model.images_embedded == 0 and not (tmp_path / "idx").exists()


def test_ann_index_without_the_library_searches_exactly_only(gallery, tmp_path, monkeypatch):
    pytest.importorskip("usearch")
    ix.build_index(FakeModel(), [gallery], output=tmp_path / "idx", ann=True)
    monkeypatch.setitem(sys.modules, "usearch.index", None)
    index = ix.open_index(tmp_path / "idx")
    assert Path(index.search_text(FakeModel(), "blue", k=1, exact=True)[0].item).stem == "blue"
    with pytest.raises(MissingDependencyError, match=r"edge-run\[ann\]'; or search exactly \(exact=True, --exact\)"):
        index.search_text(FakeModel(), "blue", k=1)


@pytest.mark.parametrize("where", ["vectors", "graph", "commit"])
def test_a_crash_mid_write_leaves_the_old_index(gallery, tmp_path, monkeypatch, where):
    if where == "graph":
        pytest.importorskip("usearch")
    model = FakeModel()
    ix.build_index(model, [gallery / "a"], output=tmp_path / "idx")
    before = sorted(os.listdir(tmp_path / "idx"))
    real_replace = os.replace

    def crash(*args, **kwargs):
        raise OSError("disk on fire")

    if where == "vectors":
        monkeypatch.setattr(ix.np, "save", crash)
    elif where == "graph":
        monkeypatch.setattr(ix, "_build_graph", crash)
    else:
        monkeypatch.setattr(ix.os, "replace", lambda src, dst: crash() if Path(dst).name == "index.json"
                            else real_replace(src, dst))
    with pytest.raises(OSError, match="disk on fire"):
        ix.build_index(model, [gallery], output=tmp_path / "idx", add=True, ann=where == "graph")
    assert sorted(os.listdir(tmp_path / "idx")) == before
    assert len(ix.open_index(tmp_path / "idx")) == 3
    with pytest.raises(OSError, match="disk on fire"):
        ix.build_index(model, [gallery], output=tmp_path / "new", ann=where == "graph")
    assert not (tmp_path / "new").exists()


def test_damaged_or_foreign_indexes_are_refused(gallery, tmp_path):
    ix.build_index(FakeModel(), [gallery / "a"], output=tmp_path / "idx")
    meta_file = tmp_path / "idx" / "index.json"
    meta = json.loads(meta_file.read_text())

    def refused(change, match):
        meta_file.write_text(change if isinstance(change, str) else json.dumps(change))
        with pytest.raises(ix.IndexFileError, match=match):
            ix.open_index(tmp_path / "idx")

    refused("{not json", "not valid JSON")
    refused({**meta, "format": "faiss"}, "not an edge-run index")
    refused({**meta, "version": 2}, "format version 2, written by a newer edge-run; this one reads version 1")
    refused({**meta, "version": "1"}, "has version '1'")
    refused({**meta, "count": "3"}, "malformed: bad count")
    refused({**meta, "count": 4}, "says 4 items of dimension 24")
    refused({**meta, "colour": "red"}, "malformed")
    refused({**meta, "files": {**meta["files"], "vectors": "../../etc/passwd"}}, "malformed")
    meta_file.write_text(json.dumps(meta))
    vectors = tmp_path / "idx" / meta["files"]["vectors"]
    vectors.write_bytes(vectors.read_bytes()[:-4])
    with pytest.raises(ix.IndexFileError, match="damaged: vectors-.*npy has .* bytes"):
        ix.open_index(tmp_path / "idx")
    vectors.unlink()
    with pytest.raises(ix.IndexFileError, match="missing vectors-"):
        ix.open_index(tmp_path / "idx")
    with pytest.raises(ix.IndexFileError, match="has no index.json"):
        ix.open_index(gallery)
    assert issubclass(ix.IndexFileError, EdgeRunError)


def test_damaged_graph_is_refused(gallery, tmp_path):
    pytest.importorskip("usearch")
    ix.build_index(FakeModel(), [gallery], output=tmp_path / "idx", ann=True)
    index = ix.open_index(tmp_path / "idx")
    size = index.file("ann").stat().st_size
    index.file("ann").write_bytes(b"\0" * size)
    with pytest.raises(ix.IndexFileError, match="HNSW graph .* could not be read.*--exact"):
        ix.open_index(tmp_path / "idx").search_vectors(np.ones((1, 24)), 3)
    assert len(ix.open_index(tmp_path / "idx").search_vectors(np.ones((1, 24)), 3, exact=True)[1][0]) == 3


@pytest.mark.slow
def test_real_retrieval_bundle(tmp_path):
    """With the real runtime: an image finds itself first, and the index refuses nothing it built."""
    pytest.importorskip("edgerun.runtime.retrieval")
    pytest.importorskip("edgerun.export.retrieval")
    import edgerun
    from edgerun.export.pipeline import export
    from edgerun.models.tiny import save_blip

    ckpt = save_blip(tmp_path / "ckpt", architecture="BlipForImageTextRetrieval", seed=4)
    bundle = export(f"hf:{ckpt}", task="retrieval", output=tmp_path / "bundle").path
    model = edgerun.load(bundle)
    rng = np.random.default_rng(5)
    save(tmp_path / "g" / "noise.png", rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    save(tmp_path / "g" / "ramp.png", np.repeat(np.linspace(0, 255, 48, dtype=np.uint8)[None, :, None], 48, 0)
         .repeat(3, 2))
    save(tmp_path / "g" / "red.png", COLOURS["red"])
    report = ix.build_index(model, [tmp_path / "g"], output=tmp_path / "idx")
    assert report.added == 3 and not report.skipped
    index = ix.open_index(tmp_path / "idx")
    hits = index.search_image(model, tmp_path / "g" / "ramp.png", k=3)
    assert hits[0].score == pytest.approx(1, abs=1e-4)
    assert {h.item: h.score for h in hits}[str(tmp_path / "g" / "ramp.png")] == pytest.approx(hits[0].score)
    assert len(index.search_text(model, "a red picture", k=2)) == 2
    # ITM re-ranking: the top k re-ordered by the match head, scores become its probabilities
    top = index.search_text(model, "a red picture", k=3)
    reranked = index.rerank(model, "a red picture", top)
    want = {h.item: float(model.itm_scores(h.item, ["a red picture"])[0]) for h in top}
    assert sorted(h.item for h in reranked) == sorted(want)
    assert [h.score for h in reranked] == sorted(want.values(), reverse=True)
    assert all(h.score == pytest.approx(want[h.item]) for h in reranked)
