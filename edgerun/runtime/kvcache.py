"""The decoder graph with its self-attention cache, as the decoding loop's `Inference`.

The cache is preallocated for the whole generation, time-major (time, layer, row, head, dim), so
that the past fed to each step is a contiguous prefix (no copy) and each step's new K/V are written
in place. Beam reordering copies only the rows that change, in place (staging in a preallocated
spare buffer the rows another one still reads). The cross-attention K/V stay one copy per image; the graph broadcasts the beams' queries over it.
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
    return DecoderInference(runner, cross, batch * beams, capacity, cache)


class DecoderInference:
    def __init__(self, runner, cross: dict[str, np.ndarray], rows: int, capacity: int, dims: dict):
        shape = (capacity, dims["layers"], rows, dims["heads"], dims["head_dim"])
        self.runner = runner
        self.cross = cross  # the cross_kv graph's outputs, fed to every step as they are
        self._key, self._value = np.empty(shape, np.float32), np.empty(shape, np.float32)
        self._spare_key, self._spare_value = np.empty(shape, np.float32), np.empty(shape, np.float32)
        self.length = 0
        self.capacity = capacity
        self.step_times: list[float] = []  # seconds of each decoder call, for timings and bench

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """tokens : (rows, new) int64 -> logits (rows, vocab) float32 at the last position."""
        past, new = self.length, tokens.shape[1]
        assert past + new <= self.capacity, "cache capacity is sized for the whole generation"
        out = self.runner.infer({"input_ids": np.ascontiguousarray(tokens, dtype=np.int64),
                                 "past_key": self._key[:past], "past_value": self._value[:past],
                                 **self.cross}, check=False)
        self.step_times.append(self.runner.last_time)
        self._key[past:past + new] = out["new_key"]
        self._value[past:past + new] = out["new_value"]
        self.length = past + new
        return out["logits"]

    def rearrange_kv_cache(self, source_indices: np.ndarray) -> None:
        """Row r of the cache becomes row source_indices[r], in place: only the rows that change are
        copied (one strided copy each), after staging in the spare buffers those of them that another
        changed row still reads. Beams mostly keep their rows, so this moves a fraction of the cache."""
        n = self.length
        moves = {row: source for row, source in enumerate(source_indices.tolist()) if row != source}
        staged = set(moves) & set(moves.values())  # overwritten, but another row's source
        for cache, spare in ((self._key, self._spare_key), (self._value, self._spare_value)):
            for row in staged:
                spare[:n, :, row] = cache[:n, :, row]
            for row, source in moves.items():
                cache[:n, :, row] = (spare if source in staged else cache)[:n, :, source]

    def cleanup_caching(self) -> None:
        self.length = 0
