"""The zoo's image set: ten visually distinct classes of small RGB images, rendered procedurally and deterministically.

No machine this project runs on can download a dataset, so the zoo's image models (`image_ar.zoo`) are trained on
images drawn here: a red disc on white, blue horizontal stripes, a green triangle, a checkerboard, a yellow sun with
rays, a purple square, a landscape (sky over ground), an orange ring, diagonal stripes and a white cross. Each image
jitters its class's position, size, period, phase and colours, so a class is a distribution of images, not one
picture (as in a real dataset, the first tokens of an image decide where things are and later tokens follow).

    images, labels = dataset(1000, seed=0)        # (1000, 3, 32, 32) in [-1, 1], (1000,) balanced labels
    images = render(labels, torch.Generator().manual_seed(1))

Rendering is torch only (no PIL), vectorised over the batch, 2x supersampled then averaged (anti-aliased edges).
Every random number comes from the passed generator, drawn as one (B, PARAMS) uniform block before any class is
rendered, so an image depends on its row's draws and class only: the same seed gives the same images on any
machine, and batching does not change them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmspec.errors import InvalidInputError

CLASS_NAMES = ("red disc", "blue horizontal stripes", "green triangle", "checkerboard", "yellow sun with rays",
               "purple square", "landscape", "orange ring", "diagonal stripes", "white cross")
NUM_CLASSES = len(CLASS_NAMES)
PARAMS = 10  # uniform draws per image
SUPERSAMPLE = 2
BG_JITTER, FG_JITTER = 0.03, 0.1  # colour jitter of backgrounds and of the objects


def _c(*rgb) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32)


def _colour(base: torch.Tensor, u: torch.Tensor, amount: float) -> torch.Tensor:
    """base (3,) jittered by a per-image brightness/hue shift from u (B, 2) in [0, 1) -> (B, 3, 1, 1) in [0, 1]."""
    shift = (u[:, :1] - 0.5) * 2 * amount  # (B, 1): brightness
    tint = (u[:, 1:2] - 0.5) * 2 * amount * torch.tensor([1.0, -0.5, -0.5])  # (B, 3): a warm/cool tint
    return (base + shift + tint).clamp(0, 1)[:, :, None, None]


def _paint(bg: torch.Tensor, fg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Blend fg (B, 3, 1, 1) over bg (B, 3, 1, 1) or (B, 3, H, W) where mask (B, H, W) is true."""
    m = mask[:, None].float()
    return bg * (1 - m) + fg * m


