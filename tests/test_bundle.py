"""The bundle format: writing atomically, reading, verifying, refusing bad bundles."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import _get_all_tensors, uses_external_data

import edgerun.bundle as bundle_mod
from edgerun.bundle import (
    Bundle,
    BundleWriter,
    FileEntry,
    Manifest,
    ModuleSpec,
    TaskSpec,
    TensorSpec,
    describe,
    open_bundle,
    sha256_file,
    validate_bundle,
)
from edgerun.errors import BundleError, OptionError
from edgerun.onnxrefs import external_data_locations

WEIGHT = np.arange(12, dtype=np.float32).reshape(3, 4)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("EDGERUN_CACHE_DIR", str(path))
    return path


def _model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _matmul_model() -> onnx.ModelProto:
    """y = x @ W, x: float32[batch, 3], W: 3x4 initializer."""
    return _model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(WEIGHT, "W")],
    )


def _save_external(model: onnx.ModelProto, path: Path, location: str) -> None:
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)


def _manifest(**overrides) -> Manifest:
    io = {"inputs": [TensorSpec("x", "float32", ["batch", 3])],
          "outputs": [TensorSpec("y", "float32", ["batch", 4])]}
    fields = {
        "tasks": {"retrieval": TaskSpec(["vision", "text"])},
        "modules": {"vision": ModuleSpec("vision.onnx", **io), "text": ModuleSpec("text.onnx", **io)},
        "preprocess": {"size": 224, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "layout": "NCHW"},
        "tokenizer": {"file": "tokenizer.json"},
        "decoding": {"decoder_start_ids": [30522], "stop_ids": [102], "pad_id": 0},
        "model": {"family": "tiny"},
        "provenance": {"source": "fixture", "versions": {"onnx": onnx.__version__}},
    }
    return Manifest(**{**fields, **overrides})


def _write_bundle(dest: Path, **kw) -> Path:
    """A bundle with an external-data module (vision), an embedded one (text) and a tokenizer."""
    with BundleWriter(dest, **kw) as writer:
        _save_external(_matmul_model(), writer.dir / "vision.onnx", "vision.bin")
        onnx.save_model(_matmul_model(), str(writer.dir / "text.onnx"))
        (writer.dir / "tokenizer.json").write_text('{"tok": "aaaa"}')
        return writer.commit(_manifest())


@pytest.fixture
def bundle_dir(tmp_path) -> Path:
    return _write_bundle(tmp_path / "b")


def _edit_manifest(root: Path, edit) -> None:
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _refresh(root: Path, rel: str) -> None:
    """Make the manifest agree with the file's current content, as a forger would."""
    def edit(data):
        data["files"][rel] = {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size}
    _edit_manifest(root, edit)


def _count_hashes(monkeypatch) -> list:
    calls = []

    def counting(path):
        calls.append(Path(path).name)
        return sha256_file(path)
    monkeypatch.setattr(bundle_mod, "sha256_file", counting)
    return calls


# --- round trips -------------------------------------------------------------------------------

def test_round_trip_and_onnxruntime_runs_the_module(bundle_dir):
    bundle = open_bundle(bundle_dir)
    raw = json.loads((bundle_dir / "manifest.json").read_text())
    assert raw["format"] == "edgerun-bundle" and raw["version"] == 1
    assert bundle.manifest == Manifest.from_dict(raw)
    assert bundle.manifest.modules["vision"].external_data == ("vision.bin",)
    assert set(bundle.manifest.files) == {"vision.onnx", "vision.bin", "text.onnx", "tokenizer.json"}
    assert bundle.manifest.decoding == _manifest().decoding

    x = np.ones((2, 3), np.float32)
    for name in ("vision", "text"):
        session = ort.InferenceSession(str(bundle.file(bundle.module(name).file)),
                                       providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ WEIGHT)


def test_module_in_a_subdirectory_records_its_external_data_there(tmp_path):
    with BundleWriter(tmp_path / "b") as writer:
        (writer.dir / "modules").mkdir()
        _save_external(_matmul_model(), writer.dir / "modules" / "vision.onnx", "vision.bin")
        spec = ModuleSpec("modules/vision.onnx", [TensorSpec("x", "float32", ["batch", 3])],
                          [TensorSpec("y", "float32", ["batch", 4])])
        writer.commit(Manifest({"retrieval": TaskSpec(["vision"])}, {"vision": spec}))
    bundle = open_bundle(tmp_path / "b", verify="full")
    assert bundle.module("vision").external_data == ("modules/vision.bin",)
    assert set(bundle.manifest.files) == {"modules/vision.onnx", "modules/vision.bin"}


