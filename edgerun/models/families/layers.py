"""Transformer building blocks shared by the built-in families (pre-LayerNorm, GELU MLP).

Attention is written out (no `nn.MultiheadAttention`): the export graphs re-use the same
projections with an explicit KV cache, and a plain matmul/softmax traces to standard ONNX ops.
Masks are boolean, True where a key may be attended, broadcast to the scores (B, H, Tq, Tk).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

NEG = torch.finfo(torch.float32).min  # a masked score; finite, so a fully masked row stays finite


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, D) -> (B, H, T, D / H)"""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, hd) -> (B, T, H * hd)"""
    x = x.transpose(1, 2)
    return x.reshape(x.shape[0], x.shape[1], -1)  # its own dims: a constant shape after export


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention. q (..., Tq, hd), k and v (..., Tk, hd) -> (..., Tq, hd); the
    leading dims broadcast (B, H, beams | 1), and `allowed` broadcasts to the scores (..., Tq, Tk)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, NEG)
    return torch.matmul(scores.softmax(dim=-1), v)


@dataclass(frozen=True)
class StepDims:
    """A decoder step's dynamic sizes, read off its inputs once (`step_dims`) and passed to every
    layer. Each `x.shape[i]` read while tracing becomes Shape -> Gather nodes of its own, so sizes
    read per layer were computed again in every layer at every step, and the Unsqueeze/Concat that
    build shapes from them could not be shared (onnxruntime merges identical nodes over the same
    inputs, which per-layer Shapes never are)."""

    rows: object  # batch * beams
    new: object  # tokens in this call
    past: object  # tokens in the cache
    batch: object  # images
    beams: object  # rows // batch


def step_dims(input_ids: torch.Tensor, past_key: torch.Tensor, cross_key: torch.Tensor) -> StepDims:
    """input_ids (R, T), the stacked past (P, ...) and one cross-attention key (B, ...)."""
    rows, new = input_ids.shape
    batch = cross_key.shape[0]
    return StepDims(rows, new, past_key.shape[0], batch, rows // batch)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,
                     past_v: torch.Tensor, blocked: torch.Tensor | None, fill: float, dims: StepDims, *,
                     scale: float | None = None, divisor: float | None = None) -> torch.Tensor:
    """Self-attention of the new tokens over the cache and themselves, without concatenating K/V.

    q, k, v : (R, H, T, hd), the new tokens; past_k, past_v : (P, R, H, hd), one layer of the
    time-major cache, read where it lies (the permutes below fold into onnxruntime's MatMul, no
    copy); blocked : bool, broadcast to (.., T, P + T), True where a key is masked (with `fill`);
    the scores are multiplied by `scale` or divided by `divisor`, as the source model does it.
    Only the scores (R, H, T, P + T) are concatenated, and the context is the sum of the past's and
    the new tokens' parts: a step copies no layer's K/V. -> (R, H, T, hd)"""
    n_past = dims.past
    scores = torch.cat([torch.matmul(q, past_k.permute(1, 2, 3, 0)), torch.matmul(q, k.transpose(-1, -2))], dim=-1)
    scores = scores / divisor if divisor is not None else scores * scale
    if blocked is not None:
        scores = scores.masked_fill(blocked, fill)
    probs = scores.softmax(dim=-1)
    return torch.matmul(probs[..., :n_past], past_v.permute(1, 2, 0, 3)) + torch.matmul(probs[..., n_past:], v)


def shared_kv_attention(q: torch.Tensor, cross_k: torch.Tensor, cross_v: torch.Tensor,
                        blocked: torch.Tensor | None = None, fill: float = NEG, *,
                        scale: float | None = None, divisor: float | None = None) -> torch.Tensor:
    """Cross-attention of `beam_queries` q (B, H, beams, T, hd) over one image's K/V (B, H, N, hd);
    blocked (B, 1, 1, 1, N) masks keys with `fill`; scores scaled as in `cached_attention`.
    -> (B, H, beams, T, hd), for `beam_context`."""
    scores = torch.matmul(q, cross_k.unsqueeze(2).transpose(-1, -2))
    scores = scores / divisor if divisor is not None else scores * scale
    if blocked is not None:
        scores = scores.masked_fill(blocked, fill)
    return torch.matmul(scores.softmax(dim=-1), cross_v.unsqueeze(2))


def beam_queries(q: torch.Tensor, heads: int, dims: StepDims) -> torch.Tensor:
    """Cross-attention queries (R, T, D), R = batch * beams, batch-major -> (B, H, beams, T, hd).

    With the image's keys and values as (B, H, 1, N, hd), every (head, beam) pair is a matrix-vector
    product against the same K/V, one beam after another while that head's K/V is still in cache:
    onnxruntime ran BLIP-base's cross-attention 1.7x faster this way than as one (beams*T)-row
    matrix product per head, which repacks the whole K/V on every call."""
    return q.view(dims.batch, dims.beams, dims.new, heads, -1).permute(0, 3, 1, 2, 4)


def beam_context(ctx: torch.Tensor, dims: StepDims) -> torch.Tensor:
    """The attention output (B, H, beams, T, hd) -> (R, T, H * hd), R = batch * beams."""
    return ctx.permute(0, 2, 3, 1, 4).reshape(dims.rows, dims.new, -1)


def key_mask(mask: torch.Tensor) -> torch.Tensor:
    """A padding mask (B, T), 1 = token -> allowed (B, 1, 1, T)."""
    return mask.bool()[:, None, None, :]


def causal_mask(length: int, device=None) -> torch.Tensor:
    """(1, 1, T, T), True on and below the diagonal."""
    pos = torch.arange(length, device=device)
    return (pos[None, :] <= pos[:, None])[None, None]


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                allowed: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) attends to `context` (B, S, D), or to itself when None."""
        context = x if context is None else context
        q = split_heads(self.query(x), self.heads)
        k, v = split_heads(self.key(context), self.heads), split_heads(self.value(context), self.heads)
        return self.out(merge_heads(attend(q, k, v, allowed)))


class Block(nn.Module):
    """Self-attention, optional cross-attention to a context, MLP; each with a residual."""

    def __init__(self, width: int, heads: int, *, cross: bool = False, mlp_ratio: int = 4):
        super().__init__()
        self.ln_self = nn.LayerNorm(width)
        self.self_attn = Attention(width, heads)
        self.ln_cross = nn.LayerNorm(width) if cross else None
        self.cross_attn = Attention(width, heads) if cross else None
        self.ln_mlp = nn.LayerNorm(width)
        hidden = mlp_ratio * width
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x, allowed=None, context=None, context_allowed=None):
        x = x + self.self_attn(self.ln_self(x), allowed=allowed)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.ln_cross(x), context, context_allowed)
        return x + self.mlp(self.ln_mlp(x))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (B, T, D), mask (B, T) -> (B, D), the mean over the unmasked positions."""
    weights = mask.to(x.dtype)[..., None]
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)
