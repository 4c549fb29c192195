"""Frame sources for `edge-run camera`: what a `--source` names, what the installed OpenCV can open,
and a reader that keeps a live source going.

Three layers, each testable alone:
- `parse_source` turns `--source` text into a `Source` (device, file, url or gst pipeline), and
  `check_support` refuses, before anything opens, a source or a window the installed OpenCV cannot
  serve, naming the build that can (`opencv_support` reads `cv2.getBuildInformation()`).
- `FrameReader` numbers and times frames from a capture opened by a factory (`open_capture`, the
  one place that calls `cv2.VideoCapture`; tests pass their own). A live source that stops giving
  frames is reopened with exponential backoff and the loss, each failed try and the recovery are
  reported; a file ends at its end.
- `LatestFrame` runs a reader on a thread and keeps only the newest frame, so a slow consumer never
  falls behind the camera; a file is released at its own frame rate, as a camera would deliver it.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, MissingDependencyError, OptionError

SOURCE_SYNTAX = ("a device index (0) or /dev/videoN, a video file, a stream URL (rtsp://, rtsps://, rtmp://, "
                 "http://, https://, udp://, tcp://), or gst:PIPELINE")
URL_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp")
OPEN_TIMEOUT_MS = 10_000  # a stream that does not answer is a failed try, not a hang
READ_TIMEOUT_MS = 10_000
DEFAULT_FPS = 25.0  # for a file whose container states no frame rate


class SourceError(InputError):
    """A source could not be opened (or reopened)."""


class SourceLostError(InputError):
    """A live source was lost and did not come back within the allowed retries."""


@dataclass(frozen=True)
class Source:
    """What `--source` names. kind: "device" (target: index or /dev path), "file", "url" or "gst"
    (target: the pipeline, without the `gst:` prefix)."""

    kind: str
    target: int | str
    text: str

    @property
    def live(self) -> bool:
        """Frames arrive in real time and a lost source may come back; a file ends at its end."""
        return self.kind != "file"

    def __str__(self) -> str:
        names = {"device": "camera", "file": "video file", "url": "stream", "gst": "GStreamer pipeline"}
        return f"{names[self.kind]} {self.target}"


def parse_source(text: str) -> Source:
    """`--source` text -> Source. InputError for a file that is not there, OptionError for text
    that is none of the valid forms."""
    text = str(text).strip()
    if not text:
        raise OptionError(f"--source is empty; give {SOURCE_SYNTAX}")
    if re.fullmatch(r"\d+", text):
        return Source("device", int(text), text)
    if text.startswith("gst:"):
        pipeline = text[4:].strip()
        if not pipeline:
            raise OptionError("--source gst: needs a pipeline after it, e.g. "
                              "'gst:nvarguscamerasrc ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! "
                              "video/x-raw,format=BGR ! appsink drop=true'")
        return Source("gst", pipeline, text)
    url = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if url:
        if url.group(1).lower() not in URL_SCHEMES:
            raise OptionError(f"--source {text}: unknown scheme {url.group(1)}://; give {SOURCE_SYNTAX}")
        return Source("url", text, text)
    if re.fullmatch(r"/dev/video\d+", text):
        return Source("device", text, text)
    return _file_source(text)


def _file_source(text: str) -> Source:
    path = Path(text).expanduser()
    if path.is_file():
        return Source("file", str(path), text)
    prefix = re.match(r"([A-Za-z][A-Za-z0-9+.-]+):", text)  # one letter is a Windows drive
    if prefix and not path.exists():
        raise OptionError(f"--source {text}: unknown source syntax {prefix.group(1)}:; give {SOURCE_SYNTAX}")
    if path.is_dir():
        raise InputError(f"--source {text} is a folder; give a video file, or {SOURCE_SYNTAX}")
    if path.exists():
        raise InputError(f"--source {text} is not a regular file; give a video file, or {SOURCE_SYNTAX}")
    raise InputError(f"--source {text}: no such file; give an existing video file, or {SOURCE_SYNTAX}")


# -- what the installed OpenCV can do -----------------------------------------------------------------


@dataclass(frozen=True)
class OpenCVSupport:
    """The parts of the installed OpenCV's build that the camera needs."""

    version: str
    location: str
    gui: str | None  # the highgui backend (GTK3, QT5, WIN32UI, COCOA...), None in headless builds
    gstreamer: bool
    ffmpeg: bool


