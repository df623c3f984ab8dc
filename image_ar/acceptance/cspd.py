"""CSpD: speculative decoding of continuous tokens whose distributions are diffusion heads.

Wang et al. 2024, "Continuous Speculative Decoding for Autoregressive Image Generation" (arXiv:2411.11925). A draft
model proposes several continuous tokens, each the endpoint of a denoising chain x_T -> ... -> x_0 of its own head;
the target scores the proposals in one forward and accepts each with ``min(1, p / q)``; the first rejected token is
replaced by a draw from the residual ``norm(max(0, p - q))``.

The rule here is exact (ALGORITHMS.md section 6). The sampled object is the token's whole chain: the draft's chain
has density ``q(traj) = N(x_T; 0, I) prod_s N(x_{s-1}; mu_q(x_s), sigma_q,s^2)`` (its head at the draft's condition)
and the target's head gives ``p(traj)`` for the *same* chain (same x_T, the target's Gaussian transitions evaluated
at the draft's states: trajectory alignment). x_T's factor cancels, so the ratio is the product of the per-step
Gaussian ratios, computed in log space for all proposed tokens and steps in one batched head call.

- accept node j with probability ``min(1, p(traj_j) / q(traj_j))``, in order, stopping at the first rejection;
- on rejection draw chains traj' ~ p (the target's head at that position, fresh noise) and keep the first with
  probability ``max(0, 1 - q(traj') / p(traj'))`` (acceptance-rejection with proposal p and bound 1: the kept chain
  has density ``max(0, p - q) / (1 - sum min(p, q))``, exactly the residual). Candidates are drawn in batches and
  the first kept one in draw order is used, which is the same as drawing them one by one;
- with every node accepted, the bonus token is a plain draw from the target's head at the next position.

The token emitted is each chain's x_0, so the marginal law of every token is exactly the target's (sampled with the
noisy last step of :mod:`image_ar.models.diffusion`). What the reference code does instead, and this module does
not: it compares only the final step's Gaussians with the exponent divided by a "temperature" of 42, and returns
zeros when 100 residual tries fail. Here no token is ever made up: when ``max_candidates`` chains have been drawn
without one kept (the residual then has mass < ~1e-4 of the rejection's), :class:`ResidualSamplingError` is raised;
raise ``max_candidates`` to go on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmspec.errors import GenerationConfigError, MMSpecError
from mmspec.kernels import Verdict
from mmspec.tree import Draft

from ..models.continuous_ar import draw_token_noise
from ..models.diffusion_head import TokenDiffusion


class ResidualSamplingError(MMSpecError):
    """The residual sampler drew max_candidates chains without keeping one."""


@dataclass
class TrajectoryDraft(Draft):
    """A chain of continuous draft tokens. tokens (N, C); states (N, S + 1, C) the denoising chains (tokens are
    states[:, -1]); log_q (N,) their log densities under the draft head given x_T; cond_q (N, W) the draft head's
    condition rows (:func:`head_rows`); head_q the draft's head (scores the residual's candidates)."""

    states: torch.Tensor | None = None
    log_q: torch.Tensor | None = None
    cond_q: torch.Tensor | None = None
    head_q: TokenDiffusion | None = None


def head_rows(z: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A head's full condition as one row per token: [z (or z_cond | z_uncond) | guidance scale] (..., W + 1)."""
    return torch.cat([z.float(), scale.float().expand(z.shape[:-1]).unsqueeze(-1)], dim=-1)


def split_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rows[..., :-1], rows[..., -1]


