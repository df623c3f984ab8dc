"""Learnable-query resampler: a fixed number of queries cross-attend to the image features.

A Perceiver-Resampler / Q-Former-lite (Jaegle et al. 2021; Alayrac et al. 2022 "Flamingo"; Li et al. 2023
"BLIP-2"), used as the query-resampler option of SpecVLM's elastic compressor and, with 576 -> 64 queries, by
FLASH. One pre-norm block:

    x = q + MHA(LN_q(q), LN_kv(f), LN_kv(f))          q: (Q, D) learned, f: (B, N, D) image features
    x = x + MLP(LN(x))                                MLP: D -> r*D -> D with GELU

The output has n_queries tokens whatever N is. The queries attend non-causally to all N tokens; the grid is
not used (image features from the target already carry their position information).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mmspec.errors import InvalidInputError

from .base import (CompressedImage, Compressor, check_attention, check_feats, check_module_matches, positive_int,
                   resolve_grid)


def check_heads(dim: int, heads: int) -> None:
    if dim % heads:
        raise InvalidInputError(f"heads={heads} does not divide dim={dim}; expected a divisor of dim")


def check_mlp_ratio(mlp_ratio) -> float:
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
        raise InvalidInputError(f"mlp_ratio={mlp_ratio!r} is invalid; expected a number > 0")
    return float(mlp_ratio)


class QueryBlock(nn.Module):
    """The resampler's one attention block + MLP; also the body of ViSpec's vision adaptor."""

    def __init__(self, n_queries: int, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.queries = nn.Parameter(torch.empty(n_queries, dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        hidden = max(1, int(round(mlp_ratio * dim)))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, feats: Tensor) -> Tensor:
        q = self.queries.expand(feats.shape[0], -1, -1)  # (B, Q, D)
        kv = self.norm_kv(feats)  # (B, N, D)
        x = q + self.attn(self.norm_q(q), kv, kv, need_weights=False)[0]  # (B, Q, D)
        return x + self.mlp(self.norm_mlp(x))


class Resampler(Compressor):
    type = "resampler"

    extra_queries = 0  # queries beyond the output tokens (ViSpec adds its global query)

    def __init__(self, n_queries: int = 16, dim: int = 64, heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        self.n_queries = positive_int("n_queries", n_queries)
        self.dim = positive_int("dim", dim)
        self.heads = positive_int("heads", heads)
        check_heads(dim, heads)
        self.mlp_ratio = check_mlp_ratio(mlp_ratio)
        self.block = QueryBlock(n_queries + self.extra_queries, dim, heads, self.mlp_ratio)

    def out_tokens(self, n_in: int, grid: tuple[int, int] | None = None) -> int:
        resolve_grid(grid, n_in)
        return self.n_queries

    def forward(self, feats: Tensor, *, grid: tuple[int, int] | None = None,
                attention: Tensor | None = None) -> CompressedImage:
        check_feats(feats, self.dim)
        check_module_matches(self, feats)
        resolve_grid(grid, feats.shape[1])
        check_attention(attention, feats)
        return self._result(self.block(feats))  # (B, Q + extra, D)

    def _result(self, out: Tensor) -> CompressedImage:
        return CompressedImage(out, method=self.type)

    def config(self) -> dict:
        return {"type": self.type, "n_queries": self.n_queries, "dim": self.dim, "heads": self.heads,
                "mlp_ratio": self.mlp_ratio}
