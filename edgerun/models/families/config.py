"""Architectures as data: JSON configs shipped in `edgerun/models/configs/`, behind `list_models()`.

A config names its family and its parts; `build_model` (in this package) turns it into a torch
module. Every section's keys are checked, so a misspelt key raises instead of falling back to a
default.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path

from ...errors import OptionError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@cache
def _configs() -> dict[str, dict]:
    out = {}
    for path in sorted(CONFIG_DIR.glob("*.json")):
        out[path.stem] = json.loads(path.read_text(encoding="utf-8"))
    return out


def list_models() -> list[str]:
    """Names of the built-in architectures, sorted."""
    return sorted(_configs())


def model_config(name: str) -> dict:
    """A copy of the named architecture's config."""
    configs = _configs()
    if name not in configs:
        raise OptionError(f"model {name} not found; available models = {list_models()}")
    return copy.deepcopy(configs[name])


def check_keys(cfg, where: str, allowed: Iterable[str], required: Iterable[str] = ()) -> dict:
    """`cfg` as a dict, after checking that it has every `required` key and no unknown one."""
    if not isinstance(cfg, Mapping):
        raise OptionError(f"config section {where} must be an object, got {type(cfg).__name__}")
    allowed, required = set(allowed) | set(required), list(required)
    missing = [k for k in required if k not in cfg]
    if missing:
        raise OptionError(f"config section {where} lacks {missing}; required: {required}")
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise OptionError(f"config section {where} has unknown key(s) {unknown}; valid: {sorted(allowed)}")
    return dict(cfg)


def choice(cfg: Mapping, key: str, where: str, valid: Iterable[str]) -> str:
    value, valid = cfg.get(key) if isinstance(cfg, Mapping) else cfg, list(valid)
    if value not in valid:
        raise OptionError(f"unknown {where} {value!r}; valid: {', '.join(valid)}")
    return value
