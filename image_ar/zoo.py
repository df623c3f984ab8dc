"""The image zoo: small class-conditional LlamaGens trained here, offline, on procedurally generated token grids.

Random tiny models say nothing about acceptance: their next-token distributions are arbitrary, so no drafter agrees
with them. These models are trained (a minute on a laptop CPU) on "pattern" grids, the visual-AR analogue of a
structured image dataset: class c has its own palette of codes and a layout family (horizontal / vertical stripes,
checkerboards, diagonals) with random period and phase, plus a little code noise. A trained target is confident
where the pattern is determined and uncertain where it is not (the first rows pick the period and phase), as real
image models are; drafters and relaxed rules then behave measurably (see `mmspec bench image`).

`zoo_llamagen("target")` / `zoo_llamagen("draft")` train on first use and cache under ``$MMSPEC_ZOO`` (default
``~/.cache/mmspec/zoo``) as ``save_pretrained`` directories; `zoo_vq()` is a random tiny VQ decoder for the codes
(images show the layout, not photographs); `zoo_head()` trains an ImageHead for the zoo target.

Continuous tokens (MAR-style, CSpD): `pattern_latents` turns the same grids into 4-channel "latents" (each code a
fixed random vector, plus Gaussian noise, so every token has a continuous distribution around the pattern's
cluster); `zoo_continuous("target" | "draft")` are ContinuousARs trained on them and `zoo_kl_vae()` a random tiny
AutoencoderKL that decodes them.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from mmspec.errors import InvalidInputError

from .models.continuous_ar import ContinuousAR, ContinuousARConfig
from .models.llamagen import LlamaGen, LlamaGenConfig

GRID, VOCAB, CLASSES = 8, 128, 10
RECIPES = {
    "target": dict(dim=128, n_layer=4, n_head=4, steps=700, lr=3e-3),
    "draft": dict(dim=64, n_layer=1, n_head=2, steps=500, lr=3e-3),
}


TOKEN_DIM = 4
CONTINUOUS_RECIPES = {
    "target": dict(dim=128, n_layer=4, n_head=4, head_width=128, head_depth=3, steps=1500, lr=2e-3),
    "draft": dict(dim=64, n_layer=1, n_head=2, head_width=64, head_depth=2, steps=1000, lr=2e-3),
}


def zoo_dir() -> Path:
    return Path(os.environ.get("MMSPEC_ZOO", Path.home() / ".cache" / "mmspec" / "zoo"))


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


def train_llamagen(config: LlamaGenConfig, steps: int, lr: float, batch_size: int = 32, seed: int = 0,
                   progress: bool = True) -> LlamaGen:
    """Teacher-forced next-code cross-entropy on fresh pattern grids every step, with class dropout (CFG)."""
    def batch_loss(model, g):
        labels = torch.randint(0, config.num_classes, (batch_size,), generator=g)
        codes = pattern_grids(labels, g, config.grid_size, config.vocab_size)
        drop = model.sample_cond_drop(batch_size, g)
        logits = model(codes[:, :-1], labels, cond_drop=drop).logits  # (B, N, V): prefix predicts the first code
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))

    torch.manual_seed(seed)
    return fit(LlamaGen(config), batch_loss, steps, lr, seed,
               f"zoo: training LlamaGen dim {config.dim} x {config.n_layer}", progress)


def _recipe(name: str) -> dict:
    if name not in RECIPES:
        raise InvalidInputError(f"zoo model {name!r}: expected one of {sorted(RECIPES)}")
    return dict(RECIPES[name], grid=GRID, vocab=VOCAB, classes=CLASSES, data="patterns-v1")


def zoo_llamagen(name: str = "target", progress: bool = True) -> LlamaGen:
    """A trained zoo LlamaGen ("target" or "draft"), from the cache or trained now (deterministic)."""
    recipe = _recipe(name)
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    path = zoo_dir() / f"llamagen-{name}-{digest}"
    if (path / "model.safetensors").is_file():
        return LlamaGen.from_pretrained(path)
    cfg = LlamaGenConfig(vocab_size=VOCAB, dim=recipe["dim"], n_layer=recipe["n_layer"], n_head=recipe["n_head"],
                         multiple_of=32, grid_size=GRID, num_classes=CLASSES, class_dropout_prob=0.1)
    model = train_llamagen(cfg, recipe["steps"], recipe["lr"], progress=progress)
    model.save_pretrained(path)
    return model


def zoo_head(target: LlamaGen, steps: int = 400, progress: bool = True):
    """An ImageHead trained on the zoo target's own samples (cached next to it)."""
    from .drafters.head import ImageHead
    from .train import train_head

    path = zoo_dir() / f"head-{steps}-{_fingerprint(target)}"
    if (path / "model.safetensors").is_file():
        return ImageHead.from_pretrained(path, target)
    head = ImageHead(target)
    train_head(target, head, samples=512, steps=steps, lr=3e-3, batch_size=32, guidance_scale=4.0, ce_weight=0.3,
               progress=progress)
    head.save_pretrained(path)
    return head


def zoo_vq():
    """A random tiny VQ decoder with the zoo's codebook size (8x8 codes -> 16x16 images)."""
    from .testing.tiny import tiny_vq

    return tiny_vq(codebook_size=VOCAB, image_size=2 * GRID)


def _fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().sum().item().hex().encode())
    return h.hexdigest()[:12]


# --- continuous tokens ----------------------------------------------------------------------------------------------
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


def continuous_config(name: str, **overrides) -> ContinuousARConfig:
    if name not in CONTINUOUS_RECIPES:
        raise InvalidInputError(f"zoo model {name!r}: expected one of {sorted(CONTINUOUS_RECIPES)}")
    r = CONTINUOUS_RECIPES[name]
    kw = dict(token_dim=TOKEN_DIM, grid_size=GRID, dim=r["dim"], n_layer=r["n_layer"], n_head=r["n_head"],
              num_classes=CLASSES, head_width=r["head_width"], head_depth=r["head_depth"], train_steps=1000,
              sampling_steps=25, noise_schedule="linear")
    kw.update(overrides)
    return ContinuousARConfig(**kw)


def zoo_continuous(name: str = "target", progress: bool = True) -> ContinuousAR:
    """A trained zoo ContinuousAR ("target" or "draft"), from the cache or trained now (deterministic)."""
    cfg = continuous_config(name)
    recipe = dict(CONTINUOUS_RECIPES[name], **vars(cfg), data="pattern-latents-v1")
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    path = zoo_dir() / f"continuous-{name}-{digest}"
    if (path / "model.safetensors").is_file():
        return ContinuousAR.from_pretrained(path)
    model = train_continuous(cfg, CONTINUOUS_RECIPES[name]["steps"], CONTINUOUS_RECIPES[name]["lr"],
                             progress=progress)
    model.save_pretrained(path)
    return model


def zoo_kl_vae():
    """A random tiny AutoencoderKL with the zoo's token channels (8x8 latents -> 16x16 images)."""
    from .models.kl_vae import tiny_kl_vae

    return tiny_kl_vae(latent_channels=TOKEN_DIM)
