"""BLIP's VQA model (`BlipForQuestionAnswering`) as the graphs the runtime runs.

- `vision`: pixel_values -> image_embeds, as for captioning;
- `question_encoder`: input_ids, attention_mask, image_embeds -> question_embeds; BLIP's text
  encoder, whose layers self-attend over the (padded) question and cross-attend to the image;
- `cross_kv`: question_embeds -> the answer decoder's cross-attention K/V per layer, once per question;
- `decoder`: the answer decoder step graph of blip.py with a `cross_attention_mask` input, so that a
  padded question in a batch is answered as it is alone.

transformers' generate() passes the decoder an all-ones mask over the question embeddings; for a
single question (no padding) that is the same computation, which the parity tests check.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .blip import BlipCaptionExporter, BlipDecoderGraph
from .encdec import cross_names, tolerance
from .onnx import GraphSpec, compare


class BlipQuestionEncoderGraph(nn.Module):
    """input_ids (B, T), attention_mask (B, T), image_embeds (B, N, Dv) -> question_embeds (B, T, D)."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        cfg = text_model.config
        self.embeddings = text_model.embeddings
        self.layers = text_model.encoder.layer
        self.n_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads

    def _heads(self, x):
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.head_dim).transpose(1, 2)

    def _attend(self, attention, x, states, mask):
        a = attention.self
        q, k, v = self._heads(a.query(x)), self._heads(a.key(states)), self._heads(a.value(states))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        ctx = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return attention.output(ctx, x)

    def forward(self, input_ids, attention_mask, image_embeds):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embeddings.word_embeddings(input_ids) + self.embeddings.position_embeddings(positions)[None]
        x = self.embeddings.LayerNorm(x)
        padding = (attention_mask == 0)[:, None, None, :]
        for layer in self.layers:
            x = self._attend(layer.attention, x, x, padding)
            x = self._attend(layer.crossattention, x, image_embeds, None)
            x = layer.output(layer.intermediate(x), x)
        return x


class BlipVqaExporter(BlipCaptionExporter):
    """Graph specs, parity cases and manifest entries for `BlipForQuestionAnswering`."""

    task = "vqa"

    def __init__(self, model):
        super().__init__(model)
        self.question_encoder = BlipQuestionEncoderGraph(model.text_encoder).eval()
        self.decoder = BlipDecoderGraph(self.text_lm, cross_mask=True).eval()

    def _question(self, batch: int, length: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.text_cfg.vocab_size, (batch, length), generator=gen)
        mask = torch.ones((batch, length), dtype=torch.int64)
        for row in range(1, batch):  # later rows padded on the right, as the tokenizer pads
            mask[row, length - row:] = 0
        return ids, mask

    def graphs(self) -> list:
        with torch.no_grad():
            embeds = self.vision(self._pixels(2, 0))
            ids, mask = self._question(2, 5, 0)
            question = self.question_encoder(ids, mask, embeds)
            cross = self.cross_kv(question)
        names = cross_names(self.dims["layers"])
        per_question = {name: {0: "batch", 2: "question"} for name in names}
        step_ids = torch.randint(0, self.text_cfg.vocab_size, (4, 2))
        return [
            GraphSpec("vision", self.vision, (self._pixels(2, 0),), ["pixel_values"], ["image_embeds"],
                      {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}),
            GraphSpec("question_encoder", self.question_encoder, (ids, mask, embeds),
                      ["input_ids", "attention_mask", "image_embeds"], ["question_embeds"],
                      {"input_ids": {0: "batch", 1: "question"}, "attention_mask": {0: "batch", 1: "question"},
                       "image_embeds": {0: "batch"}, "question_embeds": {0: "batch", 1: "question"}}),
            GraphSpec("cross_kv", self.cross_kv, (question,), ["question_embeds"], names,
                      {"question_embeds": {0: "batch", 1: "question"}, **per_question}),
            GraphSpec("decoder", self.decoder,
                      (step_ids, self._past(3, 4, 1), self._past(3, 4, 2), mask, *cross),
                      ["input_ids", "past_key", "past_value", "cross_attention_mask", *names],
                      ["logits", "new_key", "new_value"],
                      {"input_ids": {0: "rows", 1: "new"},
                       "past_key": {0: "past", 2: "rows"}, "past_value": {0: "past", 2: "rows"},
                       "cross_attention_mask": {0: "batch", 1: "question"}, **per_question,
                       "logits": {0: "rows"}, "new_key": {0: "new", 2: "rows"},
                       "new_value": {0: "new", 2: "rows"}}),
        ]

    def verify(self, run, atol: float | None) -> dict[str, float]:
        tol = tolerance(atol)
        diffs = dict.fromkeys(("vision", "question_encoder", "cross_kv", "decoder"), 0.0)
        for batch, beams, length in ((1, 3, 4), (3, 2, 7)):
            pixels = self._pixels(batch, 20 + batch)
            with torch.no_grad():
                ref = self.model.vision_model(pixel_values=pixels).last_hidden_state.numpy()
            embeds = run("vision", {"pixel_values": pixels.numpy()})["image_embeds"]
            diffs["vision"] = max(diffs["vision"], compare("vision", {"e": embeds}, {"e": ref}, tol(ref)))
            ids, mask = self._question(batch, length, batch)
            with torch.no_grad():
                ref = self.model.text_encoder(input_ids=ids, attention_mask=mask,
                                              encoder_hidden_states=torch.from_numpy(embeds)).last_hidden_state
            question = run("question_encoder", {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                                "image_embeds": embeds})["question_embeds"]
            keep = mask.numpy().astype(bool)  # padded positions are never read downstream
            diffs["question_encoder"] = max(diffs["question_encoder"], compare(
                "question_encoder", {"q": question[keep]}, {"q": ref.numpy()[keep]}, tol(ref.numpy())))
            kv = run("cross_kv", {"question_embeds": question})
            with torch.no_grad():
                want = dict(zip(cross_names(self.dims["layers"]), (t.numpy() for t in
                                                                   self.cross_kv(torch.from_numpy(question)))))
            diffs["cross_kv"] = max(diffs["cross_kv"], compare("cross_kv", kv, want, tol(want["cross_key_0"])))
            kv["cross_attention_mask"] = mask.numpy()
            diffs["decoder"] = max(diffs["decoder"], self._verify_answers(run, kv, question, mask, beams, tol))
        return diffs

    def _verify_answers(self, run, kv, question, mask, beams, tol) -> float:
        """Decoder steps against HF's text decoder, each question's beams over its own unpadded states.

        transformers 5's BLIP text layers drop `encoder_attention_mask` before the cross-attention,
        so HF attends to a padded question's padding; the graph masks it, which equals HF on the
        question alone (how generate() sees a single question)."""
        lengths = mask.sum(1).tolist()

        def hf_logits(seq):
            rows = []
            for b, n in enumerate(lengths):
                states = torch.from_numpy(question[b:b + 1, :n]).expand(beams, -1, -1)
                ids = torch.from_numpy(seq[b * beams:(b + 1) * beams])
                rows.append(self.text_lm(input_ids=ids, encoder_hidden_states=states).logits.numpy())
            return np.concatenate(rows)

        return self._check_steps(run, kv, question.shape[0] * beams, 1, hf_logits, tol)

    def manifest_parts(self, tokenizer) -> dict:
        parts = super().manifest_parts(tokenizer)
        parts["tasks"] = {"vqa": {"modules": ["vision", "question_encoder", "cross_kv", "decoder"]}}
        parts["module_extra"]["question_encoder"] = {"role": "question_encoder"}
        parts["model"]["architecture"] = "BlipForQuestionAnswering"
        return parts
