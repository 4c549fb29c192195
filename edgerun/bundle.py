"""The bundle: a directory holding manifest.json, the ONNX modules, their external data,
TensorRT engines and the tokenizer. Both halves of edge-run go through this module:
export writes bundles with `BundleWriter`, the runtime reads them with `open_bundle`.

A bundle is written under a temporary name beside its destination and renamed as a
whole, so a crash never leaves a half bundle that loads. Every file's size and sha256
are recorded in the manifest; `open_bundle` checks them, and remembers files it has
verified (by size, mtime, ctime and inode) so that loading does not re-hash gigabytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import secrets
import shutil
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from edgerun import _verifycache
from edgerun._describe import describe
from edgerun.errors import BundleError, OptionError
from edgerun.manifest import (
    DTYPES,
    FORMAT,
    MANIFEST_NAME,
    PRECISIONS,
    VERSION,
    FileEntry,
    Manifest,
    ManifestFieldError,
    ModuleSpec,
    TaskSpec,
    TensorSpec,
    check_relpath,
)
from edgerun.onnxrefs import external_data_locations

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "DTYPES",
    "FORMAT",
    "PRECISIONS",
    "VERIFY_MODES",
    "VERSION",
    "Bundle",
    "BundleWriter",
    "FileEntry",
    "Manifest",
    "ModuleSpec",
    "TaskSpec",
    "TensorSpec",
    "ValidationReport",
    "describe",
    "open_bundle",
    "sha256_file",
    "validate_bundle",
]

VERIFY_MODES = ("full", "cached", "none")
_CHUNK = 4 << 20
_Present = tuple[Path, os.stat_result]  # a file found in place, with its stat


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Lowercase hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                return digest.hexdigest()
            digest.update(view[:n])


def _short(sha: str) -> str:
    return sha[:12] + "…"


class _Problems:
    """Collects problems (validate) or raises on the first one (open)."""

    def __init__(self, root: Path, collect: bool):
        self.root = root
        self.collect = collect
        self.items: list[str] = []

    def add(self, message: str) -> None:
        message = f"bundle {self.root}: {message}"
        if not self.collect:
            raise BundleError(message)
        self.items.append(message)


def _inside(root: Path, rel: str) -> Path | None:
    """`root / rel` resolved (symlinks followed), or None if it leaves `root` (a resolved path)."""
    target = (root / rel).resolve()
    try:
        target.relative_to(root)
    except ValueError:
        return None
    return target


def _ref_problem(onnx_rel: str, location: str, files: Mapping[str, object]) -> str | None:
    """Why an ONNX file's external-data `location` is unacceptable, or None if it is fine."""
    head = f"file {onnx_rel!r} refers to external data {location!r}"
    if not location:
        return f"{head}: an empty location; re-export the bundle"
    if "\\" in location or location.startswith("/") or (len(location) > 1 and location[1] == ":"):
        return (f"{head}, an absolute or backslash path; external data must be a relative path "
                "inside the bundle")
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(onnx_rel), location))
    if joined == ".." or joined.startswith("../"):
        return f"{head}, which leaves the bundle; external data must sit inside the bundle"
    if joined not in files:
        return f"{head} ({joined!r}), which is not a file of the bundle; re-export the bundle"
    return None


def _read_manifest(root: Path) -> Manifest:
    """Parse and validate manifest.json; every failure here is fatal."""
    if not root.exists():
        raise BundleError(f"bundle {root} does not exist; expected a directory written by edge-run export")
    if not root.is_dir():
        raise BundleError(f"bundle {root} is not a directory; a bundle is a directory holding "
                          f"{MANIFEST_NAME}")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise BundleError(
            f"bundle {root} has no {MANIFEST_NAME}; it is not an edge-run bundle or its export did not finish"
        )
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BundleError(f"bundle {root}: cannot read {MANIFEST_NAME}: {exc}") from None
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError both
        raise BundleError(
            f"bundle {root}: {MANIFEST_NAME} is not valid JSON ({exc}); re-export the bundle"
        ) from None
    try:
        return Manifest.from_dict(data)
    except BundleError as exc:
        raise BundleError(f"bundle {root}: {exc}") from None


