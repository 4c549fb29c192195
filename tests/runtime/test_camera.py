"""The camera loop's parts (scheduling, change detection, reconnection, record) and the loop on
generated video files, with a capture factory that fails mid-stream where a source must drop."""
from __future__ import annotations

import json
import threading
import time

import cv2
import numpy as np
import pytest

import edgerun
from edgerun.errors import EdgeRunError, InputError, MissingDependencyError, OptionError
from edgerun.runtime import camera as cam
from edgerun.runtime import capture as cap
from edgerun.runtime.capture import Frame, FrameReader, LatestFrame, ReconnectPolicy, Source

# BGR colours whose channel mean is equal: a grey-only difference would not tell them apart
RED, GREEN, BLUE = (0, 0, 255), (0, 255, 0), (255, 0, 0)


def scene(colour, size=(48, 64)) -> np.ndarray:
    image = np.full((*size, 3), 20, np.uint8)
    image[size[0] // 4: 3 * size[0] // 4, size[1] // 3: 2 * size[1] // 3] = colour
    return image


def write_video(path, colours, per=10, fps=10.0):
    """An MJPG .avi: `per` frames of each colour's scene."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 48))
    assert writer.isOpened()
    for colour in colours:
        for _ in range(per):
            writer.write(scene(colour))
    writer.release()
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "rgb.avi", [RED, GREEN, BLUE])


@pytest.fixture(scope="module")
def multi(multi_bundle):
    """The tiny multi-task bundle (tests/conftest.py), loaded."""
    return edgerun.load(multi_bundle, threads=1)


class Events:
    """Collects report(event, **fields) calls."""

    def __init__(self):
        self.items = []

    def __call__(self, kind, **fields):
        self.items.append((kind, fields))

    def kinds(self):
        return [k for k, _ in self.items]


class NoWait(threading.Event):
    """A stop event whose waits return at once and are recorded (the backoff's delays)."""

    def __init__(self):
        super().__init__()
        self.waits = []

    def wait(self, timeout=None):
        self.waits.append(timeout)
        return self.is_set()


class DroppingCapture:
    """A real capture of a file that stops giving frames after `frames` reads, as an unplugged camera does."""

    def __init__(self, path, frames=None, delay=0.0):
        self.inner, self.left, self.delay = cv2.VideoCapture(str(path)), frames, delay

    def read(self):
        time.sleep(self.delay)
        if self.left is not None:
            if self.left <= 0:
                return False, None
            self.left -= 1
        return self.inner.read()

    def get(self, prop):
        return self.inner.get(prop)

    def release(self):
        self.inner.release()


class Opener:
    """A capture factory that plays a script, one entry per open: an int n (opens, drops after n
    frames), None (opens, never drops), or "refuse" (SourceError)."""

    def __init__(self, path, script, delay=0.0):
        self.path, self.script, self.delay, self.opens = path, list(script), delay, 0

    def __call__(self, source):
        step = self.script[min(self.opens, len(self.script) - 1)]
        self.opens += 1
        if step == "refuse":
            raise cap.SourceError(f"could not open {source}")
        return DroppingCapture(self.path, step, self.delay)


LIVE = Source("url", "rtsp://camera.local/stream", "rtsp://camera.local/stream")


# -- sources --------------------------------------------------------------------------------------------


def test_parse_source_forms(video, tmp_path):
    assert cap.parse_source("0") == Source("device", 0, "0")
    assert cap.parse_source(" 2 ").target == 2
    assert cap.parse_source("/dev/video1") == Source("device", "/dev/video1", "/dev/video1")
    assert cap.parse_source("rtsp://10.0.0.5:554/live").kind == "url"
    assert cap.parse_source("HTTP://host/cam.mjpg").kind == "url"
    gst = cap.parse_source("gst:nvarguscamerasrc ! appsink")
    assert (gst.kind, gst.target, gst.live) == ("gst", "nvarguscamerasrc ! appsink", True)
    f = cap.parse_source(str(video))
    assert (f.kind, f.live, str(f)) == ("file", False, f"video file {video}")
    odd = tmp_path / "clip:1.avi"  # a file whose name looks like a scheme is still a file
    odd.write_bytes(b"x")
    assert cap.parse_source(str(odd)).kind == "file"


@pytest.mark.parametrize("text, error, match", [
    ("", OptionError, "--source is empty"),
    ("ftp://host/x.avi", OptionError, "unknown scheme ftp://.*rtsp://"),
    ("webcam:front", OptionError, "unknown source syntax webcam:.*device index"),
    ("gst:  ", OptionError, "needs a pipeline"),
    ("no/such/clip.avi", InputError, "no such file"),
])
def test_parse_source_refuses(text, error, match):
    with pytest.raises(error, match=match):
        cap.parse_source(text)


def test_parse_source_refuses_a_folder(tmp_path):
    with pytest.raises(InputError, match="is a folder"):
        cap.parse_source(str(tmp_path))


BUILD_INFO = """
  GUI:                           {gui}
    VTK support:                 NO
  Video I/O:
    FFMPEG:                      {ffmpeg}
      avcodec:                   YES (62.28.101)
    GStreamer:                   {gst}
"""


def test_build_information_is_read():
    info = BUILD_INFO.format(gui="NONE", ffmpeg="YES", gst="YES (1.20.3)")
    assert cap._build_value(info, "GUI") == "NONE"
    assert cap._build_value(info, "GStreamer") == "YES (1.20.3)"
    assert cap._build_value(info, "FFMPEG") == "YES"
    assert cap._build_value(info, "Cocoa") == ""
    installed = cap.opencv_support()  # whatever is installed, it agrees with its own build information
    assert installed.gstreamer == cap._build_value(cv2.getBuildInformation(), "GStreamer").startswith("YES")
    assert installed.version == cv2.__version__


def support(gui=None, gstreamer=False, ffmpeg=True):
    return cap.OpenCVSupport("4.10.0", "/site-packages/cv2", gui, gstreamer, ffmpeg)


def test_check_support_names_the_fix(video):
    gst = cap.parse_source("gst:nvarguscamerasrc ! appsink")
    with pytest.raises(MissingDependencyError, match="GStreamer.*JetPack's system OpenCV") as err:
        cap.check_support(gst, False, support())
    assert "\n" not in str(err.value)
    with pytest.raises(MissingDependencyError, match="--show.*headless.*pip install opencv-python"):
        cap.check_support(cap.parse_source(str(video)), True, support())
    with pytest.raises(MissingDependencyError, match="FFmpeg or GStreamer"):
        cap.check_support(LIVE, False, support(ffmpeg=False))
    cap.check_support(gst, True, support(gui="GTK3", gstreamer=True))  # a JetPack-like build serves both


def test_show_needs_a_display(monkeypatch):
    monkeypatch.setattr(cap.sys, "platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(OptionError, match="DISPLAY"):
        cap.check_display()
    monkeypatch.setenv("DISPLAY", ":0")
    cap.check_display()


def test_open_capture_refuses_what_does_not_open(tmp_path):
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"not a video")
    with pytest.raises(cap.SourceError, match="could not open video file"):
        cap.open_capture(cap.parse_source(str(junk)))


# -- scheduling and change detection ------------------------------------------------------------------------


def test_scheduler_every_seconds_of_source_time():
    s = cam.Scheduler(1.0)
    picked = []
    for n in range(35):
        t = n / 10
        if s.due(t):
            s.mark(t)
            picked.append(n)
    assert picked == [0, 10, 20, 30]
    assert all(cam.Scheduler(None).due(t) for t in (0, 0, 0.01))


def test_thumbnail_and_pixel_change_see_colour():
    thumb = cam.thumbnail(scene(RED, (480, 640)))
    assert thumb.shape == (32, 32, 3) and thumb.dtype == np.float32 and 0 <= thumb.min() <= thumb.max() <= 1
    assert cam.pixel_distance(cam.thumbnail(scene(RED)), cam.thumbnail(scene(RED))) == 0
    # same brightness, other hue: a change
    assert cam.pixel_distance(cam.thumbnail(scene(RED)), cam.thumbnail(scene(GREEN))) > 0.05
    noisy = np.clip(scene(RED).astype(int) + np.random.default_rng(0).integers(-8, 9, (48, 64, 3)), 0, 255)
    assert cam.pixel_distance(cam.thumbnail(noisy.astype(np.uint8)), cam.thumbnail(scene(RED))) < 0.02


def test_change_detector_compares_with_the_last_reading():
    d = cam.ChangeDetector(0.1, cam.pixel_distance)
    assert d.check(np.zeros(4)) == (True, None)
    d.accept(np.zeros(4))
    fired = []
    for step in range(1, 6):  # drifts 0.04 a frame: no one step is a change, the sum is
        changed, _ = d.check(np.full(4, 0.04 * step))
        fired.append(changed)
        if changed:
            d.accept(np.full(4, 0.04 * step))
    assert fired == [False, False, True, False, False]


def test_state_vector_is_a_pooled_unit_vector(multi):
    state = multi.encode(scene(RED)[..., ::-1].copy())
    v = cam.state_vector(state)
    features = state.values["image_features"][0]
    assert v.shape == (features.shape[-1],)
    assert np.isclose(np.linalg.norm(v), 1, atol=1e-5)
    np.testing.assert_allclose(v * np.linalg.norm(features.mean(0)), features.mean(0), rtol=1e-5, atol=1e-6)


def test_options_are_checked():
    with pytest.raises(OptionError, match="--task vqa needs a question"):
        cam.CameraOptions(task="vqa")
    with pytest.raises(OptionError, match="--question is for --task vqa"):
        cam.CameraOptions(question="why?")
    with pytest.raises(OptionError, match="--every must be a positive"):
        cam.CameraOptions(every=0)
    with pytest.raises(OptionError, match="between 0 and 2"):
        cam.CameraOptions(on_change=3, change="embedding")
    with pytest.raises(OptionError, match="valid: pixel, embedding"):
        cam.CameraOptions(on_change=0.1, change="histogram")
    with pytest.raises(OptionError, match="--prompt is for --task caption"):
        cam.CameraOptions(task="vqa", question="why?", prompt="a")
    with pytest.raises(OptionError, match="-k must be"):
        cam.CameraOptions(k=0)


# -- reading and reconnecting -----------------------------------------------------------------------------


def test_reader_numbers_and_times_a_file_and_ends_it(video):
    events = Events()
    reader = FrameReader(cap.parse_source(str(video)), report=events)
    frames = list(iter(reader.next, None))
    assert [f.number for f in frames] == list(range(30))
    assert [f.time for f in frames[:3]] == [0.0, 0.1, 0.2]  # media time: number / fps
    assert frames[0].image.shape == (48, 64, 3)
    assert events.kinds() == ["opened", "ended"]
    assert events.items[0][1]["fps"] == 10 and events.items[1][1] == {"frames": 30, "frame_count": 30}


def test_backoff_delays():
    assert list(ReconnectPolicy(retries=7).delays()) == [0.5, 1, 2, 4, 8, 10, 10]
    assert list(ReconnectPolicy(first_delay=1, factor=3, max_delay=5, retries=3).delays()) == [1, 3, 5]
    with pytest.raises(OptionError, match="--retries"):
        ReconnectPolicy(retries=-1)
    with pytest.raises(OptionError):
        ReconnectPolicy(first_delay=0)


def test_a_lost_live_source_is_reopened_with_backoff(video):
    events, stop = Events(), NoWait()
    # drops after 12 frames; refused twice; opens but gives no frame; then stays up
    opener = Opener(video, [12, "refuse", "refuse", 0, None])
    reader = FrameReader(LIVE, opener, report=events, stop=stop)
    frames = [reader.next() for _ in range(20)]
    assert [f.number for f in frames] == list(range(20))  # numbering goes on across the loss
    assert events.kinds() == ["opened", "lost", "retry", "retry", "retry", "recovered"]
    assert stop.waits == [0.5, 1.0, 2.0, 4.0]
    lost, retry, recovered = events.items[1][1], events.items[2][1], events.items[5][1]
    assert lost["frame"] == 12 and "could not open" in retry["error"]
    assert events.items[4][1]["error"] == "opened, but gave no frame"
    assert recovered["attempt"] == 4 and opener.opens == 5
    # the reopened stream starts again at the file's first frame: the 13th frame is the source's first
    np.testing.assert_array_equal(frames[12].image, frames[0].image)


def test_a_lost_source_that_does_not_come_back_gives_up(video):
    events = Events()
    reader = FrameReader(LIVE, Opener(video, [3, "refuse"]), report=events, stop=NoWait(),
                         policy=ReconnectPolicy(retries=3))
    assert [reader.next().number for _ in range(3)] == [0, 1, 2]
    with pytest.raises(cap.SourceLostError, match="did not come back in 3 tries.*--retries"):
        reader.next()
    assert events.kinds() == ["opened", "lost", "retry", "retry", "retry"]


def test_stop_ends_a_reconnection_wait(video):
    stop = threading.Event()
    reader = FrameReader(LIVE, Opener(video, [1, "refuse"]), stop=stop)
    assert reader.next().number == 0
    threading.Timer(0.2, stop.set).start()
    start = time.monotonic()
    assert reader.next() is None  # waiting 0.5 s, 1 s, ... for the next try, stopped at 0.2 s
    assert time.monotonic() - start < 1.0


class ListReader:
    """The reader interface over a list of frames, each read taking `delay` seconds."""

    def __init__(self, n, delay=0.0, error=None):
        self.n, self.delay, self.error, self.frames = n, delay, error, 0
        self.stop = threading.Event()

    def next(self):
        if self.frames >= self.n:
            if self.error:
                raise self.error
            return None
        time.sleep(self.delay)
        self.frames += 1
        return Frame(np.zeros((2, 2, 3), np.uint8), self.frames - 1, (self.frames - 1) * 0.02, time.time())

    def close(self):
        pass


def test_latest_frame_keeps_only_the_newest():
    latest = LatestFrame(ListReader(40, delay=0.002)).start()
    got = []
    while (frame := latest.get(timeout=1)) is not None:
        got.append(frame.number)
        time.sleep(0.02)  # a consumer ten times slower than the source
    assert got == sorted(got) and got[-1] == 39  # never an old frame, and the last one is delivered
    assert len(got) < 20 and latest.skipped == 40 - len(got)
    assert latest.done


def test_latest_frame_paces_a_file_and_hands_on_errors():
    start = time.monotonic()
    latest = LatestFrame(ListReader(10), pace=True).start()  # 10 frames 0.02 s apart
    got = [f.number for f in iter(lambda: latest.get(timeout=1), None)]
    assert time.monotonic() - start >= 0.17  # released at their times, not at once
    assert got == sorted(got) and got[-1] == 9 and len(got) + latest.skipped == 10
    broken = LatestFrame(ListReader(2, error=cap.SourceLostError("gone"))).start()
    with pytest.raises(cap.SourceLostError, match="gone"):
        while broken.get(timeout=1) is not None:
            pass


# -- the record and the output ------------------------------------------------------------------------------


def test_record_appends_a_synced_line_at_a_time(tmp_path):
    path = tmp_path / "rec" / "run.jsonl"
    path.parent.mkdir()
    path.write_text('{"event": "caption", "text": "earlier run"}\n{"event": "capt')  # a crash cut this line
    record = cam.RecordWriter(path)
    record.write({"event": "caption", "text": "ü"})
    lines = path.read_text(encoding="utf-8").splitlines()  # read before close: already on disk
    assert json.loads(lines[-1]) == {"event": "caption", "text": "ü"} and lines[1] == '{"event": "capt'
    record.close()
    with pytest.raises(InputError, match="cannot be written"):
        cam.RecordWriter(tmp_path / "rec" / "run.jsonl" / "x.jsonl")


# -- the analyser and the loop ------------------------------------------------------------------------------


def rgb(image):
    return np.ascontiguousarray(image[..., ::-1])


def test_analyser_caption_answer_and_refusals(multi, blip_bundle):
    frame = Frame(scene(RED), 7, 0.7, time.time())  # not GREEN: the same in BGR and RGB
    reading = cam.Analyser(multi, cam.CameraOptions(), decoding={"num_beams": 2}).analyse(frame)
    want = multi.caption(rgb(frame.image), num_beams=2)  # the frame is BGR; models see RGB
    assert (reading.text, reading.score) == (want.text, want.score)
    assert set(reading.latency_ms) == {"encode", "caption", "total"}
    prompted = cam.Analyser(multi, cam.CameraOptions(prompt="a blue")).analyse(frame)
    want = multi.caption(rgb(frame.image), prompt="a blue")
    assert (prompted.text, prompted.score) == (want.text, want.score)
    out = reading.to_json()
    assert (out["event"], out["frame"], out["t"]) == ("caption", 7, 0.7)
    vqa = cam.CameraOptions(task="vqa", question="what colour is the square?")
    answer = cam.Analyser(multi, vqa).analyse(frame)
    want = multi.answer(rgb(frame.image), "what colour is the square?")
    assert (answer.text, answer.score) == (want.text, want.score)
    assert answer.to_json()["question"] == "what colour is the square?"
    with pytest.raises(OptionError, match="does not serve vqa; it serves: caption"):
        cam.Analyser(edgerun.load(blip_bundle), vqa)


def test_analyser_on_embedding_change_and_nearest(multi, tmp_path):
    from edgerun.runtime.index import build_index, open_index

    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for name, colour in (("red", RED), ("green", GREEN), ("blue", BLUE)):
        cv2.imwrite(str(gallery / f"{name}.png"), scene(colour))
    build_index(multi, [gallery], output=tmp_path / "idx")
    index = open_index(tmp_path / "idx")
    a = multi.encode(rgb(scene(RED))), multi.encode(rgb(scene(GREEN)))
    distance = cam.cosine_distance(cam.state_vector(a[0]), cam.state_vector(a[1]))
    options = cam.CameraOptions(on_change=distance / 2, change="embedding", k=2)
    analyser = cam.Analyser(multi, options, index=index)
    assert analyser.shared_index_state  # one encoding serves the caption and the search
    first = analyser.analyse(Frame(scene(RED), 0, 0.0, time.time()))
    assert first.change is None and first.nearest[0].path.endswith("red.png")
    want = index.search_image(multi, rgb(scene(RED)), 2)
    assert [(n.path, n.score) for n in first.nearest] == [(h.item, round(h.score, 4)) for h in want]
    assert analyser.analyse(Frame(scene(RED), 1, 0.1, time.time())) is None  # unchanged
    second = analyser.analyse(Frame(scene(GREEN), 2, 0.2, time.time()))
    assert second.nearest[0].path.endswith("green.png") and second.change == pytest.approx(distance, abs=1e-4)


def run(source, analyser, tmp_path, **kwargs):
    """run_camera with stdout captured and a record in tmp_path -> (summary, lines, record lines)."""
    import io

    stream, record = io.StringIO(), cam.RecordWriter(tmp_path / "record.jsonl")
    try:
        summary = cam.run_camera(source, analyser, cam.Output(stream, record), **kwargs)
    finally:
        record.close()
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    return summary, lines, [json.loads(x) for x in (tmp_path / "record.jsonl").read_text().splitlines()]


def test_every_frame_on_change_reads_each_new_scene(multi, video, tmp_path):
    options = cam.CameraOptions(on_change=0.05, every_frame=True)
    summary, lines, record = run(cap.parse_source(str(video)), cam.Analyser(multi, options), tmp_path)
    readings = [x for x in lines if x["event"] == "caption"]
    assert [x["frame"] for x in readings] == [0, 10, 20]  # exactly the scene changes
    assert [x["t"] for x in readings] == [0.0, 1.0, 2.0]
    assert (summary.reason, summary.frames, summary.readings, summary.unchanged) == ("end of file", 30, 3, 27)
    assert record == lines and lines[-1]["event"] == "end" and lines[-1]["frames"] == 30
    capture = cv2.VideoCapture(str(video))
    for _ in range(11):
        _, frame10 = capture.read()
    assert readings[1]["text"] == multi.caption(rgb(frame10)).text


def test_a_file_at_its_own_frame_rate(multi, tmp_path):
    path = write_video(tmp_path / "fast.avi", [RED, GREEN], per=10, fps=50.0)  # 0.4 s of video
    start = time.monotonic()
    summary, lines, _ = run(cap.parse_source(str(path)), cam.Analyser(multi, cam.CameraOptions(every=0.2)),
                            tmp_path)
    assert time.monotonic() - start >= 0.35  # released as a camera would, not all at once
    times = [x["t"] for x in lines if x["event"] == "caption"]
    assert times[0] < 0.1 and all(b - a >= 0.2 - 1e-6 for a, b in zip(times, times[1:]))
    assert summary.reason == "end of file" and summary.frames == 20


def test_the_loop_rides_out_a_dropped_live_source(multi, video, tmp_path):
    opener = Opener(video, [8, "refuse", None], delay=0.02)  # a 50 fps camera
    policy = ReconnectPolicy(first_delay=0.01, max_delay=0.02, retries=5)
    stopper = StopAfter(readings=12)
    summary, lines, record = run(LIVE, cam.Analyser(multi, cam.CameraOptions()), tmp_path, opener=opener,
                                 policy=policy, window=stopper)
    kinds = [x["event"] for x in lines]
    assert kinds[0] == "opened" and kinds[-1] == "end"
    events = [k for k in kinds if k != "caption"]
    assert events == ["opened", "lost", "retry", "recovered", "end"]
    assert kinds.index("lost") < kinds.index("recovered") < len(kinds) - 1 - kinds[::-1].index("caption")
    assert summary.reason == "interrupted" and record[-1] == lines[-1]


class StopAfter:
    """A --show window stand-in: presses Ctrl-C once `readings` frames have been shown."""

    def __init__(self, readings=None, close_at=None):
        self.readings, self.close_at, self.shown = readings, close_at, 0

    def show(self, image, text):
        self.shown += 1
        if self.close_at is not None and self.shown >= self.close_at:
            return False
        if self.readings is not None and self.shown >= self.readings:
            raise KeyboardInterrupt
        return True


def test_ctrl_c_and_a_closed_window_stop_cleanly(multi, video, tmp_path):
    options = cam.CameraOptions(every_frame=True)
    summary, lines, record = run(cap.parse_source(str(video)), cam.Analyser(multi, options), tmp_path,
                                 window=StopAfter(readings=5))
    assert summary.reason == "interrupted" and summary.readings == 4
    assert record == lines
    assert lines[-1] == {**lines[-1], "event": "end", "reason": "interrupted", "readings": 4}
    summary, _, _ = run(cap.parse_source(str(video)), cam.Analyser(multi, options), tmp_path,
                        window=StopAfter(close_at=3))
    assert (summary.reason, summary.readings) == ("window closed", 2)


def test_every_frame_is_for_files(multi):
    with pytest.raises(OptionError, match="--every-frame.*live"):
        cam.run_camera(LIVE, cam.Analyser(multi, cam.CameraOptions(every_frame=True)), cam.Output())


def test_errors_are_edgerun_errors():
    assert issubclass(cap.SourceError, EdgeRunError) and issubclass(cap.SourceLostError, EdgeRunError)


class ClosedPipe:
    """stdout whose reader has gone (`edge-run camera ... | head -2`): the third line fails."""

    def __init__(self):
        self.lines = []

    def write(self, text):
        if len(self.lines) >= 2:
            raise BrokenPipeError(32, "Broken pipe")
        self.lines.append(text)

    def flush(self):
        pass


def test_a_closed_stdout_stops_the_loop_and_the_record_keeps_all(multi, video, tmp_path):
    stream, record = ClosedPipe(), cam.RecordWriter(tmp_path / "r.jsonl")
    options = cam.CameraOptions(every_frame=True)
    summary = cam.run_camera(cap.parse_source(str(video)), cam.Analyser(multi, options), cam.Output(stream, record))
    record.close()
    kept = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert (summary.reason, summary.readings) == ("output closed", 2) and len(stream.lines) == 2
    assert [x["event"] for x in kept] == ["opened", "caption", "caption", "end"]
