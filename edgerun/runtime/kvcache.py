"""The decoder graph with its self-attention cache, as the decoding loop's `Inference`.

The cache is preallocated for the whole generation, time-major (time, layer, row, head, dim), so
that the past fed to each step is a contiguous prefix (no copy) and each step's new K/V are written
in place. A beam reorder mostly rewrites a row map instead of moving the cache: only a row that two
beams continue is copied (DecoderInference). The cross-attention K/V stay one copy per image; the
graph broadcasts the beams' queries over it.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import BundleError

CACHE_TYPES = ("kv", "gqa", "rnn")
STEP_INPUTS = ("input_ids", "past_key", "past_value")
GQA_STEP_INPUTS = ("input_ids", "seqlens_k", "total_sequence_length")  # edgerun.export.gqa
# a decoder with the beams as cross-attention query heads (edgerun.export.beam_heads)
CROSS_INPUTS = ("cross_seqlens_k", "cross_total_sequence_length", "cross_bias")


def present_name(name: str) -> str:
    """The output a beam-heads decoder writes its cross K/V input `name` back through."""
    return f"present_{name}"


def gqa_cache_names(layer: int) -> tuple[str, str, str, str]:
    """A GroupQueryAttention decoder's cache inputs and outputs for `layer`: past K, past V,
    present K, present V (the present ones are the same buffers, bound in place)."""
    return f"past_key_{layer}", f"past_value_{layer}", f"present_key_{layer}", f"present_value_{layer}"


def decoder_feeds(runner, values: Mapping[str, np.ndarray], step_inputs) -> dict[str, np.ndarray]:
    """The decoder inputs other than `step_inputs`, by name from `values` (cross K/V, masks)."""
    names = [i.name for i in runner.inputs if i.name not in step_inputs]
    missing = [n for n in names if n not in values]
    if missing:
        raise BundleError(f"decoder {runner.path.name} needs {missing}, which no module before it gives")
    return {n: values[n] for n in names}


def make_inference(runner, values: Mapping[str, np.ndarray], batch: int, beams: int, capacity: int,
                   cache: dict, spare: int = 0):
    """The decoder as decoding's `Inference`, by the manifest's cache layout `extra["cache"]`:
    "kv" (the default: a transformer's time-major self-attention K/V), "gqa" (the same cache per
    layer, written in place by GroupQueryAttention: edgerun.export.gqa; with the beams as its
    cross-attention heads too where the graph is made so, edgerun.export.beam_heads) or "rnn" (a
    recurrent state, edgerun.runtime.rnncache). `values` holds what the modules before the decoder
    produced; `spare`: slots its cross K/V have after the image's keys (`BeamHeadsInference`)."""
    kind = cache.get("type", "kv")
    if kind == "rnn":
        from .rnncache import RnnInference

        return RnnInference(runner, values, beams, cache)
    if kind not in CACHE_TYPES:
        raise BundleError(f"decoder {runner.path.name}: unknown cache type {kind!r}; "
                          f"valid: {', '.join(CACHE_TYPES)}")
    names = {i.name for i in runner.inputs}
    if kind == "kv" and "seqlens_k" in names:
        kind = "gqa"  # the graph's own interface (a calibration evaluates files under the float manifest)
    if kind == "gqa":
        if "seqlens_k" not in names:
            raise BundleError(f"decoder {runner.path.name}: the manifest says cache type 'gqa' but the graph "
                              f"has no seqlens_k input (its inputs: {sorted(names)})")
        if getattr(runner, "device_resident", False) or not hasattr(runner, "run_binding"):
            raise BundleError(f"decoder {runner.path.name} runs GroupQueryAttention, which edge-run runs with "
                              f"onnxruntime on the CPU only; use backend 'cpu' for this module")
        own = {*GQA_STEP_INPUTS, *CROSS_INPUTS, *(name for i in range(cache["layers"]) for name in gqa_cache_names(i)[:2])}
        feeds = decoder_feeds(runner, values, own)
        if CROSS_INPUTS[0] not in names:
            return GqaDecoderInference(runner, feeds, batch * beams, capacity, cache, group=beams)
        rows = next(i.shape[0] for i in runner.inputs if i.name == "input_ids")
        if batch != 1 or beams != rows:
            raise BundleError(f"decoder {runner.path.name} serves one image and {rows} beams (its beams are "
                              f"cross-attention heads), not {batch} x {beams}; run the module's general variant")
        return BeamHeadsInference(runner, feeds, beams, capacity, cache, group=beams, spare=spare)
    cross = decoder_feeds(runner, values, STEP_INPUTS)
    if getattr(runner, "device_resident", False):  # IO binding: the cache stays on the runner's device
        from .iobinding import DeviceDecoderInference

        return DeviceDecoderInference(runner, cross, batch * beams, capacity, cache)
    return DecoderInference(runner, cross, batch * beams, capacity, cache, group=beams)