def opencv_support() -> OpenCVSupport:
    """Read the installed OpenCV's build information (and ask highgui for its backend)."""
    import cv2

    info = cv2.getBuildInformation()
    gui = _build_value(info, "GUI")
    framework = getattr(cv2, "currentUIFramework", lambda: "")() or None
    return OpenCVSupport(version=cv2.__version__, location=os.path.dirname(cv2.__file__),
                         gui=framework or (gui if gui and gui.upper() != "NONE" else None),
                         gstreamer=_build_value(info, "GStreamer").upper().startswith("YES"),
                         ffmpeg=_build_value(info, "FFMPEG").upper().startswith("YES"))


def _build_value(info: str, key: str) -> str:
    """The value after `key:` on its line of cv2.getBuildInformation() ('' when absent)."""
    found = re.search(rf"^\s*{re.escape(key)}:[ \t]*(.*)$", info, re.MULTILINE)
    return found.group(1).strip() if found else ""


def check_support(source: Source, show: bool, support: OpenCVSupport) -> None:
    """MissingDependencyError, naming the fix, where the source or `--show` needs what OpenCV lacks."""
    build = f"this OpenCV ({support.version}, {support.location})"
    if source.kind == "gst" and not support.gstreamer:
        raise MissingDependencyError(
            f"--source gst:... needs OpenCV built with GStreamer, and {build} has none (the PyPI wheels "
            "never do): on a Jetson, use JetPack's system OpenCV (pip uninstall opencv-python-headless "
            "opencv-python, then run from a virtualenv made with --system-site-packages so that apt's "
            "python3-opencv is seen); "
            "elsewhere, an OpenCV built with -DWITH_GSTREAMER=ON")
    if source.kind == "url" and not (support.ffmpeg or support.gstreamer):
        raise MissingDependencyError(f"--source {source.text} needs OpenCV with FFmpeg or GStreamer, and "
                                     f"{build} has neither: pip install opencv-python-headless")
    if show and support.gui is None:
        raise MissingDependencyError(
            f"--show needs OpenCV with a GUI, and {build} is a headless build: pip uninstall "
            "opencv-python-headless && pip install opencv-python (on a Jetson, JetPack's system OpenCV "
            "has one); or leave out --show")


def check_display() -> None:
    """OptionError where `--show` has no display to open a window on (Linux without X11/Wayland)."""
    display = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    if sys.platform.startswith("linux") and not display:
        raise OptionError("--show needs a display, and neither DISPLAY nor WAYLAND_DISPLAY is set: run it on "
                          "the device's desktop (or with ssh -X), or use --headless")


# -- opening and reading -------------------------------------------------------------------------------


def open_capture(source: Source):
    """Open `source` with cv2.VideoCapture -> an opened capture; SourceError when it does not open.
    Streams get open and read timeouts, so a dead server is a failed try rather than a hang."""
    import cv2

    if source.kind == "gst":
        cap = cv2.VideoCapture(source.target, cv2.CAP_GSTREAMER)
    elif source.kind == "url":
        cap = cv2.VideoCapture(source.target, cv2.CAP_ANY, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, OPEN_TIMEOUT_MS,
                                                            cv2.CAP_PROP_READ_TIMEOUT_MSEC, READ_TIMEOUT_MS])
    else:
        cap = cv2.VideoCapture(source.target)
    if not cap.isOpened():
        cap.release()
        raise SourceError(f"could not open {source}" + (": is a camera plugged in at that index?"
                                                         if source.kind == "device" else ""))
    return cap


