"""Per-backend variants of a module: which file a backend runs where one file cannot serve all.

A variant is a module of its own named `NAME@TAG` (`vision@tensorrt`: symmetric Q/DQ with standard
ops for TensorRT) beside the module `NAME` that the tasks name; each lists the backends it is for
in `backends`. `select_module` picks, for a backend, the first variant of `NAME` listing it; the
module `NAME` itself when it lists the backend or when no variant does (a bundle without variants
behaves as before).
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
        if backend in spec.backends:
            return variant, spec
    return name, base
