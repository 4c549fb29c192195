"""The engine builder over a fake tensorrt: variant and flag choice by version, timing cache reuse,
skipping up-to-date engines, INT8 from Q/DQ variants, and no torch."""
import shutil
import subprocess
import sys

import pytest
from trt_fakes import FakeCudart, fake_tensorrt

from edgerun.bundle import open_bundle
from edgerun.engine.build import BuildOptions, build_engines
from edgerun.errors import OptionError
from edgerun.runtime.trt import CudaRuntime


def _copy(src, tmp_path):
    shutil.copytree(src, tmp_path / "b")
    return tmp_path / "b"


def _builds(trt):
    return [c for c in trt.calls if c[0] == "build"]


def test_timing_cache_is_reused_and_current_engines_are_kept(blip_bundle, tmp_path):
    path, timing = _copy(blip_bundle, tmp_path), tmp_path / "timing.cache"
    trt, cuda = fake_tensorrt("10.3.0"), CudaRuntime(FakeCudart())
    first = build_engines(path, BuildOptions(timing_cache=timing, workspace_mb=512), trt=trt, cuda=cuda)
    assert all(r.built for r in first.results) and timing.read_bytes() == b"+++"  # one '+' per build
    seeded = [c[1] for c in trt.calls if c[0] == "create_timing_cache"]
    assert seeded == [b"", b"+", b"++"]  # each build starts from the previous one's cache
    assert _builds(trt)[0][2] == {"WORKSPACE": 512 << 20}
    again = build_engines(path, BuildOptions(timing_cache=timing), trt=trt, cuda=cuda)
    assert not any(r.built for r in again.results) and len(_builds(trt)) == 3
    forced = build_engines(path, BuildOptions(timing_cache=timing, rebuild=True, modules=("vision",)), trt=trt, cuda=cuda)
    assert [r.module for r in forced.results if r.built] == ["vision"] and len(_builds(trt)) == 4


def test_default_workspace_is_capped_by_device_memory(blip_bundle, tmp_path):
    trt = fake_tensorrt("8.6.1")
    build_engines(_copy(blip_bundle, tmp_path), BuildOptions(modules=("vision",), timing_cache=tmp_path / "t"),
                  trt=trt, cuda=CudaRuntime(FakeCudart(total=4 << 30)))
    assert _builds(trt)[0][2] == {"WORKSPACE": 1 << 30}  # a quarter of 4 GB, under the 2 GB cap


@pytest.mark.parametrize("version, flags", [("8.6.1", ["INT8"]), ("10.3.0", ["INT8"]), ("11.0.0", [])])
def test_int8_bundles_build_from_their_qdq_variants(blip_int8_bundle, tmp_path, version, flags):
    trt = fake_tensorrt(version)
    report = build_engines(_copy(blip_int8_bundle, tmp_path), BuildOptions(int8=True, timing_cache=tmp_path / "t"),
                           trt=trt, cuda=CudaRuntime(FakeCudart()))
    assert {r.source for r in report.results} == {"vision@tensorrt", "cross_kv@tensorrt", "decoder@tensorrt"}
    assert all(b[1] == flags for b in _builds(trt))
    entries = open_bundle(tmp_path / "b").manifest.engines
    assert {e["precision"] for e in entries} == {"int8"} and {e["onnx_module"] for e in entries} == \
        {"vision@tensorrt", "cross_kv@tensorrt", "decoder@tensorrt"}


def test_int8_without_a_quantized_bundle_says_how_to_get_one(blip_bundle, tmp_path):
    with pytest.raises(OptionError, match="edge-run calibrate"):
        build_engines(_copy(blip_bundle, tmp_path), BuildOptions(int8=True), trt=fake_tensorrt("10.3.0"),
                      cuda=CudaRuntime(FakeCudart()))


def test_legacy_int8_uses_the_calibration_cache_before_trt11(blip_bundle, blip_int8_bundle, tmp_path):
    trt = fake_tensorrt("8.6.1")
    options = BuildOptions(int8=True, calibration_from=blip_int8_bundle, modules=("vision",), timing_cache=tmp_path / "t")
    build_engines(_copy(blip_bundle, tmp_path), options, trt=trt, cuda=CudaRuntime(FakeCudart()))
    calibrator = _builds(trt)[0][3]
    assert type(calibrator).__mro__[1].__name__ == "IInt8MinMaxCalibrator"  # the cache header's algorithm
    assert calibrator.read_calibration_cache().startswith(b"TRT-") and calibrator.get_batch(["x"]) is None
    with pytest.raises(OptionError, match="removed implicit INT8 calibration"):
        build_engines(tmp_path / "b", options, trt=fake_tensorrt("11.0.0"), cuda=CudaRuntime(FakeCudart()))


def test_fp16_under_trt11_needs_fp16_variants(blip_bundle, tmp_path):
    trt = fake_tensorrt("11.0.0")
    report = build_engines(_copy(blip_bundle, tmp_path), BuildOptions(fp16=True, modules=("vision",),
                                                                      timing_cache=tmp_path / "t"),
                           trt=trt, cuda=CudaRuntime(FakeCudart()))
    assert _builds(trt)[0][1] == [] and "no FP16 flag" in report.notes[0]
    trt8 = fake_tensorrt("8.6.1")
    build_engines(tmp_path / "b", BuildOptions(fp16=True, modules=("vision",), timing_cache=tmp_path / "t"),
                  trt=trt8, cuda=CudaRuntime(FakeCudart()))
    assert _builds(trt8)[0][1] == ["FP16"]


def test_the_builder_imports_no_torch():
    code = ("import sys, edgerun.engine.build, edgerun.cli_engine, edgerun.lint, edgerun.runtime.trt, "
            "edgerun.runtime.iobinding; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
