"""Grouped Speculative Decoding (GSD) acceptance for visual-AR speculative decoding (LOSSY).

So et al. 2025, "Grouped Speculative Decoding for Autoregressive Image Generation" (ICCV 2025): an SJD variant that
accepts a drafted token with the probability of its *group* of interchangeable tokens,

    accept x with min(1, sum_{j in G(x)} r(j) / sum_{j in G(x)} q(j))

where ``r`` is the target row (what is left of it after earlier siblings were rejected, on trees) and G(x) holds x
and every token j with

* rank(j) within ``rank_window`` of rank(x) in ``r`` sorted by decreasing probability (stable: ties by token id),
* ``|r(j) - r(x)| < prob_threshold``, and
* ``||E[j] - E[x]||^2 < embed_threshold`` when ``embeddings`` (V, D) are given (the condition is dropped otherwise).

Defaults are the reference code's (junhyukso/GSD, ``scheduler/jacobi_iteration_lumina_mgpt.py``): window 7,
thresholds 0.15 and 0.5. Differences from it: the window is symmetric, ranks -w..+w (the reference slices
``sort_idx[i - 7 : i + 7]`` of an ascending sort: 7 tokens on one side, 6 on the other; for the 7 least likely tokens
that slice starts at a negative index and comes out empty, a 0/0 ratio that rejects); ranks come from probabilities
(the reference sorts logits — the same order except among tokens the warper zeroed); x is always in its own group
(so thresholds of 0 are allowed and give a singleton).
``embeddings`` are used as passed: pass them in the geometry you want distances in (the reference reads a
precomputed table of image-head embedding distances).

Residual after a rejection (``residual=``): ``"speculative"`` (default, the paper's ``norm(max(0, r - q))``) or
``"deficit"`` (``norm(max(0, r - q*a))``, exact for :mod:`image_ar.acceptance.budget`'s formula; the only one allowed
with ``tv_budget``). A singleton group (``rank_window=0``, or zero thresholds) is speculative sampling exactly.

Budget mode (our addition): the ladder is the rank window, ``0, 1, ..., rank_window`` with the thresholds unchanged;
the largest window whose TV is within the budget is used, mixed with the next window above it as far as the budget
allows (``budget.interpolate``). (TV is not monotone in the window — adding a token with r < q can lower the ratio —
so every rung is priced, in one O(V w) pass.)
"""
from __future__ import annotations

import math

import torch

from mmspec.errors import GenerationConfigError, InvalidInputError
from mmspec.kernels import kernel_rule

from .budget import Relaxation, check_residual, check_tv_budget, deficit_tvs, interpolate, max_feasible, relaxed_walk
from .neighbours import squared_distance

RESIDUALS = ("speculative", "deficit")


