"""`edge-run camera`: caption, or answer a question about, what a camera sees, as JSON lines.

The loop is small parts, each testable without a camera (the OpenCV side is edgerun.runtime.capture):
- `Scheduler` says whether a frame is due (`--every SECONDS`, on the source's clock);
- `ChangeDetector` says whether the scene changed since the last reading (`--on-change THRESH`),
  by a cheap colour-thumbnail difference (`thumbnail`) or by the distance between the image encoder's
  pooled features (`state_vector`), from the same `Model.encode()` the caption then reuses;
- `Analyser` turns one frame into a `Reading`: encode once, caption or answer from that state,
  and with an index the nearest gallery items;
- `Output` writes each reading and each source event as one JSON line to stdout and to a
  `RecordWriter` (`--record`: appended, flushed and synced per line, so a crash loses nothing);
- `run_camera` wires them to a `FrameReader` (reconnects a lost live source with backoff) behind a
  `LatestFrame` thread (live sources and paced files), or reads a file frame by frame.

The loop imports no torch.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

import numpy as np

from ..errors import InputError, OptionError
from .capture import Frame, FrameReader, LatestFrame, ReconnectPolicy, Source, SourceLostError, open_capture
from .state import ImageState, encoder_module

TASKS = ("caption", "vqa")
CHANGE_METRICS = ("pixel", "embedding")


@dataclass(frozen=True)
class CameraOptions:
    """What to do with the frames.

    every : at most one reading per `every` seconds of source time (None: as often as the model can)
    on_change : read a frame only when it differs from the last one read by more than this:
        with change="pixel", the mean absolute difference of 32x32 colour thumbnails, in [0, 1];
        with change="embedding", the cosine distance of the pooled image features, in [0, 2]
    every_frame : a file is read frame by frame, not at its own frame rate (files only)
    k : how many nearest gallery items to report where there is an index"""

    task: str = "caption"
    question: str | None = None
    prompt: str | None = None
    every: float | None = None
    on_change: float | None = None
    change: str = "pixel"
    every_frame: bool = False
    k: int = 3

    def __post_init__(self):
        if self.task not in TASKS:
            raise OptionError(f"unknown task {self.task!r}; valid: {', '.join(TASKS)}")
        if self.task == "vqa" and not (self.question and self.question.strip()):
            raise OptionError('--task vqa needs a question: add --question "what is on the table?"')
        if self.task != "vqa" and self.question is not None:
            raise OptionError("--question is for --task vqa")
        if self.prompt is not None and self.task != "caption":
            raise OptionError("--prompt is for --task caption")
        if self.every is not None and not self.every > 0:
            raise OptionError(f"--every must be a positive number of seconds, got {self.every}")
        if self.change not in CHANGE_METRICS:
            raise OptionError(f"unknown change metric {self.change!r}; valid: {', '.join(CHANGE_METRICS)}")
        if self.on_change is not None and not 0 < self.on_change < (1 if self.change == "pixel" else 2):
            top = "1 (pixel)" if self.change == "pixel" else "2 (embedding)"
            raise OptionError(f"--on-change must be between 0 and {top}, got {self.on_change}")
        if self.k < 1:
            raise OptionError(f"-k must be at least 1, got {self.k}")


class Scheduler:
    """Whether a frame at source time `t` (seconds) is due: the first always is, then one every
    `every` seconds after the last one marked (every=None: every frame is)."""

    def __init__(self, every: float | None):
        self.every = every
        self.last: float | None = None

    def due(self, t: float) -> bool:
        return self.every is None or self.last is None or t - self.last >= self.every - 1e-9

    def mark(self, t: float) -> None:
        self.last = t


# -- change detection ------------------------------------------------------------------------------


def thumbnail(image: np.ndarray, side: int = 32) -> np.ndarray:
    """A colour thumbnail by block means: blind to sensor noise, and cheap next to any model.

    image : shape = (H, W, C) or (H, W), uint8. Returns shape = (about side, about side, C), float32
    in [0, 1]."""
    image = image if image.ndim == 3 else image[..., None]
    h, w, c = image.shape
    by, bx = max(1, h // side), max(1, w // side)
    crop = image[: h // by * by, : w // bx * bx].astype(np.float32)
    return crop.reshape(h // by, by, w // bx, bx, c).mean(axis=(1, 3)) / 255.0


def state_vector(state: ImageState) -> np.ndarray:
    """The image encoder's first output for the state's first image, mean-pooled over every axis but
    the last (tokens, or height and width) and L2-normalised -> shape = (D,), float32."""
    values = next(iter(state.values.values()))[0]
    pooled = values.reshape(-1, values.shape[-1]).mean(axis=0).astype(np.float32)
    return pooled / max(float(np.linalg.norm(pooled)), 1e-12)


def pixel_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(1.0 - np.dot(a, b))


class ChangeDetector:
    """Whether a signature (a thumbnail, a pooled feature vector) is more than `threshold` away from
    the last accepted one; the first one always is. Compare against the last frame read, not the
    last frame seen, so that a slow drift adds up to a change."""

    def __init__(self, threshold: float, distance: Callable[[np.ndarray, np.ndarray], float]):
        self.threshold, self.distance = threshold, distance
        self.reference: np.ndarray | None = None

    def check(self, signature: np.ndarray) -> tuple[bool, float | None]:
        """-> (changed, distance to the reference; None for the first)."""
        if self.reference is None:
            return True, None
        d = self.distance(signature, self.reference)
        return d > self.threshold, d

    def accept(self, signature: np.ndarray) -> None:
        self.reference = signature


# -- readings ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Nearest:
    rank: int
    score: float
    path: str


@dataclass
class Reading:
    """What one frame gave. latency_ms: encode (preprocess + image encoder), the task, search, total
    (all of the analysis), and, set when written, age (from capture to output)."""

    frame: Frame
    task: str
    text: str
    score: float
    question: str | None = None
    change: float | None = None
    nearest: list[Nearest] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {"event": self.task, "time": iso_time(self.frame.stamp), "frame": self.frame.number,
               "t": round(self.frame.time, 3), "text": self.text, "score": round(self.score, 4)}
        if self.question is not None:
            out["question"] = self.question
        if self.change is not None:
            out["change"] = round(self.change, 4)
        if self.nearest:
            out["nearest"] = [n.__dict__ for n in self.nearest]
        return {**out, "latency_ms": self.latency_ms}


class Analyser:
    """One frame -> a Reading, or None where the scene has not changed enough. The frame is encoded
    once (`model.encode`); the caption or answer, the embedding change and, where the index was
    built by this bundle and shares its encoder, the gallery search all start from that state.

    model : an edgerun Model serving options.task. index / index_model : an open Index and the model
    that embeds a frame for it (the same model, or the bundle the index was built with)."""

    def __init__(self, model, options: CameraOptions, *, decoding: dict | None = None, index=None,
                 index_model=None):
        if options.task not in model.tasks:
            raise OptionError(f"bundle {model.bundle.path} does not serve {options.task}; it serves: "
                              f"{', '.join(model.tasks)} (pick one with --task, or use another bundle)")
        self.model, self.options, self.decoding = model, options, dict(decoding or {})
        self.index, self.index_model = index, index_model if index_model is not None else model
        if index is not None:
            index.check_model(self.index_model)
        encoder = encoder_module(model, options.task)
        shares = "retrieval" in model.tasks and encoder_module(model, "retrieval") == encoder
        self.shared_index_state = index is not None and self.index_model is model and shares
        if options.change == "embedding" and encoder is None:
            raise OptionError(f"--change embedding needs an image encoder module, and bundle "
                              f"{model.bundle.path} has none; use --change pixel")
        self.detector = None
        if options.on_change is not None:
            metric = pixel_distance if options.change == "pixel" else cosine_distance
            self.detector = ChangeDetector(options.on_change, metric)

    def warm_up(self) -> None:
        """Run every model once on a grey frame, so that onnxruntime's session start-up is not counted
        in the first reading's latency, nor makes a live source's first frame stale."""
        grey = np.full((64, 64, 3), 128, np.uint8)
        state = self.model.encode(grey, task=self.options.task)
        self._task(state, {})
        self._nearest(grey, state, {})

    def analyse(self, frame: Frame) -> Reading | None:
        start, latency = time.perf_counter(), {}
        signature, change = None, None
        if self.detector is not None and self.options.change == "pixel":
            signature = thumbnail(frame.image)
            changed, change = self.detector.check(signature)
            if not changed:
                return None
        rgb = np.ascontiguousarray(frame.image[..., ::-1])
        state = self.model.encode(rgb, task=self.options.task)
        latency["encode"] = _ms(start)
        if self.detector is not None and self.options.change == "embedding":
            signature = state_vector(state)
            changed, change = self.detector.check(signature)
            if not changed:
                return None
        result = self._task(state, latency)
        nearest = self._nearest(rgb, state, latency)
        if self.detector is not None:
            self.detector.accept(signature)
        latency["total"] = _ms(start)
        return Reading(frame, self.options.task, result.text, result.score, self.options.question, change,
                       nearest, latency)

    def _task(self, state: ImageState, latency: dict):
        start = time.perf_counter()
        if self.options.task == "caption":
            result = self.model.caption(state=state, prompt=self.options.prompt, **self.decoding)
        else:
            result = self.model.answer(state=state, question=self.options.question, **self.decoding)
        latency[self.options.task] = _ms(start)
        return result[0] if isinstance(result, list) else result  # num_return_sequences > 1: the best

    def _nearest(self, rgb: np.ndarray, state: ImageState, latency: dict) -> list[Nearest]:
        if self.index is None:
            return []
        start = time.perf_counter()
        if self.shared_index_state:
            vector = self.index_model.embed_images(state=state)
        else:
            vector = self.index_model.embed_images([rgb])
        scores, ids = self.index.search_vectors(vector, self.options.k)
        latency["search"] = _ms(start)
        return [Nearest(rank, round(float(s), 4), self.index.items[i])
                for rank, (s, i) in enumerate(zip(scores[0], ids[0]), 1) if i >= 0]


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


def iso_time(stamp: float) -> str:
    """A time.time() value as UTC ISO 8601 with milliseconds, e.g. 2025-01-31T12:00:00.250Z."""
    iso = datetime.fromtimestamp(stamp, timezone.utc).isoformat(timespec="milliseconds")
    return iso.replace("+00:00", "Z")


# -- output --------------------------------------------------------------------------------------------


class RecordWriter:
    """`--record FILE.jsonl`: appends one JSON object a line, each flushed and synced to disk as it is
    written, so a crash or a power cut loses at most the line being written. An existing record is
    continued; a last line a crash cut short is closed first, so every later line parses."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - open for the whole run
            if self._fh.tell() > 0:
                self._fh.seek(self._fh.tell() - 1)
                if self._fh.read(1) != "\n":
                    self._fh.write("\n")
        except OSError as exc:
            raise InputError(f"--record {path} cannot be written: {exc.strerror or exc}") from None

    def write(self, obj: dict) -> None:
        self._fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


