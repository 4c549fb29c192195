"""Decoding with the torch model, through the runtime's own numpy beam search.

`TorchDecoderInference` and `TorchLstmInference` implement `edgerun.runtime.decoding.Inference`
without a cache: each call reruns every row's whole history through the model's training forward
(the teacher-forcing path). They are the reference the exported step graphs are held to (same
`decode`, same options: the token ids must be identical), and what a trainer can use to look at
captions and answers during training.
"""
from __future__ import annotations

import numpy as np
import torch

from ...runtime.decoding import DecodingOptions, Hypothesis, decode
from .tokenizer import BOS_ID, EOS_ID, PAD_ID


class _HistoryInference:
    def __init__(self):
        self.history: torch.Tensor | None = None

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        new = torch.from_numpy(np.array(tokens, dtype=np.int64))
        self.history = new if self.history is None else torch.cat([self.history, new], dim=1)
        with torch.no_grad():
            return self._last_logits(self.history).float().numpy().copy()

    def rearrange_kv_cache(self, source_indices: np.ndarray) -> None:
        self.history = self.history[torch.from_numpy(np.asarray(source_indices, dtype=np.int64))]

    def cleanup_caching(self) -> None:
        self.history = None


class TorchDecoderInference(_HistoryInference):
    """A `TextDecoder` over a memory (B, M, D) with an optional memory mask (B, M)."""

    def __init__(self, decoder, memory: torch.Tensor, memory_mask: torch.Tensor | None = None):
        super().__init__()
        self.decoder, self.memory, self.memory_mask = decoder, memory, memory_mask

    def _last_logits(self, history):
        beams = history.shape[0] // self.memory.shape[0]
        memory = self.memory.repeat_interleave(beams, 0)
        mask = None if self.memory_mask is None else self.memory_mask.repeat_interleave(beams, 0)
        return self.decoder(history, memory, mask)[:, -1]


class TorchLstmInference(_HistoryInference):
    """An `LstmCaptioner` from its initial state (h0, c0), each (layers, B, hidden)."""

    def __init__(self, model, h0: torch.Tensor, c0: torch.Tensor):
        super().__init__()
        self.model, self.h0, self.c0 = model, h0, c0

    def _last_logits(self, history):
        beams = history.shape[0] // self.h0.shape[1]
        h, c = self.h0.repeat_interleave(beams, 1), self.c0.repeat_interleave(beams, 1)
        return self.model.step(history, h, c)[0][:, -1]


def _run(inference, batch: int, options: DecodingOptions) -> list[list[Hypothesis]]:
    prompt = np.full((batch, 1), BOS_ID, dtype=np.int64)
    return decode(inference, prompt, options, stop_ids=[EOS_ID], pad_id=PAD_ID)


def caption_inference(model, pixel_values: torch.Tensor):
    """The `Inference` that captions `pixel_values` (B, 3, S, S) with `model` (either family)."""
    with torch.no_grad():
        features = model.encode_image(pixel_values)
        if model.family == "lstm":
            return TorchLstmInference(model, *model.init_state(features))
        return TorchDecoderInference(model.caption_head, features)


def generate_captions(model, pixel_values: torch.Tensor, options: DecodingOptions) -> list[list[Hypothesis]]:
    """Per image, `options.num_return_sequences` hypotheses from the prompt [BOS], as the runtime decodes."""
    return _run(caption_inference(model, pixel_values), pixel_values.shape[0], options)


def generate_answers(model, pixel_values, question_ids, question_mask, options: DecodingOptions):
    """Generative VQA: per question, its hypotheses (the answer decoder over the fused question)."""
    with torch.no_grad():
        fused = model.fuse(model.encode_image(pixel_values), question_ids, question_mask)
    inference = TorchDecoderInference(model.vqa_head, fused.tokens, fused.mask)
    return _run(inference, pixel_values.shape[0], options)


def answer_probabilities(model, pixel_values, question_ids, question_mask) -> np.ndarray:
    """Classifier VQA: (B, n_answers) probabilities over `model.answers`."""
    with torch.no_grad():
        logits = model.answer_logits(model.encode_image(pixel_values), question_ids, question_mask)
    return logits.softmax(dim=-1).numpy()
