"""Train-free pruning of image tokens by the target's attention (DREAM's visual compression).

Hu et al. 2025, "DREAM: Drafting with Refined Target Features and Entropy-Adaptive Cross-Attention Fusion for
Multimodal Speculative Decoding": keep the top fraction of image tokens ranked by the attention mass the target
pays them, discard the rest. Here the caller passes that mass as `attention` (B, N) (e.g. the last text
token's last-layer attention to each image token, summed over heads). We keep the top ceil(r * N) tokens,
in their ORIGINAL order (so positions stay monotone), and return their positions as `index`.

Without `attention` the score is the feature L2 norm ||x_i||_2, a common train-free saliency proxy
(high-norm tokens tend to be the ones attention concentrates on). Ties go to the earlier position, so the
selection is deterministic.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import CompressedImage, Compressor, ceil_count, check_attention, check_feats, fraction, resolve_grid


class AttentionPrune(Compressor):
    type = "attention_prune"
    uses_attention = True

    def __init__(self, keep_ratio: float = 0.25):
        super().__init__()
        self.keep_ratio = fraction("keep_ratio", keep_ratio)

    def out_tokens(self, n_in: int, grid: tuple[int, int] | None = None) -> int:
        resolve_grid(grid, n_in)
        return ceil_count(self.keep_ratio, n_in)

    def forward(self, feats: Tensor, *, grid: tuple[int, int] | None = None,
                attention: Tensor | None = None) -> CompressedImage:
        check_feats(feats)
        resolve_grid(grid, feats.shape[1])
        check_attention(attention, feats)
        B, N, D = feats.shape
        score = attention if attention is not None else feats.float().norm(dim=-1)  # (B, N)
        m = ceil_count(self.keep_ratio, N)
        # a stable descending sort breaks ties by position; re-sorting the kept ids restores the original order
        top = torch.argsort(score, dim=1, descending=True, stable=True)[:, :m]  # (B, M)
        index = top.sort(dim=1).values.to(feats.device)  # (B, M)
        tokens = feats.gather(1, index.unsqueeze(-1).expand(B, m, D))  # (B, M, D)
        return CompressedImage(tokens, index=index, method=self.type)

    def config(self) -> dict:
        return {"type": self.type, "keep_ratio": self.keep_ratio}
