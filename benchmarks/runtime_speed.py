"""The runtime-speed targets, from `edge-run bench --compare torch` reports of an FP32 and an INT8 bundle.

    python benchmarks/runtime_speed.py run --workdir /tmp/blip-base [--runs 7]
    python benchmarks/runtime_speed.py report FP32.json [INT8.json]

`run` expects WORKDIR/bundle (benchmarks/blip_caption.py makes it: BLIP-base shapes, BlipConfig()
defaults, 384 px, weights redrawn from N(0, 0.02)) and WORKDIR/int8 (benchmarks/int8_blip.py, or
`edge-run calibrate`), and runs, one after the other,

    edge-run bench BUNDLE --compare torch --num-beams 3 --new-tokens 20 --threads 2 --runs N --json ...

for each: the bundle and torch's generate() each in fresh processes, medians of N runs in one
invocation. `report` reads those JSON files and sets each figure beside its target: speed against
generate(), the decode step against its bandwidth floor and the vision encoder against the MatMul
peak (both peaks measured on this machine by bench's roofline and cached: one fixed reference for
every run; measured afresh they are best-of figures that swing with the host, the streaming read
28.9 and 40.4 GB/s in two invocations ten minutes apart), peak RSS and size on disk against
torch's, beam bookkeeping as a share of decoding (the decoding loop's own work choosing tokens;
the KV cache's upkeep around the graph, `kv_cache`, is shown beside it), and cold start beyond the
first caption's own time.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

TARGETS = {  # precision -> (speed-up over generate(), peak RSS ratio, disk ratio)
    "fp32": (5.0, 0.75, 1.0),
    "int8": (8.0, 0.40, 0.35),
}
STEP_FLOOR = 1.15  # decode step within this factor of its bytes / streaming-read peak
VISION_PEAK = 0.90  # vision encoder at least this fraction of the MatMul peak
BOOKKEEPING = 0.05  # beam bookkeeping at most this share of decode time
COLD_EXTRA_S = 1.0  # import + load + first caption at most this beyond the first caption's latency


def bench(bundle: Path, out: Path, runs: int) -> None:
    cmd = [sys.executable, "-m", "edgerun.cli", "bench", str(bundle), "--compare", "torch", "--num-beams", "3", "--new-tokens", "20",
           "--threads", "2", "--runs", str(runs), "--json", str(out)]
    print("$ edge-run", " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True)


def _p50(run: dict, stage: str) -> float:
    return run["stages"].get(stage, {}).get("p50_ms", 0.0)


def rows(report: dict, precision: str) -> list[tuple[str, str, str, bool | None]]:
    """(figure, measured, target, met) for one bench report; met is None for a figure without a target."""
    main = next(r for r in report["runs"] if r["role"] == "main")
    ratios = report["comparisons"][0]["ratios"]
    speed, rss, disk = TARGETS[precision]
    roof = main.get("roofline", {})
    step = roof.get("decoder_per_token", {})
    vision = next((v for k, v in roof.items() if v.get("bound") == "compute" and k != "cross_kv"), {})
    per_token = _p50(main, "decoder_per_token")
    decode = _p50(main, "decoder_first") + per_token * (main["decoder_calls"] - 1)
    bookkeeping = _p50(main, "beam_bookkeeping")
    cache = _p50(main, "kv_cache")  # 0 in reports from before it was told apart from bookkeeping
    decoding = decode + cache + bookkeeping
    cold = main["cold_start"]
    extra = cold["total_s"] - main["end_to_end"]["p50_ms"] / 1e3
    floor = step.get("work", 0) / step["peak_per_s"] * 1e3 if step.get("peak_per_s") else float("nan")
    out = [
        ("caption vs generate()", f"{ratios['end_to_end']:.2f}x", f">= {speed}x", ratios["end_to_end"] >= speed),
        ("decode step / its floor", f"{per_token:.1f} / {floor:.1f} ms = {per_token / floor:.2f}x",
         f"<= {STEP_FLOOR}x", per_token / floor <= STEP_FLOOR),
        ("vision / MatMul peak", f"{vision.get('fraction', float('nan')):.0%}", f">= {VISION_PEAK:.0%}",
         vision.get("fraction", 0) >= VISION_PEAK),
        ("peak RSS / torch's", f"{1 / ratios['peak_rss']:.2f}", f"<= {rss}", 1 / ratios["peak_rss"] <= rss),
        ("on disk / checkpoint", f"{1 / ratios['disk']:.2f}", f"<= {disk}", 1 / ratios["disk"] <= disk),
        ("beam bookkeeping / decoding", f"{bookkeeping / decoding:.1%}", f"<= {BOOKKEEPING:.0%}",
         bookkeeping / decoding <= BOOKKEEPING),
        ("  + KV cache upkeep", f"{(bookkeeping + cache) / decoding:.1%} ({cache:.1f} ms)", "-", None),
        ("cold start beyond 1st caption", f"{extra:.2f} s", f"<= {COLD_EXTRA_S} s", extra <= COLD_EXTRA_S),
    ]
    return out


def print_report(paths: list[Path]) -> None:
    for path, precision in zip(paths, ("fp32", "int8")):
        report = json.loads(path.read_text())
        main = next(r for r in report["runs"] if r["role"] == "main")
        torch = next(r for r in report["runs"] if r["role"] != "main")
        agree = report["comparisons"][0].get("agreement", {})
        print(f"\n{precision.upper()}: {main['path']}  (load average {report['machine']['load_average']})")
        print(f"  end to end p50: bundle {main['end_to_end']['p50_ms']:.0f} ms, generate() "
              f"{torch['end_to_end']['p50_ms']:.0f} ms; token ids identical for "
              f"{agree.get('identical', '?')} of {agree.get('inputs', '?')} inputs")
        for name, got, want, met in rows(report, precision):
            verdict = "" if met is None else "met" if met else "NOT met"
            print(f"  {name:32s} {got:>28s}   target {want:10s} {verdict}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["run", "report"])
    ap.add_argument("reports", nargs="*", type=Path)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    if args.step == "run":
        if args.workdir is None:
            sys.exit("run needs --workdir (with bundle/ and int8/ in it)")
        paths = []
        for name in ("bundle", "int8"):
            if (args.workdir / name / "manifest.json").exists():
                paths.append(args.workdir / f"bench-{name}.json")
                bench(args.workdir / name, paths[-1], args.runs)
        print_report(paths)
    else:
        if not args.reports:
            sys.exit("report needs one or two bench JSON files (FP32 first)")
        print_report(args.reports)


if __name__ == "__main__":
    main()
