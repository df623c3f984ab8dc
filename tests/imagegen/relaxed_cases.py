"""Exact-enumeration helpers for the relaxed (lossy) rules' tests: synthetic targets, joint output TV, outcome
comparison (test_lantern.py, test_gsd.py, test_tv_budget.py)."""
from __future__ import annotations

from collections import defaultdict

import torch

import kernel_cases
from image_ar.acceptance import enumerate_verdicts
from kernel_cases import target_rows

F64 = torch.float64
EXACT = 1e-12

SHAPES = {"chain1": [-1], "chain2": [-1, 0], "root2": [-1, -1], "tree3": [-1, -1, 0]}


def synthetic(seed: int, vocab: int, prefix: tuple[int, ...] = (), sparse: bool = True) -> torch.Tensor:
    """A random distribution per prefix; with `sparse`, about a third of the tokens at zero (top-k-like)."""
    return kernel_cases.synthetic(seed, vocab, prefix, zero_fraction=0.3 if sparse else 0.0)


def model(seed: int, vocab: int):
    return lambda prefix: synthetic(seed, vocab, tuple(prefix))


def codebook(seed: int, vocab: int, dim: int = 3) -> torch.Tensor:
    return torch.randn(vocab, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def joint_tv(kernel, P, weighted_drafts, depth: int) -> float:
    """TV between what `kernel` emits (extended by P to depth + 1 tokens) and P's own joint over depth + 1 tokens."""
    mass = defaultdict(float)
    for draft, w in weighted_drafts:
        for cw, v in enumerate_verdicts(kernel, draft, target_rows(P, draft)):
            assert float(v.residual.min()) >= 0.0 and abs(float(v.residual.sum()) - 1.0) < 1e-9
            for y, py in enumerate(v.residual.tolist()):
                if py > 0:
                    mass[tuple(v.tokens) + (y,)] += w * cw * py
    out, ref = defaultdict(float), defaultdict(float)

    def extend(seq, m, acc):
        if len(seq) == depth + 1:
            acc[seq] += m
            return
        for y, py in enumerate(P(seq).tolist()):
            if py > 0:
                extend(seq + (y,), m * py, acc)

    for seq, m in mass.items():
        extend(seq, m, out)
    extend((), 1.0, ref)
    assert abs(sum(out.values()) - 1.0) < 1e-9
    return 0.5 * sum(abs(out[s] - ref[s]) for s in set(out) | set(ref))


def first_position_distribution(kernel, P, weighted_drafts) -> torch.Tensor:
    """Exact distribution of the first emitted token (the root position), over drafts and coins."""
    out = torch.zeros_like(P(()))
    for draft, w in weighted_drafts:
        for cw, v in enumerate_verdicts(kernel, draft, target_rows(P, draft)):
            if v.path:
                out[v.tokens[0]] += w * cw
            else:
                out += (w * cw) * v.residual
    return out


def assert_same_outcomes(kernel, reference, draft, p):
    """Decision for decision: the same coin probabilities, paths and residuals as `reference`."""
    ours, theirs = enumerate_verdicts(kernel, draft, p), enumerate_verdicts(reference, draft, p)
    assert len(ours) == len(theirs)
    for (w1, v1), (w2, v2) in zip(ours, theirs):
        assert abs(w1 - w2) <= EXACT and (v1.path, v1.bonus) == (v2.path, v2.bonus)
        assert torch.allclose(v1.residual, v2.residual, rtol=0, atol=EXACT)


def coin_probability(kernel, draft, p) -> float:
    """The probability of the first coin the kernel asks for (1.0 / 0.0 when it asks none)."""
    asked = []
    v = kernel(draft, p, coin=lambda prob: asked.append(prob) or False)
    return asked[0] if asked else (1.0 if v.path else 0.0)


def rows(seed: int, vocab: int, sparse: bool = True):
    return synthetic(100 + seed, vocab, (), sparse), synthetic(200 + seed, vocab, (), sparse)