def _check_args(rank_window, prob_threshold, embed_threshold, embeddings, what):
    if isinstance(rank_window, bool) or not isinstance(rank_window, int) or rank_window < 0:
        raise GenerationConfigError(f"{what}: rank_window={rank_window!r} must be an int >= 0 (0 = lossless)")
    for name, v in (("prob_threshold", prob_threshold), ("embed_threshold", embed_threshold)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
            raise GenerationConfigError(f"{what}: {name}={v!r} must be a number >= 0 (inf = no condition)")
    if embeddings is not None and (not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2
                                   or not embeddings.is_floating_point()):
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise InvalidInputError(f"{what}: embeddings must be a 2-D float tensor (V, D) or None; got {shape}")


class _GSD(Relaxation):
    def __init__(self, rank_window, prob_threshold, embed_threshold, embeddings, residual, tv_budget, report_tv):
        self.window, self.full = rank_window, rank_window
        self.prob_threshold, self.embed_threshold = float(prob_threshold), float(embed_threshold)
        self.embeddings, self._emb = embeddings, {}
        self.residual, self.tv_budget, self.report_tv = residual, tv_budget, report_tv
        self.name = "gsd"

    def prepare(self, p):
        if self.embeddings is not None and self.embeddings.shape[0] != p.shape[-1]:
            raise InvalidInputError(f"accept_gsd: embeddings cover {self.embeddings.shape[0]} tokens but p has a "
                                    f"vocabulary of {p.shape[-1]}; pass one embedding row per token")

    def _e(self, device):
        if device not in self._emb:
            self._emb[device] = self.embeddings.to(device)
        return self._emb[device]

    def _together(self, r, a, b):
        """bool: tokens a and b (index tensors of one shape) satisfy the probability and embedding conditions."""
        ok = (r[a] - r[b]).abs() < self.prob_threshold
        if self.embeddings is not None:
            ok &= squared_distance(self._e(r.device), a, b) < self.embed_threshold
        return ok

    @staticmethod
    def _accepted(q, group_p, group_q):
        # min(q, q * P_G / Q_G), written as P_G * (q / Q_G) so that a singleton group (q / Q_G = 1) gives min(q, r)
        # bit for bit, i.e. speculative sampling's min(1, r / q).
        safe = torch.where(group_q > 0, group_q, 1.0)
        return torch.where(group_q > 0, torch.minimum(q, group_p * (q / safe)), 0.0)

    def _ladder(self, r, q, windows):
        """(V, W + 1) accepted mass for every window 0..W (column w = window w), in one pass over the offsets."""
        order = torch.sort(r, descending=True, stable=True).indices  # (V,) token at each rank
        ps, qs = r[order], q[order]  # (V,) in rank order
        group_p, group_q = ps.clone(), qs.clone()  # every token is in its own group
        cols = [self._accepted(qs, group_p, group_q)]
        for o in range(1, windows + 1):
            if o < r.shape[0]:
                ok = self._together(r, order[:-o], order[o:])  # (V - o,) pairs (rank i, rank i + o)
                group_p[:-o] += torch.where(ok, ps[o:], 0.0)
                group_q[:-o] += torch.where(ok, qs[o:], 0.0)
                group_p[o:] += torch.where(ok, ps[:-o], 0.0)
                group_q[o:] += torch.where(ok, qs[:-o], 0.0)
            cols.append(self._accepted(qs, group_p, group_q))
        m_sorted = torch.stack(cols, dim=1)  # (V, W + 1) in rank order
        return torch.empty_like(m_sorted).index_copy_(0, order, m_sorted)  # back to token order

    def mass(self, r, q, level):
        return self._ladder(r, q, level)[:, level], None

    def alpha(self, r, q, x):
        order = torch.sort(r, descending=True, stable=True).indices
        i = int((order == x).nonzero())
        span = order[max(0, i - self.window): i + self.window + 1]  # (<= 2w + 1,) the rank window around x
        ok = self._together(r, span, torch.full_like(span, x)) | (span == x)
        group_p, group_q = r[span][ok].sum(), q[span][ok].sum()
        qx = q[x]
        return float(torch.minimum(qx, group_p * (qx / group_q)) / qx), None

    def search(self, r, q, budget):
        m = self._ladder(r, q, self.window)  # (V, W + 1)
        tvs = deficit_tvs(r, m)  # (W + 1,) window 0 is lossless: exactly 0
        w = max_feasible(tvs, budget)  # every wider window is beyond the budget
        if w == self.window:
            return w, m[:, w], None, float(tvs[w])
        theta, mixed, tv = interpolate(r, m[:, w], m[:, w + 1], budget)
        return w + theta, mixed, None, tv


def gsd(*, rank_window: int = 7, prob_threshold: float = 0.15, embed_threshold: float = 0.5,
        embeddings: torch.Tensor | None = None, tv_budget: float | None = None, residual: str | None = None,
        report_tv: bool = False):
    """GSD's grouped acceptance as an engine kernel (LOSSY); see the module docstring for G(x) and the residuals.

    tv_budget: per-position output-TV budget eps >= 0 (our addition): the largest rank window within eps is used.
    report_tv: attach the per-position TV to the verdict (always on with a budget).
    Returns ``accept(draft, p, *, generator=None, coin=None) -> RelaxedVerdict`` with ``lossless = False``.
    """
    _check_args(rank_window, prob_threshold, embed_threshold, embeddings, "gsd")
    budget = check_tv_budget(tv_budget)
    residual = check_residual(residual, RESIDUALS, budget, "gsd")
    rule = _GSD(rank_window, prob_threshold, embed_threshold, embeddings, residual, budget, bool(report_tv))

    @kernel_rule("gsd" + (f"[tv<={budget:g}]" if budget is not None else ""), lossless=False)
    def accept_gsd(draft, p, *, generator=None, coin=None):
        return relaxed_walk(rule, draft, p, generator=generator, coin=coin)

    accept_gsd.rank_window, accept_gsd.prob_threshold, accept_gsd.embed_threshold = \
        rank_window, float(prob_threshold), float(embed_threshold)
    accept_gsd.tv_budget, accept_gsd.residual, accept_gsd.rule = budget, residual, rule
    return accept_gsd


def gsd_acceptance(p: torch.Tensor, q: torch.Tensor, *, rank_window: int = 7, prob_threshold: float = 0.15,
                   embed_threshold: float = 0.5, embeddings: torch.Tensor | None = None) -> torch.Tensor:
    """(V,) a(y) = min(1, sum_G(y) p / sum_G(y) q) for every token y at once (1 where q(y) = 0: never proposed).

    Feed it to :func:`~image_ar.acceptance.budget.output_tv` for the TV of the rule with the deficit residual."""
    _check_args(rank_window, prob_threshold, embed_threshold, embeddings, "gsd_acceptance")
    for name, t in (("p", p), ("q", q)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != p.shape[-1]:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InvalidInputError(f"gsd_acceptance: {name} has shape {shape}; expected one row ({p.shape[-1]},)")
    rule = _GSD(rank_window, prob_threshold, embed_threshold, embeddings, "deficit", None, False)
    rule.prepare(p)
    m, _ = rule.mass(p, q, rank_window)
    return torch.where(q > 0, m / torch.where(q > 0, q, 1.0), 1.0)


def gsd_output_distribution(p: torch.Tensor, q: torch.Tensor, *, rank_window: int = 7, prob_threshold: float = 0.15,
                            embed_threshold: float = 0.5, embeddings: torch.Tensor | None = None,
                            residual: str = "speculative") -> torch.Tensor:
    """(V,) exact distribution of the token a one-token chain emits with GSD and `residual`. O(V w)."""
    if residual not in RESIDUALS:
        raise GenerationConfigError(f"gsd_output_distribution: residual={residual!r}; expected one of {RESIDUALS}")
    gsd_acceptance(p, q, rank_window=rank_window, prob_threshold=prob_threshold, embed_threshold=embed_threshold,
                   embeddings=embeddings)  # checks the arguments
    rule = _GSD(rank_window, prob_threshold, embed_threshold, embeddings, residual, None, False)
    m, _ = rule.mass(p, q, rank_window)
    return rule.decision_output(p, q, m, None).to(p.dtype)
