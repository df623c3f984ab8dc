"""Learnable strided-convolution downsampling over the image token grid (SpecVLM's convolution option).

SpecVLM (2025, "SpecVLM: Fast Speculative Decoding in Vision-Language Models") lets its elastic compressor pick a
convolutional downsampler. This one is depthwise-separable: a depthwise s x s conv with stride s (one kernel
per channel, D * s^2 weights) followed by a pointwise D -> D linear map, so it stays cheap for D in the
thousands where a plain D -> D Conv2d would cost D^2 * s^2.

Initialisation reproduces `avg_pool` exactly: depthwise weights 1/s^2, pointwise = identity, bias 0. Edge
windows of a grid not divisible by s are zero-padded and the depthwise output is divided by the window's
in-bounds fraction, which is the ceil-mode mean of `avg_pool` for uniform weights; untrained, Conv == AvgPool.
Without a grid the tokens are the grid (1, N); only the first kernel row then sees data.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .base import (CompressedImage, Compressor, check_attention, check_feats, check_module_matches, positive_int,
                   resolve_grid)


class Conv(Compressor):
    type = "conv"

    def __init__(self, stride: int = 2, dim: int = 64):
        super().__init__()
        self.stride = positive_int("stride", stride)
        self.dim = positive_int("dim", dim)
        s = self.stride
        self.depthwise = nn.Conv2d(dim, dim, s, stride=s, groups=dim, bias=False)
        self.pointwise = nn.Linear(dim, dim)
        with torch.no_grad():
            self.depthwise.weight.fill_(1.0 / (s * s))
            self.pointwise.weight.copy_(torch.eye(dim))
            self.pointwise.bias.zero_()

    def out_tokens(self, n_in: int, grid: tuple[int, int] | None = None) -> int:
        h, w = resolve_grid(grid, n_in)
        return math.ceil(h / self.stride) * math.ceil(w / self.stride)

    def forward(self, feats: Tensor, *, grid: tuple[int, int] | None = None,
                attention: Tensor | None = None) -> CompressedImage:
        check_feats(feats, self.dim)
        check_module_matches(self, feats)
        h, w = resolve_grid(grid, feats.shape[1])
        check_attention(attention, feats)
        s = self.stride
        ph, pw = -h % s, -w % s
        x = F.pad(rearrange(feats, "b (h w) d -> b d h w", h=h, w=w), (0, pw, 0, ph))  # (B, D, h+ph, w+pw)
        valid = F.pad(feats.new_ones(1, 1, h, w), (0, pw, 0, ph))
        frac = F.avg_pool2d(valid, s, s)  # (1, 1, h', w') in-bounds share of each window
        y = self.depthwise(x) / frac  # (B, D, h', w')
        tokens = self.pointwise(rearrange(y, "b d h w -> b (h w) d"))  # (B, M, D)
        return CompressedImage(tokens, method=self.type)

    def config(self) -> dict:
        return {"type": self.type, "stride": self.stride, "dim": self.dim}
