"""Losses for feature drafters, per position, then averaged with the batch's weights.

* EAGLE (Li et al. 2024, section 4.3): L = SmoothL1(f̂_{t+1}, f_{t+1}) + w_cls * CE(p_{t+2}, p̂_{t+2}), w_cls = 0.1;
  the regression is averaged over the hidden dimension, the classification is a cross-entropy from the target's
  next-token distribution to the head's (logits through the target's frozen LM head). Only the target's top-k is
  stored (`features.Example`), so its distribution is taken as the top-k renormalised (k = 1: the greedy token).
* ViSpec (Kang et al. 2025) adds an L1 distance between the two probability vectors (weight w_prob). With the
  target's top-k known, the other V - k entries are lumped into one bucket on both sides, which gives a lower bound
  of the true L1 that is exact when k = V. ViSpec's top-10 ranking loss and self-feeding are not implemented.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmspec.errors import InvalidInputError

from .features import Batch

LOSSES = ("eagle", "vispec")


def feature_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SmoothL1 per position, averaged over the hidden dimension: (B, L, H) x2 -> (B, L)."""
    return F.smooth_l1_loss(pred.float(), target.float(), reduction="none").mean(-1)


def token_ce(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """-sum_k p_target(k) log p_head(k) over the target's top-k (renormalised): (B, L, V) -> (B, L)."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, topk_ids)  # (B, L, k)
    p = torch.softmax(topk_logprobs, dim=-1)  # (B, L, k)
    return -(p * logp).sum(-1)


def prob_l1(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """L1 between the head's and the target's probabilities, entries outside the target's top-k lumped together."""
    q = torch.softmax(logits.float(), dim=-1).gather(-1, topk_ids)  # (B, L, k) head
    p = topk_logprobs.exp()  # (B, L, k) target
    rest = (q.sum(-1) - p.sum(-1)).abs()  # |(1 - sum q) - (1 - sum p)|
    return (q - p).abs().sum(-1) + rest


def weighted_mean(per_position: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (per_position * weights).sum() / weights.sum().clamp_min(1e-6)


def drafter_loss(features: torch.Tensor, logits: torch.Tensor, batch: Batch, kind: str = "eagle",
                 w_cls: float = 0.1, w_prob: float = 1.0) -> tuple[torch.Tensor, dict]:
    """(scalar loss, {"reg", "cls"[, "prob"]: floats}) for the head's predicted features (B, L, H) and logits."""
    if kind not in LOSSES:
        raise InvalidInputError(f"loss={kind!r}: valid losses are {LOSSES}")
    w = batch.weights
    reg = weighted_mean(feature_loss(features, batch.target_features), w)
    cls = weighted_mean(token_ce(logits, batch.topk_ids, batch.topk_logprobs), w)
    loss = reg + w_cls * cls
    parts = {"reg": reg.item(), "cls": cls.item()}
    if kind == "vispec":
        prob = weighted_mean(prob_l1(logits, batch.topk_ids, batch.topk_logprobs), w)
        loss = loss + w_prob * prob
        parts["prob"] = prob.item()
    return loss, parts


@torch.no_grad()
def agreement(logits: torch.Tensor, batch: Batch) -> tuple[int, int]:
    """(hits, positions): the head's top-1 equals the target's greedy next token, inside the answers (where the
    drafter drafts; all weighted positions if no answer is present). A depth-1 acceptance estimate."""
    where = batch.answer if bool(batch.answer.any()) else batch.weights > 0
    hits = (logits.argmax(-1) == batch.topk_ids[..., 0]) & where
    return int(hits.sum()), int(where.sum())