class Output:
    """Writes each object as one JSON line to `stream` and to the record (from any thread).
    `notify(text)` also hears the source events a person watching should see (loss, recovery).
    Once the reader of `stream` has gone (`| head`), `closed` is set and lines go to the record alone."""

    NOTICES = ("lost", "retry", "recovered", "gave_up")

    def __init__(self, stream: TextIO | None = None, record: RecordWriter | None = None,
                 notify: Callable[[str], None] | None = None):
        self.stream, self.record, self.notify = stream or sys.stdout, record, notify
        self.closed = False
        self._lock = threading.Lock()

    def emit(self, obj: dict) -> None:
        line = json.dumps(obj, ensure_ascii=False)
        with self._lock:
            if not self.closed:
                try:
                    self.stream.write(line + "\n")
                    self.stream.flush()
                except BrokenPipeError:
                    self.closed = True
            if self.record is not None:
                self.record.write(obj)

    def event(self, kind: str, **fields) -> None:
        """A source event: opened, lost, retry, recovered, ended, gave_up, end."""
        self.emit({"event": kind, "time": iso_time(time.time()), **fields})
        if self.notify is not None and kind in self.NOTICES:
            self.notify(f"camera: {kind} " + " ".join(f"{k}={v}" for k, v in fields.items()))


