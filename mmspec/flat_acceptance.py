"""Batched, flat acceptance for chains: one call accepts for a whole batch, with no host sync.

Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) over chain drafts, vectorised as vLLM's rejection
sampler does it: the drafts of every request in one tensor, every decision in a few batched ops. Per request b with
n_b draft tokens x_1..x_{n_b}, target rows p_0..p_{n_b} and draft rows q_1..q_{n_b} (or none: a deterministic,
point-mass proposal):

* greedy requests accept x_i while it is the argmax of p_{i-1}; the next token is the argmax of the row they stop at;
* sampled requests accept x_i when u_i * q_i(x_i) < p_{i-1}(x_i) (probability min(1, p/q); q = 1 for a point mass,
  and a node whose q gives its token no mass is verified as a point mass, as `accept_speculative` does). The next
  token is drawn from the normalised residual max(p - q, 0) of the first rejected position, or from the row after
  the last draft token (the bonus) when all were accepted.

Randomness comes in as `coins` (B, K + 1) uniforms: the uncertain decisions take them in order, the next token the
last one, by inverse CDF (`u * total` against the cumulative sum). The loop draws each request's coins from its own
generator, n_b + 1 of them per step, so a request's output is the same alone and inside any batch; the tree-walk
kernels take the same coins the same way, so the batched path and the walk agree draw for draw. The inverse CDF keeps
the kernel's output a piecewise-constant function of the coins, so tests enumerate it exactly
(tests/engine/test_flat_acceptance.py).

`to_flat` / `from_flat` convert to vLLM's flat layout (draft tokens of all requests concatenated,
`cu_num_draft_tokens`), which `accept_flat` takes.
"""
from __future__ import annotations

from typing import Sequence

import torch


def accept_chains(draft_tokens: torch.Tensor, num_drafts: torch.Tensor, p: torch.Tensor, q: torch.Tensor | None,
                  coins: torch.Tensor | None, greedy: torch.Tensor | bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_accepted (B,), next_token (B,)) for chain drafts, on the device, without a host sync.

    draft_tokens (B, K) long, right-padded; num_drafts (B,) long; p (B, K + 1, V) target probabilities (processed
    logits are enough for greedy rows); q (B, K, V) draft probabilities or None (point-mass proposals); coins
    (B, K + 1) uniforms in [0, 1) (None when every row is greedy); greedy: (B,) bool or one bool for the batch.
    Coins are used as the tree walk (`accept_speculative`, `accept_point_mass`) uses them when handed the same
    ones: certain decisions (probability 0 or 1) take none, the others take coins 0, 1, ... in order, and the next
    token takes the last one (`draw_from_cdf`), so the two agree draw for draw.
    """
    b, k = draft_tokens.shape
    dev, v = p.device, p.shape[-1]
    rows = torch.arange(b, device=dev)
    some_greedy = greedy if isinstance(greedy, bool) else True  # a tensor is not read on the host (no sync)
    greedy = torch.as_tensor(greedy, device=dev).expand(b)
    draft_tokens, num_drafts = draft_tokens.to(dev), num_drafts.to(dev)
    valid = torch.arange(k, device=dev)[None, :] < num_drafts[:, None]  # (B, K)
    accept = (p[:, :k].argmax(-1) == draft_tokens) if some_greedy else torch.zeros_like(valid)
    if coins is not None:
        coins = coins.to(dev)
        p_x = p[:, :k].gather(-1, draft_tokens[..., None])[..., 0].float()  # (B, K)
        q_x = torch.ones_like(p_x) if q is None else q.gather(-1, draft_tokens[..., None])[..., 0].float()
        q_x = torch.where(q_x > 0, q_x, torch.ones_like(q_x))  # no mass for its own token: a point mass
        ratio = p_x / q_x
        sure, never = ratio >= 1, p_x <= 0
        uncertain = valid & ~sure & ~never
        index = (uncertain.long().cumsum(1) - 1).clamp(min=0)  # the coin each uncertain decision takes
        sampled = sure | (uncertain & (coins[:, :k].gather(1, index) < ratio))
        accept = torch.where(greedy[:, None], accept, sampled)
    n_acc = (accept & valid).long().cumprod(1).sum(1)  # (B,) accepted tokens: the first rejection stops the chain
    row = p[rows, n_acc].float()  # (B, V) the target row the chain stops at
    next_greedy = row.argmax(-1)
    if coins is None:
        return n_acc, next_greedy
    dist = row  # all accepted: the bonus is drawn from the row after the last draft token, as it is
    if k:
        at = n_acc.clamp(max=k - 1)
        x = draft_tokens[rows, at]
        point = torch.nn.functional.one_hot(x, v).to(row.dtype)
        q_row = point if q is None else q[rows, at].float()
        q_row = torch.where((q_row[rows, x] > 0)[:, None], q_row, point)
        residual = (row - q_row).clamp_min(0.0)
        mass = residual.sum(-1, keepdim=True)
        residual = torch.where(mass > torch.finfo(row.dtype).eps, residual / mass, row)  # `kernels.normalised`
        dist = torch.where((n_acc < num_drafts)[:, None], residual, row)
    return n_acc, torch.where(greedy, next_greedy, draw_from_cdf(dist, coins[:, k]))


def draw_from_cdf(dist: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Tokens drawn from distributions dist (..., V) (normalised or not) by inverse CDF with uniforms u (...): the
    first token whose cumulative mass exceeds u times the total. Tokens of no mass are never drawn."""
    cdf = dist.float().cumsum(-1)
    target = (u.to(cdf.device, cdf.dtype) * cdf[..., -1]).unsqueeze(-1).contiguous()
    return torch.searchsorted(cdf.contiguous(), target, right=True).squeeze(-1).clamp(max=dist.shape[-1] - 1)


