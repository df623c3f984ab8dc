"""Exact output distributions of acceptance kernels over toy models (float64, no sampling).

A toy target P(prefix) and drafter Q(prefix) over a small vocabulary (`toy_model`); every draft Q can produce for a
tree shape is enumerated with its probability (`sampled_drafts`), and for each draft every sequence of the kernel's
coin outcomes (`mmspec.testing.enumerate`). What one verification step emits (accepted tokens, then the next token
from the residual), extended with P's own conditionals to depth + 1 tokens, is a distribution over sequences; a
lossless kernel reproduces P's joint exactly, a lossy one drifts by a measurable total variation.

    P, Q = toy_model(seed=1, vocab=5), toy_model(seed=2, vocab=5)
    r = step_distribution(accept_speculative, P, sampled_drafts(Q, StaticTree.chain(2)), depth=2)
    r.tv, r.acceptance_length             # 0.0 (to rounding) and the expected tokens per step

This is the method of tests/engine/test_kernels.py, as a library function the notebooks call.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

from ..tree import Draft
from .enumerate import enumerate_verdicts

F64 = torch.float64
Model = Callable[[tuple], torch.Tensor]


@lru_cache(maxsize=None)
def _toy(seed: int, vocab: int, prefix: tuple, zero_fraction: float, temperature: float) -> torch.Tensor:
    code = sum((t + 1) * (vocab + 1) ** i for i, t in enumerate(prefix))
    g = torch.Generator().manual_seed(seed * 1_000_003 + code)
    w = (torch.rand(vocab, generator=g, dtype=F64) ** 2 + 1e-3) ** (1 / temperature)
    zero = torch.rand(vocab, generator=g, dtype=F64) < zero_fraction
    if int((~zero).sum()) < 3:
        zero[w.argsort(descending=True)[:3]] = False
    w = torch.where(zero, 0.0, w)
    return w / w.sum()


def toy_model(seed: int, vocab: int, zero_fraction: float = 0.35, temperature: float = 1.0) -> Model:
    """A random next-token distribution per prefix (deterministic in seed), about `zero_fraction` of it zero;
    lower temperature makes it peakier."""
    return lambda prefix: _toy(seed, vocab, tuple(prefix), zero_fraction, temperature)


def mix(a: Model, b: Model, weight: float) -> Model:
    """(1 - weight) a + weight b: a drafter that agrees with `a` more as weight falls."""
    return lambda prefix: (1 - weight) * a(prefix) + weight * b(prefix)


def _ancestors(parent, toks, i) -> tuple:
    out = []
    while i >= 0:
        out.append(toks[i])
        i = parent[i]
    return tuple(out[::-1])


def sampled_drafts(Q: Model, shape, siblings: str = "iid") -> list[tuple[Draft, float]]:
    """Every draft Q can produce for `shape` (a StaticTree or a parent list), with its probability."""
    parent = list(getattr(shape, "parent", shape))
    out = []

    def rec(i, toks, w):
        if i == len(parent):
            q = torch.stack([Q(_ancestors(parent, toks, parent[j])) for j in range(len(parent))])
            out.append((Draft(torch.tensor(toks, dtype=torch.long), torch.tensor(parent, dtype=torch.long), q,
                              siblings), w))
            return
        q = Q(_ancestors(parent, toks, parent[i])).clone()
        if siblings == "without_replacement":
            q[[toks[j] for j in range(i) if parent[j] == parent[i]]] = 0.0
            q = q / q.sum()
        for x in q.nonzero().flatten().tolist():
            rec(i + 1, toks + [x], w * float(q[x]))

    rec(0, [], 1.0)
    return out


def target_rows(P: Model, draft: Draft) -> torch.Tensor:
    """(N + 1, V): P at the root, then P after each node (what the target's verification forward gives)."""
    toks, parent = draft.token_list, draft.parent_list
    return torch.stack([P(())] + [P(_ancestors(parent, toks, i)) for i in range(len(draft))])


@dataclass
class StepDistribution:
    tv: float  # total variation between the emitted (depth + 1)-token sequences and P's joint
    acceptance_length: float  # expected tokens committed per step (accepted drafts + the correction / bonus)
    accepted_by_depth: list[float]  # probability that the accepted path reaches depth d (d = 1, 2, ...)
    output: dict  # {sequence: probability} of the emitted sequences, extended by P
    reference: dict  # {sequence: probability} under P


def _extend(P: Model, start: tuple, mass: float, length: int, out: dict) -> None:
    if mass == 0.0:
        return
    if len(start) == length:
        out[start] += mass
        return
    for y, py in enumerate(P(start).tolist()):
        if py > 0:
            _extend(P, start + (y,), mass * py, length, out)


def step_distribution(kernel, P: Model, weighted_drafts: list[tuple[Draft, float]], depth: int) -> StepDistribution:
    """The exact distribution one step of `kernel` emits, against P's (module docstring)."""
    emitted: dict = defaultdict(lambda: 0.0)
    length, reach = 0.0, [0.0] * depth
    for draft, w in weighted_drafts:
        p = target_rows(P, draft)
        for cw, v in enumerate_verdicts(kernel, draft, p):
            m = w * cw
            length += m * (len(v.tokens) + 1)
            for d in range(len(v.tokens)):
                reach[d] += m
            if v.next_token is not None:  # greedy: the next token is certain
                emitted[tuple(v.tokens) + (v.next_token,)] += m
            else:
                for y, py in enumerate(v.residual.tolist()):
                    if py > 0:
                        emitted[tuple(v.tokens) + (y,)] += m * py
    out, ref = defaultdict(float), defaultdict(float)
    for seq, m in emitted.items():
        _extend(P, seq, m, depth + 1, out)
    _extend(P, (), 1.0, depth + 1, ref)
    tv = 0.5 * sum(abs(out[s] - ref[s]) for s in set(out) | set(ref))
    return StepDistribution(tv, length, reach, dict(out), dict(ref))
