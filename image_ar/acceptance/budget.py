"""How far a relaxed acceptance rule moves the output distribution, and a mode that keeps it within a budget.

Neither LANTERN nor GSD bounds the drift of what is generated: their parameters bound the mass moved *per candidate*
(ALGORITHMS.md §5, "Caveat"). This module measures the drift exactly and, as our addition (none of the papers has it),
enforces a per-position budget.

**Measurement.** For one position with target row ``p`` (V,), proposal ``q`` (V,) and acceptance probabilities
``a`` (V,) of any rule, let the residual be the normalised deficit ``r = norm(max(0, p - q*a))``. The emitted token
is then distributed as ``out = q*a + (1 - sum(q*a)) * r`` and, exactly,

    TV(out, p) = sum_y max(0, q(y) a(y) - p(y))                                                    (O(V))

(on tokens where q*a >= p, out - p = q*a - p >= 0; everywhere else out <= p). Also ``sum(q*a) <= sum min(p, q) + TV``:
no rule accepts more than ``sum min(p, q) + eps`` within a budget eps. Rules that keep their own residual (LANTERN's
neighbour zeroing, GSD's ``norm(max(0, p - q))``) do not satisfy the formula; their kernels compute the exact
one-position output distribution of what they do instead (``decision_output``).

**Budget mode.** Given eps (``tv_budget``) the rule picks, per position and before looking at the drafted token, the
largest relaxation on its ladder whose TV (formula above) is <= eps, accepts with it and rejects to the deficit
residual, which makes the formula exact. Rungs are discrete (a neighbour or a group member joins whole), so between
the last rung within eps and the next one the rule accepts with the mixed probability ``(1 - theta) a_j + theta
a_{j+1}`` for the largest theta within eps (:func:`interpolate`): the budget is used, not just respected. The lossless
rung (delta = 0, lambda = 1, a singleton group) has TV exactly 0, so the search always succeeds and eps = 0 is
exactly speculative sampling. With several siblings at one node, sibling s gets the budget ``b_s`` and passes
``b_{s+1} = (b_s - t_s) / (1 - beta_s)`` on (``t_s`` its TV, ``beta_s`` its acceptance probability): the position's
output is ``m_s + (1 - beta_s) * out_{s+1}`` and ``t_s + (1 - beta_s) b_{s+1} = b_s``, so every position stays within
eps whatever the siblings are (iid or without replacement). The first sibling may spend the whole budget (greedy).

**Reporting.** Relaxed kernels return a :class:`RelaxedVerdict` whose ``tv`` lists, for each emitted position
(``len(path) + 1`` entries), ``T = t_1 + (1 - beta_1) (t_2 + (1 - beta_2) (...))`` over that node's children, each
``t_s`` the exact TV of sibling s's decision (with the residual the rule really uses), computed along the branch where
the earlier siblings were rejected; 0 for a bonus position. For a node with one child (every position of a chain) T is
the exact TV of the position; with several siblings it is an upper bound when the residual does not depend on the
rejected token (deficit, speculative) and the siblings are iid, and a one-draft estimate of it otherwise (siblings
without replacement, LANTERN's residual). With a draft without ``q`` (deterministic proposal, verified as a point mass)
T is the TV conditional on the drafted tokens. ``tv`` is None unless the kernel was built with ``report_tv=True`` or a
``tv_budget``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmspec.checks import check_number
from mmspec.errors import DraftError, GenerationConfigError, InvalidInputError, NonFiniteLogitsError
from mmspec.kernels import (Coin, Verdict, check_kernel_inputs, default_coin, finish_verdict, flip_coin, normalised,
                            walk_tree)
from mmspec.testing.enumerate import enumerate_verdicts  # noqa: F401 (re-exported for users' own checks)
from mmspec.tree import SIBLING_MODES, Draft

@dataclass
class RelaxedVerdict(Verdict):
    """A :class:`~mmspec.kernels.Verdict` with the per-position output TV the relaxed rule incurred.

    tv: one entry per emitted position (``len(path) + 1``), see the module docstring; None when not tracked.
    """

    tv: list[float] | None = None


# --- measurement (any rule) ----------------------------------------------------------------------------------------
def _check_row(name: str, t: torch.Tensor, vocab: int | None = None) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or (vocab is not None and t.shape[0] != vocab):
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        want = "(V,)" if vocab is None else f"({vocab},)"
        raise InvalidInputError(f"{name} has shape {shape}; expected a 1-D row of shape {want}")


def _rows(p, q, a):
    _check_row("p", p)
    _check_row("q", q, p.shape[0])
    _check_row("a", a, p.shape[0])
    if bool(((a < 0) | (a > 1)).any()) or bool(a.sum().isnan()):
        raise InvalidInputError("acceptance probabilities a must lie in [0, 1]")
    return p, q * a  # (V,) accepted mass


def output_distribution(p: torch.Tensor, q: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """(V,) distribution of the emitted token: ``q*a + (1 - sum q*a) * norm(max(0, p - q*a))``."""
    p, m = _rows(p, q, a)
    deficit = (p - m).clamp_min(0.0)
    return m + (1.0 - m.sum()).clamp_min(0.0) * normalised(deficit, fallback=p)


def output_tv(p: torch.Tensor, q: torch.Tensor, a: torch.Tensor) -> float:
    """TV(output, p) = sum_y max(0, q(y) a(y) - p(y)) for acceptance ``a`` with the deficit residual. O(V)."""
    p, m = _rows(p, q, a)
    return float((m - p).clamp_min(0.0).sum())


def tv_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Total variation 0.5 * |a - b|_1 of two (V,) distributions."""
    return 0.5 * float((a - b).abs().sum())