def draw_coins(generators: Sequence[torch.Generator], num_drafts: Sequence[int], width: int,
               device) -> torch.Tensor:
    """(B, width + 1) coins: row b's first num_drafts[b] decisions and its last column (the next token's draw) come
    from its own generator, in that fixed order (n_b + 1 draws per step), so no other request changes them."""
    out = torch.zeros(len(num_drafts), width + 1, device=device)
    for i, (g, n) in enumerate(zip(generators, num_drafts)):
        u = torch.rand(n + 1, generator=g, device=g.device if g is not None else device).to(device)
        out[i, :n] = u[:n]
        out[i, width] = u[n]
    return out


# --- vLLM's flat layout -------------------------------------------------------------------------------------------
def to_flat(draft_tokens: torch.Tensor, num_drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded (B, K) drafts -> (draft_token_ids (T,), cu_num_draft_tokens (B,)) as vLLM lays them out."""
    k = draft_tokens.shape[1]
    valid = torch.arange(k, device=draft_tokens.device)[None, :] < num_drafts[:, None]
    return draft_tokens[valid], num_drafts.cumsum(0)


def from_flat(draft_token_ids: torch.Tensor, cu_num_draft_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's flat layout -> padded (B, K) drafts (pads 0) and num_drafts (B,)."""
    num = torch.diff(cu_num_draft_tokens, prepend=cu_num_draft_tokens.new_zeros(1))
    k = int(num.max()) if num.numel() else 0
    out = draft_token_ids.new_zeros(len(num), k)
    valid = torch.arange(k, device=out.device)[None, :] < num[:, None]
    out[valid] = draft_token_ids
    return out, num


def accept_flat(draft_token_ids: torch.Tensor, cu_num_draft_tokens: torch.Tensor, target_probs: torch.Tensor,
                draft_probs: torch.Tensor | None, coins: torch.Tensor | None,
                greedy: torch.Tensor | bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`accept_chains` on vLLM's flat layout: target_probs (T + B, V), each request's n_b draft positions followed
    by its bonus row; draft_probs (T, V) or None; coins (B, K + 1) as in `accept_chains`."""
    tokens, num = from_flat(draft_token_ids, cu_num_draft_tokens)
    b, k = tokens.shape
    starts = torch.cat([num.new_zeros(1), (num + 1).cumsum(0)[:-1]])  # where request b's rows begin
    idx = (starts[:, None] + torch.arange(k + 1, device=num.device)[None, :]).clamp(max=target_probs.shape[0] - 1)
    idx = torch.minimum(idx, (starts + num)[:, None])  # pads repeat the request's bonus row
    p = target_probs[idx]  # (B, K + 1, V)
    q = None
    if draft_probs is not None:
        qs = torch.cat([num.new_zeros(1), num.cumsum(0)[:-1]])
        qidx = torch.minimum(qs[:, None] + torch.arange(k, device=num.device)[None, :],
                             (qs + (num - 1).clamp_min(0))[:, None]).clamp(min=0)
        q = draft_probs[qidx] if draft_probs.shape[0] else draft_probs.new_zeros(b, k, target_probs.shape[-1])
    return accept_chains(tokens, num, p, q, coins, greedy)
