"""LANTERN and LANTERN++ relaxed acceptance for visual-AR speculative decoding (LOSSY).

Jang et al. 2024, "LANTERN: Accelerating Visual Autoregressive Models with Relaxed Speculative Decoding" (ICLR 2025,
§3.2, Eq. 4-5: the latent proximity set A_{k,delta}(x) and the acceptance ``min(1, p(A)/q(x))``); Park et al. 2025,
"LANTERN++: Enhancing Relaxed Speculative Decoding with Static Tree Drafting for Visual Auto-regressive Models"
(the lambda-mode bound, relative to p(x)). Reference code: jadohu/LANTERN (``evaluate_posterior`` in
``models/ea_model_*.py``). ALGORITHMS.md §5.

At a node with target row ``r`` (the p-row, or what is left of it after earlier siblings were rejected) and a child
``x`` drawn from ``q``, with ``N_1(x), N_2(x), ...`` the codes nearest to x in the VQ latent space
(:func:`~image_ar.acceptance.neighbours.latent_neighbours`) and ``c_m = sum_{j <= m} r(N_j(x))`` for ``m <= k``
(``c_0 = 0``)::

    delta-mode (LANTERN):    m* = max{m : c_m <= delta}
    lambda-mode (LANTERN++): m* = max{m : c_m <= (lambda - 1) r(x)}
    r~(x) = r(x) + c_{m*};   accept x with probability min(1, r~(x) / q(x))

Residual after a rejection (``residual=``):

* ``"lantern"`` (default): ``max(0, r - q)``, then, if the relaxation moved mass (``c_{m*} > 0``), zero
  ``N_1(x) .. N_{k+1}(x)`` (as many as the neighbour table has), and renormalise. With a point-mass draft (q =
  onehot(x), which is how the reference code verifies its EAGLE-2 trees, ``qx = 1.0``) this is exactly the reference's
  ``gtp[x] = 0; gtp[nearest_latents[x, :k + 1]] = 0; gtp /= gtp.sum()``; for a sampled draft ``max(0, r - q)`` already
  zeroes x (a rejection needs ``r(x) <= r~(x) < q(x)``). Two deliberate differences: the reference zeroes whenever
  ``m* >= 1``, which also fires when the nearest neighbours carry no mass (after top-k) and would make delta = 0 lossy;
  and where zeroing would leave no mass we keep the neighbours (the reference falls back to a uniform distribution,
  which puts mass on tokens the target excluded). The reference slices ``[:k + 1]``, one more neighbour than it relaxes
  over: build the table with ``k + 1`` columns to reproduce that.
* ``"speculative"``: Leviathan's ``norm(max(0, r - q))`` (LANTERN++'s static-tree code subtracts q this way).
* ``"deficit"``: ``norm(max(0, r - q*a))`` with a(y) the rule's acceptance for every y — the residual under which
  :mod:`image_ar.acceptance.budget`'s TV formula is exact; the only one allowed with ``tv_budget``.

delta = 0 (or lambda = 1, or k = 0) gives c_{m*} = 0, r~ = r and no zeroing with every residual: the rule is then
speculative sampling, decision for decision (and point-mass verification for drafts without q).

Duplicate siblings are verified again (the engine's walk), unlike the reference code, which skips them.

Cost: the fast path (no ``tv_budget``, no ``report_tv``, residual not ``"deficit"``) touches k entries per decision;
the others gather the (V, k) neighbour probabilities once per decision (one (V, k) cumsum, then O(V log k) per
relaxation level).
"""
from __future__ import annotations

import math

import torch

from mmspec.errors import GenerationConfigError, InvalidInputError
from mmspec.kernels import kernel_rule, normalised

from .budget import Relaxation, check_residual, check_tv_budget, deficit_tvs, interpolate, max_feasible, relaxed_walk

RESIDUALS = ("lantern", "speculative", "deficit")


# --- arguments -----------------------------------------------------------------------------------------------------
def _check_neighbours(neighbours, what: str) -> torch.Tensor:
    if not isinstance(neighbours, torch.Tensor) or neighbours.dim() != 2 or neighbours.is_floating_point() \
            or neighbours.is_complex() or neighbours.dtype == torch.bool:
        shape = tuple(neighbours.shape) if isinstance(neighbours, torch.Tensor) else type(neighbours).__name__
        raise InvalidInputError(f"{what}: neighbours must be a 2-D integer tensor (V, K) of code ids, as returned by "
                                f"latent_neighbours(codebook, k); got {shape}")
    vocab = neighbours.shape[0]
    if neighbours.numel() and not (0 <= int(neighbours.min()) and int(neighbours.max()) < vocab):
        raise InvalidInputError(f"{what}: neighbours hold ids outside [0, {vocab - 1}] for a table of {vocab} codes")
    return neighbours.long()