def check_tv_budget(tv_budget) -> float | None:
    """None, or a per-position TV budget in [0, 1] (0 = lossless; a TV distance is at most 1)."""
    if tv_budget is None:
        return None
    check_number(tv_budget, "tv_budget", low=0, high=1)
    return float(tv_budget)


def check_residual(residual, allowed: tuple[str, ...], tv_budget: float | None, what: str) -> str:
    if tv_budget is not None:
        if residual not in (None, "deficit"):
            raise GenerationConfigError(f"{what}: residual={residual!r} with tv_budget={tv_budget}: the budget holds "
                                        "only with the deficit residual; pass residual='deficit' or leave it None")
        return "deficit"
    if residual is None:
        return allowed[0]
    if residual not in allowed:
        raise GenerationConfigError(f"{what}: residual={residual!r}; expected one of {allowed}")
    return residual


def max_feasible(tvs: torch.Tensor, budget: float) -> int:
    """Index of the last rung whose TV is <= budget (rung 0, the lossless one, always is)."""
    ok = (tvs <= budget).nonzero()
    return int(ok[-1]) if ok.numel() else 0


def deficit_tvs(r: torch.Tensor, masses: torch.Tensor) -> torch.Tensor:
    """(L,) sum_y max(0, m_l(y) - r(y)) for accepted masses (V, L): the TV of each candidate rule."""
    return (masses - r[:, None]).clamp_min(0.0).sum(0)


def interpolate(r: torch.Tensor, m_lo: torch.Tensor, m_hi: torch.Tensor, budget: float, rungs: int = 32,
                rounds: int = 3) -> tuple[float, torch.Tensor, float]:
    """(theta, mass, TV) of the largest mix ``(1 - theta) m_lo + theta m_hi`` within budget (m_lo is within it).

    Rungs of a relaxation ladder are discrete (a neighbour or a group member joins whole), so the last rung within
    eps may leave much of eps unused; accepting with the mixed probability ``(1 - theta) a_lo + theta a_hi`` fills
    the gap. The TV is convex in theta, so {theta : TV <= eps} is an interval [0, theta*]; `rounds` grids of
    `rungs` + 1 points locate theta* to rungs^-rounds (3e-5 by default) from below."""
    diff = m_hi - m_lo  # (V,)
    lo, hi = 0.0, 1.0
    for _ in range(rounds):
        theta = torch.linspace(lo, hi, rungs + 1, dtype=r.dtype, device=r.device)  # (L,)
        masses = m_lo[:, None] + theta[None, :] * diff[:, None]  # (V, L); theta = 0 is m_lo bit for bit
        tvs = deficit_tvs(r, masses)
        j = max_feasible(tvs, budget)
        if j == rungs:
            break
        lo, hi = float(theta[j]), float(theta[j + 1])
    return float(theta[j]), masses[:, j], float(tvs[j])