def test_manifest_dataclasses_round_trip():
    manifest = _manifest(
        files={"vision.onnx": FileEntry("ab" * 32, 10)},
        quantization={"method": "minmax", "kept_float": ["LayerNorm"]},
        engines=({"file": "vision.engine", "trt_version": "10.3.0", "sm": "8.7"},),
    )
    manifest = Manifest(**{**manifest.__dict__, "modules": {"vision": ModuleSpec(
        "vision.onnx", [TensorSpec("x", "float32", ["batch", 3, 224, 224])],
        [TensorSpec("y", "float16", ["batch", "seq", 768])], precision="int8",
        external_data=("weights/vision.bin",), backends=("cpu", "tensorrt"),
        extra={"kv_cache": {"layers": 2, "layout": "BHSD"}})}, "tasks": {"retrieval": TaskSpec(["vision"])}})
    data = json.loads(json.dumps(manifest.to_dict()))
    assert Manifest.from_dict(data) == manifest
    assert data["modules"]["vision"]["extra"]["kv_cache"]["layout"] == "BHSD"
    spec = TensorSpec("a", "int64", [1, "n"])
    assert TensorSpec.from_dict(spec.to_dict()) == TensorSpec("a", "int64", (1, "n"))


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["modules"]["vision"].update(precision="fp8"), r"modules\.vision\.precision.*'fp32'"),
    (lambda d: d["modules"]["vision"]["inputs"][0].update(dtype="f32"), r"vision\.inputs\[0\]\.dtype"),
    (lambda d: d["modules"]["vision"]["inputs"][0].update(shape=[True]), r"inputs\[0\]\.shape"),
    (lambda d: d["tasks"]["retrieval"].update(modules=["nope"]), r"retrieval\.modules.*'text', 'vision'"),
    (lambda d: d["modules"]["vision"].update(precison="fp16"), r"unknown key.*precison"),
    (lambda d: d["files"]["vision.bin"].update(sha256="xyz"), r"files\.vision\.bin\.sha256"),
    (lambda d: d.pop("modules"), r"missing key.*modules"),
])
def test_manifest_refuses_bad_fields_naming_them(bundle_dir, edit, match):
    data = json.loads((bundle_dir / "manifest.json").read_text())
    edit(data)
    with pytest.raises(BundleError, match=match):
        Manifest.from_dict(data)


# --- refusals ----------------------------------------------------------------------------------

def test_refuses_unknown_format(bundle_dir):
    _edit_manifest(bundle_dir, lambda d: d.update(format="something-else"))
    with pytest.raises(BundleError, match="format is 'something-else', expected 'edgerun-bundle'"):
        open_bundle(bundle_dir)


def test_refuses_newer_version_naming_the_supported_one(bundle_dir):
    _edit_manifest(bundle_dir, lambda d: d.update(version=2))
    with pytest.raises(BundleError, match=r"version 2 is newer.*version 1.*newer edge-run"):
        open_bundle(bundle_dir)
    _edit_manifest(bundle_dir, lambda d: d.update(version=0))
    with pytest.raises(BundleError, match="version 0 is not supported.*reads version 1"):
        open_bundle(bundle_dir)


