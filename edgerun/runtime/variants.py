"""Per-backend variants of a module: which file a backend runs where one file cannot serve all.

A variant is a module of its own named `NAME@TAG` (`vision@tensorrt`: symmetric Q/DQ with standard
ops for TensorRT) beside the module `NAME` that the tasks name; each lists the backends it is for
in `backends`. `select_module` picks, for a backend, the first variant of `NAME` listing it; the
module `NAME` itself when it lists the backend or when no variant does (a bundle without variants
behaves as before). A variant whose manifest entry has `when` serves only the calls it names
(`select_decoder`).
"""
from __future__ import annotations

from ..errors import BundleError
from ..manifest import Manifest, ModuleSpec

SEPARATOR = "@"


def variants_of(manifest: Manifest, name: str) -> list[str]:
    """The variant module names of `name` (`name@...`), in manifest order."""
    prefix = name + SEPARATOR
    return [m for m in manifest.modules if m.startswith(prefix)]


def select_module(manifest: Manifest, name: str, backend: str) -> tuple[str, ModuleSpec]:
    """(module name, spec) that `backend` runs for the module `name` the tasks refer to."""
    if name not in manifest.modules:
        raise BundleError(f"the manifest has no module {name!r}; its modules: {sorted(manifest.modules)}")
    base = manifest.modules[name]
    if backend in base.backends:
        return name, base
    for variant in variants_of(manifest, name):
        spec = manifest.modules[variant]
        if backend in spec.backends and not spec.extra.get("when"):
            return variant, spec
    return name, base


def select_decoder(manifest: Manifest, name: str, backend: str, batch: int, beams: int) -> tuple[str, ModuleSpec]:
    """(module name, spec) that `backend` runs for decoder `name` on `batch` images x `beams` beams:
    a variant made for exactly that call (its `when`, e.g. {"batch": 1, "beams": 3}: the beams as
    cross-attention heads, edgerun.export.beam_heads) where there is one, else `select_module`'s."""
    for variant in variants_of(manifest, name):
        spec = manifest.modules[variant]
        when = spec.extra.get("when")
        if when and backend in spec.backends and (when.get("batch"), when.get("beams")) == (batch, beams):
            return variant, spec
    return select_module(manifest, name, backend)


def at_least(version: str, minimum: str) -> bool:
    """Whether release `version` is `minimum` or newer (pre-release and local tags ignored)."""
    from packaging.version import Version

    return Version(version).release >= Version(str(minimum)).release


def check_requirements(name: str, spec: ModuleSpec, installed: dict[str, str] | None = None) -> None:
    """Refuse a module whose file needs a newer library than this machine has (`requires` in its
    manifest entry, e.g. {"onnxruntime": "1.23"} for block-wise INT8 decoders), naming the fix."""
    for package, minimum in (spec.extra.get("requires") or {}).items():
        have = (installed or {}).get(package) or _version(package)
        if have is None or not at_least(have, minimum):
            raise BundleError(
                f"module {name!r} ({spec.file}) needs {package} >= {minimum}; this machine has "
                f"{have or 'none'}: pip install -U '{package}>={minimum}', or calibrate the bundle again "
                f"with --decoder-int8 dynamic (standard ops)")


def _version(package: str) -> str | None:
    """The version of the importable module `package` (onnxruntime-gpu installs `onnxruntime` too)."""
    import importlib

    try:
        return getattr(importlib.import_module(package), "__version__", None)
    except ImportError:
        return None