def _check_mode(delta, lam, what: str) -> tuple[float | None, float | None]:
    if (delta is None) == (lam is None):
        raise GenerationConfigError(f"{what}: pass exactly one of delta (LANTERN, 0 <= delta <= 1) or lam "
                                    f"(LANTERN++, lam >= 1); got delta={delta!r}, lam={lam!r}")
    if delta is not None:
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 <= delta <= 1:
            hint = " (LANTERN's code reads delta > 1 as LANTERN++'s lambda: pass lam= instead)" \
                if isinstance(delta, (int, float)) and delta > 1 else ""
            raise GenerationConfigError(f"{what}: delta={delta!r} must be a number in [0, 1] (0 = lossless){hint}")
        return float(delta), None
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (1 <= lam < math.inf):
        raise GenerationConfigError(f"{what}: lam={lam!r} must be a finite number >= 1 (1 = lossless)")
    return None, float(lam)


def _check_k(k, width: int, vocab: int, what: str) -> int:
    if k is None:
        return width
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= min(width, max(vocab - 1, 0)):
        raise GenerationConfigError(f"{what}: k={k!r} must be an int in [0, {min(width, max(vocab - 1, 0))}] (the "
                                    f"neighbour table has {width} column(s) for {vocab} codes; build it with a larger "
                                    "k for more)")
    return k


