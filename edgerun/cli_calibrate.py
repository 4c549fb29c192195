"""`edge-run calibrate`: quantize a float bundle to INT8 (or add FP16 GPU variants).

The lead's cli.py registers it with `cli.add_command(calibrate)`. Progress goes to stderr; the
accuracy table, the sensitivity ranking and the summary go to stdout. Errors (EdgeRunError, an
exceeded --max-drop included) propagate to `edgerun.cli.main`, which prints one line and exits 1.
"""
from __future__ import annotations

import resource

import click


@click.command("calibrate")
@click.argument("bundle", type=click.Path())
@click.option("--data", "data", required=True,
              help="calibration images: a folder (searched recursively), a .txt list, a video file or camera:INDEX")
@click.option("-o", "--output", required=True, type=click.Path(), help="bundle directory to write")
@click.option("--method", type=click.Choice(["auto", "entropy", "minmax", "percentile"]), default="auto",
              show_default=True, help="how activation ranges are chosen; auto: per tensor, whichever of percentile, minmax "
              "and entropy quantizes it with the least error")
@click.option("--percentile", type=float, default=99.99, show_default=True, help="for --method percentile")
@click.option("--samples", type=int, default=128, show_default=True, help="calibration images")
@click.option("--augment", is_flag=True, help="a folder with fewer than --samples images: top it up with "
              "random crops and flips of them")
@click.option("--seed", type=int, default=0, show_default=True, help="picks the samples from a folder")
@click.option("--per-channel/--per-tensor", default=True, show_default=True, help="weight scales")
@click.option("--gptq/--no-gptq", default=True, show_default=True,
              help="round convolutions' int8 weights against the error on their calibration inputs (else: nearest)")
@click.option("--bias-correction/--no-bias-correction", default=True, show_default=True,
              help="add back the mean output shift that rounding a convolution's weights causes")
@click.option("--int8-head", is_flag=True, help="decoders' onnxruntime variant: quantize the LM head too (the tied "
              "embedding stays one int8 table); the held-out comparison tells what it cost")
@click.option("--decoder-int8", type=click.Choice(["auto", "blockwise", "dynamic"]), default="auto", show_default=True,
              help="decoders' onnxruntime variant: blockwise (MatMulNBits, 8-bit weights in blocks of up to 256; "
                   "onnxruntime >= 1.23) or dynamic (standard ops); auto: blockwise with onnxruntime >= 1.23 on x86-64")
@click.option("--variants", default="cpu,tensorrt", show_default=True,
              help="INT8 variants to write: cpu (onnxruntime) and tensorrt (symmetric Q/DQ); 'cpu' alone "
                   "makes a bundle for onnxruntime only, about a third smaller")
@click.option("--keep-float", multiple=True, metavar="PATTERN",
              help="layers to leave in float: a node-name glob or op type, MODULE:PATTERN for one module "
                   "(repeat or separate with commas)")
@click.option("--max-drop", type=float, help="fail (and write nothing) when a held-out metric drops more than "
              "this fraction against the float twin")
@click.option("--gate", multiple=True, metavar="GLOB",
              help="metrics --max-drop judges, by name (e.g. '*recall@5'); default: the --eval task metrics, "
                   "else every agreement metric")
@click.option("--auto", is_flag=True, help="with --max-drop: keep the fewest most sensitive layers float that meet "
              "it (doubling, then bisecting the count; each probe is a held-out comparison)")
@click.option("--fp16", is_flag=True, help="write FP16 GPU variants (cuda, tensorrt, ort-trt) instead of INT8")
@click.option("--sensitivity", is_flag=True, help="rank the layers by the error each one alone adds")
@click.option("--eval", "eval_data", help="held-out data: images (default: source images calibration did not "
              "use, then crops and flips of them), or data files (.json, comma-separated: COCO captions, VQA "
              "questions/answers) scored on recall@1/@5, VQA accuracy and caption BLEU-4 / CIDEr-D against the float twin")
@click.option("--eval-samples", type=int, default=64, show_default=True, help="held-out images compared (with data files: "
              "the first N images that have examples)")
@click.option("--eval-beams", type=int, help="beams for held-out captions and answers (default: the bundle's)")
@click.option("--decoder-samples", type=int, default=32, show_default=True,
              help="calibration images whose decoding steps calibrate the decoders' TensorRT variant")
@click.option("--batch-size", type=int, help="images per calibration batch (default: by activation size)")
@click.option("--every", type=int, help="video or camera: take every N-th frame")
@click.option("--texts", type=click.Path(exists=True, dir_okay=False),
              help="text file, one text a line, for the modules that read text")
@click.option("--threads", type=int, help="onnxruntime threads (default: every core)")
@click.option("--overwrite", is_flag=True, help="replace an existing bundle at OUTPUT")
def calibrate(bundle, data, output, method, percentile, samples, augment, seed, per_channel, gptq, bias_correction,
              int8_head, decoder_int8, variants, keep_float, max_drop, gate, auto, fp16, sensitivity, eval_data, eval_samples, eval_beams,
              decoder_samples, batch_size, every, texts, threads, overwrite):
    """Quantize the float BUNDLE with calibration images from --data into the bundle OUTPUT."""
    from .calibration import accuracy
    from .calibration import sensitivity as ranking
    from .calibration.pipeline import CalibrationOptions
    from .calibration.pipeline import calibrate as run

    options = CalibrationOptions(
        method=method, percentile=percentile, samples=samples, augment=augment, seed=seed, per_channel=per_channel, gptq=gptq, bias_correction=bias_correction,
        int8_head=int8_head, decoder_int8=decoder_int8, variants=tuple(v.strip() for v in variants.split(",") if v.strip()),
        keep_float=keep_float, max_drop=max_drop, gate=gate, auto=auto, fp16=fp16, sensitivity=sensitivity,
        eval_data=eval_data, eval_samples=eval_samples, eval_beams=eval_beams, decoder_samples=decoder_samples,
        batch_size=batch_size, every=every, texts=_texts(texts), threads=threads, overwrite=overwrite)
    report = run(bundle, data, output, options, progress=lambda msg: click.echo(f"  {msg}", err=True))
    if report.sensitivity:
        click.echo(ranking.table(report.sensitivity))
        click.echo()
    click.echo(accuracy.table(report.accuracy))
    for note in report.notes:
        click.echo(f"note: {note}")
    q = report.quantization
    if "auto" in q:
        a = q["auto"]
        click.echo(f"auto: {a['float_layers']} of {a['ranked_layers']} ranked layers kept float after "
                   f"{len(a['probes'])} probes ({', '.join(str(p['float_layers']) for p in a['probes'])})")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    samples_text = f", {q['samples']} samples" if "samples" in q else ""
    click.echo(f"wrote {report.path} in {report.seconds:.1f} s ({q['method']}{samples_text}; "
               f"peak RSS {peak:.0f} MB)")
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in report.stage_seconds.items() if k != "total")
    click.echo(f"stages: {stages}")


def _texts(path: str | None) -> tuple[str, ...]:
    if path is None:
        return ()
    from .errors import InputError

    with open(path, encoding="utf-8") as fh:
        lines = tuple(line.strip() for line in fh if line.strip())
    if not lines:
        raise InputError(f"--texts {path} holds no text; give one text a line")
    return lines