def log_density(head: TokenDiffusion, rows: torch.Tensor, states: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N,) log density of chains (N, S + 1, C) given x_T under `head` at condition rows (N, W + 1)."""
    z, scale = split_rows(rows)
    return head.log_prob(z, states, temperature, scale)


def sample_chains(head: TokenDiffusion, rows: torch.Tensor, noise: torch.Tensor, temperature: float):
    """Chains from a head at condition rows (N, W + 1) with noise (N, S + 1, C) = [x_T; per-step noise]."""
    z, scale = split_rows(rows)
    return head.sample(z, noise[:, 0], noise[:, 1:], temperature, scale)


def accepted_prefix(log_ratio: torch.Tensor, coins: torch.Tensor) -> int:
    """Leading nodes accepted: node j passes when coins[j] < min(1, exp(log_ratio[j])) (compared in log space)."""
    ok = torch.log(coins) < log_ratio
    bad = (~ok).nonzero()
    return int(bad[0]) if len(bad) else len(ok)


class CSpD:
    """The exact CSpD rule as an engine plug-in kernel for a continuous target (``ContinuousARTarget``).

    ``rule(draft, rows, generator)`` -> Verdict, where rows (n + 1, W + 1) are the target's head conditions for the
    draft's nodes and the bonus; ``rule.first(row, generator)`` samples a token from one condition row."""

    name = "cspd"
    lossless = True
    continuous = True

    def __init__(self, head: TokenDiffusion, temperature: float = 1.0, candidates: int = 16,
                 max_candidates: int = 1 << 16):
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise GenerationConfigError(f"temperature={temperature!r}: continuous tokens need temperature > 0 (it "
                                        "scales the diffusion noise)")
        for name, v in (("candidates", candidates), ("max_candidates", max_candidates)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise GenerationConfigError(f"{name}={v!r}: must be an int >= 1 (chains the residual sampler draws "
                                            "per round / in all)")
        self.head, self.temperature = head, float(temperature)
        self.candidates, self.max_candidates = candidates, max_candidates
        self.residual_draws = 0  # candidate chains drawn by the residual sampler (cost accounting)

    def _noise(self, n: int, generator, device) -> torch.Tensor:
        s, c = self.head.num_steps, self.head.token_dim
        return torch.stack([draw_token_noise(generator, s, c, device) for _ in range(n)])

    def first(self, row: torch.Tensor, generator=None) -> torch.Tensor:
        noise = self._noise(1, generator, row.device)
        return sample_chains(self.head, row[None], noise, self.temperature).tokens[0]

    def __call__(self, d: Draft, rows: torch.Tensor, generator=None) -> Verdict:
        n = len(d)
        if n == 0:
            return Verdict([], [], None, self.first(rows[0], generator), bonus=True)
        if not isinstance(d, TrajectoryDraft) or d.states is None:
            raise GenerationConfigError("CSpD verifies TrajectoryDraft proposals (states, log_q, cond_q, head_q); "
                                        f"got a {type(d).__name__}")
        log_p = log_density(self.head, rows[:n], d.states.to(rows.device), self.temperature)
        coins = torch.rand(n, generator=generator, device=rows.device)
        a = accepted_prefix(log_p - d.log_q.to(log_p.device), coins)
        tokens = list(d.tokens[:a])
        if a == n:
            return Verdict(list(range(n)), tokens, None, self.first(rows[n], generator), bonus=True)
        nxt = self.residual(rows[a], d.cond_q[a], d.head_q, generator)
        return Verdict(list(range(a)), tokens, None, nxt, bonus=False)

    def residual(self, row_p: torch.Tensor, row_q: torch.Tensor, head_q: TokenDiffusion, generator=None):
        """A token from norm(max(0, p - q)) over chains, by acceptance-rejection with proposal p and bound 1."""
        drawn = 0
        while drawn < self.max_candidates:
            r = min(self.candidates, self.max_candidates - drawn)
            chains = sample_chains(self.head, row_p.expand(r, -1), self._noise(r, generator, row_p.device),
                                   self.temperature)
            log_q = log_density(head_q, row_q.expand(r, -1), chains.states, self.temperature)
            keep = torch.rand(r, generator=generator, device=row_p.device) < -torch.expm1(log_q - chains.log_prob)
            drawn += r
            self.residual_draws += r
            hit = keep.nonzero()
            if len(hit):
                return chains.tokens[int(hit[0])]
        raise ResidualSamplingError(
            f"the residual sampler drew {drawn} chains from the target's head without keeping one: draft and target "
            "agree almost everywhere at this position, so the residual has almost no mass. Raise max_candidates "
            "(SpeculativeImagePipeline(..., cspd_max_candidates=...)) to keep sampling; no token is made up")
