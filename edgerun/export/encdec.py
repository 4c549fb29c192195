"""The caption layout shared by encoder-decoder exporters (BLIP, ViT-GPT2): three graphs.

- `vision`: pixel_values (batch, 3, H, W) -> image_embeds (batch, patches, d)
- `cross_kv`: image_embeds -> cross_key_0..L-1, cross_value_0..L-1, each (batch, heads, patches,
  head_dim), once per image; every beam of that image reads the same copy.
- `decoder`: ONE step graph with an explicit self-attention past (empty on the first call):
  input_ids (rows, new), past_key/past_value (past, layers, rows, heads, head_dim), the cross K/V ->
  logits (rows, vocab) at the last position, new_key/new_value (new, layers, rows, heads, head_dim).

A subclass builds the three torch graphs and says how the source model computes the same things
(`reference_*`); this class traces them and checks the ONNX files against those references.
"""
from __future__ import annotations

import numpy as np
import torch

from .onnx import GraphSpec, compare


def cross_names(n_layers: int) -> list[str]:
    return [f"cross_key_{i}" for i in range(n_layers)] + [f"cross_value_{i}" for i in range(n_layers)]


def decoder_dims(text_config) -> dict:
    """The cache layout the runtime needs, recorded in the manifest (GPT-2's configs map these names)."""
    c = text_config
    return {"layout": "time,layer,row,head,dim", "layers": c.num_hidden_layers, "heads": c.num_attention_heads,
            "head_dim": c.hidden_size // c.num_attention_heads, "max_positions": c.max_position_embeddings}


def tolerance(atol: float | None):
    """The max abs diff allowed for an output: `atol`, or scaled to the reference's magnitude."""
    def tol(ref: np.ndarray) -> float:
        return atol if atol is not None else max(1e-3, 1e-4 * float(np.abs(ref).max()))
    return tol


class EncoderDecoderExporter:
    """Subclasses set `model`, `image_hw`, `dims`, `vocab_size`, `start_id` and the torch graphs
    `vision`, `cross_kv`, `decoder`, and implement the three `reference_*` methods."""

    task = "caption"

    def reference_embeds(self, pixels: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def reference_cross_kv(self, embeds: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def reference_logits(self, seq: np.ndarray, embeds: np.ndarray, beams: int) -> np.ndarray:
        """The source decoder's full forward over `seq` (rows, T), each image's states repeated `beams` times."""
        raise NotImplementedError

    def _pixels(self, batch: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn((batch, 3, *self.image_hw), generator=gen)

    def _past(self, past: int, rows: int, seed: int) -> torch.Tensor:
        d = self.dims
        gen = torch.Generator().manual_seed(seed)
        return torch.randn((past, d["layers"], rows, d["heads"], d["head_dim"]), generator=gen)

    def graphs(self) -> list[GraphSpec]:
        # Trace with every dynamic dim >= 2 so that nothing is specialised to 0 or 1.
        with torch.no_grad():
            embeds = self.vision(self._pixels(2, 0))
            cross = self.cross_kv(embeds)
        ids = torch.randint(0, self.vocab_size, (4, 2), generator=torch.Generator().manual_seed(0))
        names = cross_names(self.dims["layers"])
        per_image = {name: {0: "batch"} for name in names}
        return [
            GraphSpec("vision", self.vision, (self._pixels(2, 0),), ["pixel_values"], ["image_embeds"],
                      {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}),
            GraphSpec("cross_kv", self.cross_kv, (embeds,), ["image_embeds"], names,
                      {"image_embeds": {0: "batch"}, **per_image}),
            GraphSpec("decoder", self.decoder, (ids, self._past(3, 4, 1), self._past(3, 4, 2), *cross),
                      ["input_ids", "past_key", "past_value", *names], ["logits", "new_key", "new_value"],
                      {"input_ids": {0: "rows", 1: "new"},
                       "past_key": {0: "past", 2: "rows"}, "past_value": {0: "past", 2: "rows"}, **per_image,
                       "logits": {0: "rows"}, "new_key": {0: "new", 2: "rows"},
                       "new_value": {0: "new", 2: "rows"}}),
        ]

    def verify(self, run, atol: float | None) -> dict[str, float]:
        """Run the ONNX graphs (`run(name, feeds) -> outputs`) on shapes other than the trace's and
        compare with the source model's own forward. Returns the max abs diff per graph."""
        tol = tolerance(atol)
        diffs = {"vision": 0.0, "cross_kv": 0.0, "decoder": 0.0}
        for batch, beams, prompt_len in ((1, 3, 3), (3, 1, 1)):
            pixels = self._pixels(batch, 10 + batch)
            want = {"image_embeds": self.reference_embeds(pixels)}
            got = run("vision", {"pixel_values": pixels.numpy()})
            diffs["vision"] = max(diffs["vision"], compare("vision", got, want, tol(want["image_embeds"])))
            embeds = got["image_embeds"]
            kv = run("cross_kv", {"image_embeds": embeds})
            want = self.reference_cross_kv(embeds)
            diffs["cross_kv"] = max(diffs["cross_kv"], compare("cross_kv", kv, want, tol(want["cross_key_0"])))

            def hf_logits(seq, embeds=embeds, beams=beams):
                return self.reference_logits(seq, embeds, beams)

            diffs["decoder"] = max(diffs["decoder"],
                                   self._check_steps(run, kv, batch * beams, prompt_len, hf_logits, tol))
        return diffs

    def _check_steps(self, run, feeds, rows, prompt_len, hf_logits, tol) -> float:
        """The prompt in one call on an empty past, then single steps, against `hf_logits(seq)`, the
        source decoder's full forward over the whole sequence. Returns the max abs diff of the logits."""
        gen = np.random.default_rng(rows * 10 + prompt_len)
        seq = gen.integers(0, self.vocab_size, (rows, prompt_len + 4))
        seq[:, 0] = self.start_id
        d = self.dims
        past_k = np.zeros((0, d["layers"], rows, d["heads"], d["head_dim"]), np.float32)
        past_v = past_k.copy()
        worst, start = 0.0, 0
        with torch.no_grad():
            full = hf_logits(seq)
        for end in range(prompt_len, seq.shape[1] + 1):
            out = run("decoder", {"input_ids": seq[:, start:end].astype(np.int64), "past_key": past_k,
                                  "past_value": past_v, **feeds})
            want = {"logits": full[:, end - 1]}
            worst = max(worst, compare("decoder", {"logits": out["logits"]}, want, tol(want["logits"])))
            past_k = np.concatenate([past_k, out["new_key"]])
            past_v = np.concatenate([past_v, out["new_value"]])
            start = end
        return worst
