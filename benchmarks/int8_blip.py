"""INT8 calibration of a BLIP-base-shaped bundle: speed, memory and agreement with the float twin.

    python benchmarks/int8_blip.py all --bundle /tmp/blip-base/bundle --workdir /tmp/blip-int8
    python benchmarks/int8_blip.py data --workdir DIR            # calibration and held-out photos only
    python benchmarks/int8_blip.py time --bundle FLOAT --int8 INT8

The float bundle is the one benchmarks/blip_caption.py makes (BLIP-base shapes, 384 px, random
weights redrawn from N(0, 0.02)). Calibration data are real photos, scikit-image's and
scikit-learn's, cut into crops and flips: --count for calibration (seed 0) and --holdout others
(seed 1), so no held-out image is a calibration image. Every measurement runs in its own process
(FACTS.md: processes sharing the cores distort each other): calibration reports its peak RSS per
stage; timing runs the float and INT8 bundles in turn, twice, 2 threads, median of --runs after a
warm-up: the vision encoder alone, and a full caption (3 beams, exactly 20 new tokens). Results
go to WORKDIR/int8_results.json and a table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CAPTION = {"num_beams": 3, "max_new_tokens": 20, "min_new_tokens": 20}
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field", "immunohistochemistry",
          "stereo_motorcycle", "retina", "colorwheel", "camera", "coins", "moon", "clock", "brick", "grass")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def photos() -> list:
    import numpy as np
    from skimage import data
    from sklearn.datasets import load_sample_images

    out = []
    for name in PHOTOS:
        image = getattr(data, name)()
        image = image[0] if isinstance(image, tuple) else image
        out.append(np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3])
    return out + list(load_sample_images().images)


def make_data(workdir: Path, count: int, holdout: int) -> tuple[Path, Path]:
    import cv2
    import numpy as np

    from edgerun.calibration.sources import view

    pictures = photos()
    folders = []
    for name, n, seed in (("calib", count, 0), ("heldout", holdout, 1)):
        folder = workdir / name
        folders.append(folder)
        if folder.is_dir() and len(list(folder.iterdir())) == n:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        for i in range(n):
            crop = view(pictures[i % len(pictures)], rng)
            cv2.imwrite(str(folder / f"{i:04d}.jpg"), crop[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    return folders[0], folders[1]


def child(args: list[str]) -> dict:
    """Run this script's hidden sub-command in a fresh process and return its JSON (its progress
    goes to stderr as it runs)."""
    out = subprocess.run([sys.executable, __file__, *args], check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def calibrate_child(bundle: str, calib: str, heldout: str, output: str, samples: int, eval_samples: int) -> dict:
    from edgerun.calibration.pipeline import CalibrationOptions, calibrate

    stages, t0 = [], time.perf_counter()

    def progress(msg: str) -> None:
        stages.append({"t": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_mb()), "msg": msg})
        print(f"{stages[-1]['t']:7.1f} s {stages[-1]['peak_rss_mb']:6d} MB  {msg}", file=sys.stderr, flush=True)

    options = CalibrationOptions(samples=samples, eval_data=heldout, eval_samples=eval_samples, eval_beams=3,
                                 threads=2, overwrite=True)
    report = calibrate(bundle, calib, output, options, progress=progress)
    statistics_peak = max(s["peak_rss_mb"] for s in stages if s["msg"].startswith("statistics"))
    return {"seconds": report.seconds, "stage_seconds": report.stage_seconds, "peak_rss_mb": peak_rss_mb(),
            "statistics_peak_rss_mb": statistics_peak, "accuracy": [r.to_dict() for r in report.accuracy],
            "notes": report.notes}


def time_child(bundle: str, runs: int, threads: int) -> dict:
    import numpy as np

    import edgerun

    model = edgerun.load(bundle, threads=threads)
    image = photos()[0]
    pixels = model.pixel_values([image])
    vision = model.runner(model.manifest.tasks["caption"].modules[0])
    feeds = {vision.inputs[0].name: pixels}
    enc, cap, steps = [], [], []
    for i in range(runs + 1):
        vision.infer(feeds)
        start = time.perf_counter()
        result = model.caption(image, **CAPTION)
        if i:
            enc.append(vision.last_time)
            cap.append(time.perf_counter() - start)
            steps.append(model.last_timings["decoder_per_token"])
    return {"vision_ms": statistics.median(enc) * 1000, "caption_ms": statistics.median(cap) * 1000,
            "decoder_per_token_ms": statistics.median(steps) * 1000, "peak_rss_mb": peak_rss_mb(),
            "token_ids": result.token_ids, "bundle_mb": sum(p.stat().st_size for p in Path(bundle).iterdir()) / 1e6,
            "pixels_mean": float(np.mean(pixels))}


def time_both(float_bundle: str, int8_bundle: str, runs: int, threads: int) -> dict:
    """Float and INT8 in turn, twice; each figure is the better of its two processes' medians."""
    got = {"float": [], "int8": []}
    for _ in range(2):
        for name, bundle in (("float", float_bundle), ("int8", int8_bundle)):
            got[name].append(child(["_time", bundle, str(runs), str(threads)]))
    out = {}
    for name, results in got.items():
        best = {k: min(r[k] for r in results) for k in ("vision_ms", "caption_ms", "decoder_per_token_ms")}
        out[name] = {**best, "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
                     "bundle_mb": results[0]["bundle_mb"], "token_ids": results[0]["token_ids"]}
    out["speedup"] = {k: out["float"][k] / out["int8"][k] for k in ("vision_ms", "caption_ms", "decoder_per_token_ms")}
    out["same_caption"] = out["float"]["token_ids"] == out["int8"]["token_ids"]
    return out


