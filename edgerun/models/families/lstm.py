"""The classic captioner: a ResNet-18-style CNN encoder and an LSTM decoder.

Config (JSON; see `edgerun/models/configs/tiny-cnn-lstm.json`):

    {"family": "lstm", "image_size": 32,
     "image_encoder": {"type": "cnn", "widths": [...], "blocks": [...], ...},
     "decoder": {"embed_dim", "hidden", "layers", "dropout", "max_positions",
                 "image_to": "state" | "input"},
     "preprocess": {...}}

The image is pooled to one feature vector, which starts the LSTM in one of two ways:
- "state": projected to the initial hidden and cell states of every layer (h0 = tanh(W_h f),
  c0 = W_c f), as in Show, Attend and Tell;
- "input": projected to the embedding size and fed as the first input from a zero state, as in
  Show and Tell; the state after it starts the caption.
Then `[BOS] words` are embedded and run through the LSTM, predicting `words [EOS]` (teacher forcing
in training; [PAD] targets ignored). The decoder step exports with (h, c) as its cache, so the
runtime's beam search reorders states where a transformer reorders K/V.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ...errors import InputError, OptionError
from .config import check_keys, choice
from .encoders import CNN_KEYS, resnet
from .tokenizer import PAD_ID

TOP_KEYS = ("family", "name", "description", "image_size", "image_encoder", "decoder", "preprocess",
            "vocab_size")
IMAGE_TO = ("state", "input")


class LstmCaptioner(nn.Module):
    family = "lstm"
    tasks = ("caption",)
    answers = None

    def __init__(self, config: dict, vocab_size: int):
        super().__init__()
        check_keys(config, "model", TOP_KEYS, ("family", "image_size", "image_encoder", "decoder"))
        enc = check_keys(config["image_encoder"], "image_encoder", CNN_KEYS)
        if enc.get("type") != "cnn":
            raise OptionError(f"the lstm family's image encoder is a cnn, got {enc.get('type')!r}")
        dec = check_keys(config["decoder"], "decoder", ("dropout", "image_to", "layers"),
                         ("embed_dim", "hidden", "max_positions"))
        self.config = {**config, "vocab_size": vocab_size}
        self.image_size = config["image_size"]
        self.layers, self.hidden = dec.get("layers", 1), dec["hidden"]
        self.max_positions = dec["max_positions"]
        self.image_to = choice({"image_to": dec.get("image_to", "state")}, "image_to", "decoder image_to",
                               IMAGE_TO)
        self.encoder = resnet(enc)
        channels, n = self.encoder.channels, self.layers * self.hidden
        if self.image_to == "state":
            self.init_h, self.init_c = nn.Linear(channels, n), nn.Linear(channels, n)
        else:
            self.image_proj = nn.Linear(channels, dec["embed_dim"])
        self.embed = nn.Embedding(vocab_size, dec["embed_dim"], padding_idx=PAD_ID)
        dropout = dec.get("dropout", 0.0)
        self.lstm = nn.LSTM(dec["embed_dim"], self.hidden, self.layers, batch_first=True,
                            dropout=dropout if self.layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(self.hidden, vocab_size)

    def encode_image(self, pixel_values) -> torch.Tensor:
        """pixel_values (B, 3, S, S) -> pooled feature (B, C)."""
        return self.encoder(pixel_values).mean(dim=(2, 3))

    def init_state(self, features) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, C) -> h0, c0, each (layers, B, hidden)."""
        b = features.shape[0]
        if self.image_to == "state":
            h = torch.tanh(self.init_h(features)).view(b, self.layers, self.hidden).transpose(0, 1)
            c = self.init_c(features).view(b, self.layers, self.hidden).transpose(0, 1)
            return h.contiguous(), c.contiguous()
        zeros = features.new_zeros(self.layers, b, self.hidden)
        _, (h, c) = self.lstm(self.image_proj(features)[:, None], (zeros, zeros))
        return h, c

    def step(self, input_ids, h, c):
        """input_ids (B, T) from state (h, c) -> logits (B, T, vocab), and the state after them."""
        x, (h, c) = self.lstm(self.drop(self.embed(input_ids)), (h, c))
        return self.out(self.drop(x)), h, c

    def forward(self, pixel_values, input_ids) -> torch.Tensor:
        """Teacher forcing: logits (B, T, vocab) for every position of input_ids (B, T)."""
        h, c = self.init_state(self.encode_image(pixel_values))
        return self.step(input_ids, h, c)[0]

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """batch: images (B, 3, S, S), caption_ids (B, T) `[BOS] words [EOS]` padded with [PAD]."""
        missing = [k for k in ("images", "caption_ids") if k not in batch]
        if missing:
            raise InputError(f"the batch (keys {sorted(batch)}) lacks {missing}; "
                             "the lstm captioner trains on images and caption_ids")
        ids = batch["caption_ids"]
        if ids.shape[1] > self.max_positions + 1:
            raise InputError(f"captions of {ids.shape[1]} tokens exceed max_positions {self.max_positions}")
        logits = self(batch["images"], ids[:, :-1])
        return {"caption": F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), ignore_index=PAD_ID)}

    def loss(self, batch: dict) -> torch.Tensor:
        return self.losses(batch)["caption"]
