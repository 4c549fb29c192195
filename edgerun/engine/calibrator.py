"""Legacy implicit INT8: a calibrator that hands TensorRT 8.x/10.x a calibration cache.

`edge-run calibrate` writes `NAME.trt-calib.cache` into quantized bundles (edgerun.calibration.
trtcache) and records it in the manifest's `quantization.modules.NAME.trt_calibration_cache`. Built
from the float twin's ONNX with INT8 on, TensorRT reads the scales from the cache and never asks for
a batch. TensorRT 11 removed calibrators: there, INT8 comes from the Q/DQ variant only.
"""
from __future__ import annotations

from pathlib import Path

from ..bundle import Bundle
from ..errors import BundleError


def cache_of(bundle: Bundle, module: str) -> Path | None:
    """The calibration cache a quantized bundle records for `module`, or None."""
    q = bundle.manifest.quantization or {}
    rel = q.get("modules", {}).get(module, {}).get("trt_calibration_cache")
    return bundle.file(rel) if rel else None


def cache_calibrator(trt, cache: Path):
    """An IInt8 calibrator of the cache's own algorithm (its header: `TRT-8601-MinMaxCalibration`)."""
    data = cache.read_bytes()
    header = data.split(b"\n", 1)[0].decode("ascii", "replace")
    if not header.startswith("TRT-"):
        raise BundleError(f"{cache} is not a TensorRT calibration cache (header {header!r})")
    base = trt.IInt8MinMaxCalibrator if header.endswith("MinMaxCalibration") else trt.IInt8EntropyCalibrator2

    class CacheCalibrator(base):
        def __init__(self):
            base.__init__(self)
            self.cache = data

        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            return None  # everything comes from the cache

        def read_calibration_cache(self):
            return self.cache

        def write_calibration_cache(self, cache):
            pass

    return CacheCalibrator()
