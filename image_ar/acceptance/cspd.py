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

    The engine calls the batched forms: ``rule.verify_rows(drafts, rows, generators)`` -> one Verdict per request,
    where rows[b] (n_b + 1, W + 1) are the target's head conditions for request b's draft nodes and its bonus, and
    ``rule.first_rows(rows, generators)`` -> (B, C) tokens, one per condition row. Every request draws only from
    its own generator, in the same order as one request alone (coins, then bonus noise or residual rounds), so a
    batch gives each request exactly what it would get alone; the diffusion heads run once per round for the whole
    batch. ``rule(draft, rows, generator)`` and ``rule.first(row, generator)`` are the one-request forms."""

    name = "cspd"
    lossless = True
    continuous = True
    MAX_ROUND = 256  # residual chains one request draws per round at most (the round size doubles up to this)

    def __init__(self, head: TokenDiffusion, temperature: float = 1.0, candidates: int = 4,
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

    def _noise(self, counts: list[int], generators, device) -> torch.Tensor:
        """(sum(counts), S + 1, C): counts[b] tokens' x_T and step noise from generators[b], request by request."""
        s, c = self.head.num_steps, self.head.token_dim
        return torch.stack([draw_token_noise(g, s, c, device) for g, n in zip(generators, counts) for _ in range(n)])

    def first_rows(self, rows: torch.Tensor, generators) -> torch.Tensor:
        """One token per condition row (B, W + 1), request b drawing from generators[b]: (B, C)."""
        none = [None] * len(rows)  # no draft condition and head: plain draws
        return torch.stack(self._draw(rows, none, none, generators))

    def first(self, row: torch.Tensor, generator=None) -> torch.Tensor:
        return self.first_rows(row[None], [generator])[0]

    def __call__(self, d: Draft, rows: torch.Tensor, generator=None) -> Verdict:
        return self.verify_rows([d], [rows], [generator])[0]

    def verify_rows(self, drafts: list[Draft], rows: list[torch.Tensor], generators) -> list[Verdict]:
        """Accept or reject every request's draft (one batched density call), then draw every request's next token
        (bonus or residual) in shared batched rounds."""
        ns = [len(d) for d in drafts]
        for d, n in zip(drafts, ns):
            if n and (not isinstance(d, TrajectoryDraft) or d.states is None):
                raise GenerationConfigError("CSpD verifies TrajectoryDraft proposals (states, log_q, cond_q, "
                                            f"head_q); got a {type(d).__name__}")
        drafted = [b for b, n in enumerate(ns) if n]
        a = [0] * len(drafts)  # accepted nodes per request
        if drafted:
            dev = rows[drafted[0]].device
            log_p = log_density(self.head, torch.cat([rows[b][: ns[b]] for b in drafted]),
                                torch.cat([drafts[b].states.to(dev) for b in drafted]), self.temperature)
            log_q = torch.cat([drafts[b].log_q.to(dev) for b in drafted])
            for b, ratio in zip(drafted, (log_p - log_q).split([ns[b] for b in drafted])):
                a[b] = accepted_prefix(ratio, torch.rand(ns[b], generator=generators[b], device=dev))
        rejected = [a[b] < n for b, n in enumerate(ns)]
        nxt = self._draw(torch.stack([r[k] for r, k in zip(rows, a)]),
                         [d.cond_q[k] if rej else None for d, k, rej in zip(drafts, a, rejected)],
                         [d.head_q if rej else None for d, rej in zip(drafts, rejected)], generators)
        return [Verdict(list(range(k)), list(d.tokens[:k]), None, t, bonus=not rej)
                for d, k, t, rej in zip(drafts, a, nxt, rejected)]

    def residual(self, row_p: torch.Tensor, row_q: torch.Tensor, head_q: TokenDiffusion, generator=None):
        """A token from norm(max(0, p - q)) over chains, by acceptance-rejection with proposal p and bound 1."""
        return self._draw(row_p[None], [row_q], [head_q], [generator])[0]

    def _draw(self, rows_p: torch.Tensor, rows_q: list, heads_q: list, generators) -> list[torch.Tensor]:
        """One token per request: a plain draw from the target's head at rows_p[i] where rows_q[i] is None, else a
        residual draw against the draft head heads_q[i] at rows_q[i].

        Rounds: every request still waiting draws its chains from its own generator (a plain request 1, a residual
        one `candidates` in the first round, twice as many each further round up to MAX_ROUND) and a residual
        request keeps its first chain with coin < 1 - q/p; the chains of all waiting requests are sampled in one
        batched head call and scored under each draft head in one call."""
        out: list = [None] * len(rows_p)
        waiting, drawn, r, dev = list(range(len(rows_p))), 0, self.candidates, rows_p.device
        while waiting:
            if drawn >= self.max_candidates:
                raise ResidualSamplingError(
                    f"the residual sampler drew {drawn} chains from the target's head without keeping one: draft "
                    "and target agree almost everywhere at this position, so the residual has almost no mass. Raise "
                    "max_candidates (SpeculativeImagePipeline(..., cspd_max_candidates=...)) to keep sampling; no "
                    "token is made up")
            r = min(r, self.max_candidates - drawn)
            counts = [1 if rows_q[i] is None else r for i in waiting]
            job = torch.tensor(waiting).repeat_interleave(torch.tensor(counts))  # request of every chain
            noise = self._noise(counts, [generators[i] for i in waiting], dev)
            chains = sample_chains(self.head, rows_p[job.to(dev)], noise, self.temperature)
            keep_prob = self._keep_prob(chains, job.tolist(), rows_q, heads_q)
            start, still = 0, []
            for i, c in zip(waiting, counts):
                if rows_q[i] is None:
                    out[i] = chains.tokens[start]
                else:
                    coins = torch.rand(c, generator=generators[i], device=dev)
                    hit = (coins < keep_prob[start: start + c]).nonzero()
                    if len(hit):
                        out[i] = chains.tokens[start + int(hit[0])]
                    else:
                        still.append(i)
                    self.residual_draws += c
                start += c
            if any(rows_q[i] is not None for i in waiting):
                drawn, r = drawn + r, min(2 * r, self.MAX_ROUND)
            waiting = still
        return out

    def _keep_prob(self, chains, job: list[int], rows_q: list, heads_q: list) -> torch.Tensor:
        """max(0, 1 - q/p) of every chain drawn for a residual request (1 for plain draws), q under that request's
        draft head; one density call per distinct draft head."""
        keep = torch.ones(len(job), device=chains.log_prob.device)
        heads = {id(heads_q[i]): heads_q[i] for i in set(job) if rows_q[i] is not None}
        for key, head_q in heads.items():
            pos = [k for k, i in enumerate(job) if rows_q[i] is not None and id(heads_q[i]) == key]
            at = torch.tensor(pos, device=keep.device)
            log_q = log_density(head_q, torch.stack([rows_q[job[k]] for k in pos]), chains.states[at],
                                self.temperature)
            keep[at] = -torch.expm1(log_q - chains.log_prob[at])  # 1 - q/p (<= 0 where q >= p: never kept)
        return keep
