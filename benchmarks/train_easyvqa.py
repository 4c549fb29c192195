"""Train built-in families on easy-VQA on the CPU, export them, and score torch against the bundle.

    python benchmarks/train_easyvqa.py --workdir /tmp/evqa-bench                  # the default models
    python benchmarks/train_easyvqa.py --workdir DIR --model tiny-cnn-lstm:12 --model small-vit-all:2:200

Needs `pip install 'edge-run[export,train]'` (easy-vqa, sacrebleu). Per
model (NAME:EPOCHS[:STEPS_PER_EPOCH], NAME a registry name or JSON config): `edge-run train` on easy-VQA's train split
(10 % of its images held out for best.pt), then on the 1,000-image test split with 9,673 questions:
VQA accuracy and caption BLEU / CIDEr-D of the torch checkpoint (greedy, through the runtime's decoder
over torch) and of the exported bundle (`edgerun.load(bundle).caption_batch / answer_batch` from
the image files, so the runtime's own preprocessing is in the loop), how often the two give the very
same text, training wall time and bundle size. Prints a table, writes DIR/results.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

DEFAULT_MODELS = ("tiny-cnn-lstm:12", "small-vit-all:2:200")


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def torch_predictions(best: Path, test_files, batch: int) -> dict:
    """Captions per test image and answers per test question from the torch checkpoint."""
    from edgerun.models.families import load_checkpoint
    from edgerun.train.batches import Batcher, text_limits
    from edgerun.train.data import ImageStore, load_data
    from edgerun.train.evaluate import new_tokens, predict_answers, predict_captions

    ckpt = load_checkpoint(best)
    model, data = ckpt.model, load_data(test_files)
    batcher = Batcher(data, ImageStore(data.images, ckpt.preprocess), ckpt.tokenizer, text_limits(model),
                      getattr(model, "vqa_mode", None), ckpt.answers)
    start, out = time.perf_counter(), {"data": data}
    if "caption" in model.tasks:
        images = sorted({c.image for c in data.captions})
        out["captions"] = dict(zip(images, predict_captions(model, batcher, images, batch,
                                                            new_tokens(batcher.limits.caption))))
    if "vqa" in model.tasks:
        rows = list(range(len(data.questions)))
        out["answers"] = predict_answers(model, batcher, rows, batch, new_tokens(batcher.limits.answer))
    out["seconds"] = time.perf_counter() - start
    out["limits"] = {"caption": new_tokens(batcher.limits.caption), "answer": new_tokens(batcher.limits.answer)}
    return out


def bundle_predictions(bundle: Path, data, tasks, batch: int, limits: dict) -> dict:
    import edgerun

    model, out = edgerun.load(bundle, threads=None), {}
    start = time.perf_counter()
    if "caption" in tasks:
        images = sorted({c.image for c in data.captions})
        texts = []
        for chunk in _chunks(images, batch):
            found = model.caption_batch([str(data.images[i]) for i in chunk], num_beams=1,
                                        max_new_tokens=limits["caption"])
            texts += [c.text for c in found]
        out["captions"] = dict(zip(images, texts))
    if "vqa" in tasks:
        answers = []
        for chunk in _chunks(data.questions, batch):
            found = model.answer_batch([str(data.images[q.image]) for q in chunk], [q.question for q in chunk],
                                       num_beams=1, max_new_tokens=limits["answer"])
            answers += [a.text for a in found]
        out["answers"] = answers
    out["seconds"] = time.perf_counter() - start
    return out


def scores(pred: dict, data) -> dict:
    from edgerun.train.metrics import caption_scores, mean_vqa_accuracy

    out = {}
    if "captions" in pred:
        refs = defaultdict(list)
        for c in data.captions:
            refs[c.image].append(c.caption)
        images = sorted(pred["captions"])
        out.update(caption_scores([pred["captions"][i] for i in images], [refs[i] for i in images]))
    if "answers" in pred:
        out["vqa_accuracy"] = mean_vqa_accuracy(pred["answers"], [q.answers for q in data.questions])
    return out


def agreement(a: dict, b: dict) -> dict:
    out = {}
    if "captions" in a:
        out["same_captions"] = sum(a["captions"][i] == b["captions"][i] for i in a["captions"]) / len(a["captions"])
    if "answers" in a:
        out["same_answers"] = sum(x == y for x, y in zip(a["answers"], b["answers"])) / len(a["answers"])
    return out


def run_model(spec: str, paths, workdir: Path, args) -> dict:
    from edgerun.export.builtin import export_checkpoint
    from edgerun.train.loop import TrainOptions, train

    name, epochs, steps = (spec.split(":") + ["", ""])[:3]
    run_dir, bundle = workdir / "runs" / Path(name).stem, workdir / "bundles" / Path(name).stem
    options = TrainOptions(epochs=int(epochs or 1), batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                           threads=args.threads, val_limit=args.val_limit,
                           steps_per_epoch=int(steps) if steps else args.steps_per_epoch)
    print(f"== {name}: training {options.epochs} epochs", file=sys.stderr, flush=True)
    done = run_dir / "bench_train.json"
    if args.reuse and done.is_file():
        trained = json.loads(done.read_text())
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: its wall time is the figure
        report = train(name, paths.train, run_dir, options=options, progress=True)
        trained = {"epochs": report.epochs, "steps": report.steps, "train_seconds": round(report.seconds, 1),
                   "best_epoch": report.best_epoch, "val": {report.metric: report.best_score},
                   "options": {"batch_size": options.batch_size, "lr": options.lr, "threads": options.threads,
                               "steps_per_epoch": options.steps_per_epoch}}
        done.write_text(json.dumps(trained))
    print(f"== {name}: exporting and scoring on the test split", file=sys.stderr, flush=True)
    best = run_dir / "best.pt"
    export_checkpoint(f"ckpt:{best}", "all", bundle, overwrite=True)
    torch_side = torch_predictions(best, paths.test, args.batch_size)
    data = torch_side.pop("data")
    tasks = [t for t in ("caption", "vqa") if ("captions" if t == "caption" else "answers") in torch_side]
    bundle_side = bundle_predictions(bundle, data, tasks, args.batch_size, torch_side["limits"])
    return {"model": name, **trained, "torch": scores(torch_side, data), "bundle": scores(bundle_side, data),
            "agreement": agreement(torch_side, bundle_side),
            "torch_test_seconds": round(torch_side["seconds"], 1), "bundle_test_seconds": round(bundle_side["seconds"], 1),
            "bundle_mb": round(sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()) / 1e6, 2),
            "checkpoint_mb": round(best.stat().st_size / 1e6, 2),
            "examples": {"test_images": len({c.image for c in data.captions}), "test_questions": len(data.questions)}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--model", action="append",
                        help="NAME:EPOCHS[:STEPS_PER_EPOCH] (repeat); default: " + " ".join(DEFAULT_MODELS))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; on a busy machine 2 threads ran 4-5x slower than 1")
    parser.add_argument("--reuse", action="store_true", help="score a model's finished run again, without training")
    parser.add_argument("--val-limit", type=int, default=1000, help="validation examples per task per epoch")
    parser.add_argument("--steps-per-epoch", type=int)
    args = parser.parse_args(argv)

    import torch

    from edgerun.train.easyvqa import prepare_easy_vqa

    torch.set_num_threads(args.threads)
    paths = prepare_easy_vqa(args.workdir / "data")
    results = []
    for spec in args.model or DEFAULT_MODELS:
        results.append(run_model(spec, paths, args.workdir, args))
        (args.workdir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"{'model':16s} {'epochs':>6s} {'train s':>8s} {'side':6s} {'VQA acc':>8s} {'BLEU':>6s} {'CIDEr':>6s} "
          f"{'same text':>10s} {'bundle MB':>9s}")
    for r in results:
        for side in ("torch", "bundle"):
            s = r[side]
            same = " / ".join(f"{v:.1%}" for v in r["agreement"].values()) if side == "bundle" else ""
            print(f"{r['model']:16s} {r['epochs']:6d} {r['train_seconds']:8.0f} {side:6s} "
                  f"{s.get('vqa_accuracy', float('nan')):8.3f} {s.get('bleu', float('nan')):6.1f} "
                  f"{s.get('cider', float('nan')):6.2f} {same:>10s} {r['bundle_mb'] if side == 'bundle' else '':>9}")
    print(f"results: {args.workdir / 'results.json'}")


if __name__ == "__main__":
    main()