@dataclass(frozen=True)
class Frame:
    """One frame as the reader delivered it.

    image : shape = (H, W, 3), uint8, BGR (as OpenCV decodes it)
    number : 0-based count of frames read from the source, across reconnections
    time : seconds on the source's clock: a file's media time (number / fps), a live source's time
        since it was first opened
    stamp : wall-clock time (time.time()) when the frame was read"""

    image: np.ndarray
    number: int
    time: float
    stamp: float


@dataclass(frozen=True)
class ReconnectPolicy:
    """Backoff between tries to reopen a lost live source: first_delay, then times `factor`, at most
    max_delay seconds. retries: tries before giving up, None for no limit."""

    first_delay: float = 0.5
    factor: float = 2.0
    max_delay: float = 10.0
    retries: int | None = None

    def __post_init__(self):
        if not (0 < self.first_delay <= self.max_delay) or self.factor < 1:
            raise OptionError(f"reconnect backoff needs 0 < first_delay <= max_delay and factor >= 1, "
                              f"got {self}")
        if self.retries is not None and self.retries < 0:
            raise OptionError(f"--retries must be 0 or more, got {self.retries}")

    def delays(self):
        """The wait before each try: 0.5, 1, 2, 4, 8, 10, 10, ... seconds (retries of them, or forever)."""
        delay, tries = self.first_delay, 0
        while self.retries is None or tries < self.retries:
            yield delay
            delay, tries = min(delay * self.factor, self.max_delay), tries + 1


