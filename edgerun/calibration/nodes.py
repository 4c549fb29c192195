"""Which nodes of a module get INT8, and which stay float and why.

Only linear layers are quantized: MatMul, Gemm and Conv nodes that multiply an activation by a
constant weight (an initializer). Attention's activation-by-activation MatMuls, LayerNorm,
Softmax and every other op stay float: Q/DQ on every op made INT8 barely faster than FP32
(FACTS.md), and those ops are where INT8 loses accuracy.

Among the linear layers, these stay float by default:
- the patch embedding: the first linear layer on each path from the image input (a rank-4 graph
  input with 3 channels), found by walking forward through other ops (a Cast, a Reshape);
- the head: the last linear layer before the logits of a decoder or classifier, and before the
  embeddings of an image/text embedder or the ITM probabilities (found by walking back from those
  outputs to the nearest linear layer on each path, but not through a normalization: behind the
  final LayerNorm lie the residual branches of every block, not a head; MiniLM's mean-pooled
  embedding has no head, and the walk used to keep all 12 of its residual out-projections float);
- nodes matching a `--keep-float` pattern.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

QUANT_OPS = ("MatMul", "Gemm", "Conv")
_SHAPE_OPS = ("Shape", "Size")
_NORM_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "GroupNormalization", "RMSNormalization")
HEAD_REASON = "output head"
HEAD_OUTPUTS = {  # role -> the outputs whose producing linear layer is the head; None: every output
    "decoder": ("logits",),
    "answer_classifier": None,
    "image_embedder": None,
    "text_embedder": None,
    "itm": None,
}


@dataclass(frozen=True)
class Target:
    """A linear layer: `node` multiplies the activation tensor `activation` by the weight
    initializer `weight` (input `weight_index` of the node); `axis` is the weight's output-channel
    axis for per-channel scales, None where only a per-tensor scale fits."""

    node: str
    op: str
    activation: str
    weight: str
    weight_index: int
    axis: int | None


def load_model(path):
    """The ONNX model at `path` with its weights, as calibration rewrites it. onnx refuses to read
    external weights through a file with several hard links (a bundle copied with `cp -al`, for
    one); that becomes a BundleError saying so, not a checker traceback."""
    import onnx

    try:
        return onnx.load(str(path))
    except onnx.checker.ValidationError as err:
        from ..errors import BundleError

        if "hard link" in str(err):
            raise BundleError(f"{path}: onnx will not read the weights of this module through a file with "
                              "several hard links; copy the bundle with `cp -r` (not `cp -al` or a hard-linked "
                              "store) and calibrate the copy") from None
        raise BundleError(f"{path}: onnx could not read its weights: {err}") from None


def attr(node, name: str, default=None):
    """The value of attribute `name` of an onnx node (ints, floats, lists, bytes), else `default`."""
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def plain_gemm(node) -> bool:
    """A Gemm that is `x @ W.T + C` (transB, the form a tied LM head takes) or `x @ W + C` (GPT-2's
    Conv1D layers): no transposed input, no scaling."""
    return attr(node, "transA", 0) == 0 and attr(node, "alpha", 1.0) == 1.0 and attr(node, "beta", 1.0) == 1.0


def calibration_view(graph) -> None:
    """The float graph as calibration reads it, in place: a tied LM head reads the embedding table
    as its weight initializer again (export feeds it through a Reshape, `share_tied_head`) and
    every node has a name."""
    from ..export.simplify import tied_head_weight

    tied_head_weight(graph)
    name_nodes(graph)


def name_nodes(graph) -> None:
    """Give every unnamed node a unique name (patterns, reports and exclusions refer to names)."""
    used = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def find_targets(graph) -> list[Target]:
    """Every activation x constant-weight MatMul/Gemm/Conv of `graph`, in graph order."""
    inits = {t.name: t for t in graph.initializer}
    out = []
    for node in graph.node:
        if node.op_type not in QUANT_OPS or len(node.input) < 2:
            continue
        act, weight = node.input[0], node.input[1]
        if weight not in inits or act in inits or not act:
            continue
        out.append(Target(node.name, node.op_type, act, weight, 1, _axis(node, inits[weight])))
    return out


def _axis(node, weight) -> int | None:
    rank = len(weight.dims)
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1 if rank == 2 else None  # MatMul: (in, out); batched weights get one scale


def default_float(graph, role: str | None, targets: Sequence[Target]) -> dict[str, str]:
    """{node name: reason} of the targets that stay float for `role` whatever the user asks."""
    kept: dict[str, str] = {}
    linear = {t.node for t in targets}
    images = [i.name for i in graph.input if _is_image(i)]
    for name in _nearest(graph, images, linear, forward=True):
        kept[name] = "patch embedding (reads the image)"
    if role in HEAD_OUTPUTS:
        names = HEAD_OUTPUTS[role]
        outputs = [o.name for o in graph.output if names is None or o.name in names]
        for name in _nearest(graph, outputs, linear, forward=False, stop=_NORM_OPS):
            kept.setdefault(name, HEAD_REASON)
    return kept


def _is_image(value_info) -> bool:
    """A rank-4 input with 3 channels, NCHW or NHWC."""
    if not value_info.type.HasField("tensor_type"):
        return False
    dims = [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]
    return len(dims) == 4 and 3 in (dims[1], dims[3])


def _nearest(graph, tensors: Iterable[str], linear: set[str], *, forward: bool,
             stop: Sequence[str] = ()) -> list[str]:
    """The `linear` nodes nearest to `tensors` on every data path: walking consumers (forward) or
    producers (backward) through other ops, stopping at the first linear node of each path, or at
    an op of type `stop` (no layer found on that path). Shape computations are not data paths: the
    walk does not go through Shape or Size."""
    links: dict[str, list] = {}
    for node in graph.node:
        for name in (node.input if forward else node.output):
            links.setdefault(name, []).append(node)
    found, seen, stack = [], set(), list(tensors)
    while stack:
        for node in links.get(stack.pop(), ()):
            if node.name in seen:
                continue
            seen.add(node.name)
            if node.op_type in _SHAPE_OPS or node.op_type in stop:
                continue
            if node.name in linear:
                found.append(node.name)
            else:
                stack.extend(t for t in (node.output if forward else node.input) if t)
    return found


def parse_patterns(patterns: Iterable[str]) -> list[tuple[str | None, str]]:
    """`--keep-float` patterns: "PATTERN" (any module) or "MODULE:PATTERN"; commas separate several.
    PATTERN is a shell glob over node names ("*/mlp/fc2/*") or an op type ("Conv")."""
    out = []
    for item in patterns:
        for part in (p.strip() for p in item.split(",")):
            if not part:
                continue
            module, sep, pattern = part.partition(":")
            out.append((module, pattern) if sep else (None, part))
    return out


def matching(module: str, targets: Sequence[Target], patterns: Sequence[tuple[str | None, str]]) -> set[str]:
    """Names of `targets` of `module` that a parsed `--keep-float` pattern names."""
    out = set()
    for scope, pattern in patterns:
        if scope is not None and not fnmatch.fnmatchcase(module, scope):
            continue
        out.update(t.node for t in targets if t.op == pattern or fnmatch.fnmatchcase(t.node, pattern))
    return out


def float_nodes(module: str, graph, role: str | None, targets: Sequence[Target],
                patterns: Sequence[tuple[str | None, str]], extra: Mapping[str, str] = {}) -> dict[str, str]:
    """{node: reason} for every target of `module` kept float: defaults, patterns, then `extra`
    (the layers a sensitivity pass chose)."""
    kept = default_float(graph, role, targets)
    for name in matching(module, targets, patterns):
        kept.setdefault(name, "--keep-float")
    for name, reason in extra.items():
        kept.setdefault(name, reason)
    return kept
