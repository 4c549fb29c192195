"""The resumable training state, `RUN_DIR/state.pt`, and atomic file writing.

    {"format": "edgerun-train-state", "version": 1,
     "config": model config JSON text, "tokenizer": tokenizer.json text, "answers": [...] or None,
     "options": TrainOptions as a dict, "epoch": epochs done, "step": optimizer steps done,
     "model", "optimizer", "scheduler": state dicts,
     "rng": {"torch", "python", "numpy"}: the generator states after the last epoch,
     "history": per-epoch records, "best": {"epoch", "metric", "score"} or None}

Plain tensors and containers only, so it loads with `torch.load(weights_only=True)`. Every file of a
run is written under a temporary name in its folder, synced and renamed over the old one
(`os.replace`), so a crash leaves the previous complete file, never a truncated one.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write
from .data import DataError

FORMAT = "edgerun-train-state"
VERSION = 1
STATE_FILE = "state.pt"


def write_json(path: Path, data) -> Path:
    return atomic_write(path, lambda fh: fh.write(json.dumps(data, indent=2).encode("utf-8")))


def capture_rng() -> dict:
    state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [state[0], torch.from_numpy(state[1].astype(np.int64)), *state[2:]]}


def restore_rng(saved: dict) -> None:
    torch.set_rng_state(saved["torch"])
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = saved["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def save_state(path: Path, *, model, optimizer, scheduler, tokenizer, options: dict, epoch: int, step: int,
               history: list, best: dict | None) -> Path:
    payload = {
        "format": FORMAT, "version": VERSION,
        "config": json.dumps(model.config, sort_keys=True), "tokenizer": tokenizer.to_json(),
        "answers": list(model.answers) if model.answers is not None else None,
        "options": options, "epoch": epoch, "step": step,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": capture_rng(), "history": history, "best": best,
    }
    return atomic_write(path, lambda fh: torch.save(payload, fh))


def load_state(run_dir: Path) -> dict:
    """The state saved in `run_dir`; DataError when there is none or it is not one."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise DataError(f"{run_dir} holds no training state ({STATE_FILE}) to resume; "
                        "start a run there without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; the message is what matters
        raise DataError(f"{path} is not a readable training state: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
        raise DataError(f"{path} is not an edge-run training state (format {FORMAT!r} version {VERSION})")
    return state
