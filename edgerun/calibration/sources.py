"""Calibration images: an image folder, a list file, a video file or a camera.

    source = open_source("photos/", seed=0)
    for name, rgb in source.calibration(256): ...     # (H, W, 3) uint8 RGB
    for name, rgb in source.holdout(64): ...          # images the calibration did not see

A folder is searched recursively for jpg, jpeg, png, webp and bmp files (any case), shuffled with
`seed`; calibration takes the first readable ones, the held-out set the rest. Where the rest is
shorter than asked, it is filled with new views (crops and flips) of the source images, which
differ from every calibration sample. A video gives every `every`-th frame to calibration and the
frames half-way between to the held-out set; a camera ("camera:INDEX") gives every `every`-th
frame, first to calibration, then to the held-out set. Unreadable files and frames are skipped
and counted in `report`. `calibration(n, augment=True)` tops a folder with fewer than `n` images
up with crops and flips too (other ones than the held-out views).
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
CAMERA_EVERY = 5
Item = tuple[str, np.ndarray]  # (name, HxWx3 uint8 RGB)


@dataclass
class SourceReport:
    """What a source held and what was used: `skipped` lists (name, reason) of unreadable items."""

    source: str
    kind: str
    found: int | None = None  # candidate files or frames; None for a camera
    calibration: int = 0
    held_out: int = 0
    views: int = 0  # held-out images made by cropping/flipping source images
    calibration_views: int = 0  # calibration images made so (--augment)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"source": self.source, "kind": self.kind, "found": self.found, "calibration": self.calibration,
                "held_out": self.held_out, "views": self.views,
                "calibration_views": self.calibration_views, "skipped": len(self.skipped)}


def open_source(spec: str, *, seed: int = 0, every: int | None = None, samples: int = 0):
    """The source `spec` names: a folder, a .txt list of image paths, a video file or camera:INDEX.
    `samples` (the calibration count) spreads a video's default frame step over the whole file."""
    spec = str(spec)
    if spec.startswith("camera:"):
        index = spec.split(":", 1)[1]
        if not index.isdigit():
            raise InputError(f"camera source {spec!r}: expected camera:INDEX with a device number, e.g. camera:0")
        return CameraSource(int(index), every or CAMERA_EVERY, spec)
    path = Path(spec)
    if path.is_dir():
        return FolderSource(_find_images(path), seed, spec, "folder")
    if path.is_file() and path.suffix.lower() == ".txt":
        return FolderSource(_list_file(path), seed, spec, "list")
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        return VideoSource(path, every, samples, spec)
    if not path.exists():
        raise InputError(f"calibration data {spec!r} does not exist; give an image folder, a .txt list of "
                         f"images, a video file ({', '.join(VIDEO_SUFFIXES)}) or camera:INDEX")
    raise InputError(f"calibration data {spec!r} is not a folder, a .txt list, a video file "
                     f"({', '.join(VIDEO_SUFFIXES)}) or camera:INDEX")


