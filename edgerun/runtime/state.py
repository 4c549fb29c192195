"""Encode once, serve every task: `Model.encode()` and the `ImageState` it returns.

A bundle whose tasks share one image encoder (the built-in families' `vision`; BLIP's `vision`
for its one task) lists that module, role `image_encoder`, first in each task. `encode` runs it
once; `caption`, `caption_batch`, `answer`, `answer_batch` and `embed_images` take the result as
`state=` in place of images and go on from the encoder's outputs, so they give what the same call
on the images gives.

A state is bound to the model that made it: `key` hashes the bundle's identity (source, revision,
architecture, weights digest), the encoder module's file checksums and the preprocessing. A state
from another model, or from a twin whose encoder differs (an INT8 or FP16 export), is refused with
an `InputError`; a state from a copy of the same bundle is accepted, since it holds the same
features. A bundle without an image encoder module (CLIP: its image embedder reads pixels) keeps
the preprocessed pixels as its state.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import BundleError, InputError, OptionError


@dataclass(frozen=True, eq=False)
class ImageState:
    """The image encoder's outputs for `count` images, bound to one model.

    values : the encoder module's outputs by name, e.g. image_features (count, N, D); or
        {"pixel_values": ...} when the bundle has no image encoder module (module is None)."""

    key: str
    bundle: str
    module: str | None
    values: Mapping[str, np.ndarray]
    count: int

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"ImageState({self.count} image(s), encoder {self.module!r} of {self.bundle})"


def encoder_module(model, task: str | None = None) -> str | None:
    """The image encoder that `task` (every task when None) runs first; None when there is none."""
    names = set()
    for name in (model.manifest.tasks if task is None else [task]):
        first = model.manifest.tasks[name].modules[0]
        names.add(first if model.bundle.module(first).extra.get("role") == "image_encoder" else None)
    if len(names) > 1:
        raise OptionError(f"the tasks of this bundle use different image encoders "
                          f"({sorted(map(str, names))}); "
                          "pass task= to encode() for one of them")
    return names.pop()


def state_key(model, module: str | None) -> str:
    """What a state must match: the bundle identity, the encoder's files and the preprocessing."""
    files = {}
    if module is not None:
        spec = model.bundle.module(module)
        for rel in (spec.file, *spec.external_data):
            entry = model.manifest.files.get(rel)
            files[rel] = entry.sha256 if entry is not None else None
    blob = json.dumps({"identity": model.identity, "encoder": module, "files": files,
                       "preprocess": model.manifest.preprocess}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def encode_pixels(model, pixels: np.ndarray, module: str | None, timings: dict) -> ImageState:
    """Run the image encoder `module` on pixels (n, 3, H, W) -> an ImageState."""
    if module is None:
        values = {"pixel_values": pixels}
    else:
        runner = model.runner(module)
        values = runner.infer({runner.inputs[0].name: pixels})
        timings["vision"] = timings.get("vision", 0.0) + runner.last_time
    return ImageState(state_key(model, module), str(model.bundle.path), module, values, int(pixels.shape[0]))


def check_state(model, state, task: str) -> ImageState:
    """`state` if this model made it and `task` starts from its encoder; InputError otherwise."""
    if not isinstance(state, ImageState):
        raise InputError(f"state must be an ImageState from model.encode(), got {type(state).__name__}")
    module = encoder_module(model, task)
    if state.key != state_key(model, state.module):
        raise InputError(f"this image state was encoded by another model ({state.bundle}, encoder "
                         f"{state.module!r}); it cannot serve {model.bundle.path}: encode the image with "
                         "this model's encode()")
    if state.module != module:
        raise InputError(f"this image state holds the outputs of {state.module!r}, but {task} starts from "
                         f"{module!r}; encode with encode(..., task={task!r})")
    return state


def task_chain(model, task: str) -> tuple[str | None, list[str], str]:
    """(image encoder or None, the modules between it and the last, the last module) of `task`."""
    modules = list(model.manifest.tasks[task].modules)
    encoder = encoder_module(model, task)
    middle = modules[1:-1] if encoder is not None else modules[:-1]
    return encoder, middle, modules[-1]


def run_modules(model, names, values: dict, timings: dict) -> dict:
    """Run `names` in order, each fed by name from `values`, which gathers their outputs; their
    times go to `timings` under each module's role (its name where it has none)."""
    for name in names:
        runner = model.runner(name)
        missing = [i.name for i in runner.inputs if i.name not in values]
        if missing:
            raise BundleError(f"bundle {model.bundle.path}: module {name} needs {missing}, which no module "
                              "before it gives")
        values.update(runner.infer({i.name: values[i.name] for i in runner.inputs}))
        stage = model.bundle.module(name).extra.get("role", name)  # bench reads stages by role
        timings[stage] = timings.get(stage, 0.0) + runner.last_time
    return values
