"""`edge-run bench`: parses the options, runs `edgerun.runtime.bench`, prints the report as tables."""
from __future__ import annotations

import sys

import click

NAMES = {"decoder_first": "decoder first step", "decoder_per_token": "decoder per token",
         "beam_bookkeeping": "beam bookkeeping", "kv_cache": "KV cache upkeep", "cross_kv": "cross-attention K/V",
         "question_encoder": "question encoder", "embed_images": "embed images (total)",
         "embed_texts": "embed texts (total)", "end_to_end": "end to end"}


def _name(stage: str) -> str:
    return NAMES.get(stage, stage.replace("_", " "))


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {prefix}{unit}"
    return f"{value:.1f} {unit}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _header(report) -> list[str]:
    o, m = report.options, report.machine
    decode = f", {o.num_beams} beam(s) x {o.new_tokens} tokens" if report.task != "retrieval" else ""
    inputs = f"images from {o.images}" if o.images else "synthetic 640x480 images"
    lines = [f"edge-run bench {report.bundle}",
             (f"  task {report.task}, batch {o.batch}{decode}, threads {o.threads or 'all'}, {o.runs} runs "
              f"after {o.warmup} warm-up, {inputs}"),
             f"  machine: {m['cpu']}, {m['usable_cores']} of {m['cores']} cores; "
             f"onnxruntime {m['onnxruntime']}"
             + (f"; TensorRT {m['tensorrt']}" if m.get("tensorrt") else "")]
    if m.get("gpu"):
        lines.append("  gpu: " + ", ".join(f"{k} {v}" for k, v in m["gpu"].items() if v))
    if m.get("load_average"):
        load = m["load_average"][0]
        busy = " (other processes were running: timings may be inflated)" if load > 0.5 else ""
        lines.append(f"  load average at start: {load:.2f}{busy}")
    for backend, p in report.peaks.items():
        how = f"cached from {p.measured_at}" if p.cached else "measured now"
        if not p.cached and p.load_average is not None:
            how += f" at load {p.load_average:.2f}"
        lines.append(f"  peaks [{backend}, {p.threads} threads]: "
                     f"MatMul {_si(p.matmul_flops_per_s, 'FLOP/s')}, "
                     f"streaming GEMV read {_si(p.gemv_bytes_per_s, 'B/s')}; {how}")
    prov = report.runs[0].provenance if report.runs else {}
    libs = ", ".join(f"{k} {v}" for k, v in (prov.get("libraries") or {}).items())
    lines.append(f"  bundle provenance: source {prov.get('source')}"
                 + (f" (revision {prov['revision']})" if prov.get("revision") else "")
                 + (f", {prov['architecture']}" if prov.get("architecture") else "")
                 + (f", exported {prov['exported_at']}" if prov.get("exported_at") else "")
                 + (f", opset {prov['opset']}" if prov.get("opset") else ""))
    if libs:
        lines.append(f"    with {libs}")
    return lines


def _run_table(run) -> list[str]:
    from edgerun.runtime.bench import TOTALS, Stats

    lines = [f"{run.label}", f"  {'stage (ms)':26s}{'p50':>9s}{'p90':>9s}{'p99':>9s}{'mean':>9s}"]
    rows = {**run.stages, **{k: Stats.of(run.samples[k]) for k in TOTALS if k in run.samples},
            "end_to_end": run.end_to_end}
    for stage, s in rows.items():
        ms = "".join(f"{v * 1000:9.2f}" for v in (s.p50, s.p90, s.p99, s.mean))
        lines.append(f"  {_name(stage):26s}{ms}")
    per_s = ", ".join(f"{v:.2f} {k.replace('_per_s', '')}/s" for k, v in run.throughput.items())
    c = run.cold_start
    lines += [f"  throughput: {per_s}",
              (f"  cold start: {c.total:.2f} s to the first result (process start {c.process_start:.2f} s, "
               f"imports {c.imports:.2f} s, bundle load {c.load:.2f} s, first call {c.first_result:.2f} s)"),
              f"  memory: peak RSS {_mb(run.peak_rss_bytes)}; on disk {_mb(run.disk_bytes)}"]
    if run.roofline:
        lines.append(f"  {'roofline (at p50)':26s}{'work/call':>14s}{'achieved':>16s}{'of peak':>9s}")
        for stage, r in run.roofline.items():
            work, rate = (_si(r.work, "FLOP"), _si(r.achieved_per_s, "FLOP/s")) if r.bound == "compute" else \
                (_si(r.work, "B"), _si(r.achieved_per_s, "B/s"))
            lines.append(f"  {_name(stage):26s}{work:>14s}{rate:>16s}{r.fraction:9.0%}")
    return lines