class FrameReader:
    """Frames from one source, numbered and timed; a lost live source is reopened with backoff.

    opener(source) -> an opened capture (read() -> (ok, image), get(prop), release()); raises
    SourceError when it cannot. report(event, **fields) hears "opened", "lost", "retry", "recovered"
    and "ended". `stop` (set from another thread) ends a wait for the next try at once."""

    def __init__(self, source: Source, opener: Callable = open_capture, *, report: Callable | None = None,
                 policy: ReconnectPolicy | None = None, stop: threading.Event | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.source, self.opener = source, opener
        self.report = report or (lambda event, **fields: None)
        self.policy = policy or ReconnectPolicy()
        self.stop = stop or threading.Event()
        self.clock = clock
        self.cap = None
        self.frames = 0
        self.fps: float | None = None
        self.frame_count: int | None = None
        self._origin = 0.0

    def open(self) -> None:
        """Open the source the first time; SourceError (nothing is retried) when it does not open."""
        self.cap = self.opener(self.source)
        self._origin = self.clock()
        self.fps, self.frame_count = _stream_facts(self.cap)
        self.report("opened", source=str(self.source), fps=self.fps, frame_count=self.frame_count)

    def next(self) -> Frame | None:
        """The next frame; None at the end of a file or when stopped. SourceLostError when a live
        source does not come back within the policy's retries."""
        if self.cap is None:
            self.open()
        image = _read(self.cap)
        if image is None:
            if not self.source.live:
                self.report("ended", frames=self.frames, frame_count=self.frame_count)
                return None
            image = self._reconnect()
            if image is None:
                return None
        return self._frame(image)

    def _frame(self, image: np.ndarray) -> Frame:
        number, self.frames = self.frames, self.frames + 1
        t = number / (self.fps or DEFAULT_FPS) if not self.source.live else self.clock() - self._origin
        return Frame(image, number, t, time.time())

    def _reconnect(self) -> np.ndarray | None:
        """Reopen the lost source until it gives a frame again -> that frame; None when stopped."""
        self.close()
        lost_at, attempt = self.clock(), 0
        self.report("lost", source=str(self.source), frame=self.frames)
        for delay in self.policy.delays():
            attempt += 1
            if self.stop.wait(delay):
                return None
            try:
                self.cap = self.opener(self.source)
            except SourceError as exc:
                self.report("retry", attempt=attempt, waited_s=delay, error=str(exc))
                continue
            image = _read(self.cap)
            if image is not None:
                self.report("recovered", attempt=attempt, down_s=round(self.clock() - lost_at, 3))
                return image
            self.close()
            self.report("retry", attempt=attempt, waited_s=delay, error="opened, but gave no frame")
        raise SourceLostError(f"lost {self.source} at frame {self.frames} and it did not come back in "
                              f"{attempt} tries over {self.clock() - lost_at:.1f} s; raise --retries to wait "
                              "longer")

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


def _read(cap) -> np.ndarray | None:
    try:
        ok, image = cap.read()
    except Exception:  # noqa: BLE001 - a backend that throws on a dropped stream is a lost source
        return None
    return image if ok and image is not None and image.size else None


def _stream_facts(cap) -> tuple[float | None, int | None]:
    """(frames per second, frame count) where the container states them, else None."""
    import cv2

    fps = cap.get(cv2.CAP_PROP_FPS)
    count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    fps = float(fps) if fps and np.isfinite(fps) and 0 < fps < 1000 else None
    count = int(count) if count and np.isfinite(count) and count > 0 else None
    return fps, count


class LatestFrame:
    """Runs `reader.next()` on a thread and keeps only the newest frame.

    get() waits for a frame newer than the one it last returned -> that Frame, or None once the
    reader has ended; frames read in between were skipped (`skipped` counts them). With pace=True
    (a file) frames are released at their own times (frame.time after the first), as a camera
    would deliver them. An error on the reader's thread (SourceLostError) is raised by get()."""

    def __init__(self, reader: FrameReader, *, pace: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        self.reader, self.pace, self.clock = reader, pace, clock
        self.skipped = 0
        self._latest: Frame | None = None
        self._ended = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="edgerun-capture", daemon=True)

    def start(self) -> LatestFrame:
        self._thread.start()
        return self

    def _run(self) -> None:
        origin = None
        try:
            while not self.reader.stop.is_set():
                frame = self.reader.next()
                if frame is None:
                    break
                if self.pace:
                    origin = self.clock() - frame.time if origin is None else origin
                    if self.reader.stop.wait(max(0.0, origin + frame.time - self.clock())):
                        break
                    frame = dataclasses.replace(frame, stamp=time.time())  # delivered now, as a camera would
                self._publish(frame)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer's thread by get()
            self._error = exc
        finally:
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def _publish(self, frame: Frame) -> None:
        with self._cond:
            if self._latest is not None:
                self.skipped += 1
            self._latest = frame
            self._cond.notify_all()

    @property
    def done(self) -> bool:
        """The reader has ended and its last frame has been taken."""
        with self._cond:
            return self._ended and self._latest is None

    def get(self, timeout: float | None = None) -> Frame | None:
        """The newest unseen frame; None when the reader has ended (or after `timeout` seconds)."""
        with self._cond:
            self._cond.wait_for(lambda: self._latest is not None or self._ended, timeout)
            frame, self._latest = self._latest, None
        if frame is None and self._error is not None:
            raise self._error
        return frame

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the reader to stop and wait up to `timeout` s for its thread (a read blocked inside
        OpenCV is left to end by itself: the thread is a daemon)."""
        self.reader.stop.set()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.reader.close()


class Window:
    """`--show`: the newest frame with the newest text drawn on it, in an OpenCV window.
    show() -> False once the user closes the window or presses q or Esc."""

    def __init__(self, title: str = "edge-run camera"):
        import cv2

        self.cv2, self.title = cv2, title
        cv2.namedWindow(title, cv2.WINDOW_NORMAL)

    def show(self, image: np.ndarray, text: str = "") -> bool:
        """image : shape = (H, W, 3), uint8, BGR."""
        cv2 = self.cv2
        canvas = image.copy()
        if text:
            scale = max(0.4, canvas.shape[1] / 1000)
            for colour, width in (((0, 0, 0), 4), ((255, 255, 255), 1)):  # outlined, legible on any scene
                cv2.putText(canvas, text, (10, canvas.shape[0] - 12), cv2.FONT_HERSHEY_SIMPLEX, scale, colour,
                            width, cv2.LINE_AA)
        cv2.imshow(self.title, canvas)
        key = cv2.waitKey(1) & 0xFF
        return key not in (ord("q"), 27) and cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) >= 1

    def close(self) -> None:
        self.cv2.destroyWindow(self.title)