class DecoderInference:
    """The decoder over a preallocated time-major cache whose rows are addressed through a map.

    Logical row r (what decoding calls row r) lives in physical row `self._phys[r]` of the cache.
    A beam reorder only rewrites the map where it can: a beam that continues one source keeps that
    source's physical row, and only a source that two new beams continue is copied, into a row no
    new beam continues (rows never leave their group of `group` rows, the beams of one image,
    because the graph gives each group its own image's cross K/V). The decoder runs on the rows in
    physical order; its logits are returned in logical order.

    A copy starts where the two rows' token histories first differ: a row's K/V at a position are
    computed from its tokens up to there (every operation of the graph is row by row), so over the
    steps the rows share they hold the same K/V already. Beams share their first tokens: on
    BLIP-base (3 beams x 20 tokens) a caption's reorders moved 2.9 MB instead of 14.2. In float
    the skipped steps are bit-identical (onnxruntime's float kernels round a row the same wherever
    it sits in the batch), so captions stay token-exact with generate(). Its int8 kernels round a
    row slightly differently by its position in the batch, so there the kept steps are the same
    tokens' K/V computed in another row: equally valid, not bitwise the source row's."""

    def __init__(self, runner, cross: dict[str, np.ndarray], rows: int, capacity: int, dims: dict,
                 group: int | None = None):
        self.runner = runner
        self.cross = cross  # the cross_kv graph's outputs, fed to every step as they are
        self._allocate(rows, capacity, dims)
        self._phys = np.arange(rows)  # logical row -> physical row
        # the tokens each physical row has been fed; -1 - row until then, so no two rows match
        self._tokens = np.repeat(-1 - np.arange(rows, dtype=np.int64)[:, None], capacity, axis=1)
        self._mapped = False  # whether _phys differs from the identity
        self._logits = None  # the logits in logical order, when rows are mapped
        self.group = group or rows
        if rows % self.group:
            raise BundleError(f"{rows} decoder rows do not split into groups of {self.group}")
        self.length = 0
        self.capacity = capacity
        self.copies = 0  # rows copied by reorders (for tests and profiling)
        self.copied_steps = 0  # and the time steps those copies moved
        self.step_times: list[float] = []  # seconds of each decoder call, for timings and bench

    def _allocate(self, rows: int, capacity: int, dims: dict) -> None:
        shape = (capacity, dims["layers"], rows, dims["heads"], dims["head_dim"])
        self._key, self._value = np.empty(shape, np.float32), np.empty(shape, np.float32)

    def _step(self, ids: np.ndarray, past: int, new: int) -> np.ndarray:
        """One decoder call on physical rows: the logits, the new K/V stored at [past, past + new)."""
        out = self.runner.infer({"input_ids": ids, "past_key": self._key[:past], "past_value": self._value[:past],
                                 **self.cross}, check=False)
        self.step_times.append(self.runner.last_time)
        self._key[past:past + new] = out["new_key"]
        self._value[past:past + new] = out["new_value"]
        return out["logits"]

    def _copy(self, target: int, row: int, first: int, end: int) -> None:
        """Physical row `row`'s K/V over time steps [first, end) into row `target`."""
        self._key[first:end, :, target] = self._key[first:end, :, row]
        self._value[first:end, :, target] = self._value[first:end, :, row]

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """tokens : (rows, new) int64 -> logits (rows, vocab) float32 at the last position."""
        past, new = self.length, tokens.shape[1]
        assert past + new <= self.capacity, "cache capacity is sized for the whole generation"
        mapped = self._mapped
        ids = np.ascontiguousarray(tokens, dtype=np.int64)
        if mapped:  # the graph sees physical rows
            physical = np.empty_like(ids)
            physical[self._phys] = ids
            ids = physical
        self._tokens[:, past:past + new] = ids
        logits = self._step(ids, past, new)
        self.length = past + new
        if not mapped:
            return logits
        if self._logits is None or self._logits.shape != logits.shape:
            self._logits = np.empty_like(logits)
        return np.take(logits, self._phys, axis=0, out=self._logits, mode="clip")  # "raise" would buffer

    def rearrange_kv_cache(self, source_indices: np.ndarray) -> None:
        """Logical row r continues logical row source_indices[r] (a row of its own group)."""
        n, phys, g = self.length, self._phys, self.group
        new = np.empty_like(phys)
        sources = phys[np.asarray(source_indices)]  # physical rows the new rows continue
        for start in range(0, phys.size, g):
            block = sources[start:start + g].tolist()
            if len(set(block)) == g:  # a permutation of the group's rows: only the map changes
                new[start:start + g] = block
                continue
            taken: set[int] = set()
            spare = iter(sorted(set(range(start, start + g)) - set(block)))
            for i, row in enumerate(block):
                if row not in taken:
                    taken.add(row)  # the first continuation keeps the row: nothing moves
                    new[start + i] = row
                    continue
                target = next(spare)  # no new row continues it: free to overwrite
                differ = self._tokens[target, :n] != self._tokens[row, :n]
                first = int(differ.argmax()) if differ.any() else n  # the steps before are equal
                self._copy(target, row, first, n)
                self._tokens[target, first:n] = self._tokens[row, first:n]
                new[start + i] = target
                self.copies += 1
                self.copied_steps += n - first
        self._phys = new
        self._mapped = bool((new != np.arange(new.size)).any())

    def cleanup_caching(self) -> None:
        self.length = 0
        self._phys = np.arange(self._phys.size)
        self._mapped = False


