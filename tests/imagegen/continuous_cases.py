"""Tiny continuous-token models for the CSpD tests: a random ContinuousAR target and perturbed copies as drafters,
plus an energy-distance two-sample test."""
import copy

import torch

from image_ar.models.continuous_ar import ContinuousAR, ContinuousARConfig


def tiny_config(**kw) -> ContinuousARConfig:
    base = dict(token_dim=2, grid_size=2, dim=32, n_layer=2, n_head=2, num_classes=3, head_width=32, head_depth=2,
                train_steps=100, sampling_steps=4, noise_schedule="linear")
    base.update(kw)
    return ContinuousARConfig(**base)


def tiny_continuous(seed: int = 0, head_scale: float = 0.05, **kw) -> ContinuousAR:
    """Random weights everywhere (the head's AdaLN-Zero init would output zeros: give it random weights too)."""
    torch.manual_seed(seed)
    model = ContinuousAR(tiny_config(**kw)).eval()
    with torch.no_grad():
        for p in model.diffloss.parameters():
            p.normal_(0, head_scale)
    return model


def perturbed(model: ContinuousAR, sigma: float, seed: int = 1) -> ContinuousAR:
    """A copy whose every weight moves by N(0, sigma^2): a drafter close to the target."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(sigma * torch.randn(p.shape, generator=g))
    return out


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
