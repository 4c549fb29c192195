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

CACHE_TYPES = ("kv", "rnn")
STEP_INPUTS = ("input_ids", "past_key", "past_value")


def decoder_feeds(runner, values: Mapping[str, np.ndarray], step_inputs) -> dict[str, np.ndarray]:
    """The decoder inputs other than `step_inputs`, by name from `values` (cross K/V, masks)."""
    names = [i.name for i in runner.inputs if i.name not in step_inputs]
    missing = [n for n in names if n not in values]
    if missing:
        raise BundleError(f"decoder {runner.path.name} needs {missing}, which no module before it gives")
    return {n: values[n] for n in names}


def make_inference(runner, values: Mapping[str, np.ndarray], batch: int, beams: int, capacity: int,
                   cache: dict):
    """The decoder as decoding's `Inference`, by the manifest's cache layout `extra["cache"]`:
    "kv" (the default: a transformer's time-major self-attention K/V) or "rnn" (a recurrent state,
    edgerun.runtime.rnncache). `values` holds what the modules before the decoder produced."""
    kind = cache.get("type", "kv")
    if kind == "rnn":
        from .rnncache import RnnInference

        return RnnInference(runner, values, beams, cache)
    if kind != "kv":
        raise BundleError(f"decoder {runner.path.name}: unknown cache type {kind!r}; "
                          f"valid: {', '.join(CACHE_TYPES)}")
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
        shape = (capacity, dims["layers"], rows, dims["heads"], dims["head_dim"])
        self.runner = runner
        self.cross = cross  # the cross_kv graph's outputs, fed to every step as they are
        self._key, self._value = np.empty(shape, np.float32), np.empty(shape, np.float32)
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
        out = self.runner.infer({"input_ids": ids, "past_key": self._key[:past], "past_value": self._value[:past],
                                 **self.cross}, check=False)
        self.step_times.append(self.runner.last_time)
        self._key[past:past + new] = out["new_key"]
        self._value[past:past + new] = out["new_value"]
        self.length = past + new
        logits = out["logits"]
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
                self._key[first:n, :, target] = self._key[first:n, :, row]
                self._value[first:n, :, target] = self._value[first:n, :, row]
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