# --- the walk shared by the relaxed rules --------------------------------------------------------------------------
class Relaxation:
    """One relaxed rule, as the shared tree walk sees it at a node with residual row ``r`` and proposal ``q``.

    Levels are the rule's relaxation ladder: ``full`` is the configured rule, level 0 gives a(y) = min(1, r/q).
    Subclasses implement ``alpha`` (a(x) at full relaxation, the fast path), ``mass`` (accepted mass q*a of every
    token at a level) and ``search`` (the largest relaxation within a budget); they may override ``reject`` and
    ``decision_output`` for a residual of their own.
    """

    name = "relaxed"
    residual = "deficit"
    tv_budget: float | None = None
    report_tv = False

    def prepare(self, p: torch.Tensor) -> None:
        """Check tables against p's vocabulary and move them to p's device (once per device)."""

    # hooks -------------------------------------------------------------------------------------------------------
    full = 1.0

    def alpha(self, r: torch.Tensor, q: torch.Tensor, x: int) -> tuple[float, object]:
        """(a(x) at full relaxation, context for ``reject``) without the (V,) vectors."""
        raise NotImplementedError

    def mass(self, r: torch.Tensor, q: torch.Tensor, level) -> tuple[torch.Tensor, object]:
        """((V,) accepted mass q*a at `level`, context for ``reject`` / ``decision_output``)."""
        raise NotImplementedError

    def search(self, r: torch.Tensor, q: torch.Tensor, budget: float):
        """(level, (V,) mass, context, TV) of the largest relaxation whose deficit-residual TV is <= budget."""
        raise NotImplementedError

    # residuals ---------------------------------------------------------------------------------------------------
    def reject(self, r, q, x, m, ctx) -> torch.Tensor:
        """Distribution after rejecting x (m: accepted mass or None on the fast path)."""
        if self.residual == "deficit":
            return normalised((r - m).clamp_min(0.0), fallback=r)  # (V,) norm(max(0, r - q*a))
        return normalised((r - q).clamp_min(0.0), fallback=r)  # (V,) Leviathan's norm(max(0, r - q))

    def decision_output(self, r, q, m, ctx) -> torch.Tensor:
        """(V,) float64 exact distribution of the token emitted by one decision (x ~ q, then accept or reject).

        Computed in float64 (1 - sum(m) and the residual's mass are differences of nearly equal sums), with the
        fallback taken where ``reject`` (in r's own dtype) takes it."""
        eps = torch.finfo(r.dtype).eps
        r, q, m = r.double(), q.double(), m.double()
        rejected = (1.0 - m.sum()).clamp_min(0.0)
        left = (r - (m if self.residual == "deficit" else q)).clamp_min(0.0)  # (V,) the residual before normalising
        mass = float(left.sum())
        return m + rejected * (left / mass if mass > eps else r)

    def decision_tv(self, r, q, m, ctx) -> float:
        if self.residual == "deficit":  # the formula is exact for this residual
            return float((m.double() - r.double()).clamp_min(0.0).sum())
        return tv_distance(self.decision_output(r, q, m, ctx), r.double())

    # one decision ------------------------------------------------------------------------------------------------
    def decide(self, r, q, x, budget, need_vectors):
        """(a(x), (V,) mass or None, context, TV or None) for drafted token x."""
        if budget is not None:
            _, m, ctx, t = self.search(r, q, budget)
        elif need_vectors:
            m, ctx = self.mass(r, q, self.full)
            t = None
        else:
            a, ctx = self.alpha(r, q, x)
            return a, None, ctx, None
        return min(1.0, float(m[x] / q[x])), m, ctx, t


