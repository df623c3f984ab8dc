"""An energy-distance two-sample test for the CSpD tests (the tiny models are image_ar.testing's)."""
import torch


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo), rows are samples."""
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def energy_test(x: torch.Tensor, y: torch.Tensor, permutations: int = 200, seed: int = 0) -> tuple[float, float]:
    """(statistic, permutation p-value) with a fixed permutation seed."""
    x, y = x.reshape(len(x), -1).double(), y.reshape(len(y), -1).double()
    pooled, n = torch.cat([x, y]), len(x)
    d = torch.cdist(pooled, pooled)
    g = torch.Generator().manual_seed(seed)

    def stat(idx):
        a, b = idx[:n], idx[n:]
        return float(2 * d[a][:, b].mean() - d[a][:, a].mean() - d[b][:, b].mean())

    observed = stat(torch.arange(len(pooled)))
    hits = sum(stat(torch.randperm(len(pooled), generator=g)) >= observed for _ in range(permutations))
    return observed, (1 + hits) / (1 + permutations)
