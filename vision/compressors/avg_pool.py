"""Train-free 2-D average pooling over the image token grid.

SpecVLM (2025) lists pooling among the elastic compressor's options; it is also the standard LLaVA-style
token reduction. Each output token is the mean of an s x s window of the (h, w) grid (stride s). When h or w
is not divisible by s the last window is partial (ceil mode) and averages only the tokens it covers, so the
output has ceil(h/s) * ceil(w/s) tokens. Without a grid the tokens are a 1-D sequence pooled along N in
windows of s, giving ceil(N/s) tokens.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .base import CompressedImage, Compressor, check_attention, check_feats, positive_int, resolve_grid


def pool_grid(feats: Tensor, h: int, w: int, stride: int) -> Tensor:
    """(B, h*w, D) -> (B, ceil(h/s)*ceil(w/s), D); partial windows average only the tokens they cover."""
    x = rearrange(feats, "b (h w) d -> b d h w", h=h, w=w)
    # padding=0 with ceil_mode makes PyTorch divide an edge window by its in-bounds size
    y = F.avg_pool2d(x, stride, stride, ceil_mode=True)  # (B, D, h', w')
    return rearrange(y, "b d h w -> b (h w) d")


class AvgPool(Compressor):
    type = "avg_pool"

    def __init__(self, stride: int = 2):
        super().__init__()
        self.stride = positive_int("stride", stride)

    def out_tokens(self, n_in: int, grid: tuple[int, int] | None = None) -> int:
        h, w = resolve_grid(grid, n_in)
        return math.ceil(h / self.stride) * math.ceil(w / self.stride)

    def forward(self, feats: Tensor, *, grid: tuple[int, int] | None = None,
                attention: Tensor | None = None) -> CompressedImage:
        check_feats(feats)
        h, w = resolve_grid(grid, feats.shape[1])
        check_attention(attention, feats)
        return CompressedImage(pool_grid(feats, h, w, self.stride), method=self.type)

    def config(self) -> dict:
        return {"type": self.type, "stride": self.stride}
