"""The built-in families as the graphs a bundle holds (torch modules traced by `edgerun.export`).

Transformer family (names are the ONNX interface the runtime reads):
- `VisionGraph`: pixel_values (B, 3, S, S) -> image_features (B, N, D); the one image encoding
  every task of a multi-task bundle reads;
- `CrossKVGraph`: a memory (B, M, D) -> cross_key_i, cross_value_i (B, H, M, hd) per decoder layer;
- `DecoderStepGraph`: the text decoder's step with a time-major self-attention past, the same
  interface as the BLIP decoder graph (input_ids, past_key, past_value, [cross_attention_mask],
  cross K/V -> logits, new_key, new_value);
- `QuestionGraph`: input_ids, attention_mask, image_features -> question_embeds (B, M, D) and
  cross_attention_mask (B, M), the fused question a generative VQA decoder attends to;
- `ClassifierGraph`: input_ids, attention_mask, image_features -> answer_probs (B, n_answers);
- `ImageEmbedGraph` / `TextEmbedGraph`: -> image_embeds / text_embeds (B, d), L2-normalised.

LSTM family: `VisionGraph` -> image_features (B, C); `LstmInitGraph`: image_features -> init_h,
init_c (layers, B, hidden); `LstmStepGraph`: input_ids (R, T), h, c (layers, R, hidden) -> logits
(R, vocab) at the last position, new_h, new_c.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .layers import (
    NEG,
    beam_context,
    beam_queries,
    cached_attention,
    merge_heads,
    shared_kv_attention,
    split_heads,
    step_dims,
)


class VisionGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.encode_image(pixel_values)


class CrossKVGraph(nn.Module):
    """One output per layer (no stacked tensor to slice per step); one copy per image or question."""

    def __init__(self, decoder):
        super().__init__()
        self.attn = nn.ModuleList(block.cross_attn for block in decoder.blocks)

    def forward(self, memory):
        keys = [split_heads(a.key(memory), a.heads) for a in self.attn]
        values = [split_heads(a.value(memory), a.heads) for a in self.attn]
        return (*keys, *values)


class DecoderStepGraph(nn.Module):
    """One decoder call over the tokens the cache has not seen.

    input_ids : (R, T) int64, R = batch * beams (batch-major)
    past_key, past_value : (P, L, R, H, hd), P may be 0
    cross_attention_mask : (B, M) int64, 1 = attend; only with `cross_mask=True`
    cross : cross_key_0..L-1 then cross_value_0..L-1, each (B, H, M, hd)
    returns logits (R, V) at the last position, new_key/new_value (T, L, R, H, hd)
    """

    def __init__(self, decoder, cross_mask: bool = False):
        super().__init__()
        self.decoder = decoder
        self.with_cross_mask = cross_mask
        self.heads = decoder.heads

    def forward(self, input_ids, past_key, past_value, *cross):
        memory_allowed = None
        if self.with_cross_mask:
            memory_allowed = cross[0].bool()[:, None, None, :]
            cross = cross[1:]
        n_layers = len(self.decoder.blocks)
        dims = step_dims(input_ids, past_key, cross[0])
        t, past = dims.new, dims.past
        queries = torch.arange(t, device=input_ids.device) + past
        x = self.decoder.embed(input_ids) + self.decoder.position(queries)[None]
        allowed = torch.arange(past + t, device=input_ids.device)[None, :] <= queries[:, None]
        new_keys, new_values = [], []
        for i, block in enumerate(self.decoder.blocks):
            h = block.ln_self(x)
            a = block.self_attn
            q, k, v = (split_heads(proj(h), a.heads) for proj in (a.query, a.key, a.value))
            ctx = cached_attention(q, k, v, past_key[:, i], past_value[:, i], ~allowed, NEG, dims,
                                   divisor=math.sqrt(a.query.out_features // a.heads))
            x = x + a.out(merge_heads(ctx))
            new_keys.append(k)
            new_values.append(v)
            x = x + self._cross(block.cross_attn, block.ln_cross(x), cross[i], cross[n_layers + i],
                                memory_allowed, dims)
            x = x + block.mlp(block.ln_mlp(x))
        # F.linear on a 2-D input exports as Gemm(transB=1): the tied embedding is stored once.
        logits = self.decoder.logits(self.decoder.ln(x[:, -1]))
        # (L, R, H, T, hd) -> (T, L, R, H, hd): time-major, as the runtime's cache holds it
        new_key, new_value = torch.stack(new_keys), torch.stack(new_values)
        return logits, new_key.permute(3, 0, 1, 2, 4), new_value.permute(3, 0, 1, 2, 4)

    def _cross(self, attn, x, cross_k, cross_v, allowed, dims):
        # (R, T, D) -> (B, H, beams, T, hd): the beams of one image share its K/V (B, H, 1, M, hd).
        q = beam_queries(attn.query(x), self.heads, dims)
        blocked = None if allowed is None else ~allowed.unsqueeze(2)
        head_dim = attn.query.out_features // attn.heads
        ctx = shared_kv_attention(q, cross_k, cross_v, blocked, divisor=math.sqrt(head_dim))
        return attn.out(beam_context(ctx, dims))


class QuestionGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, image_features):
        fused = self.model.fuse(image_features, input_ids, attention_mask)
        return fused.tokens, fused.mask.to(torch.int64)


class ClassifierGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, image_features):
        return self.model.answer_logits(image_features, input_ids, attention_mask).softmax(dim=-1)


class ImageEmbedGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image_features):
        return self.model.image_embeds(image_features)


class TextEmbedGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.text_embeds(input_ids, attention_mask)


class LstmInitGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image_features):
        return self.model.init_state(image_features)


class LstmStepGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, h, c):
        logits, h, c = self.model.step(input_ids, h, c)
        return logits[:, -1], h, c
