"""The compressor interface: image-token features in, a shorter sequence of drafter-side tokens out.

A feature-level drafter (EAGLE-style) reads the target's hidden states; the image span of a VLM prompt holds
hundreds of them. A compressor shortens that span so the drafter stays cheap. Every compressor is an
`nn.Module` with the same narrow interface:

    out_tokens(n_in, grid) -> M                      exact for all but `elastic` (which depends on `attention`)
    forward(feats (B, N, D), *, grid=(h, w) | None, attention=(B, N) | None) -> CompressedImage
    config() -> dict                                 JSON-serialisable; `build_compressor(config)` rebuilds it

`grid` is the (rows, cols) layout of the N image tokens in raster order (h * w == N); without it the tokens
are a 1-D sequence, i.e. the grid (1, N). `attention` is a per-token importance the caller took from the
target (e.g. the attention mass the last text token pays to each image token); only the attention-driven
methods use it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmspec.errors import DeviceMismatchError, InvalidInputError


@dataclass
class CompressedImage:
    """What a compressor returns.

    tokens:     (B, M, D) the compressed image tokens, in the dtype/device of the input.
    index:      (B, M) positions in the original N that the tokens are copies of (selection methods), else None.
    global_vec: (B, D) a whole-image summary (ViSpec), else None.
    method:     `type` name of the compressor that made `tokens` (for `elastic`, the chosen one).
    choice:     for `elastic`, the index of the chosen compressor in its list; else None.
    """

    tokens: Tensor
    index: Tensor | None = None
    global_vec: Tensor | None = None
    method: str = ""
    choice: int | None = None


class Compressor(nn.Module):
    """Base class; subclasses set `type` (the registry name) and implement the three methods."""

    type: str = ""
    uses_attention = False  # True: forward reads `attention` (the drafter then asks the target for it)

    def out_tokens(self, n_in: int, grid: tuple[int, int] | None = None) -> int:
        raise NotImplementedError

    def forward(self, feats: Tensor, *, grid: tuple[int, int] | None = None,
                attention: Tensor | None = None) -> CompressedImage:
        raise NotImplementedError

    def config(self) -> dict:
        raise NotImplementedError


# ---- validation shared by the compressors (typed errors naming the value and what is valid) ----

def positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInputError(f"{name}={value!r} is invalid; expected an integer >= {minimum}")
    return value


def fraction(name: str, value) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0.0 < value <= 1.0:
        raise InvalidInputError(f"{name}={value!r} is invalid; expected a number in (0, 1]")
    return float(value)


def ceil_count(ratio: float, n: int) -> int:
    """ceil(ratio * n), at least 1, robust to float noise (ceil(0.3 * 10) must be 3, not 4)."""
    return max(1, math.ceil(round(ratio * n, 9)))


def check_feats(feats: Tensor, dim: int | None = None) -> None:
    if not isinstance(feats, Tensor) or feats.dim() != 3 or feats.shape[0] < 1 or feats.shape[1] < 1:
        shape = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
        raise InvalidInputError(f"feats has shape {shape}; expected a (B, N, D) tensor with B >= 1 and N >= 1")
    if not feats.is_floating_point():
        raise InvalidInputError(f"feats has dtype {feats.dtype}; expected a floating-point tensor")
    if dim is not None and feats.shape[-1] != dim:
        raise InvalidInputError(f"feats has D={feats.shape[-1]}; this compressor was built for dim={dim}")


def resolve_grid(grid, n: int) -> tuple[int, int]:
    """The (h, w) layout of n tokens; None means a 1-D sequence, i.e. (1, n)."""
    if grid is None:
        return 1, n
    ok = isinstance(grid, (tuple, list)) and len(grid) == 2 and all(
        isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)
    if not ok or grid[0] * grid[1] != n:
        raise InvalidInputError(f"grid={grid!r} does not match N={n} image tokens; expected (h, w) with "
                                f"positive integers h * w == {n}, or grid=None for a 1-D sequence")
    return int(grid[0]), int(grid[1])


def check_attention(attention: Tensor | None, feats: Tensor) -> None:
    if attention is None:
        return
    if not isinstance(attention, Tensor) or tuple(attention.shape) != tuple(feats.shape[:2]):
        shape = tuple(attention.shape) if isinstance(attention, Tensor) else type(attention).__name__
        raise InvalidInputError(f"attention has shape {shape}; expected (B, N) = {tuple(feats.shape[:2])}")
    if not torch.isfinite(attention).all():
        raise InvalidInputError("attention has NaN or infinite entries; expected finite scores")


def check_module_matches(module: nn.Module, feats: Tensor) -> None:
    """Learnable compressors compute in their own dtype/device; the caller moves the module, we do not."""
    p = next(module.parameters())
    if p.device != feats.device or p.dtype != feats.dtype:
        raise DeviceMismatchError(f"feats are {feats.dtype} on {feats.device} but {type(module).__name__} "
                                  f"parameters are {p.dtype} on {p.device}; call .to() on the compressor")
