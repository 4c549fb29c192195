"""TensorRT calibration cache, from the same statistics as the Q/DQ graphs.

TensorRT's implicit INT8 calibration (TensorRT 8.x and 10.x; 11 removed it) reads a text cache:
a header naming the TensorRT version and calibrator, then one line per tensor with its scale as
the big-endian hex of a float32 (`name: 3c010a14`), scale = amax / 127. The Q/DQ graphs make
the cache unnecessary for building engines from them; it serves users who build from the float
ONNX with an implicit calibrator. Only the tensors calibrated here (the inputs of the linear
layers) are listed; TensorRT runs layers whose tensors lack a scale in higher precision.
"""
from __future__ import annotations

import struct
from collections.abc import Mapping
from pathlib import Path

from .stats import Range

HEADERS = {"entropy": "EntropyCalibration2", "minmax": "MinMaxCalibration", "percentile": "EntropyCalibration2"}
TRT_VERSION = "8601"  # the header's TensorRT version tag: 8.6.1, the oldest release edge-run targets


def scale_hex(scale: float) -> str:
    return struct.pack(">f", scale).hex()


def write_cache(path: Path, ranges: Mapping[str, Range], method: str) -> Path:
    """Write `ranges` (tensor -> Range) as a TensorRT calibration cache at `path`."""
    lines = [f"TRT-{TRT_VERSION}-{HEADERS.get(method, 'EntropyCalibration2')}"]
    lines += [f"{name}: {scale_hex(r.amax / 127.0)}" for name, r in sorted(ranges.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_cache(path: Path) -> tuple[str, dict[str, float]]:
    """(header, {tensor: scale}) of a cache written by `write_cache` (or by TensorRT)."""
    header, *rows = path.read_text(encoding="utf-8").splitlines()
    scales = {}
    for row in rows:
        name, _, value = row.rpartition(":")
        scales[name.strip()] = struct.unpack(">f", bytes.fromhex(value.strip()))[0]
    return header, scales
