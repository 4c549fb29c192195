"""`edge-run engine build`: TensorRT engines from a bundle's ONNX, written into the bundle."""
from __future__ import annotations

import click


@click.group()
def engine():
    """Build TensorRT engines into a bundle (on the machine that will run them)."""


@engine.command("build")
@click.argument("bundle", type=click.Path())
@click.option("--fp16", is_flag=True, help="allow FP16 kernels (TensorRT 11: the bundle's @fp16 variants)")
@click.option("--int8", is_flag=True, help="INT8 from the bundle's Q/DQ variants (edge-run calibrate)")
@click.option("--workspace", "workspace_mb", type=int, help="builder workspace cap in MB (8 GB Jetsons: 1024)")
@click.option("--profiles", multiple=True, metavar="AXIS=N[,N...]",
              help="bucket bounds per axis (batch, beams, past, new, seq), e.g. --profiles past=16,64")
@click.option("--module", "modules", multiple=True, help="only these modules (default: all the tasks run)")
@click.option("--rebuild", is_flag=True, help="build even where an engine matches this machine")
@click.option("--timing-cache", type=click.Path(), help="timing cache file (default: under the user cache)")
@click.option("--calibration-from", type=click.Path(),
              help="legacy INT8 (TensorRT 8.x/10): a quantized twin whose calibration caches to use")
def build(bundle, fp16, int8, workspace_mb, profiles, modules, rebuild, timing_cache, calibration_from):
    """Build an engine for each module of BUNDLE and record it in the manifest."""
    from pathlib import Path

    from .engine.build import BuildOptions, build_engines

    options = BuildOptions(fp16=fp16, int8=int8, workspace_mb=workspace_mb, profiles=profiles, rebuild=rebuild,
                           modules=modules, timing_cache=Path(timing_cache) if timing_cache else None,
                           calibration_from=Path(calibration_from) if calibration_from else None)
    report = build_engines(bundle, options, progress=lambda msg: click.echo(f"  {msg}", err=True))
    d = report.device
    click.echo(f"{report.bundle}: TensorRT {d['trt_version']} ({report.api} API) on {d['gpu_name']} "
               f"(compute capability {d['compute_capability']}); timing cache {report.timing_cache}")
    for r in report.results:
        what = f"built in {r.seconds:.1f} s" if r.built else "up to date"
        click.echo(f"  {r.module:12s} {r.precision:5s} from {r.source}: {r.file} ({what})")
    for note in report.notes:
        click.echo(f"  note: {note}")
