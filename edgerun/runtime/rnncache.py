"""A recurrent decoder (the built-in LSTM captioner) as the decoding loop's `Inference`.

The manifest's decoder `extra["cache"]` describes it:

    {"type": "rnn", "layers": L, "hidden": H,
     "state": ["h", "c"],              # decoder inputs: the state before the step, (L, rows, H)
     "init": ["init_h", "init_c"],     # where the first state comes from: outputs of the module
                                       # before the decoder, one per image, (L, batch, H)
     "outputs": ["new_h", "new_c"]}    # decoder outputs: the state after the step

The decoder takes input_ids (rows, new) and the state and returns logits (rows, vocab) at the last
position and the new state. Rows are batch-major (row = image * beams + beam), so the first state
is each image's repeated over its beams; beam reordering gathers state rows.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import BundleError
from .kvcache import decoder_feeds


class RnnInference:
    def __init__(self, runner, values: Mapping[str, np.ndarray], beams: int, cache: dict):
        self.runner = runner
        self.names, self.outputs = list(cache["state"]), list(cache["outputs"])
        if not (len(self.names) == len(self.outputs) == len(cache["init"])):
            raise BundleError(f"decoder {runner.path.name}: cache state, init and outputs differ in length: "
                              f"{cache}")
        missing = [n for n in cache["init"] if n not in values]
        if missing:
            raise BundleError(f"decoder {runner.path.name}: the initial state {missing} is not given by "
                              "any module")
        self.initial = {n: np.repeat(values[i], beams, axis=1) for n, i in zip(self.names, cache["init"])}
        self.cross = decoder_feeds(runner, values, ("input_ids", *self.names))
        self.state = dict(self.initial)
        self.step_times: list[float] = []

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """tokens : (rows, new) int64 -> logits (rows, vocab) float32 at the last position."""
        out = self.runner.infer({"input_ids": np.ascontiguousarray(tokens, dtype=np.int64), **self.state,
                                 **self.cross}, check=False)
        self.step_times.append(self.runner.last_time)
        self.state = {n: out[o] for n, o in zip(self.names, self.outputs)}
        return out["logits"]

    def rearrange_kv_cache(self, source_indices: np.ndarray) -> None:
        self.state = {n: np.take(s, source_indices, axis=1) for n, s in self.state.items()}

    def cleanup_caching(self) -> None:
        self.state = dict(self.initial)