def _grid(b: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel centres y, x (B, H, W) in [0, 1)."""
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    return c.view(1, size, 1).expand(b, size, size), c.view(1, 1, size).expand(b, size, size)


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1)


def _disc(u, y, x):
    cy, cx, r = _col(0.3 + 0.4 * u[:, 2]), _col(0.3 + 0.4 * u[:, 3]), _col(0.15 + 0.15 * u[:, 4])
    return _paint(_colour(_c(1, 1, 1), u[:, 5:7], BG_JITTER), _colour(_c(0.85, 0.1, 0.1), u[:, 7:9], FG_JITTER),
                  (y - cy) ** 2 + (x - cx) ** 2 < r ** 2)


def _hstripes(u, y, x):
    period, phase = _col(0.15 + 0.2 * u[:, 2]), _col(u[:, 3])
    return _paint(_colour(_c(0.95, 0.95, 0.95), u[:, 5:7], BG_JITTER), _colour(_c(0.1, 0.2, 0.85), u[:, 7:9], FG_JITTER),
                  torch.frac(y / period + phase) < 0.5)


def _triangle(u, y, x):
    cx, base, h = _col(0.3 + 0.4 * u[:, 2]), _col(0.82 - 0.1 * u[:, 3]), _col(0.35 + 0.35 * u[:, 4])
    top = base - h
    half = (y - top) / h * 0.55 * h  # the half-width grows linearly from the apex
    return _paint(_colour(_c(1, 1, 1), u[:, 5:7], BG_JITTER), _colour(_c(0.1, 0.7, 0.2), u[:, 7:9], FG_JITTER),
                  (y >= top) & (y <= base) & ((x - cx).abs() <= half))


def _checker(u, y, x):
    cell, oy, ox = _col(0.125 + 0.125 * u[:, 2]), _col(u[:, 3]), _col(u[:, 4])
    parity = (torch.floor(y / cell + oy) + torch.floor(x / cell + ox)) % 2 == 0
    return _paint(_colour(_c(0.1, 0.1, 0.1), u[:, 5:7], BG_JITTER), _colour(_c(0.95, 0.95, 0.9), u[:, 7:9], FG_JITTER), parity)


def _sun(u, y, x):
    cy, cx, r = _col(0.3 + 0.4 * u[:, 2]), _col(0.3 + 0.4 * u[:, 3]), _col(0.12 + 0.06 * u[:, 4])
    d = ((y - cy) ** 2 + (x - cx) ** 2).sqrt()
    angle = torch.atan2(y - cy, x - cx) + _col(u[:, 9]) * math.pi
    rays = (d < 2.2 * r) & (torch.cos(8 * angle) > 0.5)
    sky = _colour(_c(0.45, 0.7, 0.95), u[:, 5:7], BG_JITTER)
    return _paint(sky, _colour(_c(1.0, 0.85, 0.1), u[:, 7:9], FG_JITTER), (d < r) | rays)


def _square(u, y, x):
    cy, cx, half = _col(0.3 + 0.4 * u[:, 2]), _col(0.3 + 0.4 * u[:, 3]), _col(0.12 + 0.15 * u[:, 4])
    return _paint(_colour(_c(0.75, 0.75, 0.75), u[:, 5:7], BG_JITTER), _colour(_c(0.55, 0.15, 0.7), u[:, 7:9], FG_JITTER),
                  ((y - cy).abs() < half) & ((x - cx).abs() < half))


def _landscape(u, y, x):
    horizon = _col(0.45 + 0.3 * u[:, 2]) + _col(0.08 * (u[:, 3] - 0.5)) * torch.sin(2 * math.pi * (x + _col(u[:, 4])))
    sky = _colour(_c(0.35, 0.55, 0.95), u[:, 5:7], BG_JITTER) * (0.75 + 0.25 * y[:, None])  # lighter towards the horizon
    return _paint(sky, _colour(_c(0.2, 0.6, 0.15), u[:, 7:9], FG_JITTER), y > horizon)


def _ring(u, y, x):
    cy, cx, r = _col(0.35 + 0.3 * u[:, 2]), _col(0.35 + 0.3 * u[:, 3]), _col(0.18 + 0.12 * u[:, 4])
    d = ((y - cy) ** 2 + (x - cx) ** 2).sqrt()
    return _paint(_colour(_c(0.08, 0.1, 0.3), u[:, 5:7], BG_JITTER), _colour(_c(1.0, 0.55, 0.1), u[:, 7:9], FG_JITTER),
                  (d < r) & (d > 0.55 * r))


def _diagonal(u, y, x):
    period, phase = _col(0.2 + 0.2 * u[:, 2]), _col(u[:, 3])
    sign = torch.where(_col(u[:, 4]) < 0.5, 1.0, -1.0)  # either diagonal
    return _paint(_colour(_c(0.95, 0.9, 0.6), u[:, 5:7], BG_JITTER), _colour(_c(0.6, 0.1, 0.3), u[:, 7:9], FG_JITTER),
                  torch.frac((y + sign * x) / period + phase) < 0.5)


def _cross(u, y, x):
    cy, cx, arm, width = (_col(0.35 + 0.3 * u[:, 2]), _col(0.35 + 0.3 * u[:, 3]), _col(0.18 + 0.12 * u[:, 4]),
                          _col(0.06 + 0.05 * u[:, 9]))
    dy, dx = (y - cy).abs(), (x - cx).abs()
    return _paint(_colour(_c(0.85, 0.1, 0.15), u[:, 5:7], BG_JITTER), _colour(_c(1, 1, 1), u[:, 7:9], FG_JITTER),
                  ((dy < width) & (dx < arm)) | ((dx < width) & (dy < arm)))


PAINTERS = (_disc, _hstripes, _triangle, _checker, _sun, _square, _landscape, _ring, _diagonal, _cross)


def check_labels(labels) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise InvalidInputError(f"labels must be a 1-D integer tensor; got {labels.dtype} {tuple(labels.shape)}")
    bad = (labels < 0) | (labels >= NUM_CLASSES)
    if bool(bad.any()):
        raise InvalidInputError(f"label(s) {labels[bad].tolist()[:8]} out of range: the image set has classes "
                                f"0..{NUM_CLASSES - 1} ({', '.join(CLASS_NAMES)})")
    return labels.long()


def render(labels, generator: torch.Generator, size: int = 32) -> torch.Tensor:
    """Images (B, 3, size, size) in [-1, 1] for class labels (B,); every random draw from `generator`."""
    labels = check_labels(labels)
    if isinstance(size, bool) or not isinstance(size, int) or size < 4:
        raise InvalidInputError(f"size={size!r}: must be an int >= 4")
    u = torch.rand(len(labels), PARAMS, generator=generator)  # (B, PARAMS): all draws first (batching-invariant)
    s = size * SUPERSAMPLE
    out = torch.zeros(len(labels), 3, s, s)
    for c, paint in enumerate(PAINTERS):
        rows = (labels == c).nonzero().view(-1)
        if len(rows):
            y, x = _grid(len(rows), s)
            out[rows] = paint(u[rows], y, x).expand(len(rows), 3, s, s)
    return F.avg_pool2d(out, SUPERSAMPLE) * 2 - 1


def balanced_labels(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,) labels, every class n / NUM_CLASSES times (+1 for the first n % NUM_CLASSES), shuffled with generator."""
    labels = torch.arange(n) % NUM_CLASSES
    return labels if generator is None else labels[torch.randperm(n, generator=generator)]


def dataset(n: int, seed: int = 0, size: int = 32, batch: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (n, 3, size, size) in [-1, 1] with their balanced, shuffled labels (n,); deterministic in seed."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidInputError(f"n={n!r}: must be an int >= 1")
    g = torch.Generator().manual_seed(seed)
    labels = balanced_labels(n, g)
    return torch.cat([render(labels[i:i + batch], g, size) for i in range(0, n, batch)]), labels
