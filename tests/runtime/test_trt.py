"""The native TensorRT runner and the engine guard at load, over fake tensorrt/cudart modules
(nothing real can run here); the fake engine runs its ONNX with onnxruntime on the CPU."""
import json
import shutil
import sys

import numpy as np
import pytest
from trt_fakes import FakeCudart, fake_tensorrt

import edgerun
from edgerun.bundle import open_bundle
from edgerun.engine.build import BuildOptions, build_engines
from edgerun.errors import BundleError, MissingDependencyError
from edgerun.runtime.guard import EngineMismatchError
from edgerun.runtime.profiles import ShapeOutsideProfilesError
from edgerun.runtime.trt import CudaRuntime, TrtRunner, engine_runner

IMAGE = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)


@pytest.fixture
def built(blip_bundle, tmp_path):
    """A copy of the tiny BLIP bundle with engines built by a fake TensorRT 10.3 on a fake Orin."""
    path = tmp_path / "blip"
    shutil.copytree(blip_bundle, path)
    trt, cuda = fake_tensorrt("10.3.0"), CudaRuntime(FakeCudart(b"Orin", (8, 7)))
    build_engines(path, BuildOptions(profiles=("past=16,64",), timing_cache=tmp_path / "timing"), trt=trt, cuda=cuda)
    return path, trt, cuda


@pytest.mark.parametrize("version, execute", [("8.6.1", "execute_async_v2"), ("10.3.0", "execute_async_v3")])
def test_captions_through_engines_match_the_cpu_backend(blip_bundle, tmp_path, version, execute):
    path = tmp_path / "blip"
    shutil.copytree(blip_bundle, path)
    trt, fake = fake_tensorrt(version), FakeCudart()
    cuda = CudaRuntime(fake)
    build_engines(path, BuildOptions(timing_cache=tmp_path / "timing"), trt=trt, cuda=cuda)
    model, bundle = edgerun.load(path), open_bundle(path)
    want = model.caption(IMAGE, num_beams=3, max_new_tokens=10)
    for name in ("vision", "cross_kv", "decoder"):
        model._runners[name] = engine_runner(bundle, name, trt=trt, cuda=cuda)
    model._runners["decoder@cpu-beams3"] = model._runners["decoder"]  # engines have no beam-heads variant
    got = model.caption(IMAGE, num_beams=3, max_new_tokens=10)
    assert got.token_ids == want.token_ids and got.score == pytest.approx(want.score, abs=1e-4)
    executed = [c[0] for c in trt.calls if c[0].startswith("execute")]
    assert set(executed) == {execute} and len(executed) == 2 + model.last_timings["decoder_calls"]
    kinds = {k for k, _ in fake.copies}
    assert kinds == {"cudaMemcpyHostToDevice", "cudaMemcpyDeviceToHost"}


def test_profiles_are_switched_as_the_past_grows(built):
    path, trt, cuda = built
    runner = engine_runner(open_bundle(path), "decoder", trt=trt, cuda=cuda)
    cross = {f"cross_{kv}_{i}": np.zeros((1, 4, 17, 8), np.float32) for kv in ("key", "value") for i in (0, 1)}

    def step(rows, past):
        return runner.infer({"input_ids": np.zeros((rows, 1), np.int64),
                             "past_key": np.zeros((past, 2, rows, 4, 8), np.float32),
                             "past_value": np.zeros((past, 2, rows, 4, 8), np.float32), **cross})

    assert step(1, 3)["logits"].shape == (1, 120)
    step(1, 30)
    chosen = [c[1] for c in trt.calls if c[0] == "set_optimization_profile_async"]
    buckets = [runner.profiles[i].bucket["past"] for i in chosen]
    assert buckets == [[0, 16], [17, 64]]
    with pytest.raises(ShapeOutsideProfilesError, match="outside every optimization profile"):
        step(1, 70)


def test_a_shape_outside_the_profiles_is_rebuilt_when_allowed(built):
    path, trt, cuda = built
    runner = engine_runner(open_bundle(path), "vision", trt=trt, cuda=cuda, rebuild=True)
    before = runner.path
    out = runner.infer({"pixel_values": np.zeros((6, 3, 32, 32), np.float32)})  # batch buckets end at 4
    assert out["image_embeds"].shape == (6, 17, 24)
    assert runner.path != before and not before.exists()
    entry = next(e for e in open_bundle(path).manifest.engines if e["module"] == "vision")
    assert entry["grid"]["batch"][-1] == 6 and (path / entry["file"]).is_file()


def test_an_engine_for_another_gpu_or_trt_is_refused(built):
    path, trt, _ = built
    other_gpu = CudaRuntime(FakeCudart(b"NVIDIA H100", (9, 0)))
    with pytest.raises(EngineMismatchError, match=r"built for TensorRT 10.3.0 on Orin .*this GPU has 9.0"):
        engine_runner(open_bundle(path), "vision", trt=trt, cuda=other_gpu, rebuild=False)
    with pytest.raises(EngineMismatchError, match=r"built with TensorRT 10.3.0, this machine has 8.6.1"):
        engine_runner(open_bundle(path), "vision", trt=fake_tensorrt("8.6.1"), cuda=CudaRuntime(FakeCudart(b"Orin")),
                      rebuild=False)
    runner = engine_runner(open_bundle(path), "vision", trt=trt, cuda=other_gpu, rebuild=True)
    entry = next(e for e in open_bundle(path).manifest.engines if e["module"] == "vision")
    assert entry["gpu_name"] == "NVIDIA H100" and runner.entry == entry


def test_a_corrupt_engine_file_is_a_clear_error(built, tmp_path):
    path, trt, cuda = built
    entry = next(e for e in open_bundle(path).manifest.engines if e["module"] == "vision")
    bad = tmp_path / "bad.engine"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(BundleError, match="corrupt or not an engine.*--rebuild"):
        TrtRunner(bad, entry, trt=trt, cuda=cuda)


def test_a_module_without_engine_says_how_to_build(blip_bundle):
    with pytest.raises(BundleError, match="no TensorRT engine for module 'vision'.*edge-run engine build"):
        engine_runner(open_bundle(blip_bundle), "vision", trt=fake_tensorrt("10.3.0"),
                      cuda=CudaRuntime(FakeCudart()), rebuild=False)


def test_tensorrt_missing_names_the_extra(blip_bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'edge-run\[trt\]'"):
        edgerun.load(blip_bundle, backend="tensorrt")


def test_manifest_entries_record_what_the_guard_needs(built):
    path, _, _ = built
    manifest = json.loads((path / "manifest.json").read_text())
    entries = {e["module"]: e for e in manifest["engines"]}
    assert set(entries) == {"vision", "cross_kv", "decoder"}
    d = entries["decoder"]
    assert (d["trt_version"], d["gpu_name"], d["compute_capability"], d["api"]) == ("10.3.0", "Orin", "8.7", "tensors")
    assert d["onnx_sha256"] == manifest["files"]["decoder.onnx"]["sha256"]
    assert manifest["files"][d["file"]]["size"] == (path / d["file"]).stat().st_size
    assert [p["bucket"]["past"] for p in d["profiles"]][:2] == [[0, 16], [17, 64]]
    edgerun.load(path, verify="full")  # the bundle still verifies