def _sibling_proposal(draft: Draft, c: int, x: int, tried: list[int], wor: bool, r: torch.Tensor) -> torch.Tensor:
    """The distribution sibling c was drawn from (as in accept_speculative), or onehot(x) for a point-mass draft."""
    if draft.q is not None:
        qs = draft.q[c].to(r.dtype)  # (V,)
        if wor and tried:
            qs = qs.clone()
            qs[tried] = 0.0
            qs = normalised(qs, fallback=torch.zeros_like(qs))
        if float(qs[x]) > 0.0:
            return qs
    # q = None, or q_s(x) = 0 (the drafter could not have drawn x): verify x as a point mass, which is what makes
    # the lossless rung lossless for any proposal.
    qs = torch.zeros_like(r)
    qs[x] = 1.0
    return qs


def next_budget(budget: float, t: float, beta: float) -> float:
    """Budget left for the siblings after one with TV t and acceptance beta (see the module docstring)."""
    left = max(budget - t, 0.0)
    rejected = 1.0 - beta
    return left / rejected if rejected > 1e-12 else left


def relaxed_walk(rule: Relaxation, draft: Draft, p: torch.Tensor, *, generator: torch.Generator | None = None,
                 coin: Coin | None = None) -> RelaxedVerdict:
    """Walk `draft` root-first like accept_speculative, accepting each child with `rule`'s relaxed probability."""
    what = f"accept_{rule.name}"
    check_kernel_inputs(draft, p, what)
    if draft.q is not None:
        if draft.siblings not in SIBLING_MODES:
            raise DraftError(f"{what}: draft siblings={draft.siblings!r}; expected one of {SIBLING_MODES}")
        if bool(draft.q.sum().isnan()):
            raise NonFiniteLogitsError(f"{what}: draft q {tuple(draft.q.shape)} contains NaN")
    rule.prepare(p)
    flip = coin or default_coin(p, generator)
    toks, wor = draft.token_list, draft.siblings == "without_replacement"
    track = rule.report_tv or rule.tv_budget is not None
    need_vectors = track or rule.residual == "deficit"
    tvs: list[float] | None = [] if track else None

    def try_children(kids, r):
        chosen, tried = None, []
        budget, total, reach = rule.tv_budget, 0.0, 1.0
        for i, c in enumerate(kids):
            x = toks[c]
            qs = _sibling_proposal(draft, c, x, tried, wor, r)
            alpha, m, ctx, t = rule.decide(r, qs, x, budget, need_vectors)
            if track:
                beta = min(1.0, float(m.sum()))
                t = rule.decision_tv(r, qs, m, ctx) if t is None or rule.residual != "deficit" else t
                total += reach * t
                reach *= 1.0 - beta
                if budget is not None:
                    budget = next_budget(budget, t, beta)
            if chosen is None and flip_coin(flip, alpha):
                chosen = c
                if not track:
                    break
            if chosen is None or i + 1 < len(kids):
                # After an acceptance this only prices the remaining siblings for `tv` (no coins are drawn).
                r = rule.reject(r, qs, x, m, ctx)
            tried.append(x)
        if track:
            tvs.append(total)
        return chosen, (r if chosen is None else None)

    v = walk_tree(draft, p, try_children)
    if track and v.bonus:
        tvs.append(0.0)  # a bonus token is drawn from the target row as is
    verdict = RelaxedVerdict(v.path, v.tokens, v.residual, v.next_token, v.bonus, tv=tvs)
    return finish_verdict(verdict, coin, generator)


# --- exact enumeration (tests, notebooks) --------------------------------------------------------------------------
def first_token_distribution(kernel, p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Exact (distribution of the first emitted token, acceptance probability) of `kernel` on a one-token chain.

    The draft token x runs over q's support with weight q(x), and the kernel's coins are enumerated. p, q: (V,)."""
    rows = torch.stack([p, p])  # (2, V); the second row (after x) never affects the first token
    out, accept = torch.zeros_like(p), 0.0
    for x in q.nonzero().flatten().tolist():
        w = float(q[x])
        draft = Draft.chain([x], q=q.unsqueeze(0), device=p.device)
        for cw, v in enumerate_verdicts(kernel, draft, rows):
            if v.path:
                out[x] += w * cw
                accept += w * cw
            else:
                out += (w * cw) * v.residual
    return out, accept
