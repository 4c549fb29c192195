"""`TrainOptions`: how `edge-run train` trains (torch-free, so the command's --help stays light)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import OptionError

METRICS = ("vqa_accuracy", "cider", "bleu", "loss")  # what best.pt may be chosen by; loss: lower is better
RESUMABLE = ("epochs", "val_limit", "threads")  # options a resumed run may change


@dataclass(frozen=True)
class TrainOptions:
    """How to train. Change one with `dataclasses.replace`, so a misspelt name raises."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0  # max gradient norm; 0 for none
    seed: int = 0
    val_fraction: float = 0.1  # of the images held out when no validation data is given
    val_limit: int | None = None  # at most this many validation examples per kind
    steps_per_epoch: int | None = None  # cut epochs short (quick runs)
    metric: str = "auto"  # what best.pt is chosen by: auto, vqa_accuracy, bleu, cider or loss
    min_word_count: int = 1  # words seen fewer times in training are [UNK]
    max_answers: int | None = None  # classifier VQA: keep the most frequent answers only
    threads: int | None = None  # torch CPU threads (None: torch's default)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "min_word_count"):
            _check_int(name, getattr(self, name), 1)
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_int("seed", self.seed, 0)
        for name in ("val_limit", "steps_per_epoch", "max_answers", "threads"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise OptionError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise OptionError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.grad_clip, (int, float)) and self.grad_clip >= 0):
            raise OptionError(f"grad_clip must be >= 0 (0: no clipping), got {self.grad_clip!r}")
        if not (isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1):
            raise OptionError(f"val_fraction must be between 0 and 1, got {self.val_fraction!r}")
        if self.metric not in ("auto", *METRICS):
            raise OptionError(f"unknown metric {self.metric!r}; valid: auto, {', '.join(METRICS)}")


def _check_int(name: str, value, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise OptionError(f"{name} must be an integer >= {least}, got {value!r}")
