"""Elastic compression: several compressors, one picked per input by a token budget and the attention shape.

SpecVLM (2025, "SpecVLM: Fast Speculative Decoding in Vision-Language Models") pairs its EAGLE-2 drafter with
an elastic visual compressor that chooses among pruning, pooling, convolution and a query resampler per input.
The paper learns nothing about the choice that we could reproduce exactly, so this module uses a simple,
deterministic rule:

1. Budget: the candidates are the compressors giving at least `min_tokens` tokens for this (N, grid). If none
   does, the one giving the most tokens is used.
2. Shape of the attention (only when `attention` (B, N) >= 0 is given): the concentration of a row is the
   share of its mass held by its top ceil(top_fraction * N) tokens (a flat row gives ~top_fraction, a row
   peaked on a few tokens gives ~1). If it is >= `threshold` the attention says where the content is, so only
   `attention_prune` candidates are considered; otherwise (diffuse) only the others (pooling, conv,
   resampler, ...). If that leaves no candidate, the restriction is dropped.
3. The cheapest remaining candidate (fewest output tokens) wins; ties go to the earlier one in the list.

One compressor serves the whole batch (its output must be one (B, M, D) tensor): the batch counts as
concentrated only if every row is. For a strictly per-input choice, call with B = 1. The result's `choice`
is the index of the chosen compressor and `method` its type.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mmspec.errors import InvalidInputError

from .attention_prune import AttentionPrune
from .avg_pool import AvgPool
from .base import CompressedImage, Compressor, ceil_count, check_attention, check_feats, fraction, positive_int


def concentration(attention: Tensor, top_fraction: float) -> Tensor:
    """(B, N) non-negative attention -> (B,) share of each row's mass in its top ceil(top_fraction * N) tokens."""
    k = ceil_count(top_fraction, attention.shape[1])
    a = attention.float()
    return a.topk(k, dim=1).values.sum(1) / a.sum(1)


class Elastic(Compressor):
    type = "elastic"
    uses_attention = True

    def __init__(self, compressors: Sequence[Compressor] | None = None, min_tokens: int = 1,
                 threshold: float = 0.5, top_fraction: float = 0.1):
        super().__init__()
        if compressors is None:
            compressors = [AttentionPrune(0.25), AvgPool(2)]
        if len(compressors) == 0 or not all(isinstance(c, Compressor) for c in compressors):
            raise InvalidInputError(f"compressors={compressors!r} is invalid; expected a non-empty list of "
                                    f"Compressor modules (or their configs via build_compressor)")
        if any(isinstance(c, Elastic) for c in compressors):
            raise InvalidInputError("an elastic compressor cannot hold another elastic compressor")
        self.compressors = nn.ModuleList(compressors)
        self.min_tokens = positive_int("min_tokens", min_tokens)
        self.threshold = fraction("threshold", threshold)
        self.top_fraction = fraction("top_fraction", top_fraction)

    def choose(self, n_in: int, grid: tuple[int, int] | None = None, attention: Tensor | None = None) -> int:
        """Index of the compressor the rule in the module docstring picks."""
        counts = [c.out_tokens(n_in, grid) for c in self.compressors]
        fits = [i for i, m in enumerate(counts) if m >= self.min_tokens]
        if not fits:
            return max(range(len(counts)), key=lambda i: (counts[i], -i))
        if attention is not None:
            peaked = bool((concentration(attention, self.top_fraction) >= self.threshold).all())
            wanted = [i for i in fits if isinstance(self.compressors[i], AttentionPrune) == peaked]
            fits = wanted or fits
        return min(fits, key=lambda i: (counts[i], i))

    def out_tokens(self, n_in: int, grid: tuple[int, int] | None = None, attention: Tensor | None = None) -> int:
        """Depends on the choice, hence on `attention` when the rule uses it."""
        return self.compressors[self.choose(n_in, grid, attention)].out_tokens(n_in, grid)

    def forward(self, feats: Tensor, *, grid: tuple[int, int] | None = None,
                attention: Tensor | None = None) -> CompressedImage:
        check_feats(feats)
        check_attention(attention, feats)
        if attention is not None and ((attention < 0).any() or not (attention.sum(1) > 0).all()):
            raise InvalidInputError("attention must be non-negative with a positive sum in every row for the "
                                    "elastic compressor to measure its concentration")
        i = self.choose(feats.shape[1], grid, attention)
        out = self.compressors[i](feats, grid=grid, attention=attention)
        out.choice = i
        return out

    def config(self) -> dict:
        return {"type": self.type, "compressors": [c.config() for c in self.compressors],
                "min_tokens": self.min_tokens, "threshold": self.threshold, "top_fraction": self.top_fraction}
