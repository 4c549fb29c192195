"""Task heads: a transformer text decoder (captioning, generative VQA), an answer classifier, and
contrastive projections for retrieval.

The decoder is causal self-attention, cross-attention to a memory (image tokens, or the fused
question), and an MLP per block, with learned positions and the LM head tied to the token
embedding. Its export graph (`graphs.DecoderStepGraph`) re-states the same computation one step at
a time with a KV cache; `TextDecoder.forward` over a whole sequence is the reference it is checked
against.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .config import check_keys
from .layers import Block, causal_mask, key_mask
from .tokenizer import PAD_ID

DECODER_KEYS = ("layers", "heads", "max_positions")
IGNORE = -100  # the label of an answer outside the answer set


class TextDecoder(nn.Module):
    def __init__(self, cfg: dict, vocab_size: int, width: int, where: str):
        super().__init__()
        check_keys(cfg, where, ("type",), DECODER_KEYS)
        self.heads, self.max_positions = cfg["heads"], cfg["max_positions"]
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(cfg["max_positions"], width)
        self.blocks = nn.ModuleList(Block(width, cfg["heads"], cross=True) for _ in range(cfg["layers"]))
        self.ln = nn.LayerNorm(width)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, input_ids, memory, memory_mask=None) -> torch.Tensor:
        """input_ids (B, T), memory (B, M, width), memory_mask (B, M) or None -> logits (B, T, vocab)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) + self.position(positions)[None]
        allowed = causal_mask(input_ids.shape[1], input_ids.device)
        memory_allowed = None if memory_mask is None else key_mask(memory_mask)
        for block in self.blocks:
            x = block(x, allowed, memory, memory_allowed)
        return self.logits(self.ln(x))

    def logits(self, hidden) -> torch.Tensor:
        return F.linear(hidden, self.embed.weight, self.bias)

    def loss(self, ids, memory, memory_mask=None) -> torch.Tensor:
        """Teacher forcing: predict ids[:, 1:] from ids[:, :-1]; [PAD] targets are ignored."""
        if ids.shape[1] < 2:
            raise ValueError(f"target sequences need [BOS] and at least one more token, "
                             f"got shape {tuple(ids.shape)}")
        if ids.shape[1] > self.max_positions + 1:
            raise ValueError(f"sequences of {ids.shape[1]} tokens exceed the decoder's "
                             f"{self.max_positions} positions")
        logits = self(ids[:, :-1], memory, memory_mask)
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), ignore_index=PAD_ID)


class AnswerClassifier(nn.Module):
    """Fused pooled vector (B, width) -> logits over the answer set (B, n_answers)."""

    def __init__(self, cfg: dict, width: int, n_answers: int):
        super().__init__()
        check_keys(cfg, "heads.vqa", ("type", "hidden"))
        if n_answers < 2:
            raise ValueError(f"a VQA classifier needs an answer set of at least 2 answers, got {n_answers}")
        hidden = cfg.get("hidden", 2 * width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, n_answers))

    def forward(self, pooled):
        return self.mlp(pooled)

    def loss(self, pooled, labels):
        """Cross-entropy over the answer set; label -100 (an answer outside the set) is ignored."""
        logits = self(pooled)
        if not (labels != IGNORE).any():
            return logits.sum() * 0.0  # nothing to learn from this batch; not NaN
        return F.cross_entropy(logits, labels, ignore_index=IGNORE)


class ContrastiveHead(nn.Module):
    """CLIP-style projections of the pooled image and text vectors to one space, L2-normalised."""

    def __init__(self, cfg: dict, width: int):
        super().__init__()
        check_keys(cfg, "heads.retrieval", ("embed_dim",))
        dim = cfg.get("embed_dim", width)
        self.image_proj = nn.Linear(width, dim, bias=False)
        self.text_proj = nn.Linear(width, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed_images(self, image_pooled):
        return F.normalize(self.image_proj(image_pooled), dim=-1)

    def embed_texts(self, text_pooled):
        return F.normalize(self.text_proj(text_pooled), dim=-1)

    def loss(self, image_pooled, text_pooled):
        """Symmetric cross-entropy over the batch's image-text similarities (pair i matches i)."""
        similarity = self.embed_images(image_pooled) @ self.embed_texts(text_pooled).T
        logits = self.logit_scale.exp().clamp(max=100) * similarity
        target = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
