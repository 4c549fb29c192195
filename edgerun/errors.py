"""The one exception family edge-run raises at its API boundary.

Every message says what was wrong and what would have been valid, so that the
CLI can print it as a single line and exit non-zero.
"""
from __future__ import annotations


class EdgeRunError(Exception):
    """Base class of every error edge-run raises for a user's mistake or a bad file."""


class BundleError(EdgeRunError):
    """A bundle is missing, malformed, corrupted, or refers outside itself."""


class InputError(EdgeRunError, ValueError):
    """An input (image, text, path) cannot be used."""


class OptionError(EdgeRunError, ValueError):
    """An option is unknown or out of range."""


class ExportError(EdgeRunError):
    """An export failed: unsupported model, parity check failed, or a tool is missing."""


class UnsupportedModelError(ExportError):
    """The source model's architecture is not one edge-run can export."""


class MissingDependencyError(EdgeRunError, ImportError):
    """An optional dependency needed for this command is not installed."""


def require(module: str, extra: str):
    """Import an optional dependency, or fail with the install line that fixes it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module} is needed for this; install it with: pip install 'edge-run[{extra}]'"
        ) from exc
