"""`edge-run train`: fit a built-in family model to caption / VQA data, then export it.

The lead's cli.py registers it with `cli.add_command(train)`. torch is imported when the command
runs, not at `--help`.
"""
from __future__ import annotations

import click

from .train.options import METRICS, TrainOptions

D = TrainOptions()  # the defaults, shown in --help


@click.command("train")
@click.argument("config")
@click.option("--data", "data", multiple=True, required=True, type=click.Path(),
              help="a COCO-style caption JSON or VQA-style question/answer JSON; repeat for several files")
@click.option("-o", "--output", "run_dir", required=True, type=click.Path(),
              help="run directory: best.pt, last.pt, state.pt, metrics.json")
@click.option("--val-data", multiple=True, type=click.Path(),
              help="validation files (same formats); default: --val-fraction of the images held out")
@click.option("--resume", is_flag=True, help="continue the run in OUTPUT after its last finished epoch")
@click.option("--epochs", type=int, help=f"total epochs of the run  [default: {D.epochs}]")
@click.option("--batch-size", type=int, help=f"[default: {D.batch_size}]")
@click.option("--lr", type=float, help=f"AdamW learning rate, after a linear warm-up  [default: {D.lr}]")
@click.option("--weight-decay", type=float, help=f"[default: {D.weight_decay}]")
@click.option("--warmup-steps", type=int, help=f"steps of linear warm-up  [default: {D.warmup_steps}]")
@click.option("--grad-clip", type=float, help=f"max gradient norm, 0 for none  [default: {D.grad_clip}]")
@click.option("--seed", type=int, help=f"fixes init, validation split and batch order  [default: {D.seed}]")
@click.option("--val-fraction", type=float, help=f"of the images, held out without --val-data  [default: {D.val_fraction}]")
@click.option("--val-limit", type=int, help="validate on at most this many examples per task")
@click.option("--steps-per-epoch", type=int, help="cut each epoch to this many steps")
@click.option("--metric", type=click.Choice(["auto", *METRICS]),
              help="what best.pt is chosen by  [default: auto: the first available of " + ", ".join(METRICS) + "]")
@click.option("--min-word-count", type=int, help=f"rarer training words become [UNK]  [default: {D.min_word_count}]")
@click.option("--max-answers", type=int, help="VQA classifier: keep the most frequent answers")
@click.option("--threads", type=int, help="torch CPU threads")
@click.option("--quiet", is_flag=True, help="no progress bar")
def train(config, data, run_dir, val_data, resume, quiet, **given):
    """Train CONFIG (a built-in model name, such as tiny-vit-all, or a JSON model config file) on --data.

    \b
    Data files (see edgerun/train/data.py):
      COCO captions  {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}
      VQA questions  {"questions": [{"question_id", "image_id", "question"}]}
      VQA answers    {"annotations": [{"question_id", "multiple_choice_answer", "answers"}]}
    or one file with all three lists. Image paths are relative to the JSON file that lists them.
    \b
    Afterwards: edge-run export ckpt:OUTPUT/best.pt --task all -o BUNDLE
    """
    from dataclasses import replace

    from .train.loop import run_options
    from .train.loop import train as run_train

    given = {k: v for k, v in given.items() if v is not None}  # unset: defaults, or the run's
    options = replace(run_options(run_dir), **given) if resume else TrainOptions(**given)
    report = run_train(config, list(data), run_dir, val_data=list(val_data) or None, options=options,
                       resume=resume, progress=not quiet)
    for label, skipped in (("training", report.skipped), ("validation", report.val_skipped)):
        if skipped.examples:
            click.echo(f"{label} data: {skipped.summary()}", err=True)
    click.echo(f"trained {', '.join(report.tasks)} for {report.epochs} epochs ({report.steps} steps) in "
               f"{report.seconds:.1f} s; best {report.metric} {report.best_score:.4g} at epoch {report.best_epoch}")
    click.echo(f"  best: {report.best}\n  last: {report.last}")
    click.echo(f"export it: edge-run export ckpt:{report.best} --task all -o BUNDLE")
