"""Remember which bundle files were verified, so loading a bundle need not re-hash them.

One JSON file, ``verified.json``, under ``$EDGERUN_CACHE_DIR``, else
``$XDG_CACHE_HOME/edgerun``, else ``~/.cache/edgerun``:

    {"format": "edgerun-verify-cache", "version": 1,
     "bundles": {"/real/path/of/bundle": {"vision.onnx": [size, mtime_ns, ctime_ns, inode, sha256]}}}

The cache is an optimisation only: if it cannot be read or written (a read-only home,
a full disk, a concurrent writer), callers just hash again. It never makes a load fail.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

_FORMAT = "edgerun-verify-cache"
_VERSION = 1
_NAME = "verified.json"
log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where edge-run keeps its caches."""
    explicit = os.environ.get("EDGERUN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "edgerun"


def _read_all() -> dict[str, dict]:
    try:
        data = json.loads((cache_dir() / _NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    ok = isinstance(data, dict) and data.get("format") == _FORMAT and data.get("version") == _VERSION
    bundles = data.get("bundles") if ok else None
    return bundles if isinstance(bundles, dict) else {}


def load(root: Path) -> dict[str, list]:
    """The verified entries recorded for the bundle at `root` (a resolved path)."""
    entries = _read_all().get(str(root))
    return entries if isinstance(entries, dict) else {}


def store(root: Path, entries: dict[str, list]) -> None:
    """Record `entries` as the bundle's verified files, replacing what was there.

    Entries of bundles that no longer exist are dropped. Written to a temporary
    file and renamed over the cache, so readers never see a half-written file.
    """
    bundles = {k: v for k, v in _read_all().items() if k != str(root) and os.path.isdir(k)}
    if entries:
        bundles[str(root)] = entries
    text = json.dumps({"format": _FORMAT, "version": _VERSION, "bundles": bundles})
    directory = cache_dir()
    tmp = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{_NAME}.", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, directory / _NAME)
    except OSError as exc:
        log.debug("cannot write the verification cache in %s (%s); bundles will be re-hashed", directory, exc)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