class GqaDecoderInference(DecoderInference):
    """A decoder whose self-attention is onnxruntime's GroupQueryAttention (edgerun.export.gqa).

    The cache is one (rows, heads, capacity, head_dim) buffer per layer for K and for V, bound
    through one IO binding as both the layer's past input and its present output: the graph writes
    each step's K/V into the buffer itself, and nothing is stored after the call. The cross K/V and
    the cache stay bound for the whole generation; a step binds the token ids, sets the lengths
    (`seqlens_k`, `total_sequence_length`, arrays bound once and changed in place) and runs. The
    row map, the copies a reorder needs and the logits in logical order are DecoderInference's."""

    def _allocate(self, rows: int, capacity: int, dims: dict) -> None:
        shape = (rows, dims["heads"], capacity, dims["head_dim"])
        layers = dims["layers"]
        self._keys = [np.zeros(shape, np.float32) for _ in range(layers)]
        self._values = [np.zeros(shape, np.float32) for _ in range(layers)]
        self._seqlens = np.zeros(rows, np.int32)
        self._total = np.zeros((), np.int32)
        logits = next((o.shape for o in self.runner.outputs if o.name == "logits"), None)
        vocab = logits[-1] if logits else None
        if not isinstance(vocab, int):
            raise BundleError(f"decoder {self.runner.path.name}: its logits need a fixed vocabulary size, "
                              f"got shape {logits}")
        self._out = np.empty((rows, vocab), np.float32)
        binding = self.runner.session.io_binding()
        for name, array in (("seqlens_k", self._seqlens), ("total_sequence_length", self._total)):
            binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        for i in range(layers):
            past_k, past_v, present_k, present_v = gqa_cache_names(i)
            for past, present, buf in ((past_k, present_k, self._keys[i]), (past_v, present_v, self._values[i])):
                binding.bind_input(past, "cpu", 0, np.float32, list(shape), buf.ctypes.data)
                binding.bind_output(present, "cpu", 0, np.float32, list(shape), buf.ctypes.data)
        self._binding = binding
        for name, array in self.cross.items():
            self.cross[name] = array = np.ascontiguousarray(array)  # the binding reads this memory
            binding.bind_cpu_input(name, array)
        binding.bind_output("logits", "cpu", 0, np.float32, list(self._out.shape), self._out.ctypes.data)

    def _step(self, ids: np.ndarray, past: int, new: int) -> np.ndarray:
        self._binding.bind_cpu_input("input_ids", ids)
        self._seqlens[:] = past + new - 1
        self._total[...] = past + new

        def reads() -> dict[str, np.ndarray]:  # the cache before this step, as a past input would be
            out = {"input_ids": ids, "seqlens_k": self._seqlens, "total_sequence_length": self._total}
            for i, (k, v) in enumerate(zip(self._keys, self._values)):
                past_k, past_v, _, _ = gqa_cache_names(i)
                out[past_k], out[past_v] = k[:, :, :past], v[:, :, :past]
            return {**out, **self.cross}

        self.runner.run_binding(self._binding, reads)
        self.step_times.append(self.runner.last_time)
        return self._out  # overwritten by the next step; decoding reads it before

    def _copy(self, target: int, row: int, first: int, end: int) -> None:
        for buffers in (self._keys, self._values):
            for buf in buffers:
                buf[target, :, first:end] = buf[row, :, first:end]


