"""`train()`: fit a built-in family model to caption and VQA data, with checkpoints and resume.

    from edgerun.train.loop import TrainOptions, train
    report = train("tiny-vit-all", ["captions.json", "questions.json"], "runs/1", options=TrainOptions(epochs=5))
    # then: edge-run export ckpt:runs/1/best.pt --task all -o bundle

A run directory holds, each rewritten atomically at the end of every epoch:
    last.pt      the model after the latest epoch (an edgerun-checkpoint, exportable)
    best.pt      the model after the epoch with the best validation metric so far
    state.pt     everything `--resume` needs: model, optimizer, scheduler, epoch, RNG states
    metrics.json the per-epoch history, for people and plots

Repeatability: the seed fixes the weight init, the validation split and every epoch's batch order
(a function of seed and epoch), and the RNG states are saved with each epoch; so a run stopped after
epoch k and resumed gives the same losses and weights as a run that never stopped (on the same
machine, torch version and thread count). The learning rate warms up linearly, then stays constant,
so `--resume` with a larger `--epochs` extends a run exactly as if it had been planned that long.
"""
from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import OptionError, require
from ..models.families import build_model, build_tokenizer, model_config, preprocess_config, save_checkpoint
from ..models.families.tokenizer import WordTokenizer
from .batches import Batcher, answer_set, config_tasks, epoch_batches, text_limits, trained_kinds
from .data import DataError, ImageStore, ImageTextData, Skipped, load_data, split_by_image
from .evaluate import METRICS, better, evaluate, pick_metric
from .options import RESUMABLE, TrainOptions
from .state import STATE_FILE, load_state, restore_rng, save_state, write_json


@dataclass
class TrainReport:
    run_dir: Path
    best: Path
    last: Path
    epochs: int  # epochs done in total
    steps: int
    seconds: float  # wall time of this call
    metric: str
    best_score: float
    best_epoch: int
    tasks: tuple[str, ...]  # the heads trained
    history: list[dict] = field(default_factory=list)
    skipped: Skipped = field(default_factory=Skipped)  # training examples left out
    val_skipped: Skipped = field(default_factory=Skipped)


def resolve_config(config: str | Path | Mapping) -> dict:
    """A registry name (see list_models()), a JSON file, or a config dict -> the config dict."""
    if isinstance(config, Mapping):
        return dict(config)
    text = str(config)
    if text.endswith(".json") or Path(text).is_file():
        path = Path(text)
        if not path.is_file():
            raise OptionError(f"model config {path} does not exist; give a JSON file or a built-in name")
        try:
            out = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise OptionError(f"{path}:{exc.lineno}:{exc.colno}: malformed JSON: {exc.msg}") from None
        if not isinstance(out, dict):
            raise OptionError(f"{path}: a model config is a JSON object, got {type(out).__name__}")
        return {"name": path.stem, **out}
    return {**model_config(text), "name": text}


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


