"""Text encoders: bag-of-words, mean of word embeddings, GRU, or a transformer.

input_ids, mask (B, T) int64, `[BOS] words [EOS]` right-padded with [PAD] -> `TextFeatures`:
tokens (B, T', width) with their mask (B, T'), and one pooled vector (B, width). Config keys
(under "text_encoder"): type, and `layers`, `heads`, `max_length` where they apply.

- bow: counts of each vocabulary word (padding excluded) through a linear layer; no order, and one
  token (the pooled vector) for fusion to attend to;
- mean: the masked mean of the word embeddings; the embeddings are the tokens;
- gru: a unidirectional GRU; pooled at each text's last token, which right-padding never reaches;
- transformer: learned positions, bidirectional blocks over the unpadded tokens, mean-pooled.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import check_keys, choice
from .layers import Block, key_mask, masked_mean


@dataclass
class TextFeatures:
    tokens: torch.Tensor  # (B, T', width)
    mask: torch.Tensor  # (B, T') int64, 1 = token
    pooled: torch.Tensor  # (B, width)


class BowEncoder(nn.Module):
    def __init__(self, cfg: dict, vocab_size: int, width: int):
        super().__init__()
        check_keys(cfg, "text_encoder", ("type",))
        self.vocab_size = vocab_size
        self.proj = nn.Linear(vocab_size, width)
        self.ln = nn.LayerNorm(width)

    def forward(self, input_ids, mask) -> TextFeatures:
        counts = torch.zeros(input_ids.shape[0], self.vocab_size, device=input_ids.device)
        counts = counts.scatter_add(1, input_ids, mask.to(torch.float32))
        pooled = self.ln(self.proj(torch.log1p(counts)))
        return TextFeatures(pooled[:, None], torch.ones_like(mask[:, :1]), pooled)


class MeanEncoder(nn.Module):
    def __init__(self, cfg: dict, vocab_size: int, width: int):
        super().__init__()
        check_keys(cfg, "text_encoder", ("type",))
        self.embed = nn.Embedding(vocab_size, width)

    def forward(self, input_ids, mask) -> TextFeatures:
        x = self.embed(input_ids)
        return TextFeatures(x, mask, masked_mean(x, mask))


class GruEncoder(nn.Module):
    def __init__(self, cfg: dict, vocab_size: int, width: int):
        super().__init__()
        check_keys(cfg, "text_encoder", ("type", "layers"))
        self.embed = nn.Embedding(vocab_size, width)
        self.gru = nn.GRU(width, width, num_layers=cfg.get("layers", 1), batch_first=True)

    def forward(self, input_ids, mask) -> TextFeatures:
        x, _ = self.gru(self.embed(input_ids))
        last = (mask.sum(1) - 1).clamp(min=0)[:, None, None].expand(-1, 1, x.shape[-1])
        return TextFeatures(x, mask, torch.gather(x, 1, last)[:, 0])


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: dict, vocab_size: int, width: int):
        super().__init__()
        check_keys(cfg, "text_encoder", ("type", "layers", "heads"), ("max_length",))
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(cfg["max_length"], width)
        self.blocks = nn.ModuleList(Block(width, cfg.get("heads", 4)) for _ in range(cfg.get("layers", 2)))
        self.ln = nn.LayerNorm(width)

    def forward(self, input_ids, mask) -> TextFeatures:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) + self.position(positions)[None]
        allowed = key_mask(mask)
        for block in self.blocks:
            x = block(x, allowed)
        x = self.ln(x)
        return TextFeatures(x, mask, masked_mean(x, mask))


TEXT_ENCODERS = {"bow": BowEncoder, "mean": MeanEncoder, "gru": GruEncoder, "transformer": TransformerEncoder}


def build_text_encoder(cfg: dict, vocab_size: int, width: int) -> nn.Module:
    return TEXT_ENCODERS[choice(cfg, "type", "text encoder", TEXT_ENCODERS)](cfg, vocab_size, width)