def test_refuses_missing_directory_and_manifest(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        open_bundle(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="not a directory"):
        open_bundle(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="has no manifest.json"):
        open_bundle(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        open_bundle(tmp_path / "empty")


def test_refuses_unknown_verify_mode(bundle_dir):
    with pytest.raises(OptionError, match=r"'full', 'cached', 'none'"):
        open_bundle(bundle_dir, verify="fast")


def test_refuses_missing_file(bundle_dir):
    (bundle_dir / "vision.bin").unlink()
    with pytest.raises(BundleError, match="'vision.bin' listed in the manifest is missing"):
        open_bundle(bundle_dir, verify="none")


def test_full_verify_catches_a_flipped_byte_with_mtime_restored(bundle_dir):
    open_bundle(bundle_dir)  # cache it as verified
    path = bundle_dir / "vision.bin"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[5] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(BundleError, match=r"'vision.bin' has sha256 \w{12}… but the manifest records"):
        open_bundle(bundle_dir, verify="full")
    with pytest.raises(BundleError, match="corrupted or was replaced"):
        open_bundle(bundle_dir, verify="cached")  # utime changed ctime


def test_cached_verify_catches_a_size_change(bundle_dir):
    open_bundle(bundle_dir)
    with open(bundle_dir / "vision.bin", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match="'vision.bin' is 49 bytes but the manifest records 48"):
        open_bundle(bundle_dir)


def test_cached_verify_catches_two_same_size_files_swapped_by_rename(tmp_path):
    with BundleWriter(tmp_path / "b") as writer:
        onnx.save_model(_matmul_model(), str(writer.dir / "vision.onnx"))
        onnx.save_model(_matmul_model(), str(writer.dir / "text.onnx"))
        (writer.dir / "tokenizer.json").write_text('{"tok": "aaaa"}')
        (writer.dir / "vocab.json").write_text('{"tok": "bbbb"}')
        root = writer.commit(_manifest())
    open_bundle(root)
    os.rename(root / "tokenizer.json", root / "tmp")
    os.rename(root / "vocab.json", root / "tokenizer.json")
    os.rename(root / "tmp", root / "vocab.json")
    with pytest.raises(BundleError, match="has sha256 .* but the manifest records"):
        open_bundle(root, verify="cached")


@pytest.mark.parametrize("field, path, match", [
    ("file", "../x.onnx", "leaves the bundle"),
    ("file", "/etc/passwd", "is absolute"),
    ("file", "a\\b.onnx", "backslash"),
    ("external_data", ["../vision.bin"], "leaves the bundle"),
])
def test_refuses_manifest_paths_that_leave_the_bundle(bundle_dir, field, path, match):
    _edit_manifest(bundle_dir, lambda d: d["modules"]["vision"].update({field: path}))
    with pytest.raises(BundleError, match=rf"modules\.vision\.{field}.*{match}"):
        open_bundle(bundle_dir)


def test_refuses_files_key_that_leaves_the_bundle(bundle_dir):
    _edit_manifest(bundle_dir, lambda d: d["files"].update({"../outside.bin": d["files"]["vision.bin"]}))
    with pytest.raises(BundleError, match=r"files\.\.\./outside\.bin.*leaves the bundle"):
        open_bundle(bundle_dir)


def test_refuses_symlink_leaving_the_bundle(bundle_dir, tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes((bundle_dir / "vision.bin").read_bytes())
    (bundle_dir / "vision.bin").unlink()
    (bundle_dir / "vision.bin").symlink_to(outside)
    with pytest.raises(BundleError, match="'vision.bin' resolves to .*outside the bundle"):
        open_bundle(bundle_dir, verify="full")


def test_refuses_onnx_external_data_location_leaving_the_bundle(bundle_dir, tmp_path):
    (tmp_path / "outside.bin").write_bytes((bundle_dir / "vision.bin").read_bytes())
    path = bundle_dir / "vision.onnx"
    model = onnx.load_model(str(path), load_external_data=False)
    (entry,) = [e for e in model.graph.initializer[0].external_data if e.key == "location"]
    entry.value = "../outside.bin"
    path.write_bytes(model.SerializeToString())
    _refresh(bundle_dir, "vision.onnx")
    with pytest.raises(BundleError, match="refers to external data '../outside.bin', which leaves"):
        open_bundle(bundle_dir, verify="full")


def test_refuses_module_file_not_listed_in_files(bundle_dir):
    _edit_manifest(bundle_dir, lambda d: d["files"].pop("vision.bin"))
    with pytest.raises(BundleError, match=r"vision\.external_data\[0\] = 'vision.bin' is not listed"):
        open_bundle(bundle_dir)


@pytest.mark.parametrize("content", [b"", b"this is not an onnx model\n" * 4])
def test_refuses_empty_or_garbage_onnx(bundle_dir, content):
    (bundle_dir / "text.onnx").write_bytes(content)
    _refresh(bundle_dir, "text.onnx")
    with pytest.raises(BundleError, match="text.onnx is empty or not an ONNX model"):
        open_bundle(bundle_dir)


# --- verification cache ------------------------------------------------------------------------

def test_cache_avoids_rehashing(bundle_dir, monkeypatch, cache_dir):
    calls = _count_hashes(monkeypatch)
    open_bundle(bundle_dir)
    assert sorted(calls) == ["text.onnx", "tokenizer.json", "vision.bin", "vision.onnx"]
    assert (cache_dir / "verified.json").is_file()
    calls.clear()
    open_bundle(bundle_dir)
    assert calls == []
    open_bundle(bundle_dir, verify="full")
    assert len(calls) == 4
    calls.clear()
    open_bundle(bundle_dir, verify="none")
    assert calls == []


def test_unwritable_cache_dir_still_verifies(bundle_dir, monkeypatch, tmp_path):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("EDGERUN_CACHE_DIR", str(tmp_path / "a_file" / "cache"))
    calls = _count_hashes(monkeypatch)
    open_bundle(bundle_dir)
    open_bundle(bundle_dir)
    assert len(calls) == 8


def test_corrupt_cache_file_is_ignored(bundle_dir, cache_dir, monkeypatch):
    cache_dir.mkdir()
    (cache_dir / "verified.json").write_text("{garbage")
    calls = _count_hashes(monkeypatch)
    open_bundle(bundle_dir)
    assert len(calls) == 4
    assert json.loads((cache_dir / "verified.json").read_text())["bundles"]


# --- writer ------------------------------------------------------------------------------------

def _leftovers(parent: Path) -> list:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_writer_leaves_nothing_on_exception(tmp_path):
    with pytest.raises(RuntimeError, match="export failed"), BundleWriter(tmp_path / "b") as writer:
        assert writer.dir.name.startswith(".b.tmp-") and writer.dir.parent == tmp_path
        onnx.save_model(_matmul_model(), str(writer.dir / "vision.onnx"))
        raise RuntimeError("export failed")
    assert list(tmp_path.iterdir()) == []


def test_writer_without_commit_leaves_nothing(tmp_path):
    with BundleWriter(tmp_path / "b") as writer:
        (writer.dir / "x.txt").write_text("x")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_existing_dest_unless_overwrite(tmp_path):
    root = _write_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="already exists; pass overwrite=True"):
        _write_bundle(tmp_path / "b")
    with BundleWriter(root, overwrite=True) as writer:
        onnx.save_model(_matmul_model(), str(writer.dir / "only.onnx"))
        spec = ModuleSpec("only.onnx", [TensorSpec("x", "float32", ["batch", 3])],
                          [TensorSpec("y", "float32", ["batch", 4])])
        writer.commit(Manifest({"retrieval": TaskSpec(["only"])}, {"only": spec}))
    assert set(open_bundle(root).manifest.files) == {"only.onnx"}
    assert not (root / "vision.bin").exists()
    assert _leftovers(tmp_path) == []


def test_writer_will_not_overwrite_a_directory_that_is_not_a_bundle(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "precious.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not an edge-run bundle"):
        _write_bundle(tmp_path / "home", overwrite=True)
    assert (tmp_path / "home" / "precious.txt").read_text() == "keep me"


def test_writer_refuses_symlink_leaving_the_bundle(tmp_path):
    (tmp_path / "secret").write_text("s")
    match = "symlinks in a bundle must be relative and stay inside"
    with pytest.raises(BundleError, match=match), BundleWriter(tmp_path / "b") as writer:
        onnx.save_model(_matmul_model(), str(writer.dir / "vision.onnx"))
        (writer.dir / "tokenizer.json").symlink_to(tmp_path / "secret")
        writer.commit(_manifest())
    assert _leftovers(tmp_path) == [] and not (tmp_path / "b").exists()


def test_writer_refuses_missing_module_file_and_bad_onnx(tmp_path):
    match = r"modules\.text\.file = 'text.onnx' was not written"
    with pytest.raises(BundleError, match=match), BundleWriter(tmp_path / "b") as writer:
        onnx.save_model(_matmul_model(), str(writer.dir / "vision.onnx"))
        (writer.dir / "tokenizer.json").write_text("{}")
        writer.commit(_manifest())
    match = "text.onnx is empty or not an ONNX model"
    with pytest.raises(BundleError, match=match), BundleWriter(tmp_path / "b") as writer:
        onnx.save_model(_matmul_model(), str(writer.dir / "vision.onnx"))
        (writer.dir / "text.onnx").write_bytes(b"")
        writer.commit(_manifest())
    assert list(tmp_path.iterdir()) == []


# --- validate, describe, accessors -------------------------------------------------------------

def test_validate_collects_every_problem(bundle_dir):
    report = validate_bundle(bundle_dir)
    assert report.ok and report.files_checked == 4 and report.total_bytes > 0
    (bundle_dir / "tokenizer.json").unlink()
    (bundle_dir / "text.onnx").write_bytes(b"x" * (bundle_dir / "text.onnx").stat().st_size)
    with open(bundle_dir / "vision.bin", "r+b") as fh:
        fh.write(b"\xff")
    report = validate_bundle(bundle_dir)
    assert not report.ok
    joined = "\n".join(report.problems)
    assert len(report.problems) == 4, joined
    assert "'tokenizer.json' listed in the manifest is missing" in joined
    assert "text.onnx is empty or not an ONNX model" in joined
    assert "'text.onnx' has sha256" in joined and "'vision.bin' has sha256" in joined


def test_validate_reports_an_unreadable_manifest(tmp_path):
    report = validate_bundle(tmp_path / "nope")
    assert not report.ok and "does not exist" in report.problems[0]


def test_accessors_name_the_valid_choices(bundle_dir):
    bundle = open_bundle(bundle_dir)
    assert isinstance(bundle, Bundle) and bundle.path == bundle_dir.resolve()
    assert bundle.task("retrieval").modules == ("vision", "text")
    with pytest.raises(BundleError, match=r"does not serve task 'caption'; it serves: \['retrieval'\]"):
        bundle.task("caption")
    with pytest.raises(BundleError, match=r"no module 'decoder'; its modules: \['text', 'vision'\]"):
        bundle.module("decoder")
    with pytest.raises(BundleError, match="no file 'x.bin'; its files: text.onnx"):
        bundle.file("x.bin")
    with pytest.raises(BundleError, match="leaves the bundle"):
        bundle.file("../b/vision.bin")
    files = [bundle_dir / rel for rel in bundle.manifest.files] + [bundle_dir / "manifest.json"]
    assert bundle.size_bytes() == sum(p.stat().st_size for p in files)


def test_describe(bundle_dir):
    text = describe(open_bundle(bundle_dir))
    for piece in ("edgerun-bundle version 1", "retrieval: vision -> text",
                  "vision: vision.onnx + 1 external data file(s), fp32, backends cpu",
                  "in  x: float32[batch, 3]", "out y: float32[batch, 4]", "size=224",
                  "decoder_start_ids=[30522]", "stop_ids=[102]", 'source="fixture"', "total:"):
        assert piece in text, text


# --- onnxrefs ----------------------------------------------------------------------------------

def _onnx_view(path: Path) -> set:
    model = onnx.load_model(str(path), load_external_data=False)
    return {e.value for t in _get_all_tensors(model) if uses_external_data(t)
            for e in t.external_data if e.key == "location"}


def _constant_and_subgraph_model() -> onnx.ModelProto:
    """A Constant node's tensor attribute, and an If whose branches hold initializers."""
    def branch(name, value):
        init = numpy_helper.from_array(np.full((2,), value, np.float32), f"{name}_c")
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [2])
        node = helper.make_node("Identity", [f"{name}_c"], [f"{name}_out"])
        return helper.make_graph([node], name, [], [out], [init])
    const = helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.ones(2, np.float32)))
    cond = helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True)))
    branch_node = helper.make_node("If", ["cond"], ["b"], then_branch=branch("then", 1.0),
                                   else_branch=branch("else", 2.0))
    add = helper.make_node("Add", ["k", "b"], ["y"])
    return _model([const, cond, branch_node, add], [],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])


