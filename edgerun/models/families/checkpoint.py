"""The built-in families' checkpoint: one `.pt` file, written atomically.

    {"format": "edgerun-checkpoint", "version": 1,
     "config": JSON text of the model config (vocab_size included),
     "state_dict": {name: tensor},
     "tokenizer": tokenizer.json text,
     "preprocess": PreprocessConfig as a dict,
     "answers": the VQA classifier's answer set in label order, or None,
     "metadata": free-form JSON-safe dict (step, metrics...)}

Only tensors, strings, numbers, lists and dicts are stored, so `load_checkpoint` reads it with
`torch.load(weights_only=True)`: no pickled code runs on load. The file is written under a
temporary name in the same directory, synced and renamed, so a crash mid-save never leaves a
truncated `best.pt` where a good one was.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ...atomic import atomic_write
from ...errors import InputError

FORMAT = "edgerun-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    path: Path
    model: object  # a family model in eval mode
    tokenizer: object  # WordTokenizer
    preprocess: object  # PreprocessConfig
    answers: tuple[str, ...] | None
    metadata: dict = field(default_factory=dict)

    @property
    def config(self) -> dict:
        return self.model.config


def save_checkpoint(model, path: str | os.PathLike, *, tokenizer, preprocess=None,
                    metadata: dict | None = None) -> Path:
    """Write `model` (a built-in family model), its tokenizer (`WordTokenizer`), preprocessing
    (`PreprocessConfig`; the config's default when None) and answer set to `path`, atomically."""
    import torch

    from . import check_preprocess, preprocess_config

    if tokenizer.vocab_size != model.config["vocab_size"]:
        raise InputError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model was built for "
                         f"{model.config['vocab_size']}")
    if preprocess is None:
        preprocess = preprocess_config(model)
    check_preprocess(preprocess, model.image_size)
    payload = {
        "format": FORMAT, "version": VERSION,
        "config": json.dumps(model.config, sort_keys=True),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "tokenizer": tokenizer.to_json(),
        "preprocess": preprocess.to_dict(),
        "answers": list(model.answers) if model.answers is not None else None,
        "metadata": json.loads(json.dumps(metadata or {})),
    }
    return atomic_write(path, lambda fh: torch.save(payload, fh))


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The model (eval mode), tokenizer, preprocessing, answer set and metadata saved at `path`."""
    import torch

    from ...runtime.preprocess import PreprocessConfig
    from . import build_model
    from .tokenizer import WordTokenizer

    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist or is not a file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; the message is what matters
        raise InputError(f"{path} is not a readable checkpoint: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"{path} is not an edge-run checkpoint (format {FORMAT!r}); "
                         "write one with edgerun.models.families.save_checkpoint")
    if data.get("version") != VERSION:
        raise InputError(f"{path}: checkpoint version {data.get('version')!r} is not supported; "
                         f"this edge-run reads version {VERSION}")
    config = json.loads(data["config"])
    model = build_model(config, answers=data["answers"])
    model.load_state_dict(data["state_dict"])
    answers = tuple(data["answers"]) if data["answers"] is not None else None
    return Checkpoint(path, model.eval(), WordTokenizer.from_json(data["tokenizer"]),
                      PreprocessConfig.from_dict(data["preprocess"]), answers, data.get("metadata") or {})