def _find_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _list_file(path: Path) -> list[Path]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [path.parent / line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _no_images(report: SourceReport, what: str) -> InputError:
    reasons = "; ".join(f"{n}: {r}" for n, r in report.skipped[:3])
    more = f" ({len(report.skipped)} unreadable: {reasons})" if report.skipped else ""
    return InputError(f"calibration data {report.source!r} has no readable {what}{more}; supported images: "
                      f"{', '.join(s[1:] for s in IMAGE_SUFFIXES)}")


class FolderSource:
    """Image files in a seeded order; calibration takes from the front, the held-out set the rest."""

    def __init__(self, files: list[Path], seed: int, spec: str, kind: str):
        self.report = SourceReport(spec, kind, found=len(files))
        order = np.random.default_rng(seed).permutation(len(files))
        self.files = [files[i] for i in order]
        self.seed = seed
        self._used = 0  # files consumed by calibration

    def _load(self, path: Path) -> np.ndarray | None:
        from ..runtime.image import load_image

        try:
            return load_image(path)
        except (InputError, OSError) as exc:
            self.report.skipped.append((str(path), str(exc)))
            return None

    def calibration(self, n: int, augment: bool = False) -> Iterator[Item]:
        """The first `n` readable images; with `augment`, a folder holding fewer is topped up to
        `n` with crops and flips of them (seeded apart from the held-out views)."""
        if not self.files:
            raise _no_images(self.report, "images")
        for i, path in enumerate(self.files):
            if self.report.calibration >= n:
                return
            self._used = i + 1
            image = self._load(path)
            if image is not None:
                self.report.calibration += 1
                yield str(path), image
        if self.report.calibration == 0:
            raise _no_images(self.report, "images")
        if augment:
            for name, image in itertools.islice(self._views(self.seed + 2), n - self.report.calibration):
                self.report.calibration += 1
                self.report.calibration_views += 1
                yield name, image

    def holdout(self, n: int) -> Iterator[Item]:
        count = 0
        for path in self.files[self._used:]:
            if count >= n:
                return
            image = self._load(path)
            if image is not None:
                count += 1
                self.report.held_out += 1
                yield str(path), image
        for name, image in itertools.islice(self._views(self.seed + 1), n - count):
            self.report.views += 1
            self.report.held_out += 1
            yield name, image

    def _views(self, seed: int) -> Iterator[Item]:
        """Crops and flips of the source images, new ones for ever, in a seeded order."""
        rng = np.random.default_rng(seed)
        skipped = {name for name, _ in self.report.skipped}
        readable = [p for p in self.files if str(p) not in skipped]
        for round_ in itertools.count():
            for path in readable:
                image = self._load(path)
                if image is not None:
                    yield f"{path}#view{round_}", view(image, rng)


def view(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random crop (55-90 % of each side) of `image`, flipped left-right half of the time."""
    h, w = image.shape[:2]
    ch, cw = (max(1, int(s * rng.uniform(0.55, 0.9))) for s in (h, w))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out = image[top:top + ch, left:left + cw]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def _rgb(frame: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(frame[..., ::-1]) if frame.ndim == 3 and frame.shape[2] == 3 else frame


class VideoSource:
    """Every `every`-th frame of a video file; held-out frames sit half-way between them."""

    def __init__(self, path: Path, every: int | None, samples: int, spec: str):
        import cv2

        self.path = path
        cap = cv2.VideoCapture(str(path))
        try:
            if not cap.isOpened():
                raise InputError(f"video {spec!r} cannot be opened by OpenCV; is it a video file?")
            frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        finally:
            cap.release()
        self.report = SourceReport(spec, "video", found=frames or None)
        spread = max(2, frames // max(1, samples)) if frames else 10  # calibration spans the whole video
        self.every = every or spread

    def _frames(self, offset: int, n: int, counter: str) -> Iterator[Item]:
        import cv2

        cap = cv2.VideoCapture(str(self.path))
        taken = 0
        try:
            for index in itertools.count():
                if taken >= n or not cap.grab():
                    break
                if index % self.every != offset:
                    continue
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    self.report.skipped.append((f"{self.path}@{index}", "frame could not be decoded"))
                    continue
                taken += 1
                setattr(self.report, counter, getattr(self.report, counter) + 1)
                yield f"{self.path}@{index}", _rgb(frame)
        finally:
            cap.release()
        if counter == "calibration" and taken == 0:
            raise _no_images(self.report, "frames")

    def calibration(self, n: int, augment: bool = False) -> Iterator[Item]:  # frames enough: no views
        return self._frames(0, n, "calibration")

    def holdout(self, n: int) -> Iterator[Item]:
        return self._frames(self.every // 2, n, "held_out") if self.every > 1 else iter(())


class CameraSource:
    """Every `every`-th frame of a live camera: calibration frames first, then held-out ones."""

    def __init__(self, index: int, every: int, spec: str):
        self.index, self.every = index, every
        self.report = SourceReport(spec, "camera")
        self._cap = None

    def _capture(self):
        import cv2

        if self._cap is None:
            self._cap = cv2.VideoCapture(self.index)
            if not self._cap.isOpened():
                raise InputError(f"camera {self.index} cannot be opened (camera:{self.index}); check the device "
                                 "index and permissions")
        return self._cap

    def _frames(self, n: int, counter: str) -> Iterator[Item]:
        cap, taken, failures = self._capture(), 0, 0
        for index in itertools.count():
            if taken >= n or failures > 30:
                break
            ok, frame = cap.read()
            if not ok or frame is None:
                failures += 1
                continue
            if index % self.every == 0:
                taken += 1
                setattr(self.report, counter, getattr(self.report, counter) + 1)
                yield f"camera:{self.index}@{index}", _rgb(frame)
        if counter == "calibration" and taken == 0:
            raise _no_images(self.report, "frames")

    def calibration(self, n: int, augment: bool = False) -> Iterator[Item]:  # frames enough: no views
        return self._frames(n, "calibration")

    def holdout(self, n: int) -> Iterator[Item]:
        return self._frames(n, "held_out")

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
