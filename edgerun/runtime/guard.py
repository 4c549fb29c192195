"""The engine device guard: a TensorRT engine runs only where it was built.

A serialized engine is tied to the TensorRT release that built it and to the GPU's compute
capability (and tuned for the GPU model); it is also only as current as the ONNX it came from.
Each engine's manifest entry records all four:

    {"module": "vision", "onnx_module": "vision@tensorrt", "file": "engines/vision.int8.1a2b3c4d.engine",
     "precision": "int8", "trt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7",
     "onnx_sha256": "...", "profiles": [...], "api": "tensors", "workspace_mb": 1024, "built_at": "..."}

`decide` compares an entry with this machine and the bundle: "use", "rebuild" (when rebuilding was
asked for) or "refuse", with the reasons. The refusal says what the engine was built for and what
this machine is.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from packaging.version import InvalidVersion, Version

from ..errors import BundleError

ENGINE_KEYS = ("module", "onnx_module", "file", "precision", "trt_version", "gpu_name", "compute_capability",
               "onnx_sha256", "profiles")
REBUILD_HINT = "rebuild it with: edge-run engine build {bundle} --rebuild"


class EngineMismatchError(BundleError):
    """An engine built for another TensorRT, GPU or ONNX file than the one at hand."""


@dataclass(frozen=True)
class DeviceInfo:
    """What a TensorRT engine is tied to on the machine that loads it."""

    trt_version: str
    gpu_name: str
    compute_capability: str  # "8.7"

    def describe(self) -> str:
        return f"TensorRT {self.trt_version} on {self.gpu_name} (compute capability {self.compute_capability})"


@dataclass
class Decision:
    action: str  # "use", "rebuild" or "refuse"
    reasons: list[str] = field(default_factory=list)


def _release(text: str) -> tuple[int, ...] | None:
    try:
        return Version(str(text)).release[:3]
    except InvalidVersion:
        return None


def check_entry(entry: Mapping) -> None:
    """BundleError naming the missing keys of a manifest engine entry."""
    missing = [k for k in ENGINE_KEYS if k not in entry]
    if missing:
        raise BundleError(f"engine entry {entry.get('file', entry)!r} lacks {missing}; it was not written by "
                          "edge-run engine build — rebuild it with: edge-run engine build BUNDLE --rebuild")


def mismatches(entry: Mapping, device: DeviceInfo, onnx_sha256: str | None) -> list[str]:
    """Why the engine of `entry` cannot run here; empty when it can."""
    check_entry(entry)
    reasons = []
    built, here = _release(entry["trt_version"]), _release(device.trt_version)
    if built is None or built != here:
        reasons.append(f"it was built with TensorRT {entry['trt_version']}, this machine has {device.trt_version}")
    if str(entry["compute_capability"]) != str(device.compute_capability):
        reasons.append(f"it was built for compute capability {entry['compute_capability']}, this GPU has "
                       f"{device.compute_capability}")
    if entry["gpu_name"] != device.gpu_name:
        reasons.append(f"it was built on {entry['gpu_name']}, this GPU is {device.gpu_name}")
    if onnx_sha256 is not None and entry["onnx_sha256"] != onnx_sha256:
        reasons.append(f"its ONNX ({entry['onnx_module']}) changed since: built from sha256 "
                       f"{entry['onnx_sha256'][:12]}…, the bundle now has {onnx_sha256[:12]}…")
    return reasons


def decide(entry: Mapping, device: DeviceInfo, onnx_sha256: str | None, rebuild: bool) -> Decision:
    reasons = mismatches(entry, device, onnx_sha256)
    if not reasons:
        return Decision("use")
    return Decision("rebuild" if rebuild else "refuse", reasons)


def refusal(entry: Mapping, device: DeviceInfo, reasons: list[str], bundle: str = "BUNDLE") -> EngineMismatchError:
    built = DeviceInfo(str(entry.get("trt_version")), str(entry.get("gpu_name")),
                       str(entry.get("compute_capability")))
    return EngineMismatchError(
        f"engine {entry.get('file')} of module {entry.get('module')} was built for {built.describe()}; this machine "
        f"has {device.describe()}: {'; '.join(reasons)}. {REBUILD_HINT.format(bundle=bundle)} "
        "(or set EDGERUN_TRT_REBUILD=1 to rebuild on load)")


def engine_for(engines, module: str) -> dict | None:
    """The manifest entry of `module`'s engine (the last one listed wins)."""
    found = [e for e in engines if e.get("module") == module]
    return dict(found[-1]) if found else None
