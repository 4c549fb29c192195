"""The bundles a server runs: loaded, tried once on a small image, and routed by the tasks their
manifests list (caption, vqa, retrieval), with the index that search reads. A `ModelSet` is
immutable once built; a reload builds a new one and swaps it in, and requests already running keep
the one they started with."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import BundleError, EdgeRunError, InputError

TASKS = ("caption", "vqa", "retrieval")
ENDPOINT_TASK = {"caption": "caption", "vqa": "vqa", "search": "retrieval"}
_PROBE = np.full((32, 32, 3), 128, np.uint8)  # the image every bundle is tried on at load


@dataclass(frozen=True)
class Loaded:
    name: str  # the bundle directory's name
    path: str  # absolute
    tasks: tuple[str, ...]
    model: object  # edgerun.Model, or a test's stand-in with the same methods


class NoModel(EdgeRunError):
    """No loaded bundle serves the task an endpoint needs."""


@dataclass(frozen=True)
class ModelSet:
    bundles: tuple[Loaded, ...]
    routes: dict  # task -> Loaded: the first bundle, in the order given, that serves it
    index: object | None = None  # edgerun.runtime.index.Index for search
    generation: int = 1  # counts reloads

    def for_task(self, task: str) -> Loaded:
        if task not in self.routes:
            served = ", ".join(sorted(self.routes)) or "none"
            raise NoModel(f"no loaded bundle serves the {task} task (this server serves: {served}); "
                          f"start it with a {task} bundle")
        return self.routes[task]

    def describe(self) -> dict:
        """What /v1/models shows: bundles, tasks, which bundle each task goes to, the index."""
        bundles = [{"name": b.name, "tasks": list(b.tasks), "identity": getattr(b.model, "identity", {})}
                   for b in self.bundles]
        index = None
        if self.index is not None:
            index = {"name": self.index.path.name, "count": len(self.index),
                     "thumbnails": bool(self.index.has_thumbnails)}
        return {"bundles": bundles, "routes": {t: b.name for t, b in self.routes.items()}, "index": index,
                "generation": self.generation}


def default_loader(threads: int | None) -> Callable[[str], object]:
    def load(path: str):
        from ..model import load as load_bundle

        return load_bundle(path, threads=threads)

    return load


def load_models(paths: Sequence[str | os.PathLike], *, index: str | os.PathLike | None = None,
                loader: Callable[[str], object], generation: int = 1) -> ModelSet:
    """Load every bundle and the index, try each on a small image, and route the tasks. Raises
    BundleError naming the bundle and why when any of them fails: a server never starts, or
    reloads, half-working."""
    if not paths:
        raise BundleError("give at least one bundle to serve")
    bundles = tuple(_load_one(os.path.abspath(p), loader) for p in paths)
    routes = {}
    for loaded in bundles:
        for task in loaded.tasks:
            routes.setdefault(task, loaded)
    opened = _open_index(index, routes) if index is not None else None
    return ModelSet(bundles, routes, opened, generation)


def _load_one(path: str, loader) -> Loaded:
    name = Path(path).name
    try:
        model = loader(path)
        tasks = tuple(t for t in model.tasks if t in TASKS)
        if not tasks:
            raise BundleError(f"it serves {', '.join(model.tasks) or 'no task'}; the server runs "
                              f"{', '.join(TASKS)}")
        for task in tasks:
            _probe(model, task)
    except EdgeRunError as exc:
        raise BundleError(f"bundle {path} could not be loaded: {exc}") from exc
    except Exception as exc:  # a session that fails on its first run (bad graph, wrong opset) ...
        raise BundleError(f"bundle {path} failed its first run: {type(exc).__name__}: {exc}") from exc
    return Loaded(name, path, tasks, model)


def _probe(model, task: str) -> None:
    """One run of `task` on a grey image: creates the sessions, and fails now rather than mid-request."""
    if task == "caption":
        model.caption(_PROBE)
    elif task == "vqa":
        model.answer(_PROBE, "what is this?")
    else:
        model.embed_images([_PROBE])
        model.embed_texts(["a photo"])


def _open_index(path, routes: dict):
    from ..index import open_index

    if "retrieval" not in routes:
        raise InputError(f"--index {path} needs a retrieval bundle among the bundles served "
                         "(the one that built the index, or a quantized twin of it)")
    opened = open_index(path)
    opened.check_model(routes["retrieval"].model)
    return opened
