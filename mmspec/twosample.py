"""A two-sample test for continuous outputs: the energy distance with a permutation p-value.

Székely & Rizzo (2013), "Energy statistics: A class of statistics based on distances", eq. (2):
E(X, Y) = 2 E|X - Y| - E|X - X'| - E|Y - Y'|, zero iff the two distributions are equal. The p-value is the share of
random relabellings of the pooled samples whose statistic is at least the observed one (a fixed permutation seed,
so a notebook or test reads the same number every run).

    stat, p = energy_test(cspd_tokens, target_only_tokens)      # rows are samples (any trailing shape)
"""
from __future__ import annotations

import torch


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """The energy distance between two samples (rows), float64."""
    x, y = x.reshape(len(x), -1).double(), y.reshape(len(y), -1).double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def energy_test(x: torch.Tensor, y: torch.Tensor, permutations: int = 200, seed: int = 0) -> tuple[float, float]:
    """(statistic, permutation p-value) of H0: x and y come from one distribution."""
    x, y = x.reshape(len(x), -1).double(), y.reshape(len(y), -1).double()
    pooled, n = torch.cat([x, y]), len(x)
    d = torch.cdist(pooled, pooled)  # (N, N), computed once
    g = torch.Generator().manual_seed(seed)

    def stat(idx):
        a, b = idx[:n], idx[n:]
        return float(2 * d[a][:, b].mean() - d[a][:, a].mean() - d[b][:, b].mean())

    observed = stat(torch.arange(len(pooled)))
    hits = sum(stat(torch.randperm(len(pooled), generator=g)) >= observed for _ in range(permutations))
    return observed, (1 + hits) / (1 + permutations)
