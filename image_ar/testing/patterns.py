"""Procedural token data for tests: "pattern" code grids and continuous "pattern latents", and a training loop.

Class c has its own palette of codes and a layout family (horizontal / vertical stripes, checkerboards, diagonals)
with random period and phase, plus a little code noise; `pattern_latents` turns the grids into continuous tokens (each
code a fixed random vector plus Gaussian noise). Tests train tiny models on them in seconds where a model must be
trained, not random (e.g. CSpD's two-sample test). The zoo (`image_ar.zoo`) trains on real images instead.
"""
from __future__ import annotations

import torch

from ..models.continuous_ar import ContinuousAR, ContinuousARConfig

GRID, VOCAB, TOKEN_DIM = 8, 128, 4


def pattern_grids(labels: torch.Tensor, generator: torch.Generator, grid: int = GRID, vocab: int = VOCAB,
                  noise: float = 0.03) -> torch.Tensor:
    """(B,) class labels -> (B, grid * grid) code grids in raster order (see the module docstring)."""
    b = len(labels)
    rows = torch.arange(grid).view(1, grid, 1)
    cols = torch.arange(grid).view(1, 1, grid)
    period = torch.randint(2, 5, (b, 1, 1), generator=generator)
    phase = torch.randint(0, 4, (b, 1, 1), generator=generator)
    layout = (labels % 4).view(b, 1, 1)
    index = torch.where(layout == 0, rows, torch.where(layout == 1, cols, torch.where(layout == 2, rows + cols,
                                                                                     rows - cols + grid)))
    index = ((index + phase) // period) % 4  # (B, grid, grid) palette slot
    palette = (labels.view(b, 1, 1) * 11 + torch.tensor([0, 3, 7, 9]).view(1, 4, 1)) % vocab  # (B, 4, 1)
    codes = palette.squeeze(-1).gather(1, index.view(b, -1))  # (B, grid * grid)
    flip = torch.rand(codes.shape, generator=generator) < noise
    return torch.where(flip, (codes + 1) % vocab, codes)


def fit(model: torch.nn.Module, batch_loss, steps: int, lr: float, seed: int, desc: str,
        progress: bool = True) -> torch.nn.Module:
    """AdamW with a one-cycle schedule and gradient clipping; batch_loss(model, generator) -> loss of a fresh batch."""
    from tqdm.auto import tqdm

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for _ in bar:
        loss = batch_loss(model, g)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def pattern_latents(labels: torch.Tensor, generator: torch.Generator, grid: int = GRID, token_dim: int = TOKEN_DIM,
                    noise: float = 0.1) -> torch.Tensor:
    """(B,) labels -> (B, grid * grid, token_dim) continuous tokens: each pattern code's fixed random vector (a
    table seeded independently of `generator`) plus N(0, noise^2) per channel."""
    codes = pattern_grids(labels, generator, grid, VOCAB)
    table = torch.randn(VOCAB, token_dim, generator=torch.Generator().manual_seed(1234))
    return table[codes] + noise * torch.randn(*codes.shape, token_dim, generator=generator)


def train_continuous(config: ContinuousARConfig, steps: int, lr: float, batch_size: int = 32, seed: int = 0,
                     progress: bool = True) -> ContinuousAR:
    """Teacher-forced diffusion loss on fresh pattern latents every step, with class dropout (CFG)."""
    def batch_loss(model, g):
        labels = torch.randint(0, config.num_classes, (batch_size,), generator=g)
        return model.training_loss(pattern_latents(labels, g, config.grid_size, config.token_dim), labels, g)

    torch.manual_seed(seed)
    return fit(ContinuousAR(config), batch_loss, steps, lr, seed,
               f"zoo: training ContinuousAR dim {config.dim} x {config.n_layer}", progress)