def _check_files(root: Path, manifest: Manifest, problems: _Problems) -> dict[str, _Present]:
    """Check paths stay inside, files exist and sizes match; return the files fit to hash."""
    for where, rel in manifest.paths():
        if rel not in manifest.files:
            problems.add(f"{where} = {rel!r} is not listed in the manifest's files, so it cannot be "
                         "verified; re-export the bundle")
    present = {}
    for rel, entry in manifest.files.items():
        target = _inside(root, rel)
        if target is None:
            problems.add(f"file {rel!r} resolves to {(root / rel).resolve()}, outside the bundle "
                         "(a symlink?); bundle files must stay inside the bundle")
            continue
        try:
            st = os.stat(target)
        except (FileNotFoundError, NotADirectoryError):
            problems.add(f"file {rel!r} listed in the manifest is missing; the bundle is incomplete "
                         "— re-export it")
            continue
        except OSError as exc:
            problems.add(f"file {rel!r} cannot be read: {exc}")
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.add(f"{rel!r} is not a regular file; the manifest lists it as one")
        elif st.st_size != entry.size:
            problems.add(f"file {rel!r} is {st.st_size} bytes but the manifest records {entry.size}; "
                         "the file is corrupted or was replaced — re-export the bundle")
        else:
            present[rel] = (target, st)
    return present


def _check_onnx_refs(files: Mapping[str, object], paths: Mapping[str, Path], problems: _Problems) -> None:
    """Every external-data location of every .onnx file must be a file of the bundle."""
    for rel, path in paths.items():
        if not rel.endswith(".onnx"):
            continue
        try:
            locations = external_data_locations(path)
        except BundleError as exc:
            problems.add(f"file {rel!r}: {exc}")
            continue
        except OSError as exc:
            problems.add(f"file {rel!r} cannot be read: {exc}")
            continue
        for location in locations:
            problem = _ref_problem(rel, location, files)
            if problem:
                problems.add(problem)


def _stat_key(st: os.stat_result, sha: str) -> list:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, sha]


def _check_hashes(root: Path, manifest: Manifest, present: Mapping[str, _Present],
                  verify: str, problems: _Problems) -> None:
    """Hash the files ("full"), or those whose stat changed since last verified ("cached")."""
    known = _verifycache.load(root) if verify == "cached" else {}
    verified = {}
    try:
        for rel, (target, st) in present.items():
            expected = manifest.files[rel].sha256
            key = _stat_key(st, expected)
            if known.get(rel) == key:
                verified[rel] = key
                continue
            try:
                actual = sha256_file(target)
            except OSError as exc:
                problems.add(f"file {rel!r} cannot be read: {exc}")
                continue
            if actual != expected:
                problems.add(f"file {rel!r} has sha256 {_short(actual)} but the manifest records "
                             f"{_short(expected)}; the file is corrupted or was replaced "
                             "— re-export the bundle")
            elif _stat_key(os.stat(target), expected) == key:  # unchanged while it was hashed
                verified[rel] = key
    finally:
        if verified != known:
            _verifycache.store(root, verified)


def _inspect(path: str | os.PathLike[str], verify: str, problems: _Problems) -> tuple[Manifest, int, int]:
    root = Path(path)
    manifest = _read_manifest(root)
    real = root.resolve()
    present = _check_files(real, manifest, problems)
    _check_onnx_refs(manifest.files, {rel: p for rel, (p, _) in present.items()}, problems)
    if verify != "none":
        _check_hashes(real, manifest, present, verify, problems)
    return manifest, len(present), sum(st.st_size for _, st in present.values())


