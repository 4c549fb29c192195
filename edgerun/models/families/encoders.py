"""Image encoders: a ResNet-18-style CNN and a ViT. Both map pixels to a sequence of tokens.

pixel_values (B, 3, S, S) -> tokens (B, N, width), projected to the model's width and carrying a
learned position embedding; `pool(tokens) -> (B, width)` gives one vector per image (the mean of
the CNN's cells; the ViT's CLS token). Config keys (JSON, under "image_encoder"):

- cnn: widths [64, 128, 256, 512], blocks [2, 2, 2, 2] (ResNet-18), stem_kernel 7, stem_stride 2,
  stem_pool true. Tiny configs shrink these.
- vit: patch_size, width, layers, heads.
"""
from __future__ import annotations

import torch
from torch import nn

from ...errors import OptionError
from .config import check_keys, choice
from .layers import Block


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with batch norm, and a 1x1 projection on the shortcut when the
    shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
    """pixel_values (B, 3, S, S) -> feature map (B, widths[-1], h, w)."""

    def __init__(self, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), stem_kernel: int = 7,
                 stem_stride: int = 2, stem_pool: bool = True):
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise OptionError(f"cnn widths {list(widths)} and blocks {list(blocks)} must be non-empty lists "
                              "of the same length")
        stem = [nn.Conv2d(3, widths[0], stem_kernel, stem_stride, stem_kernel // 2, bias=False),
                nn.BatchNorm2d(widths[0]), nn.ReLU()]
        if stem_pool:
            stem.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*stem)
        stages, c_in = [], widths[0]
        for i, (c_out, n) in enumerate(zip(widths, blocks)):
            stage = [BasicBlock(c_in, c_out, 1 if i == 0 else 2)]
            stage += [BasicBlock(c_out, c_out, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.channels = c_in

    def forward(self, pixel_values):
        return self.stages(self.stem(pixel_values))


CNN_KEYS = ("type", "widths", "blocks", "stem_kernel", "stem_stride", "stem_pool")


def resnet(cfg: dict) -> ResNet:
    """A ResNet from a "cnn" config section (ResNet-18's sizes where a key is left out)."""
    return ResNet(tuple(cfg.get("widths", (64, 128, 256, 512))), tuple(cfg.get("blocks", (2, 2, 2, 2))),
                  cfg.get("stem_kernel", 7), cfg.get("stem_stride", 2), cfg.get("stem_pool", True))


class CnnEncoder(nn.Module):
    """ResNet feature map cells as tokens (row-major), projected to `width`."""

    def __init__(self, cfg: dict, image_size: int, width: int):
        super().__init__()
        self.backbone = resnet(check_keys(cfg, "image_encoder", CNN_KEYS))
        with torch.no_grad():
            cells = self.backbone.eval()(torch.zeros(1, 3, image_size, image_size)).shape[2:]
        self.backbone.train()
        self.proj = nn.Linear(self.backbone.channels, width)
        self.position = nn.Parameter(torch.zeros(1, cells[0] * cells[1], width))
        nn.init.normal_(self.position, std=0.02)

    def forward(self, pixel_values):
        cells = self.backbone(pixel_values).flatten(2).transpose(1, 2)  # (B, h*w, C)
        return self.proj(cells) + self.position

    def pool(self, tokens):
        return tokens.mean(dim=1)


class VitEncoder(nn.Module):
    """Patches plus a CLS token, pre-LN transformer blocks, projected to `width`."""

    def __init__(self, cfg: dict, image_size: int, width: int):
        super().__init__()
        check_keys(cfg, "image_encoder", ("type", "layers", "heads"), ("patch_size", "width"))
        patch, inner = cfg.get("patch_size", 16), cfg.get("width", width)
        if image_size % patch:
            raise OptionError(f"vit patch_size {patch} does not divide image_size {image_size}")
        self.patch = nn.Conv2d(3, inner, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, inner))
        self.position = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, inner))
        nn.init.normal_(self.position, std=0.02)
        nn.init.normal_(self.cls, std=0.02)
        self.blocks = nn.ModuleList(Block(inner, cfg.get("heads", 4)) for _ in range(cfg.get("layers", 4)))
        self.ln = nn.LayerNorm(inner)
        self.proj = nn.Linear(inner, width)

    def forward(self, pixel_values):
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.position
        for block in self.blocks:
            x = block(x)
        return self.proj(self.ln(x))

    def pool(self, tokens):
        return tokens[:, 0]


IMAGE_ENCODERS = {"cnn": CnnEncoder, "vit": VitEncoder}



def build_image_encoder(cfg: dict, image_size: int, width: int) -> nn.Module:
    return IMAGE_ENCODERS[choice(cfg, "type", "image encoder", IMAGE_ENCODERS)](cfg, image_size, width)
