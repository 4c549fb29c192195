"""Error-compensating weight rounding for convolutions (the GPTQ scheme, per output channel).

Rounding each weight to its nearest int8 level ignores that the rounding errors of one output
channel's weights add up on correlated inputs. Here the weights of an output channel are rounded
one input position at a time, on the int8 grid of the nearest rounding (same per-channel scales),
and each rounding error is pushed onto the weights not yet rounded, weighted by the inverse of the
input's second-moment matrix H = E[x x^T] (Cin x Cin for a 1x1 convolution; k*k x k*k per channel
for a depthwise one, from its input patches). That minimises the layer's output error on the
calibration inputs instead of the weights' own error.

On EfficientNet-Lite0 (zoo bundle), INT8 weights alone, 400 crops: top-1 agreement with float
0.893 with nearest rounding, 0.965 with this; logits relative error 0.143 -> 0.054. With INT8
activations too, activation rounding dominates: calibrate's default bundle went from 94.3 % (cpu) /
90.2 % (tensorrt) top-1 agreement over 1,200 crops to 94.5 % / 90.7 %, and its held-out image
embedding cosine from 0.985 / 0.974 to 0.994 / 0.987.

    codes = conv_codes(path, targets, feeds, threads)   # {weight name: int8 array like the weight}
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .nodes import Target, attr, load_model
from .qdq import weight_scales

DAMP = 0.01  # added to H's diagonal, as a fraction of its mean


def round_rows(w: np.ndarray, h: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 codes of `w` (rows, n) with per-row `scale` (rows,), compensating each rounding error
    on the columns after it through H (n, n), the second moment of the inputs."""
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    dead = np.diag(h) <= 0  # inputs always 0 on the calibration feeds: nearest rounding, nothing to shift
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    h += DAMP * np.mean(np.diag(h)) * np.eye(len(h))
    try:
        u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor of H^-1
    except np.linalg.LinAlgError:
        u = np.diag(1.0 / np.sqrt(np.diag(h)))  # no compensation: nearest rounding
    s = scale.astype(np.float64)
    codes = np.zeros(w.shape, np.int8)
    for i in range(w.shape[1]):
        q = np.clip(np.rint(w[:, i] / s), -127, 127)
        codes[:, i] = q
        err = (w[:, i] - q * s) / u[i, i]
        w[:, i + 1:] -= np.outer(err, u[i, i + 1:])
    return codes


def _patch_moments(x: np.ndarray, node) -> np.ndarray:
    """Per-channel second moments (C, k*k, k*k) of a depthwise convolution's input patches; x (N, C, H, W)."""
    k, kw = attr(node, "kernel_shape", [1, 1])
    sh, sw = attr(node, "strides", [1, 1])
    dh, dw = attr(node, "dilations", [1, 1])
    p = attr(node, "pads", [0, 0, 0, 0])
    x = np.pad(x, ((0, 0), (0, 0), (p[0], p[2]), (p[1], p[3])))
    ho, wo = (x.shape[2] - dh * (k - 1) - 1) // sh + 1, (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    total = np.zeros((x.shape[1], k * kw, k * kw))
    for img in x:  # one image at a time: patches of a large early layer are hundreds of MB per batch
        views = [img[:, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
                 for i in range(k) for j in range(kw)]
        patches = np.stack(views, -1).reshape(x.shape[1], -1, k * kw)
        total += np.einsum("cpi,cpj->cij", patches, patches, dtype=np.float64)
    return total / (len(x) * ho * wo)


def _kind(node, w: np.ndarray) -> str | None:
    group = attr(node, "group", 1)
    if group == 1 and w.shape[2:] == (1, 1):
        return "pointwise"
    if w.shape[1] == 1 and group == w.shape[0]:
        return "depthwise"
    return None


def conv_codes(path: Path, targets: Sequence[Target], feeds: Sequence[Mapping[str, np.ndarray]],
               threads: int | None = None) -> dict[str, np.ndarray]:
    """{weight name: int8 codes} for the pointwise and depthwise convolutions among `targets` of the
    module at `path`, from their inputs on `feeds` (the float module's); per output channel scales
    as `qdq.weight_scales` makes them. Other layers are left to nearest rounding."""
    from onnx import numpy_helper

    from .collect import augment, session
    from .nodes import calibration_view

    model = load_model(path)
    calibration_view(model.graph)
    nodes = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    chosen = []
    for t in targets:
        if t.op == "Conv" and t.axis == 0 and t.weight in inits:
            w = numpy_helper.to_array(inits[t.weight]).astype(np.float32)
            if (kind := _kind(nodes[t.node], w)) is not None:
                chosen.append((t, w, kind))
    if not chosen or not feeds:
        return {}
    acts = list(dict.fromkeys(t.activation for t, _, _ in chosen))
    runner = session(augment(path, acts), path.parent, threads)
    moments: dict[str, np.ndarray] = {}
    for feed in feeds:
        values = dict(zip(acts, runner.run(acts, dict(feed))))
        for t, w, kind in chosen:
            x = values[t.activation]
            if kind == "pointwise":
                flat = x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1]).astype(np.float64)
                m = flat.T @ flat / len(flat)
            else:
                m = _patch_moments(x, nodes[t.node])
            moments[t.node] = moments.get(t.node, 0.0) + m / len(feeds)
    codes = {}
    for t, w, kind in chosen:
        scale = weight_scales(w, 0)
        if kind == "pointwise":
            codes[t.weight] = round_rows(w[:, :, 0, 0], moments[t.node], scale)[:, :, None, None]
        else:
            h, k = moments[t.node], w.shape[2:]
            codes[t.weight] = np.stack([round_rows(w[c].reshape(1, -1), h[c], scale[c:c + 1]).reshape(1, *k)
                                        for c in range(w.shape[0])])
    return codes