def print_table(results: dict) -> None:
    t = results.get("timing")
    if t:
        print(f"{'':24} {'float':>10} {'int8':>10} {'speedup':>8}")
        for key, label in (("vision_ms", "vision encoder (ms)"), ("caption_ms", "caption 3x20 (ms)"),
                           ("decoder_per_token_ms", "decoder step (ms)")):
            print(f"{label:24} {t['float'][key]:10.1f} {t['int8'][key]:10.1f} {t['speedup'][key]:7.2f}x")
        print(f"{'peak RSS (MB)':24} {t['float']['peak_rss_mb']:10.0f} {t['int8']['peak_rss_mb']:10.0f}")
        print(f"{'bundle (MB)':24} {t['float']['bundle_mb']:10.0f} {t['int8']['bundle_mb']:10.0f}")
    c = results.get("calibration")
    if c:
        print(f"calibration: {c['seconds']:.0f} s, peak RSS {c['peak_rss_mb']:.0f} MB "
              f"(statistics stage {c['statistics_peak_rss_mb']} MB)")
        for report in c["accuracy"]:
            shown = ", ".join(f"{m['metric']} {m['value']:.4f}" for m in report["metrics"])
            print(f"  {report['variant']} vs float on {report['samples']} held-out images: {shown}")
    print(f"load average during the run: {os.getloadavg()}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):  # hidden sub-commands, one per process
        name, rest = sys.argv[1], sys.argv[2:]
        if name == "_time":
            print(json.dumps(time_child(rest[0], int(rest[1]), int(rest[2]))))
        elif name == "_calibrate":
            print(json.dumps(calibrate_child(*rest[:4], int(rest[4]), int(rest[5]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["all", "data", "time"])
    parser.add_argument("--bundle", default="/tmp/blip-base/bundle", help="the float bundle")
    parser.add_argument("--int8", help="the INT8 bundle (time); default WORKDIR/bundle-int8")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/blip-int8"))
    parser.add_argument("--count", type=int, default=256, help="calibration images")
    parser.add_argument("--holdout", type=int, default=64, help="held-out images")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    int8 = args.int8 or str(args.workdir / "bundle-int8")
    saved = args.workdir / "int8_results.json"
    results: dict = json.loads(saved.read_text()) if saved.is_file() else {}  # a later stage adds to it
    results["load_average_start"] = os.getloadavg()
    if args.stage in ("all", "data"):
        calib, heldout = make_data(args.workdir, args.count, args.holdout)
    if args.stage == "all":
        results["calibration"] = child(["_calibrate", args.bundle, str(calib), str(heldout), int8, str(args.count),
                                        str(args.holdout)])
    if args.stage in ("all", "time"):
        results["timing"] = time_both(args.bundle, int8, args.runs, args.threads)
    results["load_average_end"] = os.getloadavg()
    saved.write_text(json.dumps(results, indent=2))
    print_table(results)


if __name__ == "__main__":
    main()