@dataclass(frozen=True)
class Bundle:
    """An opened, verified bundle. `path` is its resolved directory."""

    path: Path
    manifest: Manifest

    def file(self, rel: str) -> Path:
        """Path of a file of the bundle, e.g. ``bundle.file(bundle.module("vision").file)``."""
        try:
            check_relpath(rel, "path")
        except ManifestFieldError as exc:
            raise BundleError(f"bundle {self.path}: {exc.problem}") from None
        if rel not in self.manifest.files:
            names = sorted(self.manifest.files)
            shown = ", ".join(names[:12]) + (", …" if len(names) > 12 else "")
            raise BundleError(f"bundle {self.path} has no file {rel!r}; its files: {shown}")
        if _inside(self.path, rel) is None:
            raise BundleError(f"bundle {self.path}: file {rel!r} resolves outside the bundle")
        return self.path / rel

    def module(self, name: str) -> ModuleSpec:
        try:
            return self.manifest.modules[name]
        except KeyError:
            raise BundleError(f"bundle {self.path} has no module {name!r}; its modules: "
                              f"{sorted(self.manifest.modules)}") from None

    def task(self, name: str) -> TaskSpec:
        try:
            return self.manifest.tasks[name]
        except KeyError:
            raise BundleError(f"bundle {self.path} does not serve task {name!r}; it serves: "
                              f"{sorted(self.manifest.tasks)}") from None

    def module_bytes(self, name: str) -> int:
        """Size on disk of a module's ONNX file plus its external data."""
        spec = self.module(name)
        files = self.manifest.files
        return sum(files[p].size for p in (spec.file,) + spec.external_data if p in files)

    def size_bytes(self) -> int:
        """Size on disk of every file of the bundle, manifest.json included."""
        total = sum(entry.size for entry in self.manifest.files.values())
        try:
            return total + (self.path / MANIFEST_NAME).stat().st_size
        except OSError:
            return total


def open_bundle(path: str | os.PathLike[str], verify: str = "cached") -> Bundle:
    """Open a bundle directory, checking it first.

    verify: "full" hashes every file; "cached" hashes only files not verified before
    with the same size, mtime, ctime and inode; "none" checks paths and sizes only.
    Raises BundleError on the first problem found.
    """
    if verify not in VERIFY_MODES:
        raise OptionError(f"verify must be one of {list(VERIFY_MODES)}, got {verify!r}")
    manifest, _, _ = _inspect(path, verify, _Problems(Path(path), collect=False))
    return Bundle(Path(path).resolve(), manifest)


@dataclass
class ValidationReport:
    """What `validate_bundle` checked and every problem it found (empty when the bundle is sound)."""

    path: Path
    files_checked: int = 0
    total_bytes: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_bundle(path: str | os.PathLike[str]) -> ValidationReport:
    """Hash every file and check everything, collecting all problems instead of stopping."""
    start = time.perf_counter()
    report = ValidationReport(Path(path))
    problems = _Problems(Path(path), collect=True)
    try:
        _, report.files_checked, report.total_bytes = _inspect(path, "full", problems)
    except BundleError as exc:  # the manifest itself is unreadable: nothing else can be checked
        problems.items.append(str(exc))
    report.problems = problems.items
    report.seconds = time.perf_counter() - start
    return report


