"""Explicit Q/DQ: QuantizeLinear/DequantizeLinear pairs in front of the quantized linear layers.

Two schemes from the same statistics:
- "tensorrt": symmetric int8 activations and weights, zero point 0, standard ONNX ops only
  (no com.microsoft ops, no If): what TensorRT 8.6, 10 and 11 build INT8 engines from;
- "cpu": asymmetric uint8 activations and symmetric int8 weights (U8S8), which onnxruntime's CPU
  provider fuses into integer MatMul kernels.

Weights are quantized here, per output channel by default (per tensor where the layout allows no
channel axis); activations get one scale per tensor, shared by every quantized layer reading it.
Only the inputs of the targets named are touched: ops kept float have no Q/DQ around them. That
matters beyond speed: onnxruntime's WeightBiasQuantization transformer quantizes, per tensor and
silently, the float weight of any Conv or Gemm that reads a DequantizeLinear output (measured on
EfficientNet-Lite0: top-1 agreement 59% instead of 95%), so a layer kept float reads the float tensor.

Bias correction (`means`): rounding a convolution's weights shifts the mean of its outputs by
(W - Wq) . E[x], per output channel; with the per-channel means of its input from calibration, that
shift is added back to the bias. On EfficientNet-Lite0, whose depthwise kernels have a dominant
centre tap, INT8 weights alone gave its logits a relative error of 0.124 and 0.045 corrected.

Centred activations (the symmetric scheme): a tensor that is never negative (a ReLU or ReLU6
output) would use only codes 0..127 of a zero-point-0 int8 scale, twice the step uint8 gives it; a
GELU output (-0.17 up) nearly as few. Where a range is that lopsided (its symmetric step at least
CENTRE_GAIN times the centred one) and every quantized reader is a convolution, a MatMul or a plain
Gemm with a constant weight, the tensor is quantized as x - c, c the middle of its range, over all
255 codes, and each reader adds c * sum(Wq) (its dequantized weights, summed over the inputs) to
its output: W (x - c) + c sum(W) = W x exactly. A convolution or Gemm takes it into its bias, a
MatMul gets an Add; a padded convolution reads a Pad of value -c placed before the QuantizeLinear
(padding x with zeros is padding x - c with -c):

    x -> Sub(c) -> [Pad(-c), the conv's pads] -> QuantizeLinear -> DequantizeLinear -> Conv(pads 0)

Standard ops only, Q/DQ still straight in front of the layer as TensorRT fuses it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import OptionError
from ..export.simplify import drop_dead_nodes, initializer_behind, readers_of
from .nodes import Target, attr, plain_gemm
from .stats import Range

SCHEMES = ("tensorrt", "cpu")
_MIN_OPSET = 13  # per-axis DequantizeLinear
CENTRE_GAIN = 1.25  # centre a tensor whose symmetric step is at least this times its centred step


def opset(model) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def weight_scales(w: np.ndarray, axis: int | None) -> np.ndarray:
    """Symmetric int8 scales of `w`: one per slice along `axis`, or a scalar when axis is None."""
    if axis is None:
        amax = np.abs(w).max(initial=0.0)
    else:
        others = tuple(d for d in range(w.ndim) if d != axis)
        amax = np.abs(w).max(axis=others, initial=0.0)
    scale = np.asarray(amax / 127.0, dtype=np.float32)
    return np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)


def quantize_weight(w: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    return np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)


def activation_params(r: Range, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) of an activation with range `r` under `scheme`."""
    if scheme == "tensorrt":
        return np.array(max(r.amax, 1e-8) / 127.0, np.float32), np.array(0, np.int8)
    scale = max(r.high - r.low, 1e-8) / 255.0
    zero = int(np.clip(np.rint(-r.low / scale), 0, 255))
    return np.array(scale, np.float32), np.array(zero, np.uint8)


