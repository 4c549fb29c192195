"""Caption latency and memory: edge-run against transformers generate() on the same BLIP weights.

    python benchmarks/blip_caption.py all --workdir /tmp/blip-base          # make, export, time both
    python benchmarks/blip_caption.py make --workdir DIR [--tiny]            # checkpoint only

`all` builds a BLIP-base-shaped checkpoint (BlipConfig() defaults, 384 px, weights redrawn from
N(0, 0.02): BLIP's vision init range of 1e-10 gives denormals that distort timings), exports it,
then times each side in its own process, one after the other: 3 beams, exactly 20 new tokens
(min_new_tokens = max_new_tokens = 20), batch 1, 2 threads, median of --runs runs after a warm-up.
It prints a table and writes DIR/results.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

OPTIONS = {"num_beams": 3, "max_new_tokens": 20, "min_new_tokens": 20}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def photo():
    from skimage import data

    return data.astronaut()  # 512x512 RGB uint8


def make(workdir: Path, tiny: bool) -> Path:
    from edgerun.models.tiny import save_blip_caption

    folder = workdir / "checkpoint"
    if (folder / "config.json").exists():
        return folder
    if tiny:
        return save_blip_caption(folder, init_std=0.02)
    return save_blip_caption(folder, text={}, vision={}, init_std=0.02, bert_vocab=True)


def time_torch(folder: Path, runs: int, threads: int) -> dict:
    import torch
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipImageProcessorPil

    torch.set_num_threads(threads)
    model = BlipForConditionalGeneration.from_pretrained(folder).eval()
    proc = BlipImageProcessorPil.from_pretrained(folder)
    image = Image.fromarray(photo())
    times, out = [], None
    with torch.inference_mode():
        for i in range(runs + 1):
            start = time.perf_counter()
            pixels = proc(images=image, return_tensors="pt")["pixel_values"]
            out = model.generate(pixel_values=pixels, **OPTIONS)
            if i:
                times.append(time.perf_counter() - start)
    return {"median_ms": statistics.median(times) * 1000, "runs_ms": [t * 1000 for t in times],
            "peak_rss_mb": peak_rss_mb(), "token_ids": out[0].tolist()}


def time_edgerun(bundle: Path, runs: int, threads: int) -> dict:
    import edgerun

    model = edgerun.load(bundle, threads=threads)
    image = photo()
    times, stages, result = [], [], None
    for i in range(runs + 1):
        start = time.perf_counter()
        result = model.caption(image, **OPTIONS)
        if i:
            times.append(time.perf_counter() - start)
            stages.append(dict(model.last_timings))
    stage_ms = {k: statistics.median(s[k] for s in stages) * (1 if k == "decoder_calls" else 1000)
                for k in stages[0]}
    return {"median_ms": statistics.median(times) * 1000, "runs_ms": [t * 1000 for t in times],
            "stages_ms": stage_ms, "peak_rss_mb": peak_rss_mb(), "token_ids": result.token_ids,
            "torch_imported": "torch" in sys.modules}


def run_side(side: str, workdir: Path, runs: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, side, "--workdir", str(workdir), "--runs", str(runs),
           "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def dir_mb(path: Path, suffixes=None) -> float:
    return sum(p.stat().st_size for p in path.rglob("*")
               if p.is_file() and (suffixes is None or p.suffix in suffixes)) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["make", "export", "torch", "edgerun", "all"])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="a tiny model, to try the script quickly")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    folder, bundle = args.workdir / "checkpoint", args.workdir / "bundle"
    if args.step == "make":
        print(make(args.workdir, args.tiny))
    elif args.step == "export":
        from edgerun.export.pipeline import export

        start = time.perf_counter()
        report = export(f"hf:{folder}", task="caption", output=bundle, overwrite=True)
        print(json.dumps({"seconds": time.perf_counter() - start, "stages": report.stage_seconds,
                          "max_abs_diff": report.max_abs_diff, "peak_rss_mb": peak_rss_mb()}))
    elif args.step == "torch":
        print(json.dumps(time_torch(folder, args.runs, args.threads)))
    elif args.step == "edgerun":
        print(json.dumps(time_edgerun(bundle, args.runs, args.threads)))
    else:
        make(args.workdir, args.tiny)
        results = {"export": run_side("export", args.workdir, args.runs, args.threads)}
        results["torch"] = run_side("torch", args.workdir, args.runs, args.threads)
        results["edgerun"] = run_side("edgerun", args.workdir, args.runs, args.threads)
        results["same_token_ids"] = results["torch"]["token_ids"] == results["edgerun"]["token_ids"]
        results["speedup"] = results["torch"]["median_ms"] / results["edgerun"]["median_ms"]
        results["checkpoint_mb"] = dir_mb(folder, {".safetensors", ".bin"})
        results["bundle_mb"] = dir_mb(bundle)
        (args.workdir / "results.json").write_text(json.dumps(results, indent=2))
        t, e = results["torch"], results["edgerun"]
        print(f"export: {results['export']['seconds']:.1f} s, max abs diff {results['export']['max_abs_diff']}")
        print(f"{'':24s}{'generate()':>12s}{'edge-run':>12s}")
        print(f"{'caption median (ms)':24s}{t['median_ms']:12.1f}{e['median_ms']:12.1f}   {results['speedup']:.2f}x")
        print(f"{'peak RSS (MB)':24s}{t['peak_rss_mb']:12.0f}{e['peak_rss_mb']:12.0f}")
        print(f"{'on disk (MB)':24s}{results['checkpoint_mb']:12.0f}{results['bundle_mb']:12.0f}")
        print(f"stages (ms): {e['stages_ms']}")
        print(f"same token ids: {results['same_token_ids']}; torch imported by edge-run: {e['torch_imported']}")


if __name__ == "__main__":
    main()
