"""Exact enumeration of an acceptance kernel's randomness (for tests of lossless and relaxed rules).

Every kernel draws its accept/reject decisions through `coin(prob)`; replaying every sequence of outcomes, each
weighted by its probability, gives the exact distribution of verdicts without sampling."""
from __future__ import annotations

import torch

from ..kernels import Verdict
from ..tree import Draft


class _Branch(Exception):
    def __init__(self, prob):
        self.prob = prob


def enumerate_verdicts(kernel, draft: Draft, p: torch.Tensor) -> list[tuple[float, Verdict]]:
    """[(probability, verdict)] over every sequence of coin outcomes `kernel` can ask for (exact; exponential)."""
    out, stack = [], [()]
    while stack:
        script = stack.pop()
        asked: list[float] = []

        def coin(prob):
            if len(asked) == len(script):
                raise _Branch(prob)
            asked.append(prob)
            return script[len(asked) - 1]

        try:
            verdict = kernel(draft, p, coin=coin)
        except _Branch as b:
            if not 0.0 <= b.prob <= 1.0:
                raise ValueError(f"kernel asked for a coin with probability {b.prob}, outside [0, 1]") from None
            stack += [script + (d,) for d, w in ((True, b.prob), (False, 1.0 - b.prob)) if w > 0]
            continue
        weight = 1.0
        for prob, d in zip(asked, script):
            weight *= prob if d else 1.0 - prob
        out.append((weight, verdict))
    return out
