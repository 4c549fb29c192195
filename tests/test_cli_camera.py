"""`edge-run camera` through `edgerun.cli.main`: JSON lines, the record, --index, and the one-line
errors for bad inputs; a capture factory that fails mid-stream where a source must drop."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

import edgerun
from edgerun import cli_camera
from edgerun.cli import main
from edgerun.runtime import capture

RED, GREEN, BLUE = (0, 0, 255), (0, 255, 0), (255, 0, 0)  # BGR


def scene(colour):
    image = np.full((48, 64, 3), 20, np.uint8)
    image[12:36, 21:43] = colour
    return image


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """An MJPG .avi at 10 fps: 10 frames each of a red, a green and a blue scene."""
    path = tmp_path_factory.mktemp("camera-video") / "rgb.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    for colour in (RED, GREEN, BLUE):
        for _ in range(10):
            writer.write(scene(colour))
    writer.release()
    return path




@pytest.fixture(scope="module")
def gallery_index(multi_bundle, tmp_path_factory):
    """An index of the three scenes, built with the multi bundle."""
    from edgerun.runtime.index import build_index

    root = tmp_path_factory.mktemp("camera-gallery")
    for name, colour in (("red", RED), ("green", GREEN), ("blue", BLUE)):
        cv2.imwrite(str(root / f"{name}.png"), scene(colour))
    return build_index(edgerun.load(multi_bundle, threads=1), [root], output=root / "idx").path


def camera(capsys, *args):
    """Run `edge-run camera ARGS` -> (exit code, JSON lines on stdout, stderr)."""
    code = 0
    try:
        main(["camera", *map(str, args)])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def readings(lines, task="caption"):
    return [x for x in lines if x["event"] == task]


def rgb(image):
    return np.ascontiguousarray(image[..., ::-1])


def test_caption_a_video_file_with_a_record(blip_bundle, video, tmp_path, capsys):
    record = tmp_path / "run.jsonl"
    code, lines, err = camera(capsys, blip_bundle, "--source", video, "--every-frame", "--on-change", "0.05",
                              "--record", record, "--num-beams", "2", "--max-new-tokens", "6")
    assert code == 0, err
    found = readings(lines)
    assert [x["frame"] for x in found] == [0, 10, 20]
    model = edgerun.load(blip_bundle)
    first = cv2.VideoCapture(str(video)).read()[1]
    want = model.caption(rgb(first), num_beams=2, max_new_tokens=6)
    assert (found[0]["text"], found[0]["score"]) == (want.text, round(want.score, 4))
    assert {"encode", "caption", "total", "age"} <= set(found[0]["latency_ms"])
    assert found[0]["time"].endswith("Z") and found[1]["change"] > 0.05
    assert [json.loads(x) for x in record.read_text().splitlines()] == lines
    assert lines[-1]["event"] == "end" and lines[-1]["reason"] == "end of file"
    assert err.strip() == ("camera: end of file: 3 readings of 30 frames (0 skipped while busy, "
                           f"27 unchanged) in {lines[-1]['seconds']:.1f} s; record {record}")


def test_vqa_at_the_files_frame_rate(vqa_bundle, video, capsys):
    question = "what colour is the square?"
    start = time.monotonic()
    code, lines, err = camera(capsys, vqa_bundle, "--source", video, "--task", "vqa", "--question", question,
                              "--every", "1")
    assert code == 0, err
    assert time.monotonic() - start >= 2.5  # 3 s of video, delivered as a camera would
    found = readings(lines, "vqa")
    # one a second: frames 0, 10, 20 unless a busy machine made the reader replace one before it was taken
    assert [int(x["t"]) for x in found] == [0, 1, 2] and all(x["question"] == question for x in found)
    frame = cv2.VideoCapture(str(video)).read()[1]
    want = edgerun.load(vqa_bundle).answer(rgb(frame), question)
    assert (found[0]["text"], found[0]["score"]) == (want.text, round(want.score, 4))


def test_nearest_gallery_items(multi_bundle, blip_bundle, gallery_index, video, capsys):
    for bundle in (multi_bundle, blip_bundle):  # the index's own bundle (one encoding), and another captioner
        code, lines, err = camera(capsys, bundle, "--source", video, "--every-frame", "--on-change", "0.05",
                                  "--index", gallery_index, "-k", "2")
        assert code == 0, err
        found = readings(lines)
        nearest = [x["nearest"][0]["path"].rsplit("/", 1)[-1] for x in found]
        assert nearest == ["red.png", "green.png", "blue.png"]
        assert all(len(x["nearest"]) == 2 and "search" in x["latency_ms"] for x in found)


def test_a_dropped_stream_is_reported_and_given_up(blip_bundle, video, tmp_path, capsys, monkeypatch):
    opens = []

    def flaky(source):  # the first open gives 5 frames and drops; the stream never comes back
        opens.append(source)
        if len(opens) > 1:
            raise capture.SourceError(f"could not open {source}")
        cap = cv2.VideoCapture(str(video))
        return _Dropping(cap, 5)

    monkeypatch.setattr(cli_camera, "open_source", flaky)
    record = tmp_path / "r.jsonl"
    code, lines, err = camera(capsys, blip_bundle, "--source", "rtsp://cam.local/live", "--retries", "2",
                              "--record", record, "--max-new-tokens", "3")
    assert code == 1
    events = [x for x in lines if x["event"] != "caption"]
    assert [x["event"] for x in events] == ["opened", "lost", "retry", "retry", "end"]
    assert [x["waited_s"] for x in events[2:4]] == [0.5, 1.0] and events[-1]["reason"] == "source lost"
    assert events[1]["frame"] == 5 and 1 <= len(readings(lines)) <= 5
    assert "camera: lost source=stream rtsp://cam.local/live frame=5" in err
    assert err.strip().splitlines()[-1].startswith(
        "error: lost stream rtsp://cam.local/live at frame 5 and it did not come back in 2 tries")
    # written and flushed before the error
    assert json.loads(record.read_text().splitlines()[-1])["reason"] == "source lost"


class _Dropping:
    def __init__(self, cap, frames):
        self.cap, self.left = cap, frames

    def read(self):
        self.left -= 1
        time.sleep(0.01)
        return self.cap.read() if self.left >= 0 else (False, None)

    def get(self, prop):
        return self.cap.get(prop)

    def release(self):
        self.cap.release()


class _Window:
    """A --show window stand-in that presses Ctrl-C at the 4th frame."""

    shown = 0

    def show(self, image, text):
        _Window.shown += 1
        if _Window.shown == 4:
            raise KeyboardInterrupt
        return True

    def close(self):
        pass


def test_show_and_ctrl_c(blip_bundle, video, tmp_path, capsys, monkeypatch):
    gui = capture.OpenCVSupport("4.10.0", "/usr/lib/python3/dist-packages/cv2", "GTK3", True, True)
    monkeypatch.setattr(capture, "opencv_support", lambda: gui)
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setattr(cli_camera, "_window", _Window)
    record = tmp_path / "r.jsonl"
    code, lines, err = camera(capsys, blip_bundle, "--source", video, "--every-frame", "--show",
                              "--record", record, "--max-new-tokens", "3")
    assert code == 130
    assert len(readings(lines)) == 3 and lines[-1]["reason"] == "interrupted"
    assert json.loads(record.read_text().splitlines()[-1]) == lines[-1]
    assert err.startswith("camera: interrupted: 3 readings")


def test_sigterm_stops_like_ctrl_c():
    with pytest.raises(KeyboardInterrupt), cli_camera._sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


HEADLESS = capture.OpenCVSupport("4.10.0", "/venv/site-packages/cv2", None, False, True)


@pytest.mark.parametrize("args, match", [
    (["--source", "missing.avi"], "error: --source missing.avi: no such file"),
    (["--source", "webcam:front"], "error: --source webcam:front: unknown source syntax webcam:"),
    (["--source", "ftp://h/x"], "error: --source ftp://h/x: unknown scheme ftp://"),
    (["--source", "{video}", "--show"], "error: --show needs OpenCV with a GUI.*pip install opencv-python"),
    (["--source", "gst:nvarguscamerasrc ! appsink"],
     "error: --source gst:... needs OpenCV built with GStreamer.*JetPack's system OpenCV"),
    (["--source", "{video}", "--show", "--headless"],
     "error: --show opens a window and --headless forbids one"),
    (["--source", "{video}", "--task", "vqa"], "error: --task vqa needs a question"),
    (["--source", "{video}", "--task", "vqa", "--question", "why?"],
     "error: bundle .* does not serve vqa; it serves: caption"),
    (["--source", "0", "--every-frame"],
     "error: --every-frame reads a video file frame by frame; camera 0 is live"),
    (["--source", "{video}", "--on-change", "1.5"], "error: --on-change must be between 0 and 1"),
    (["--source", "{video}", "--index", "{tmp}/none"], "error: .*none is not an edge-run index"),
    (["--source", "{video}", "--record", "{video}/x.jsonl"], "error: --record .* cannot be written"),
    (["--source", "{video}", "--index-bundle", "{video}"], "error: --index-bundle is for --index"),
    (["--task", "caption"], "error: Missing option '--source'"),
])
def test_bad_inputs_are_one_line_errors(blip_bundle, video, tmp_path, capsys, monkeypatch, args, match):
    import re

    monkeypatch.setattr(capture, "opencv_support", lambda: HEADLESS)
    args = [a.format(video=video, tmp=tmp_path) for a in args]
    code, lines, err = camera(capsys, blip_bundle, *args)
    assert code != 0 and code != 130
    assert len(err.strip().splitlines()) == 1 and re.match(match, err.strip()), err
    assert "Traceback" not in err and not readings(lines)


def test_a_camera_that_is_not_there(blip_bundle, capsys):
    code, _, err = camera(capsys, blip_bundle, "--source", "9")
    assert code == 1 and "error: could not open camera 9: is a camera plugged in at that index?" in err


def test_the_camera_loop_imports_no_torch(blip_bundle, video):
    args = ["camera", str(blip_bundle), "--source", str(video), "--every-frame", "--every", "1",
            "--max-new-tokens", "3"]
    script = f"import sys; from edgerun.cli import main; main({args!r}); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [json.loads(x)["frame"] for x in lines[:-1] if '"caption"' in x] == [0, 10, 20]
    assert lines[-1] == "False"