# -- the loop --------------------------------------------------------------------------------------------


@dataclass
class Summary:
    """How a run ended. reason: "end of file", "interrupted", "window closed", "output closed" or
    "source lost".
    frames: read from the source; skipped: read but never looked at because the model was busy;
    unchanged: due, but not read because the scene had not changed."""

    reason: str
    frames: int = 0
    readings: int = 0
    skipped: int = 0
    unchanged: int = 0
    seconds: float = 0.0


def run_camera(source: Source, analyser: Analyser, output: Output, *, opener: Callable = open_capture,
               policy: ReconnectPolicy | None = None, window=None) -> Summary:
    """Read `source` until it ends, the user interrupts (Ctrl-C) or closes the window, or a lost
    live source does not come back; write each reading with `output`; end with an "end" event.
    Raises SourceLostError after writing that event, when a lost source did not come back."""
    options = analyser.options
    if options.every_frame and source.live:
        raise OptionError(f"--every-frame reads a video file frame by frame; {source} is live (frames come "
                          "when the camera sends them): leave it out, or use --every")
    analyser.warm_up()
    reader = FrameReader(source, opener, report=output.event, policy=policy or ReconnectPolicy())
    reader.open()
    latest = None if options.every_frame else LatestFrame(reader, pace=not source.live).start()
    summary, start = Summary("end of file"), time.monotonic()
    try:
        frames = iter(reader.next, None) if latest is None else _latest_frames(latest)
        summary.reason = _loop(frames, analyser, output, Scheduler(options.every), summary, window)
    except KeyboardInterrupt:
        summary.reason = "interrupted"
    except SourceLostError:
        summary.reason = "source lost"
        raise
    finally:
        if latest is not None:
            latest.stop()
            summary.skipped = latest.skipped
        reader.close()
        summary.frames, summary.seconds = reader.frames, round(time.monotonic() - start, 3)
        output.event("end", **summary.__dict__)
    return summary


def _latest_frames(latest: LatestFrame) -> Iterator[Frame]:
    """The newest frames as they come, until the reader ends (wakes twice a second, so Ctrl-C is heard)."""
    while True:
        frame = latest.get(timeout=0.5)
        if frame is not None:
            yield frame
        elif latest.done:
            return


def _loop(frames: Iterator[Frame], analyser: Analyser, output: Output, scheduler: Scheduler, summary: Summary,
          window) -> str:
    text = ""
    for frame in frames:
        if window is not None and not window.show(frame.image, text):
            return "window closed"
        if not scheduler.due(frame.time):
            continue
        reading = analyser.analyse(frame)
        if reading is None:
            summary.unchanged += 1
            continue
        scheduler.mark(frame.time)
        reading.latency_ms["age"] = round((time.time() - frame.stamp) * 1000, 3)
        output.emit(reading.to_json())
        summary.readings += 1
        if output.closed:
            return "output closed"
        text = reading.text
    return "end of file"
