"""Sensitivity: how much each linear layer alone hurts its module when quantized.

For every layer that would be quantized, the module is rebuilt with Q/DQ on that layer only (the
symmetric TensorRT scheme, the stricter one) and run on a few feeds recorded during calibration
(`probes`); the layer's error is the relative L2 distance of the module's outputs (a decoder's
logits) from the float module's. Layers are ranked worst first; `--auto` keeps the worst float.

Cost: one session per layer, each reading the module's weights once, on at most a couple of
feeds. The weights are not copied: the one-layer graphs refer to the module's external data.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .collect import session
from .nodes import Target, calibration_view
from .qdq import insert_qdq
from .stats import Range


@dataclass(frozen=True)
class LayerError:
    module: str
    node: str
    error: float  # ||y_q - y|| / ||y|| over the probes

    def to_dict(self) -> dict:
        return {"module": self.module, "node": self.node, "error": round(self.error, 8)}


def _outputs(session_, probes: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]) -> list[np.ndarray]:
    return [np.concatenate([o.ravel() for o in session_.run(list(names), dict(feeds))]) for feeds in probes]


def module_sensitivity(module: str, path: Path, targets: Sequence[Target], ranges: Mapping[str, Range],
                       probes: Sequence[Mapping[str, np.ndarray]], outputs: Sequence[str], *,
                       per_channel: bool = True, threads: int | None = None,
                       progress: Callable[[str], None] = lambda msg: None,
                       means: Mapping[str, np.ndarray] | None = None,
                       codes: Mapping[str, np.ndarray] | None = None) -> list[LayerError]:
    """The error of each of `targets` quantized alone, worst first."""
    import onnx

    if not probes or not targets:
        return []
    base = onnx.load(str(path), load_external_data=False)
    calibration_view(base.graph)
    reference = _outputs(session(base.SerializeToString(), path.parent, threads), probes, outputs)
    errors = []
    for i, target in enumerate(targets):
        model = onnx.ModelProto()
        model.CopyFrom(base)
        insert_qdq(model, [target], ranges, scheme="tensorrt", per_channel=per_channel, base_dir=str(path.parent),
                   means=means, codes=codes)
        got = _outputs(session(model.SerializeToString(), path.parent, threads), probes, outputs)
        err = np.mean([np.linalg.norm(g - r) / (np.linalg.norm(r) + 1e-12) for g, r in zip(got, reference)])
        errors.append(LayerError(module, target.node, float(err)))
        if (i + 1) % 10 == 0 or i + 1 == len(targets):
            progress(f"sensitivity {module}: {i + 1}/{len(targets)} layers")
    return sorted(errors, key=lambda e: -e.error)


def table(errors: Sequence[LayerError], top: int = 10) -> str:
    lines = [f"{'module':<14} {'layer':<60} {'rel. error':>10}"]
    lines += [f"{e.module:<14} {e.node[-60:]:<60} {e.error:>10.2e}" for e in errors[:top]]
    return "\n".join(lines)
