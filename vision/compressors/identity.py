"""No compression: the drafter sees every image token (the baseline the other compressors are measured against)."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import CompressedImage, Compressor, check_attention, check_feats, resolve_grid


class Identity(Compressor):
    """Returns the features unchanged, with `index` = 0..N-1."""

    type = "none"

    def out_tokens(self, n_in: int, grid: tuple[int, int] | None = None) -> int:
        resolve_grid(grid, n_in)
        return n_in

    def forward(self, feats: Tensor, *, grid: tuple[int, int] | None = None,
                attention: Tensor | None = None) -> CompressedImage:
        check_feats(feats)
        resolve_grid(grid, feats.shape[1])
        check_attention(attention, feats)
        B, N, _ = feats.shape
        index = torch.arange(N, device=feats.device).expand(B, N)  # (B, N)
        return CompressedImage(feats, index=index, method=self.type)

    def config(self) -> dict:
        return {"type": self.type}