def _comparison(report, comp) -> list[str]:
    runs = {r.label: r for r in report.runs}
    ref, other = runs[comp.reference], runs[comp.other]
    lines = [f"{comp.other} vs {comp.reference}",
             f"  {'p50 (ms)':24s}{comp.reference[:16]:>17s}{comp.other[:16]:>17s}{'ratio':>9s}"]
    stages = {**ref.stages, "end_to_end": ref.end_to_end}
    theirs = {**other.stages, "end_to_end": other.end_to_end}
    for stage, s in stages.items():
        if stage in theirs:
            ratio = comp.ratios.get(stage)
            lines.append(f"  {_name(stage):24s}{s.p50 * 1000:17.2f}{theirs[stage].p50 * 1000:17.2f}"
                         + (f"{ratio:8.2f}x" if ratio is not None else ""))
    for key, a, b in (("peak RSS (MB)", ref.peak_rss_bytes / 1e6, other.peak_rss_bytes / 1e6),
                      ("on disk (MB)", ref.disk_bytes / 1e6, other.disk_bytes / 1e6),
                      ("cold start (s)", ref.cold_start.total, other.cold_start.total)):
        lines.append(f"  {key:24s}{a:17.1f}{b:17.1f}" + (f"{b / a:8.2f}x" if a else ""))
    lines.append(f"  ratio = {comp.other} / {comp.reference}: above 1, {comp.other} is slower or larger")
    a = comp.agreement
    if "identical" in a:
        lines.append(f"  outputs: identical token ids for {a['identical']} of {a['inputs']} input(s)")
    for key, v in a.items():
        if isinstance(v, dict):
            lines.append(f"  outputs: {key} cosine min {v['cosine_min']:.6f}, mean {v['cosine_mean']:.6f} "
                         f"over {v['inputs']} input(s)")
    return lines


def _baseline(check) -> list[str]:
    lines = [f"against baseline {check.path} (tolerance {check.tolerance:.0%})"]
    lines += [f"  note: {n}" for n in check.notes]
    for c in check.changes:
        flag = "  REGRESSED" if c.regressed else ""
        ratio = f"{c.ratio:6.2f}x" if c.ratio is not None else "   new"
        lines.append(f"  [{c.backend}] {_name(c.stage):24s}{c.baseline * 1000:10.2f} -> "
                     f"{c.now * 1000:10.2f} ms {ratio}{flag}")
    bad = check.regressed
    lines.append(f"  {len(bad)} stage(s) regressed beyond {check.tolerance:.0%}" if bad else
                 "  no stage regressed")
    return lines


def format_report(report) -> str:
    """The report as plain-text tables, for the terminal."""
    blocks = [_header(report)]
    blocks += [_run_table(run) for run in report.runs]
    blocks += [_comparison(report, c) for c in report.comparisons]
    if report.baseline is not None:
        blocks.append(_baseline(report.baseline))
    return "\n\n".join("\n".join(b) for b in blocks)


@click.command()
@click.argument("bundle", type=click.Path())
@click.option("--task", help="caption, vqa or retrieval (default: the bundle's first task)")
@click.option("--backend", default="cpu", show_default=True,
              help="cpu, cuda, ort-trt, or all (every one installed)")
@click.option("--images", type=click.Path(), help="a folder of real input images (default: synthetic images)")
@click.option("--runs", type=int, default=10, show_default=True, help="timed calls")
@click.option("--warmup", type=int, default=2, show_default=True, help="untimed calls first")
@click.option("--batch", type=int, default=1, show_default=True, help="images per call")
@click.option("--threads", type=int, help="onnxruntime (and torch) threads (default: every core)")
@click.option("--num-beams", type=int, default=3, show_default=True)
@click.option("--new-tokens", type=int, default=20, show_default=True,
              help="tokens generated per sequence, exactly (min = max), so runs compare")
@click.option("--compare", help="'torch' (transformers generate() on the bundle's Hugging Face source), "
              "or a second bundle BUNDLE2")
@click.option("--baseline", type=click.Path(),
              help="an earlier run's --json: stages slower beyond --tolerance are flagged, exit status 1")
@click.option("--tolerance", type=float, default=0.10, show_default=True,
              help="allowed slowdown of a stage's p50 against --baseline, as a fraction")
@click.option("--json", "json_path", type=click.Path(), help="write the full report as JSON")
@click.option("--plot", "plot_path", type=click.Path(),
              help="write a PNG of the latency distribution and stages (pip install 'edge-run[plot]')")
@click.option("--remeasure-peaks", is_flag=True,
              help="measure the machine's MatMul and bandwidth peaks again, not from the cache")
def bench(bundle, **kwargs):
    """Time BUNDLE per stage: latency, throughput, cold start, memory and roofline."""
    from .runtime.bench import BenchOptions, plot, run_bench, write_json

    options = BenchOptions(**kwargs)
    report = run_bench(bundle, options, progress=lambda msg: click.echo(f"  {msg}", err=True))
    click.echo(format_report(report))
    if options.json_path:
        click.echo(f"\nwrote {write_json(report, options.json_path)}")
    if options.plot_path:
        click.echo(f"wrote {plot(report, options.plot_path)}")
    if report.baseline is not None and report.baseline.regressed:
        sys.exit(1)