@pytest.mark.parametrize("one_file", [True, False])
@pytest.mark.parametrize("make", [_matmul_model, _constant_and_subgraph_model])
def test_onnxrefs_matches_onnx(tmp_path, make, one_file):
    path = tmp_path / "m.onnx"
    onnx.save_model(make(), str(path), save_as_external_data=True, all_tensors_to_one_file=one_file,
                    location="m.bin", size_threshold=0)
    found = external_data_locations(path)
    assert len(found) == len(set(found))
    assert set(found) == _onnx_view(path) and found
    if one_file and make is _constant_and_subgraph_model:
        model = onnx.load_model(str(path))
        out = ort.InferenceSession(model.SerializeToString()).run(None, {})[0]
        np.testing.assert_allclose(out, [2.0, 2.0])


def test_onnxrefs_embedded_and_sparse(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(_matmul_model(), str(path))
    assert external_data_locations(path) == [] == sorted(_onnx_view(path))
    model = _matmul_model()
    values = numpy_helper.from_array(np.ones(2, np.float32), "s")
    values.data_location = TensorProto.EXTERNAL
    values.external_data.add(key="location", value="sparse.bin")
    indices = numpy_helper.from_array(np.array([0, 3], np.int64), "")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))
    path.write_bytes(model.SerializeToString())
    assert external_data_locations(path) == ["sparse.bin"]


def test_onnxrefs_skips_large_embedded_weights(tmp_path):
    big = _model([helper.make_node("Identity", ["W"], ["y"])], [],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4 << 20])],
                 [numpy_helper.from_array(np.zeros(4 << 20, np.float32), "W")])
    path = tmp_path / "big.onnx"
    onnx.save_model(big, str(path))
    assert external_data_locations(path) == []
