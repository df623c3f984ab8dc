"""Classifier-free guidance rows, in one place (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"; LlamaGen's
and MAR's samplers).

A guided request runs as two rows of one batch: rows [0, B) carry the condition, rows [B, 2B) the null condition,
in the same order ([cond; uncond]). Targets, drafters and trainers that guide use these helpers to double their rows,
to address both halves of a request, and to fold the halves back into one row: logits as ``u + s (c - u)``, features
side by side as (B, ..., 2D) = [cond | uncond]. A scale of 1 means no guidance: one row per request and every helper
is the identity.
"""
from __future__ import annotations

from typing import Sequence

import torch


def is_guided(scale: float) -> bool:
    return scale != 1.0


def double_rows(x: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, ...) -> (2B, ...) = [x; x] when guided: the same inputs for the cond and the uncond half."""
    return torch.cat([x, x]) if is_guided(scale) else x


def both_halves(rows: Sequence[int], batch: int, scale: float) -> list[int]:
    """Row indices of requests `rows` (of `batch` requests) in the doubled batch: their cond and their uncond rows."""
    rows = list(rows)
    return rows + [batch + r for r in rows] if is_guided(scale) else rows


def per_row(values: list, scale: float) -> list:
    """A per-request list (one entry per request) extended to the doubled batch: each half gets the same entries."""
    return values + values if is_guided(scale) else values


def combine_logits(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Guided logits from a [cond; uncond] batch (2B, ...): u + scale * (c - u), (B, ...)."""
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + scale * (cond - uncond)


def pair_halves(x: torch.Tensor, scale: float) -> torch.Tensor:
    """(2B, ..., D) [cond; uncond] -> (B, ..., 2D) [cond | uncond] when guided, so a request's features travel as one
    row; unguided batches are returned as they are."""
    return torch.cat(x.chunk(2), dim=-1) if is_guided(scale) else x


def split_halves(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The inverse of pair_halves: (B, ..., 2D) -> (2B, ..., D) when guided."""
    return torch.cat(x.chunk(2, dim=-1)) if is_guided(scale) else x