class BundleWriter:
    """Write a bundle atomically.

        with BundleWriter("out/blip") as w:
            export_vision(w.dir / "vision.onnx")
            path = w.commit(manifest)          # manifest.files is filled in here

    `dir` is a temporary directory ``.<name>.tmp-<random>`` beside `dest`. `commit`
    records every file's size and sha256, fills in each module's external_data from
    its ONNX file when left empty, checks every path, writes manifest.json, syncs
    and renames the directory to `dest`. If the ``with`` block raises or commit is
    never called, the temporary directory is removed and `dest` is left untouched.
    """

    def __init__(self, dest: str | os.PathLike[str], overwrite: bool = False):
        self.dest = Path(os.path.abspath(dest))
        self.overwrite = overwrite
        self.dir: Path | None = None
        self._committed = False

    def __enter__(self) -> Self:
        self._check_dest()
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        while self.dir is None:
            candidate = self.dest.parent / f".{self.dest.name}.tmp-{secrets.token_hex(4)}"
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            self.dir = candidate
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.dir is not None and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
        return False

    def _check_dest(self) -> None:
        if not os.path.lexists(self.dest):
            return
        if not self.overwrite:
            raise BundleError(f"bundle destination {self.dest} already exists; pass overwrite=True "
                              "(--overwrite) to replace it, or choose another path")
        if not self.dest.is_dir() or not (
            (self.dest / MANIFEST_NAME).is_file() or not any(self.dest.iterdir())
        ):
            raise BundleError(f"bundle destination {self.dest} exists and is not an edge-run bundle "
                              "(no manifest.json); refusing to replace it — remove it or choose another path")

    def commit(self, manifest: Manifest) -> Path:
        """Seal the bundle under `dest` and return that path. `manifest.files` is ignored."""
        if self.dir is None or self._committed:
            raise BundleError("BundleWriter.commit must be called once, inside its `with` block")
        problems = _Problems(self.dest, collect=False)
        paths = _scan(self.dir, problems)
        files = {rel: FileEntry(sha256_file(p), p.stat().st_size) for rel, p in paths.items()}
        _check_onnx_refs(files, paths, problems)
        manifest = _fill_external_data(replace(manifest, files=files), paths, problems)
        for where, rel in manifest.paths():
            if rel not in files:
                problems.add(f"{where} = {rel!r} was not written into the bundle directory")
        text = json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n"
        _write_synced(self.dir / MANIFEST_NAME, text.encode("utf-8"))
        for p in paths.values():
            _fsync_path(p)
        for directory in {p.parent for p in paths.values()} | {self.dir}:
            _fsync_dir(directory)
        self._check_dest()
        self._swap_in()
        self._committed = True
        return self.dest

    def _swap_in(self) -> None:
        """Rename the sealed directory to `dest`, moving an old bundle aside first.

        Between the two renames `dest` is briefly absent; it never holds a half bundle.
        """
        old = None
        if os.path.lexists(self.dest):
            old = self.dest.parent / f".{self.dest.name}.old-{secrets.token_hex(4)}"
            os.replace(self.dest, old)
        try:
            os.replace(self.dir, self.dest)
        except OSError:
            if old is not None:
                os.replace(old, self.dest)
            raise
        _fsync_dir(self.dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _scan(tmp: Path, problems: _Problems) -> dict[str, Path]:
    """Every regular file under `tmp` (manifest.json excepted) by bundle-relative path."""
    real = tmp.resolve()
    found = {}
    for dirpath, dirnames, filenames in os.walk(tmp):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            rel = full.relative_to(tmp).as_posix()
            if full.is_symlink() and (os.path.isabs(os.readlink(full)) or _inside(real, rel) is None):
                problems.add(f"{rel!r} is a symlink to {os.readlink(full)!r}; symlinks in a bundle must be "
                             "relative and stay inside it")
            if name in dirnames:
                continue
            if rel == MANIFEST_NAME:
                continue
            try:
                check_relpath(rel, rel)
            except ManifestFieldError as exc:
                problems.add(f"file name {rel!r} cannot go in a bundle: {exc.problem}")
            if not full.is_file():
                problems.add(f"{rel!r} is not a regular file; a bundle holds regular files only")
                continue
            found[rel] = full
    return found


def _fill_external_data(manifest: Manifest, paths: Mapping[str, Path], problems: _Problems) -> Manifest:
    """Record each module's external-data files from its ONNX file; check declared ones agree."""
    modules = {}
    for name, spec in manifest.modules.items():
        if not spec.file.endswith(".onnx") or spec.file not in paths:
            modules[name] = spec
            continue
        refs = tuple(
            posixpath.normpath(posixpath.join(posixpath.dirname(spec.file), loc))
            for loc in external_data_locations(paths[spec.file])
        )
        if spec.external_data and set(spec.external_data) != set(refs):
            problems.add(f"module {name!r} declares external_data {list(spec.external_data)} but "
                         f"{spec.file} refers to {list(refs)}")
        modules[name] = spec if spec.external_data else replace(spec, external_data=refs)
    return replace(manifest, modules=modules)


def _write_synced(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_path(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
