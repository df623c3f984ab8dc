"""Losses for feature drafters, per position, then averaged with the batch's weights.

* EAGLE (Li et al. 2024, section 4.3; `mmspec.eagle_loss`, shared with image_ar's head):
  L = SmoothL1(f̂_{t+1}, f_{t+1}) + w_cls * CE(p_{t+2}, p̂_{t+2}), w_cls = 0.1;
  the regression is averaged over the hidden dimension, the classification is a cross-entropy from the target's
  next-token distribution to the head's (logits through the target's frozen LM head). Only the target's top-k is
  stored (`features.Example`), so its distribution is taken as the top-k renormalised (k = 1: the greedy token).
* ViSpec (Kang et al. 2025) adds an L1 distance between the two probability vectors (weight w_prob) and a ranking
  loss on the target's top tokens (weight w_rank). With the target's top-k known, the other V - k entries of the L1
  are lumped into one bucket on both sides, which gives a lower bound of the true L1 that is exact when k = V. The
  ranking loss is pairwise (RankNet): for every pair i, j of the target's top min(k, 10) tokens with
  p_target(i) > p_target(j), softplus(-(log q(i) - log q(j))), averaged over the pairs: it is small when the head
  orders those tokens as the target does, which is what top-k tree drafting needs. ViSpec's self-feeding is the
  trainer's `unroll` (the head reads its own predicted features).
* DREAM (Hu et al. 2025) adds w_mid * SmoothL1(cross-attention output, the target's entropy-selected intermediate
  feature) (`features.target_pass`); its w1 on the last-feature regression is w_reg.
"""
from __future__ import annotations

import torch

from mmspec.eagle_loss import eagle_loss, feature_loss, token_ce, weighted_mean  # noqa: F401 (re-exported)
from mmspec.errors import InvalidInputError

from .features import Batch

LOSSES = ("eagle", "vispec", "dream")
RANK_TOP = 10


def prob_l1(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """L1 between the head's and the target's probabilities, entries outside the target's top-k lumped together."""
    q = torch.softmax(logits.float(), dim=-1).gather(-1, topk_ids)  # (B, L, k) head
    p = topk_logprobs.exp()  # (B, L, k) target
    rest = (q.sum(-1) - p.sum(-1)).abs()  # |(1 - sum q) - (1 - sum p)|
    return (q - p).abs().sum(-1) + rest


def rank_loss(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """Pairwise ranking of the target's top min(k, 10) tokens under the head: (B, L, V) -> (B, L)."""
    k = min(RANK_TOP, topk_ids.shape[-1])
    s = torch.log_softmax(logits.float(), dim=-1).gather(-1, topk_ids[..., :k])  # (B, L, k) head scores
    t = topk_logprobs[..., :k]
    above = t.unsqueeze(-1) > t.unsqueeze(-2)  # (B, L, k, k): i ranks above j for the target
    pair = torch.nn.functional.softplus(-(s.unsqueeze(-1) - s.unsqueeze(-2)))  # (B, L, k, k)
    return (pair * above).sum((-1, -2)) / above.sum((-1, -2)).clamp_min(1)


def drafter_loss(features: torch.Tensor, logits: torch.Tensor, batch: Batch, kind: str = "eagle",
                 w_cls: float = 0.1, w_prob: float = 1.0, *, w_reg: float = 1.0, w_rank: float = 0.1,
                 w_mid: float = 0.1, cross_hidden: torch.Tensor | None = None,
                 weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """(scalar loss, {"reg", "cls"[, "prob", "rank"][, "mid"]: floats}) for the head's predicted features (B, L, H)
    and logits. kind "dream" needs the head's cross_hidden and the batch's mid_features. weights: per-position
    weights replacing the batch's (the trainer's unrolled steps)."""
    if kind not in LOSSES:
        raise InvalidInputError(f"loss={kind!r}: valid losses are {LOSSES}")
    if kind == "dream" and (cross_hidden is None or batch.mid_features is None):
        raise InvalidInputError("loss='dream' needs a DreamHead (cross-attention output) and examples with "
                                "mid_features (make_example(..., mid_features=True))")
    w = batch.weights if weights is None else weights
    loss, reg, cls = eagle_loss(features, batch.target_features, logits, batch.topk_ids, batch.topk_logprobs,
                                w_cls=w_cls, w_reg=w_reg, weights=w)
    parts = {"reg": reg.item(), "cls": cls.item()}
    if kind == "vispec":
        prob = weighted_mean(prob_l1(logits, batch.topk_ids, batch.topk_logprobs), w)
        rank = weighted_mean(rank_loss(logits, batch.topk_ids, batch.topk_logprobs), w)
        loss = loss + w_prob * prob + w_rank * rank
        parts.update(prob=prob.item(), rank=rank.item())
    if kind == "dream":
        mid = weighted_mean(feature_loss(cross_hidden, batch.mid_features), w)
        loss = loss + w_mid * mid
        parts["mid"] = mid.item()
    return loss, parts


@torch.no_grad()
def agreement(logits: torch.Tensor, batch: Batch) -> tuple[int, int]:
    """(hits, positions): the head's top-1 equals the target's greedy next token, inside the answers (where the
    drafter drafts; all weighted positions if no answer is present). A depth-1 acceptance estimate."""
    where = batch.answer if bool(batch.answer.any()) else batch.weights > 0
    hits = (logits.argmax(-1) == batch.topk_ids[..., 0]) & where
    return int(hits.sum()), int(where.sum())
