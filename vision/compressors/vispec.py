"""ViSpec's vision adaptor: a few compressed image tokens plus a global image vector fused into the text.

Kang et al. 2025, "ViSpec: Accelerating Vision-Language Models with Vision-Aware Speculative Decoding".
Learnable queries attend non-causally to the image features (the resampler block of `resampler.py` with
n_queries + 1 queries). The first n_queries outputs replace the image span for the drafter; the last output
g (B, D) is an attention-pooled summary of the whole image, returned as `global_vec`.

The paper fuses g into every later text hidden state h by img_fc(cat(h, g)), initialised to the identity on
h and zero on g so that an untrained adaptor leaves the drafter unchanged. `fuse` implements the same idea
as a gated addition,

    fuse(h, g) = h + tanh(gate) * W g         gate (D,) initialised to 0,

which equals the identity on h at initialisation (tested) and learns how much of g each channel takes.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mmspec.errors import InvalidInputError

from .base import CompressedImage
from .resampler import Resampler


class ViSpec(Resampler):
    type = "vispec"
    extra_queries = 1  # the last query is the global one

    def __init__(self, n_queries: int = 4, dim: int = 64, heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__(n_queries, dim, heads, mlp_ratio)
        self.global_proj = nn.Linear(dim, dim)
        self.gate = nn.Parameter(torch.zeros(dim))

    def _result(self, out: Tensor) -> CompressedImage:
        return CompressedImage(out[:, :-1], global_vec=out[:, -1], method=self.type)

    def fuse(self, text_hidden: Tensor, global_vec: Tensor) -> Tensor:
        """(B, T, D) text hidden states + (B, D) global vector -> (B, T, D); the identity while gate == 0."""
        ok = (text_hidden.dim() == 3 and global_vec.dim() == 2 and text_hidden.shape[0] == global_vec.shape[0]
              and text_hidden.shape[-1] == global_vec.shape[-1] == self.dim)
        if not ok:
            raise InvalidInputError(f"fuse got text_hidden {tuple(text_hidden.shape)} and global_vec "
                                    f"{tuple(global_vec.shape)}; expected (B, T, {self.dim}) and (B, {self.dim})")
        g = torch.tanh(self.gate) * self.global_proj(global_vec)  # (B, D)
        return text_hidden + g.unsqueeze(1)
