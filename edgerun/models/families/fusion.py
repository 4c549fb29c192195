"""Fusion of an image's tokens with a question's `TextFeatures`: concatenation, attention pooling, or
a cross-modal transformer. Each returns `Fused`: tokens (B, M, width) with a mask (B, M) that a
generative answer decoder cross-attends to, and a pooled vector (B, width) that a classifier reads.

- concat: pooled = MLP([image pooled; text pooled]); tokens = image tokens then text tokens;
- attention: the text's pooled vector queries the image tokens (multi-head attention pooling);
  pooled = MLP([attended; text pooled]); tokens = the pooled vector then the text tokens;
- cross_transformer: `layers` blocks in which the text tokens attend to each other (unpadded) and
  to the image tokens, as BLIP's question encoder does; pooled = their masked mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import check_keys, choice
from .layers import Attention, Block, key_mask, masked_mean
from .text import TextFeatures


@dataclass
class Fused:
    tokens: torch.Tensor  # (B, M, width)
    mask: torch.Tensor  # (B, M) int64
    pooled: torch.Tensor  # (B, width)


def _mlp(d_in: int, width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, width), nn.GELU(), nn.Linear(width, width), nn.LayerNorm(width))


class ConcatFusion(nn.Module):
    def __init__(self, cfg: dict, width: int):
        super().__init__()
        check_keys(cfg, "fusion", ("type",))
        self.mlp = _mlp(2 * width, width)

    def forward(self, image_tokens, image_pooled, text: TextFeatures) -> Fused:
        pooled = self.mlp(torch.cat([image_pooled, text.pooled], dim=-1))
        ones = torch.ones(image_tokens.shape[:2], dtype=text.mask.dtype, device=text.mask.device)
        tokens = torch.cat([image_tokens, text.tokens], dim=1)
        return Fused(tokens, torch.cat([ones, text.mask], dim=1), pooled)


class AttentionFusion(nn.Module):
    def __init__(self, cfg: dict, width: int):
        super().__init__()
        check_keys(cfg, "fusion", ("type", "heads"))
        self.ln = nn.LayerNorm(width)
        self.attn = Attention(width, cfg.get("heads", 4))
        self.mlp = _mlp(2 * width, width)

    def forward(self, image_tokens, image_pooled, text: TextFeatures) -> Fused:
        attended = self.attn(self.ln(text.pooled)[:, None], self.ln(image_tokens))[:, 0]
        pooled = self.mlp(torch.cat([attended, text.pooled], dim=-1))
        one = torch.ones_like(text.mask[:, :1])
        tokens = torch.cat([pooled[:, None], text.tokens], dim=1)
        return Fused(tokens, torch.cat([one, text.mask], dim=1), pooled)


class CrossTransformerFusion(nn.Module):
    def __init__(self, cfg: dict, width: int):
        super().__init__()
        check_keys(cfg, "fusion", ("type", "layers", "heads"))
        heads = cfg.get("heads", 4)
        self.blocks = nn.ModuleList(Block(width, heads, cross=True) for _ in range(cfg.get("layers", 2)))
        self.ln = nn.LayerNorm(width)

    def forward(self, image_tokens, image_pooled, text: TextFeatures) -> Fused:
        x, allowed = text.tokens, key_mask(text.mask)
        for block in self.blocks:
            x = block(x, allowed, image_tokens)
        x = self.ln(x)
        return Fused(x, text.mask, masked_mean(x, text.mask))


FUSIONS = {"concat": ConcatFusion, "attention": AttentionFusion, "cross_transformer": CrossTransformerFusion}


def build_fusion(cfg: dict, width: int) -> nn.Module:
    return FUSIONS[choice(cfg, "type", "fusion", FUSIONS)](cfg, width)