# --- the rule ------------------------------------------------------------------------------------------------------
class _Lantern(Relaxation):
    def __init__(self, neighbours, k, delta, lam, residual, tv_budget, report_tv, rungs=32, rounds=2):
        self.table, self.k, self.delta, self.lam = neighbours, k, delta, lam
        self.kz = min(k + 1, neighbours.shape[1])  # neighbours zeroed by LANTERN's residual
        self.residual, self.tv_budget, self.report_tv = residual, tv_budget, report_tv
        self.rungs, self.rounds = rungs, rounds
        self.name = "lantern" if lam is None else "lantern++"
        self._tables: dict = {}

    def prepare(self, p: torch.Tensor) -> None:
        if self.table.shape[0] != p.shape[-1]:
            raise InvalidInputError(f"accept_{self.name}: the neighbour table covers {self.table.shape[0]} codes but "
                                    f"p has a vocabulary of {p.shape[-1]}; build the table from this model's codebook")

    def _nb(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """((V, k) neighbours relaxed over, (V, kz) neighbours zeroed) on `device`, contiguous for fast gathers."""
        if device not in self._tables:
            table = self.table.to(device)
            self._tables[device] = table[:, : self.k].contiguous(), table[:, : self.kz].contiguous()
        return self._tables[device]

    def _slack(self, r: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """(V, L) bound on c_m at each relaxation level (level 1 = as configured, 0 = lossless)."""
        if self.lam is None:
            return (levels * self.delta).expand(r.shape[0], -1).contiguous()
        return r[:, None] * (levels * (self.lam - 1.0))[None, :]

    def _cumulative(self, r: torch.Tensor) -> torch.Tensor:
        return r[self._nb(r.device)[0]].cumsum(1)  # (V, k) c_m(y) for m = 1..k

    def _masses(self, r, q, levels, c):
        """(V, L) accepted mass min(q, r~) and (V, L) c_{m*} per level."""
        if self.k == 0:
            cstar = torch.zeros(r.shape[0], levels.shape[0], dtype=r.dtype, device=r.device)
        else:
            counts = torch.searchsorted(c, self._slack(r, levels), right=True)  # (V, L) m* in [0, k]
            cstar = torch.where(counts > 0, c.gather(1, (counts - 1).clamp_min_(0)), 0.0)  # (V, L) c_{m*}, c_0 = 0
        return torch.minimum(q[:, None], r[:, None] + cstar), cstar

    def mass(self, r, q, level):
        levels = torch.tensor([float(level)], dtype=r.dtype, device=r.device)
        m, cstar = self._masses(r, q, levels, self._cumulative(r))
        return m[:, 0], cstar[:, 0]

    def alpha(self, r, q, x):
        cx = r[self._nb(r.device)[0][x]].cumsum(0)  # (k,)
        bound = self.delta if self.lam is None else (self.lam - 1.0) * r[x]
        count = int(torch.searchsorted(cx, torch.as_tensor(bound, dtype=r.dtype, device=r.device).reshape(1),
                                       right=True)) if self.k else 0
        cstar = cx[count - 1] if count else torch.zeros((), dtype=r.dtype, device=r.device)
        qx = q[x]
        return float(torch.minimum(qx, r[x] + cstar) / qx), float(cstar)

    def search(self, r, q, budget):
        c = self._cumulative(r) if self.k else None
        levels = torch.linspace(0.0, 1.0, self.rungs + 1, dtype=r.dtype, device=r.device)
        for round_ in range(self.rounds):
            m, cstar = self._masses(r, q, levels, c)  # (V, L)
            tvs = deficit_tvs(r, m)  # (L,) exact TV per level, monotone in the level
            j = max_feasible(tvs, budget)
            if j == self.rungs:
                return float(levels[j]), m[:, j], cstar[:, j], float(tvs[j])
            if round_ < self.rounds - 1:
                levels = torch.linspace(float(levels[j]), float(levels[j + 1]), self.rungs + 1, dtype=r.dtype,
                                        device=r.device)
        theta, mixed, tv = interpolate(r, m[:, j], m[:, j + 1], budget)
        level = float(levels[j]) + theta * float(levels[j + 1] - levels[j])
        # LANTERN's residual is not used with a budget; cstar only marks where mass was borrowed.
        return level, mixed, cstar[:, j + 1] if theta > 0 else cstar[:, j], tv

    # LANTERN's own residual -------------------------------------------------------------------------------------
    def reject(self, r, q, x, m, ctx):
        if self.residual != "lantern":
            return super().reject(r, q, x, m, ctx)
        cstar = float(ctx[x]) if isinstance(ctx, torch.Tensor) else ctx
        deficit = (r - q).clamp_min(0.0)  # (V,) zero at x whenever x can be rejected
        plain = normalised(deficit, fallback=r)
        if cstar <= 0.0:
            return plain
        zeroed = deficit.clone()
        zeroed[self._nb(r.device)[1][x]] = 0.0
        return normalised(zeroed, fallback=plain)

    def decision_output(self, r, q, m, ctx):
        if self.residual != "lantern":
            return super().decision_output(r, q, m, ctx)
        # out = m + sum_x w(x) R_x with w(x) = q(x) - m(x) the mass of drawing x and rejecting it, and R_x the
        # residual after rejecting x: D / |D| (plain), or D off Z(x) renormalised when x's relaxation moved mass.
        # In float64: |D off Z(x)| is a difference of two sums that are nearly equal when Z(x) covers most of D, and
        # in float32 its rounding noise can exceed eps and be divided by (a drift of 0.52 reported for a true 0.09).
        # The branches follow `reject`, which decides with the threshold of r's own dtype.
        eps = torch.finfo(r.dtype).eps
        r, q, m = r.double(), q.double(), m.double()
        deficit = (r - q).clamp_min(0.0)  # (V,) D
        mass = float(deficit.sum())
        plain = deficit / mass if mass > eps else r
        w = (q - m).clamp_min(0.0)  # (V,)
        xs = ((ctx > 0) & (w > 0)).nonzero().flatten()  # (n,) rejectable tokens whose relaxation borrowed mass
        zone = self._nb(r.device)[1][xs]  # (n, kz) Z(x)
        kept = deficit.sum() - deficit[zone].sum(1)  # (n,) |D off Z(x)|, absolute error ~1e-16
        zeroes = kept > eps  # (n,) False: zeroing leaves no mass and `reject` falls back to plain
        coef = torch.where(zeroes, w[xs] / kept.clamp_min(eps), 0.0)  # (n,)
        hit = torch.zeros_like(r).index_add_(0, zone.reshape(-1), coef.repeat_interleave(self.kz))  # (V,)
        plain_mass = w.sum() - torch.where(zeroes, w[xs], 0.0).sum()
        return m + plain * plain_mass + deficit * (coef.sum() - hit)


# --- public API ----------------------------------------------------------------------------------------------------
def lantern(neighbours: torch.Tensor, *, delta: float | None = None, lam: float | None = None, k: int | None = None,
            tv_budget: float | None = None, residual: str | None = None, report_tv: bool = False):
    """LANTERN (``delta``) or LANTERN++ (``lam``) relaxed acceptance as an engine kernel (LOSSY).

    neighbours: (V, K) table from :func:`~image_ar.acceptance.neighbours.latent_neighbours`.
    delta: LANTERN's bound on the borrowed mass, in [0, 1] (paper default 0.1 with k = 1000).
    lam: LANTERN++'s bound relative to r(x), >= 1 (paper default 5 with k = 10). Exactly one of delta / lam.
    k: neighbours relaxed over, 0 <= k <= K (default K).
    tv_budget: per-position output-TV budget eps >= 0 (our addition, see :mod:`image_ar.acceptance.budget`): the
      relaxation is scaled down per position (delta' = s delta or lambda' = 1 + s (lambda - 1), s in [0, 1], found to
      1/1024 by two rounds of a 33-rung ladder; TV is monotone in s) until TV <= eps, then mixed with the next level up
      to use the rest of eps (``budget.interpolate``). Implies the deficit residual.
    residual: "lantern" (default), "speculative" or "deficit" (see the module docstring).
    report_tv: attach the per-position TV to the verdict (always on with a budget).

    Returns ``accept(draft, p, *, generator=None, coin=None) -> RelaxedVerdict`` with ``lossless = False``.
    """
    nb = _check_neighbours(neighbours, "lantern")
    delta, lam = _check_mode(delta, lam, "lantern")
    k = _check_k(k, nb.shape[1], nb.shape[0], "lantern")
    budget = check_tv_budget(tv_budget)
    residual = check_residual(residual, RESIDUALS, budget, "lantern")
    rule = _Lantern(nb, k, delta, lam, residual, budget, bool(report_tv))

    @kernel_rule(rule.name + (f"[tv<={budget:g}]" if budget is not None else ""), lossless=False)
    def accept_lantern(draft, p, *, generator=None, coin=None):
        return relaxed_walk(rule, draft, p, generator=generator, coin=coin)

    accept_lantern.delta, accept_lantern.lam, accept_lantern.k = delta, lam, k
    accept_lantern.tv_budget, accept_lantern.residual, accept_lantern.rule = budget, residual, rule
    return accept_lantern


def _row_rule(p, q, neighbours, delta, lam, k, residual, what):
    nb = _check_neighbours(neighbours, what)
    for name, t in (("p", p), ("q", q)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != nb.shape[0]):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InvalidInputError(f"{what}: {name} has shape {shape}; expected ({nb.shape[0]},) to match the "
                                    "neighbour table")
    delta, lam = _check_mode(delta, lam, what)
    rule = _Lantern(nb, _check_k(k, nb.shape[1], nb.shape[0], what), delta, lam, residual, None, False)
    return rule


def lantern_relaxed_target(p: torch.Tensor, neighbours: torch.Tensor, *, delta: float | None = None,
                           lam: float | None = None, k: int | None = None) -> torch.Tensor:
    """(V,) r~(y) = p(y) + c_{m*}(y) for every token y at once."""
    rule = _row_rule(p, None, neighbours, delta, lam, k, "deficit", "lantern_relaxed_target")
    _, cstar = rule.mass(p, torch.ones_like(p), 1.0)
    return p + cstar


def lantern_acceptance(p: torch.Tensor, q: torch.Tensor, neighbours: torch.Tensor, *, delta: float | None = None,
                       lam: float | None = None, k: int | None = None) -> torch.Tensor:
    """(V,) a(y) = min(1, r~(y) / q(y)) for every token y at once (1 where q(y) = 0: never proposed).

    Feed it to :func:`~image_ar.acceptance.budget.output_tv` for the TV of the rule with the deficit residual."""
    rule = _row_rule(p, q, neighbours, delta, lam, k, "deficit", "lantern_acceptance")
    m, _ = rule.mass(p, q, 1.0)
    return torch.where(q > 0, m / torch.where(q > 0, q, 1.0), 1.0)


def lantern_output_distribution(p: torch.Tensor, q: torch.Tensor, neighbours: torch.Tensor, *,
                                delta: float | None = None, lam: float | None = None, k: int | None = None,
                                residual: str = "lantern") -> torch.Tensor:
    """(V,) exact distribution of the token a one-token chain emits (x ~ q, accept or reject with `residual`).

    For LANTERN's residual this is O(V k): the residual depends on the rejected x only through the k + 1 zeroed
    neighbours, so the mixture over x is a scatter-add over the neighbour table."""
    if residual not in RESIDUALS:
        raise GenerationConfigError(f"lantern_output_distribution: residual={residual!r}; expected one of {RESIDUALS}")
    rule = _row_rule(p, q, neighbours, delta, lam, k, residual, "lantern_output_distribution")
    m, cstar = rule.mass(p, q, 1.0)
    return rule.decision_output(p, q, m, cstar).to(p.dtype)
