"""Synthetic targets and drafters over tiny vocabularies, and every draft a drafter can produce: the ground for
exact-enumeration tests of acceptance kernels (the engine's and image_ar's relaxed rules alike)."""
from __future__ import annotations

from functools import lru_cache

import torch

from mmspec.testing import exact
from mmspec.tree import Draft

F64 = torch.float64


@lru_cache(maxsize=None)
def synthetic(seed: int, vocab: int, prefix: tuple[int, ...] = (), zero_fraction: float = 0.35,
              min_support: int = 3) -> torch.Tensor:
    """A random distribution per prefix, with about `zero_fraction` of the tokens at zero (top-k-like sparsity) and
    at least `min_support` tokens left (drafts without replacement need as many candidates as siblings)."""
    code = sum((t + 1) * (vocab + 1) ** i for i, t in enumerate(prefix))
    g = torch.Generator().manual_seed(seed * 1_000_003 + code)
    w = torch.rand(vocab, generator=g, dtype=F64) ** 2 + 1e-3
    zero = torch.rand(vocab, generator=g, dtype=F64) < zero_fraction
    if int((~zero).sum()) < min_support:
        zero[w.argsort(descending=True)[:min_support]] = False
    w = torch.where(zero, 0.0, w)
    return w / w.sum()


def ancestors(parent, toks, i) -> tuple[int, ...]:
    """Tokens on the path from the root to node i (i included; () for i = -1)."""
    return exact._ancestors(parent, toks, i)


def sampled_drafts(Q, vocab: int, shape, siblings: str = "iid") -> list[tuple[Draft, float]]:
    """Every draft the drafter Q can produce for `shape` (a StaticTree or a parent list), with its probability
    (`mmspec.testing.exact.sampled_drafts`)."""
    out = exact.sampled_drafts(Q, shape, siblings)
    assert abs(sum(w for _, w in out) - 1.0) < 1e-12
    return out


target_rows = exact.target_rows  # (N + 1, V): P at the root, then P after each node