class _Builder:
    """Collects the new initializers and Q/DQ nodes, each made once per tensor."""

    def __init__(self, graph, scheme: str, per_channel: bool, base_dir: str, codes: Mapping[str, np.ndarray]):
        from onnx import numpy_helper

        self.graph, self.scheme, self.per_channel, self.base_dir = graph, scheme, per_channel, base_dir
        self.codes = codes if per_channel else {}  # weight -> int8 codes rounded elsewhere (gptq.py)
        self.inits = {t.name: t for t in graph.initializer}
        self.to_array, self.from_array = numpy_helper.to_array, numpy_helper.from_array
        self.new_inits: list = []
        self.made: dict[str, tuple[str, list]] = {}  # tensor -> (dequantized name, nodes not yet placed)

    def _const(self, array: np.ndarray, name: str) -> str:
        self.new_inits.append(self.from_array(array, name))
        return name

    def activation(self, tensor: str, r: Range) -> str:
        from onnx import helper

        if tensor not in self.made:
            scale, zero = activation_params(r, self.scheme)
            s = self._const(scale, f"{tensor}_scale")
            z = self._const(zero, f"{tensor}_zero_point")
            q, dq = f"{tensor}_quantized", f"{tensor}_dequantized"
            nodes = [helper.make_node("QuantizeLinear", [tensor, s, z], [q], name=f"{tensor}_QuantizeLinear"),
                     helper.make_node("DequantizeLinear", [q, s, z], [dq], name=f"{tensor}_DequantizeLinear")]
            self.made[tensor] = (dq, nodes)
        return self.made[tensor][0]

    def centred(self, tensor: str, r: Range, pads: Sequence[int]) -> str:
        """`tensor` - c, padded by `pads` with -c, quantized symmetrically over [-h, h]; c and h the
        middle and half-width of [r.low, r.high]."""
        from onnx import helper

        key = f"{tensor}_centred" + ("_pad" + "_".join(map(str, pads)) if any(pads) else "")
        if key not in self.made:
            c, half = centre(r)
            nodes = []
            made_sub = f"{tensor}\0sub"  # the Sub is made once, with the first of its Q/DQ pairs
            if made_sub not in self.made:
                shift = self._const(c, f"{tensor}_centre")
                nodes.append(helper.make_node("Sub", [tensor, shift], [f"{tensor}_centred"], name=f"{tensor}_Centre"))
                self.made[made_sub] = (f"{tensor}_centred", [])
            source = f"{tensor}_centred"
            if any(pads):
                n = len(pads) // 2  # ONNX Conv pads: begins then ends of the spatial axes
                width = self._const(np.array([0, 0, *pads[:n], 0, 0, *pads[n:]], np.int64), f"{key}_pads")
                fill = self._const(np.array(-c, np.float32), f"{key}_fill")
                nodes.append(helper.make_node("Pad", [source, width, fill], [key], name=f"{key}_Pad", mode="constant"))
                source = key
            scale = self._const(np.array(max(half, 1e-8) / 127.0, np.float32), f"{key}_scale")
            zero = self._const(np.array(0, np.int8), f"{key}_zero_point")
            q, dq = f"{key}_quantized", f"{key}_dequantized"
            nodes += [helper.make_node("QuantizeLinear", [source, scale, zero], [q], name=f"{key}_QuantizeLinear"),
                      helper.make_node("DequantizeLinear", [q, scale, zero], [dq], name=f"{key}_DequantizeLinear")]
            self.made[key] = (dq, nodes)
        return key

    def weight(self, t: Target) -> str:
        from onnx import helper

        if t.weight not in self.made:
            w = self.to_array(self.inits[t.weight], self.base_dir).astype(np.float32)
            axis = t.axis if self.per_channel else None
            scale = weight_scales(w, axis)
            q = self._const(self._codes(t.weight, w, scale, axis), f"{t.weight}_quantized")
            s = self._const(scale, f"{t.weight}_scale")
            z = self._const(np.zeros(scale.shape, np.int8), f"{t.weight}_zero_point")
            dq = f"{t.weight}_dequantized"
            attrs = {"axis": axis} if axis is not None else {}
            nodes = [helper.make_node("DequantizeLinear", [q, s, z], [dq], name=f"{t.weight}_DequantizeLinear",
                                      **attrs)]
            self.made[t.weight] = (dq, nodes)
        return self.made[t.weight][0]

    def _codes(self, name: str, w: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
        given = self.codes.get(name)
        return given if given is not None and given.shape == w.shape else quantize_weight(w, scale, axis)

    def rounded(self, t: Target) -> tuple[np.ndarray, np.ndarray]:
        """The float weight of `t` and its dequantized int8 copy."""
        w = self.to_array(self.inits[t.weight], self.base_dir).astype(np.float32)
        axis = t.axis if self.per_channel else None
        scale = weight_scales(w, axis)
        shape = [1] * w.ndim
        if axis is not None:
            shape[axis] = -1
        return w, self._codes(t.weight, w, scale, axis) * scale.reshape(shape)

    def corrected_bias(self, node, t: Target, mean: np.ndarray) -> np.ndarray | None:
        """`node`'s bias plus the output shift its rounded weights cause for inputs of per-channel
        `mean` (Cin,); None where there is no constant bias to correct."""
        if node.op_type != "Conv" or len(node.input) < 3 or node.input[2] not in self.inits:
            return None
        w, wq = self.rounded(t)
        error = (w - wq).sum(axis=(2, 3))  # (Cout, Cin/g)
        groups = mean.size // w.shape[1]
        per_group = w.shape[0] // groups
        inputs = mean.reshape(groups, w.shape[1]).astype(np.float64)
        shift = np.einsum("gok,gk->go", error.reshape(groups, per_group, w.shape[1]), inputs).reshape(-1)
        bias = self.to_array(self.inits[node.input[2]], self.base_dir).astype(np.float32)
        return (bias + shift).astype(np.float32)

    def centre_term(self, node, t: Target, c: float) -> np.ndarray:
        """c * sum(Wq) per output channel: what a layer fed x - c misses of its output for x."""
        _, wq = self.rounded(t)
        if t.op == "Conv":
            inputs = tuple(range(1, wq.ndim))  # (Cout, Cin/g, k...)
        else:  # MatMul (K, N); Gemm (N, K) with transB
            inputs = (1,) if t.op == "Gemm" and attr(node, "transB", 0) else (0,)
        return (np.float64(c) * wq.astype(np.float64).sum(axis=inputs)).astype(np.float32)

    def uncentre(self, node, t: Target, c: float, bias: np.ndarray | None) -> tuple[np.ndarray | None, list]:
        """Give a layer fed x - c back what it misses: (its new bias, or None to keep it; nodes to
        place after it). A MatMul has no bias input: an Add of c * sum(Wq) follows it."""
        from onnx import helper

        term = self.centre_term(node, t, c)
        if t.op == "MatMul":
            out = node.output[0]
            node.output[0] = f"{out}_uncentred"
            shift = self._const(term, f"{node.name}_centre_term")
            return bias, [helper.make_node("Add", [node.output[0], shift], [out], name=f"{node.name}_Uncentre")]
        if bias is None:
            has = len(node.input) > 2 and node.input[2]
            bias = (self.to_array(self.inits[node.input[2]], self.base_dir).astype(np.float32) if has
                    else np.zeros(term.shape, np.float32))
        term = term.reshape(bias.shape) if bias.size == term.size else term  # a Gemm's C may broadcast
        return (bias + term).astype(np.float32), []

    def take(self, tensor: str) -> list:
        """The nodes that make `tensor`'s dequantized copy, the first time they are needed."""
        name, nodes = self.made[tensor]
        self.made[tensor] = (name, [])
        return nodes


def insert_qdq(model, targets: Sequence[Target], ranges: Mapping[str, Range], *, scheme: str,
               per_channel: bool = True, base_dir: str = "", means: Mapping[str, np.ndarray] | None = None,
               codes: Mapping[str, np.ndarray] | None = None) -> int:
    """Quantize `targets` of `model` (an onnx ModelProto) in place; returns how many layers got
    Q/DQ. `ranges` maps each target's activation tensor to its Range; weights still held as
    external data are read from `base_dir`. `means` (activation tensor -> per-channel mean (C,)):
    correct the biases of the convolutions reading those tensors (see the module docstring).
    `codes` (weight name -> int8 array shaped like it, on the per-channel grid `weight_scales`
    gives): weights rounded elsewhere (gptq.py) instead of to their nearest level."""
    if scheme not in SCHEMES:
        raise OptionError(f"unknown Q/DQ scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    if opset(model) < _MIN_OPSET:
        raise OptionError(f"INT8 Q/DQ needs opset {_MIN_OPSET} or newer, this model has opset {opset(model)}; "
                          "re-export the bundle with --opset 17")
    graph = model.graph
    by_node = {t.node: t for t in targets}
    missing = sorted({t.activation for t in targets} - set(ranges))
    if missing:
        raise OptionError(f"no calibration range for {missing[:3]}; the statistics do not match this model")
    b = _Builder(graph, scheme, per_channel, base_dir, codes or {})
    centred = centred_tensors(graph, targets, ranges) if scheme == "tensorrt" else set()
    nodes, replaced = [], set()
    for node in graph.node:
        t, after = by_node.get(node.name), []
        if t is not None:
            r = ranges[t.activation]
            if t.activation in centred:
                pads = _conv_pads(node)
                key = b.centred(t.activation, r, pads)
                nodes += b.take(key)
                act = b.made[key][0]
                if any(pads):  # the Pad before the QuantizeLinear did it
                    next(a for a in node.attribute if a.name == "pads").ints[:] = [0] * len(pads)
            else:
                act = b.activation(t.activation, r)
                nodes += b.take(t.activation)
            weight = b.weight(t)
            nodes += b.take(t.weight)
            mean = (means or {}).get(t.activation)
            bias = b.corrected_bias(node, t, mean) if mean is not None else None
            if t.activation in centred:
                bias, after = b.uncentre(node, t, float(centre(r)[0]), bias)
            node.input[0], node.input[t.weight_index] = act, weight
            if bias is not None:
                name = b._const(bias, f"{node.name}_bias_corrected")
                if len(node.input) < 3:
                    node.input.append(name)
                else:
                    if node.input[2]:
                        replaced.add(node.input[2])
                    node.input[2] = name
        nodes.append(node)
        nodes += after
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused(graph, {t.weight for t in targets} | replaced)
    graph.initializer.extend(b.new_inits)
    return len(by_node)


def centre(r: Range) -> tuple[np.ndarray, float]:
    """The middle (float32 scalar array) and half-width of `r`'s asymmetric range."""
    return np.array((r.high + r.low) / 2, np.float32), (r.high - r.low) / 2


def centred_tensors(graph, targets: Sequence[Target], ranges: Mapping[str, Range]) -> set[str]:
    """Activations to quantize centred (module docstring): a range lopsided enough that centring
    gains CENTRE_GAIN in step, and only quantized readers that can take c * sum(Wq) back: convolutions
    with explicit padding and a constant bias (or none), MatMuls and plain Gemms (alpha = beta = 1,
    no transA) with the weight second. A reader left float still reads the tensor itself."""
    nodes = {n.name: n for n in graph.node}
    inits = {i.name for i in graph.initializer}
    readers: dict[str, list] = {}
    for t in targets:
        readers.setdefault(t.activation, []).append(t)
    out = set()
    for tensor, ts in readers.items():
        r = ranges.get(tensor)
        if r is None or r.high <= r.low or r.amax < CENTRE_GAIN * centre(r)[1]:
            continue
        if all(_takes_centre(nodes[t.node], t, inits) for t in ts):
            out.add(tensor)
    return out


def _takes_centre(node, t: Target, inits: set[str]) -> bool:
    if t.weight_index != 1:
        return False
    bias_ok = len(node.input) < 3 or not node.input[2] or node.input[2] in inits
    if t.op == "Conv":
        return attr(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET") and bias_ok
    if t.op == "Gemm":
        return bias_ok and plain_gemm(node)
    return t.op == "MatMul"


def _conv_pads(node) -> list[int]:
    return list(attr(node, "pads", None) or [0] * (2 * len(attr(node, "kernel_shape", [1, 1]))))


def _drop_unused(graph, names: set[str]) -> None:
    """Remove the float weights in `names` that nothing reads any more."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name not in names or t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def integer_matmuls(model) -> int:
    """Turn each `DequantizeLinear(x) @ DequantizeLinear(W) + b` of the onnxruntime (U8S8) variant
    into one com.microsoft MatMulIntegerToFloat(x_q, W_q, scales, zero points, b); returns how many.

    onnxruntime makes the same integer kernel out of the Q/DQ MatMul by itself but leaves the bias
    Add a kernel of its own, one more pass over every projection's output: BLIP-base's INT8 vision
    encoder ran 235.9 -> 226.4 and 276.5 -> 264.9 ms with the 48 biases folded (alternating, 10
    rounds each), its output equal to the last bit there (elsewhere within a few ulps: the bias is
    added in another order). Only for the onnxruntime variant (TensorRT reads
    standard ops); a layer whose scales do not fit the op (per-tensor activations, weights per
    output column) stays as it is."""
    from onnx import helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    made = {o: n for n in graph.node for o in n.output}
    reads = readers_of(graph)

    def fused(matmul):
        a, w = (made.get(name) for name in matmul.input)
        if not (a and w and a.op_type == w.op_type == "DequantizeLinear" and w.input[0] in inits
                and len(a.input) == len(w.input) == 3 and _dims(inits, a.input[1]) == []):
            return None
        n = _dims(inits, w.input[0])
        if len(n) != 2 or _dims(inits, w.input[1]) not in ([], [n[1]]) or (attr(w, "axis", 1) not in (1, -1)):
            return None
        after = reads.get(matmul.output[0], [])
        if len(after) != 1 or after[0].op_type != "Add":
            return None
        add = after[0]
        bias = initializer_behind(add.input[1] if add.input[0] == matmul.output[0] else add.input[0], inits, made)
        if bias is None or _dims(inits, bias) != [n[1]]:
            return None
        return add, helper.make_node("MatMulIntegerToFloat", [a.input[0], w.input[0], a.input[1], w.input[1], a.input[2],
                                                             w.input[2], bias], [add.output[0]],
                                     name=f"{matmul.name}_integer", domain="com.microsoft")

    swaps = {id(m): f for m in graph.node if m.op_type == "MatMul" and (f := fused(m)) is not None}
    if not swaps:
        return 0
    gone = {id(add) for add, _ in swaps.values()}
    nodes = [swaps[id(n)][1] if id(n) in swaps else n for n in graph.node if id(n) not in gone]
    del graph.node[:]
    graph.node.extend(nodes)
    drop_dead_nodes(graph)  # the weights' DequantizeLinear nodes nothing reads now
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(swaps)


def _dims(inits, name: str) -> list[int] | None:
    """The shape of initializer `name`, None when it is not one."""
    return list(inits[name].dims) if name in inits else None