class BeamHeadsInference(GqaDecoderInference):
    """A GroupQueryAttention decoder whose cross-attention is GroupQueryAttention too, the beams of
    its one image as query heads (edgerun.export.beam_heads): for batch 1 and exactly the beam count
    the graph was made for. Each cross K/V input sits in a buffer with spare slots after the
    image's keys, bound as the input and as its `present_` output (the op writes a dummy K/V there,
    which `cross_bias` masks); `cross_seqlens_k`, `cross_total_sequence_length` and `cross_bias`
    follow the number of new tokens. `spare`: slots the given cross K/V already have after the keys
    (Model._padded: the module that made them ran on its input with zero rows appended), used in
    place; where they are too few, the K/V are copied into new buffers once."""

    def __init__(self, runner, cross: dict[str, np.ndarray], rows: int, capacity: int, dims: dict,
                 group: int | None = None, spare: int = 0):
        outputs = {o.name for o in runner.outputs}
        self._caches = [n for n in cross if present_name(n) in outputs]
        shapes = {cross[n].shape for n in self._caches}
        if not self._caches or len(shapes) != 1 or next(iter(shapes))[0] != 1:
            raise BundleError(f"decoder {runner.path.name}: its beam-heads cross-attention serves one image, "
                              f"got cross K/V of shapes {sorted(shapes)}")
        self._keys_n = next(iter(shapes))[2] - spare
        self._images = {n: cross.pop(n) for n in self._caches}  # the cross_kv outputs
        self._spare = 0
        self._given = spare
        self._seqlens_x = np.zeros(1, np.int32)
        self._total_x = np.zeros((), np.int32)
        self._biases: dict[int, np.ndarray] = {}
        super().__init__(runner, cross, rows, capacity, dims, group=group)
        binding = self._binding
        for name, array in ((CROSS_INPUTS[0], self._seqlens_x), (CROSS_INPUTS[1], self._total_x)):
            binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
            self.cross[name] = array

    def _pad(self, spare: int) -> None:
        """Buffers of the image's keys + `spare` slots, bound as past and present: the given ones
        where they have the room, else copies."""
        for name, image in self._images.items():
            if spare <= self._given:
                buf = np.ascontiguousarray(image)
            else:
                buf = np.zeros((*image.shape[:2], self._keys_n + spare, image.shape[3]), image.dtype)
                buf[:, :, :self._keys_n] = image[:, :, :self._keys_n]
            shape = buf.shape
            self._binding.bind_input(name, "cpu", 0, buf.dtype, list(shape), buf.ctypes.data)
            self._binding.bind_output(present_name(name), "cpu", 0, buf.dtype, list(shape), buf.ctypes.data)
            self.cross[name] = buf
        self._spare = max(spare, self._given)

    def _step(self, ids: np.ndarray, past: int, new: int) -> np.ndarray:
        if new > self._spare:
            self._pad(new)
        n = self._keys_n
        self._seqlens_x[0] = n + new - 1
        self._total_x[...] = n + new
        bias = self._biases.get(new)
        if bias is None:
            bias = self._biases[new] = np.zeros((1, 1, new, n + new), np.float32)
            bias[..., n:] = -np.inf
        if self.cross.get(CROSS_INPUTS[2]) is not bias:
            self._binding.bind_input(CROSS_INPUTS[2], "cpu", 0, bias.dtype, list(bias.shape), bias.ctypes.data)
            self.cross[CROSS_INPUTS[2]] = bias
        return super()._step(ids, past, new)