class _Bar:
    """A progress bar with the running loss: tqdm when installed, else a plain line now and then."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.done, self.enabled = total, desc, 0, enabled
        self._tqdm = None
        if enabled:
            try:
                from tqdm import tqdm

                self._tqdm = tqdm(total=total, desc=desc, unit="step", leave=True, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, loss: float) -> None:
        self.done += 1
        if self._tqdm is not None:
            self._tqdm.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self._tqdm.update(1)
        elif self.enabled and (self.done == self.total or self.done % max(1, self.total // 10) == 0):
            print(f"{self.desc}: {self.done}/{self.total} steps, loss {loss:.4f}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


@dataclass
class _Setup:
    model: torch.nn.Module
    tokenizer: WordTokenizer
    kinds: tuple[str, ...]
    train: Batcher
    val: Batcher
    metric: str


def _load(paths, preprocess, progress: bool, label: str) -> tuple[ImageTextData, ImageStore]:
    data = load_data(paths)
    _say(progress, f"{label}: {len(data.captions)} captions, {len(data.questions)} questions, "
                   f"{len(data.images)} images")
    store = ImageStore(data.images, preprocess)
    return data.without_images(store.unreadable), store


def _split(config: dict, data, val_data, options: TrainOptions, progress: bool):
    """(train, its images, validation, its images), the examples of unreadable images dropped."""
    preprocess = preprocess_config(config)
    loaded, store = _load(data, preprocess, progress, "data")
    if val_data is None:
        train, val = split_by_image(loaded, options.val_fraction, options.seed)
        return train, store, val, store
    return (loaded, store, *_load(val_data, preprocess, progress, "validation data"))


def _setup(config: dict, data, val_data, options: TrainOptions, saved: dict | None, progress: bool) -> _Setup:
    train_part, store, val_part, val_store = _split(config, data, val_data, options, progress)
    kinds = trained_kinds(config_tasks(config), train_part)
    if not any(getattr(val_part, "captions" if k == "caption" else "questions") for k in kinds):
        raise DataError(f"the validation data has no {' or '.join(kinds)} examples to score the run by; "
                        "give other --val-data, or a larger --val-fraction")
    classifier = (config.get("heads") or {}).get("vqa", {}).get("type") == "classifier"
    answers = answer_set(train_part, options.max_answers) if classifier and "vqa" in kinds else None
    if classifier and "vqa" in kinds and len(answers) < 2:
        raise DataError(f"a VQA classifier needs at least 2 distinct training answers, got {len(answers)}")
    tokenizer = build_tokenizer(train_part.texts(kinds), min_count=options.min_word_count)
    if saved is not None and (tokenizer.to_json(), list(answers) if answers else None) != \
            (saved["tokenizer"], saved["answers"]):
        raise DataError("the data differs from the run's: its words or answers changed since the run started; "
                        "resume with the same --data (and --val-data) files")
    _seed_everything(options.seed)
    model = build_model(config, vocab_size=tokenizer.vocab_size, answers=answers)
    if answers:  # questions whose answer the classifier cannot give teach it nothing
        known = set(answers)
        train_part = replace(train_part, questions=[q for q in train_part.questions if q.answer in known])
    used = [f"{len(train_part.captions)} captions"] * ("caption" in kinds) + \
        [f"{len(train_part.questions)} questions"] * ("vqa" in kinds)
    _say(progress, f"training {', '.join(model.tasks)} on {' and '.join(used)}; "
                   f"{train_part.skipped.summary() or 'nothing skipped'}")
    limits, mode = text_limits(model), getattr(model, "vqa_mode", None)
    train = Batcher(train_part, store, tokenizer, limits, mode, answers)
    val = Batcher(val_part, val_store, tokenizer, limits, mode, answers)
    return _Setup(model, tokenizer, kinds, train, val, _metric(options.metric, model, kinds, val_part))


def _metric(requested: str, model, kinds, val: ImageTextData) -> str:
    available = {"loss"}
    if "caption" in kinds and "caption" in model.tasks and val.captions:
        require("sacrebleu", "train")  # now, not after the first epoch
        available |= {"bleu", "cider"}
    if "vqa" in kinds and val.questions:
        available.add("vqa_accuracy")
    if requested == "auto":
        return pick_metric("auto", dict.fromkeys(available))
    if requested not in available:
        raise OptionError(f"metric {requested!r} is not available for this model and data; "
                          f"valid: {', '.join(m for m in METRICS if m in available)}")
    return requested


def train(config: str | Path | Mapping, data: Sequence[str | Path], run_dir: str | Path, *,
          val_data: Sequence[str | Path] | None = None, options: TrainOptions | None = None,
          resume: bool = False, progress: bool = False) -> TrainReport:
    """Train the model `config` on `data` (COCO-style caption / VQA-style files, see `data`), writing
    checkpoints to `run_dir`. Without `val_data`, `options.val_fraction` of the images is held out.

    resume : continue the run in `run_dir` after its last finished epoch, with its options
        (`run_options(run_dir)`) when `options` is None; given options may differ from the run's
        only in epochs, val_limit and threads.
    progress : a progress bar per epoch and a line of metrics after it, on stderr."""
    start, run_dir = time.perf_counter(), Path(run_dir)
    saved = load_state(run_dir) if resume else None
    if saved is None and (run_dir / STATE_FILE).exists():
        raise OptionError(f"{run_dir} already holds a run; continue it with --resume, or give a new run directory")
    if saved is not None:
        config, options = _resumed(saved, config, options)
        if saved["epoch"] >= options.epochs:
            raise OptionError(f"nothing to do: the run in {run_dir} has done {saved['epoch']} epochs already; "
                              "give a larger --epochs to go on")
    else:
        config, options = resolve_config(config), options or TrainOptions()
    if options.threads:
        torch.set_num_threads(options.threads)
    setup = _setup(config, data, val_data, options, saved, progress)
    model = setup.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    warmup = options.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    done, step, history, best = 0, 0, [], None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        restore_rng(saved["rng"])
        done, step, history, best = saved["epoch"], saved["step"], saved["history"], saved["best"]
        _say(progress, f"resuming {run_dir} after epoch {done} (step {step})")
    run_dir.mkdir(parents=True, exist_ok=True)
    sizes = {"caption": len(setup.train.data.captions), "vqa": len(setup.train.data.questions)}
    sizes = {k: n for k, n in sizes.items() if k in setup.kinds}
    for epoch in range(done + 1, options.epochs + 1):
        batches = epoch_batches(sizes, options.batch_size, options.seed, epoch, options.steps_per_epoch)
        train_loss = _run_epoch(model, setup.train, batches, optimizer, scheduler, options, step,
                                _Bar(len(batches), f"epoch {epoch}/{options.epochs}", progress))
        step += len(batches)
        scores = evaluate(model, setup.val, setup.kinds, options.batch_size, options.val_limit)
        history.append({"epoch": epoch, "step": step, "train_loss": train_loss, "lr": scheduler.get_last_lr()[0],
                        **scores})
        _say(progress, "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in history[-1].items()))
        if better(setup.metric, scores[setup.metric], best and best["score"]):
            best = {"epoch": epoch, "metric": setup.metric, "score": scores[setup.metric]}
        _save_epoch(run_dir, setup, optimizer, scheduler, options, history, best)
    return TrainReport(run_dir, run_dir / "best.pt", run_dir / "last.pt", len(history), step,
                       time.perf_counter() - start, best["metric"], best["score"], best["epoch"],
                       setup.kinds, history, setup.train.data.skipped,
                       setup.val.data.skipped if val_data is not None else Skipped())


def _save_epoch(run_dir: Path, setup: _Setup, optimizer, scheduler, options: TrainOptions, history: list,
                best: dict) -> None:
    """best.pt (when this epoch is the best), last.pt, state.pt, metrics.json: each atomically, in
    this order, so that a crash between two of them leaves a state.pt that resumes to the same run."""
    record = history[-1]
    meta = {"epoch": record["epoch"], "step": record["step"], "seed": options.seed,
            "metrics": {k: v for k, v in record.items() if k not in ("epoch", "step")}}
    if best["epoch"] == record["epoch"]:
        save_checkpoint(setup.model, run_dir / "best.pt", tokenizer=setup.tokenizer, metadata={**meta, "best": True})
    save_checkpoint(setup.model, run_dir / "last.pt", tokenizer=setup.tokenizer, metadata=meta)
    save_state(run_dir / STATE_FILE, model=setup.model, optimizer=optimizer, scheduler=scheduler,
               tokenizer=setup.tokenizer, options=asdict(options), epoch=record["epoch"], step=record["step"],
               history=history, best=best)
    write_json(run_dir / "metrics.json", {"metric": setup.metric, "best": best, "history": history})


def run_options(run_dir: str | Path) -> TrainOptions:
    """The options the run in `run_dir` was trained with (to resume it with a few changed)."""
    saved = load_state(Path(run_dir))["options"]
    return TrainOptions(**{f.name: saved[f.name] for f in fields(TrainOptions) if f.name in saved})


def _resumed(saved: dict, config, options: TrainOptions | None) -> tuple[dict, TrainOptions]:
    """The saved run's config, and `options` after checking it only changes what a resume may."""
    run_config = json.loads(saved["config"])
    run_config.pop("vocab_size", None)
    given = resolve_config(config)
    if {k: v for k, v in given.items() if k != "name"} != {k: v for k, v in run_config.items() if k != "name"}:
        raise OptionError(f"the run was started with model config {run_config.get('name')!r}, which differs from "
                          f"{given.get('name')!r}; resume with the run's config")
    saved_options = TrainOptions(**{f.name: saved["options"][f.name] for f in fields(TrainOptions)
                                    if f.name in saved["options"]})
    if options is None:
        return run_config, saved_options
    changed = [f.name for f in fields(TrainOptions)
               if f.name not in RESUMABLE and getattr(options, f.name) != getattr(saved_options, f.name)]
    if changed:
        raise OptionError(f"--resume continues a run with its own settings; these differ from the run's: "
                          f"{', '.join(f'{n} (run: {getattr(saved_options, n)!r})' for n in changed)}. "
                          f"A resumed run may change only: {', '.join(RESUMABLE)}")
    return run_config, options


def _run_epoch(model, batcher: Batcher, batches, optimizer, scheduler, options: TrainOptions, step: int,
               bar: _Bar) -> float:
    """Train on `batches` (kind, rows), the first being step `step` + 1; returns the mean loss."""
    model.train()
    total = 0.0
    try:
        for n, (kind, rows) in enumerate(batches, step + 1):
            loss = model.loss(batcher(kind, rows))
            if not torch.isfinite(loss):
                raise OptionError(f"the {kind} loss is {float(loss)} at step {n}; lower --lr or raise --warmup-steps")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if options.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
            optimizer.step()
            scheduler.step()
            total += float(loss.detach())
            bar.update(total / (bar.done + 1))
    finally:
        bar.close()
    return total / max(1, len(batches))
