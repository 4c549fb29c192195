"""Engine files and their manifest entries, written into an existing bundle without a half state.

Each engine file gets a new name (`engines/NAME.PRECISION.SHA8.engine`) and is written atomically;
then manifest.json is replaced atomically with the new files and entries; only then are the
engines it replaced deleted. A crash leaves either the old manifest (the new file unlisted and
ignored) or the new one, never a manifest whose checksums do not match its files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from ..atomic import atomic_write
from ..bundle import Bundle, sha256_file
from ..manifest import MANIFEST_NAME, FileEntry

ENGINE_DIR = "engines"


def engine_name(module: str, precision: str, data: bytes) -> str:
    """Bundle-relative path of a new engine file; '@' in variant names becomes '-'."""
    digest = hashlib.sha256(data).hexdigest()[:8]
    return f"{ENGINE_DIR}/{module.replace('@', '-')}.{precision}.{digest}.engine"


def write_engine_file(bundle: Bundle, rel: str, data: bytes) -> Path:
    return atomic_write(bundle.path / rel, lambda fh: fh.write(data))


def commit_entries(bundle: Bundle, entries: Mapping[str, dict]) -> Bundle:
    """Replace the engine entries of the modules in `entries` ({module: entry}, each entry's file
    already written) and record their files; returns the bundle with its new manifest."""
    m = bundle.manifest
    files = dict(m.files)
    kept = [e for e in m.engines if e.get("module") not in entries]
    new_files = {e["file"] for e in entries.values()}
    stale = [e["file"] for e in m.engines if e.get("module") in entries and e.get("file") not in new_files]
    for rel in stale:
        files.pop(rel, None)
    for rel in new_files:
        path = bundle.path / rel
        files[rel] = FileEntry(sha256_file(path), path.stat().st_size)
    manifest = dataclasses.replace(m, files=files, engines=tuple(kept + list(entries.values())))
    text = json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n"
    atomic_write(bundle.path / MANIFEST_NAME, lambda fh: fh.write(text.encode("utf-8")))
    for rel in stale:
        (bundle.path / rel).unlink(missing_ok=True)
    return Bundle(bundle.path, manifest)
