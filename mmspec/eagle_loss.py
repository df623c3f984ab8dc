"""EAGLE's training loss, shared by every feature drafter (vision's EAGLE / EAGLE-3 / DREAM / ViSpec heads and
image_ar's LlamaGen head).

Li et al. 2024, "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty", section 4.3:
L = w_reg * SmoothL1(f̂_{t+1}, f_{t+1}) + w_cls * CE(p_{t+2}, p̂_{t+2}), w_cls = 0.1. The regression is averaged over
the hidden dimension; the classification is a cross-entropy from the target's next-token distribution to the
head's. The target's distribution is given by its top-k ids and log-probabilities (renormalised over the k; k = V is
the whole distribution, k = 1 the greedy token). Per-position terms are averaged with per-position weights.
`noise` (the one name for EAGLE's feature noise) is added by the callers to the head's input features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def feature_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SmoothL1 per position, averaged over the hidden dimension: (..., L, H) x2 -> (..., L)."""
    return F.smooth_l1_loss(pred.float(), target.float(), reduction="none").mean(-1)


def token_ce(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """-sum_k p_target(k) log p_head(k) over the target's top-k (renormalised): (..., V) -> (...). A head with a
    reduced draft vocabulary (-inf logits outside it, EAGLE-3) learns the target's distribution restricted to its
    vocabulary and renormalised; a position whose top-k lies wholly outside contributes 0."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, topk_ids)  # (..., k)
    lp = topk_logprobs.float()
    outside = torch.isneginf(logp)
    if bool(outside.any()):
        lp, logp = lp.masked_fill(outside, float("-inf")), logp.masked_fill(outside, 0.0)
        p = torch.softmax(lp, dim=-1).nan_to_num(0.0)  # every entry outside: all -inf -> nan -> 0
    else:
        p = torch.softmax(lp, dim=-1)  # (..., k)
    return -(p * logp).sum(-1)


def weighted_mean(per_position: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of per-position values with per-position weights (None: uniform)."""
    if weights is None:
        return per_position.mean()
    return (per_position * weights).sum() / weights.sum().clamp_min(1e-6)


def eagle_loss(features: torch.Tensor, target_features: torch.Tensor, logits: torch.Tensor,
               topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, *, w_cls: float = 0.1, w_reg: float = 1.0,
               weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, reg, cls): the head's predicted features (..., L, H) against the target's, and its logits (..., L, V)
    against the target's top-k distribution (..., L, k); weights (..., L) or None."""
    reg = weighted_mean(feature_loss(features, target_features), weights)
    cls = weighted_mean(token_ce(logits, topk_ids, topk_logprobs), weights)
    return w_reg * reg + w_cls * cls, reg, cls


def full_distribution(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole target distribution (..., V) as the (topk_ids, topk_logprobs) that `eagle_loss` reads (k = V)."""
    ids = torch.arange(p.shape[-1], device=p.device).expand(p.shape)
    return ids, p.float().clamp_min(1e-30).log()
