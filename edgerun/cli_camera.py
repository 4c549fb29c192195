"""`edge-run camera`: caption a camera, stream or video file live, one JSON line per reading.

Parses and checks the options (cheap checks first: the source's syntax, what OpenCV can open, a
window), loads the bundle, then runs `edgerun.runtime.camera.run_camera`. Bundles are opened
through `load_model`, and captures through `OPENER`: the seams tests replace.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

import click

from .errors import InputError, OptionError


def load_model(bundle: str | os.PathLike, threads: int | None = None):
    """Open a bundle (tests replace this)."""
    from .runtime.model import load

    return load(bundle, threads=threads)


def open_source(source):
    """Open a capture for a Source with cv2.VideoCapture (tests replace this with a fake factory)."""
    from .runtime.capture import open_capture

    return open_capture(source)


@click.command("camera")
@click.argument("bundle", type=click.Path())
@click.option("--source", required=True, metavar="SRC",
              help="device index (0), /dev/videoN, video file, rtsp:// or http(s):// URL, or gst:PIPELINE")
@click.option("--task", type=click.Choice(["caption", "vqa"]), default="caption", show_default=True)
@click.option("--question", help="with --task vqa: the question asked of every reading")
@click.option("--prompt", help='with --task caption: a conditional prefix, e.g. "a picture of"')
@click.option("--every", type=float, metavar="SECONDS", help="at most one reading per SECONDS of source time")
@click.option("--on-change", type=float, metavar="THRESH",
              help="read a frame only when the scene changed by more than THRESH since the last reading "
              "(pixel: 0..1, e.g. 0.05; embedding: cosine distance 0..2, e.g. 0.02)")
@click.option("--change", type=click.Choice(["pixel", "embedding"]), default="pixel", show_default=True,
              help="how --on-change measures a change: colour-thumbnail difference, or image-encoder "
              "features")
@click.option("--every-frame", is_flag=True,
              help="a video file: read every frame, not at the file's frame rate")
@click.option("--index", "index_path", type=click.Path(), help="also report the nearest items of this index")
@click.option("--index-bundle", type=click.Path(),
              help="embed frames for --index with this bundle (default: BUNDLE where it built the index, "
              "else the bundle the index records)")
@click.option("-k", "k", type=int, default=3, show_default=True, help="nearest items reported with --index")
@click.option("--record", type=click.Path(), help="also append every line to this .jsonl file")
@click.option("--show", is_flag=True, help="draw the text on the video in a window (needs a GUI OpenCV)")
@click.option("--headless", is_flag=True, help="never open a window (the default; refuses --show)")
@click.option("--retries", type=int,
              help="give up on a lost live source after this many tries (default: never)")
@click.option("--num-beams", type=int, help="1 = greedy (fastest)")
@click.option("--max-new-tokens", type=int)
@click.option("--threads", type=int)
def camera(bundle, source, task, question, prompt, every, on_change, change, every_frame, index_path,
           index_bundle, k, record, show, headless, retries, num_beams, max_new_tokens, threads):
    """Caption what SRC shows with BUNDLE (or answer --question about it), live.

    One JSON line per reading on stdout (time, frame, t, text, score, latency_ms) and per source
    event (opened, lost, retry, recovered, ended, end). A live source keeps only its newest frame,
    so readings never fall behind; a lost one is reopened with backoff. Ctrl-C stops cleanly.
    """
    from .runtime.camera import Analyser, CameraOptions, Output, RecordWriter, run_camera
    from .runtime.capture import ReconnectPolicy, check_display, check_support, opencv_support, parse_source

    options = CameraOptions(task=task, question=question, prompt=prompt, every=every, on_change=on_change,
                            change=change, every_frame=every_frame, k=k)
    if show and headless:
        raise OptionError("--show opens a window and --headless forbids one: give one of them")
    policy = ReconnectPolicy(retries=retries)
    src = parse_source(source)
    check_support(src, show, opencv_support())
    if show:
        check_display()
    decoding = {name: value for name, value in (("num_beams", num_beams), ("max_new_tokens", max_new_tokens))
                if value is not None}
    model = load_model(bundle, threads)
    index, index_model = _open_index(index_path, index_bundle, bundle, model, threads)
    analyser = Analyser(model, options, decoding=decoding, index=index, index_model=index_model)
    writer = RecordWriter(record) if record else None
    window = _window() if show else None
    output = Output(sys.stdout, writer, notify=lambda text: click.echo(text, err=True))
    try:
        with _sigterm_as_interrupt():
            summary = run_camera(src, analyser, output, opener=open_source, policy=policy, window=window)
    finally:
        if writer is not None:
            writer.close()
        if window is not None:
            window.close()
    click.echo(f"camera: {summary.reason}: {summary.readings} readings of {summary.frames} frames "
               f"({summary.skipped} skipped while busy, {summary.unchanged} unchanged) in "
               f"{summary.seconds:.1f} s" + (f"; record {record}" if record else ""), err=True)
    if output.closed:  # keep Python from failing to flush the dead pipe at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if summary.reason == "interrupted":
        sys.exit(130)


def _open_index(index_path, index_bundle, bundle, model, threads):
    """(open Index, the model that embeds frames for it), or (None, None) without --index."""
    if index_path is None:
        if index_bundle is not None:
            raise OptionError("--index-bundle is for --index: give --index with it")
        return None, None
    from .runtime.index import IndexModelError, open_index

    idx = open_index(index_path)
    if index_bundle is not None:
        return idx, load_model(index_bundle, threads)
    if "retrieval" in model.tasks:
        try:
            idx.check_model(model)
            return idx, model
        except IndexModelError:
            pass  # another model built it: embed with the bundle it records
    if not os.path.exists(idx.meta.bundle):
        raise InputError(f"index {idx.path} was built with {idx.meta.bundle}, which is not there, and "
                         f"{bundle} did not build it: pass --index-bundle with that bundle or a quantized "
                         "twin of it")
    return idx, load_model(idx.meta.bundle, threads)


def _window():
    from .runtime.capture import Window

    return Window()


class _sigterm_as_interrupt:
    """While inside, SIGTERM (systemctl stop, docker stop) stops the loop as Ctrl-C does, so the
    record is closed and the end event written. Only the main thread may set signal handlers."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
