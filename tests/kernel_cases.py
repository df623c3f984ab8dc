"""Synthetic targets and drafters over tiny vocabularies, and every draft a drafter can produce: the ground for
exact-enumeration tests of acceptance kernels (the engine's and image_ar's relaxed rules alike)."""
from __future__ import annotations

from functools import lru_cache

import torch

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
    out = []
    while i >= 0:
        out.append(toks[i])
        i = parent[i]
    return tuple(out[::-1])


def sampled_drafts(Q, vocab: int, shape, siblings: str = "iid") -> list[tuple[Draft, float]]:
    """Every draft the drafter Q can produce for `shape` (a StaticTree or a parent list), with its probability."""
    parent = list(getattr(shape, "parent", shape))
    out = []

    def rec(i, toks, w):
        if i == len(parent):
            q = torch.stack([Q(ancestors(parent, toks, parent[j])) for j in range(len(parent))])
            out.append((Draft(torch.tensor(toks, dtype=torch.long), torch.tensor(parent, dtype=torch.long), q,
                              siblings), w))
            return
        q = Q(ancestors(parent, toks, parent[i])).clone()
        if siblings == "without_replacement":
            q[[toks[j] for j in range(i) if parent[j] == parent[i]]] = 0.0
            q = q / q.sum()
        for x in q.nonzero().flatten().tolist():
            rec(i + 1, toks + [x], w * float(q[x]))

    rec(0, [], 1.0)
    assert abs(sum(w for _, w in out) - 1.0) < 1e-12
    return out


def target_rows(P, draft: Draft) -> torch.Tensor:
    """(N + 1, V): P at the root, then P after each node."""
    toks, parent = draft.token_list, draft.parent_list
    return torch.stack([P(())] + [P(ancestors(parent, toks, i)) for i in range(len(draft))])
