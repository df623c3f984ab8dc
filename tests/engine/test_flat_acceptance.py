"""The batched flat acceptance kernel (mmspec.flat_acceptance) by exact enumeration against the tree walk.

The kernel's only randomness is its coins: one uniform per uncertain decision, in order, and one for the next token
(inverse CDF), so its output is piecewise constant in them. Evaluating it just inside both ends of every cell between
the breakpoints a correct kernel can have (each decision's acceptance probability; every cumulative sum of each
distribution the next token can come from), requiring the two to agree, and weighting by the cell's size gives its
exact output distribution, which must equal the one `enumerate_verdicts` gives for the tree-walk kernels
(`accept_speculative`, `accept_point_mass`).
"""
from __future__ import annotations

import itertools
from collections import defaultdict

import pytest
import torch

from mmspec.flat_acceptance import accept_chains, accept_flat, draw_coins, from_flat, to_flat
from mmspec.kernels import accept_greedy, accept_point_mass, accept_speculative
from mmspec.testing.enumerate import enumerate_verdicts
from mmspec.tree import Draft

V = 5


def _case(seed: int, n: int, with_q: bool, zeros: bool):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(n + 1, V, generator=g, dtype=torch.float64) * 1.5, -1)
    q = torch.softmax(torch.randn(max(n, 1), V, generator=g, dtype=torch.float64) * 1.5, -1)[:n]
    if zeros:  # tokens the target or the drafter cannot produce
        p[:, 0] = 0.0
        p = p / p.sum(-1, keepdim=True)
        if n:
            q[0, 1] = 0.0
            q = q / q.sum(-1, keepdim=True)
    tokens = [int(torch.multinomial(q[i], 1, generator=g)) if with_q else int(torch.randint(V, (), generator=g))
              for i in range(n)]
    if zeros and n > 1:
        tokens[1] = 0  # a token the target gives no mass
    return p, (q if with_q else None), tokens


def _walk_distribution(p, q, tokens) -> dict:
    draft = Draft(torch.tensor(tokens, dtype=torch.long), torch.arange(-1, len(tokens) - 1), q)
    kernel = accept_speculative if q is not None else accept_point_mass
    out = defaultdict(float)
    for w, verdict in enumerate_verdicts(kernel, draft, p):
        for t, pt in enumerate(verdict.residual.tolist()):
            if w * pt > 0:
                out[(len(verdict.path), t)] += w * pt
    return out


def _candidate_breaks(p, q, tokens) -> list[float]:
    rows = [p[i] for i in range(len(p))]
    for i, x in enumerate(tokens):
        qi = q[i] if q is not None and q[i, x] > 0 else torch.nn.functional.one_hot(torch.tensor(x), V).double()
        r = (p[i] - qi).clamp_min(0)
        if r.sum() > 0:
            rows.append(r / r.sum())
    pts = {0.0, 1.0}
    for r in rows:
        pts.update((r / r.sum()).cumsum(0).tolist())
    return sorted(x for x in pts if 0.0 <= x <= 1.0)


def _run(p, q, tokens, decision_coins, last_coin):
    n = len(tokens)
    k = max(n, 1)
    c = torch.zeros(1, k + 1)
    c[0, : len(decision_coins)] = torch.tensor(decision_coins, dtype=torch.float32)
    c[0, k] = last_coin
    toks = torch.tensor([tokens + [0] * (k - n)], dtype=torch.long)
    pp = torch.cat([p, p[-1:].expand(k + 1 - len(p), V)]).float()[None]
    qq = None if q is None else torch.cat([q, q.new_zeros(k - n, V)]).float()[None]
    acc, nxt = accept_chains(toks, torch.tensor([n]), pp, qq, c, False)
    return int(acc), int(nxt)


DELTA = 1e-5  # how close to a cell's ends the kernel is evaluated


def _kernel_distribution(p, q, tokens) -> dict:
    """The kernel's exact output distribution, with a check that it is constant on every cell: it is evaluated
    just inside both ends of each cell (every decision coin at the low end of its cell, then every one at the high
    end), so a decision or draw threshold anywhere but where a correct kernel has it makes the two disagree."""
    n = len(tokens)
    alphas = []
    for i, x in enumerate(tokens):
        qx = float(q[i, x]) if q is not None and q[i, x] > 0 else 1.0
        alphas.append(min(1.0, float(p[i, x]) / qx))
    breaks = _candidate_breaks(p, q, tokens)
    cells = [(a, b) for a, b in zip(breaks, breaks[1:]) if b - a > 4 * DELTA]
    out = defaultdict(float)
    for decisions in itertools.product([True, False], repeat=n):
        w, low, high = 1.0, [], []
        for accept, a in zip(decisions, alphas):
            if a >= 1.0 or a <= 0.0:  # a certain decision takes no coin
                w *= float(accept == (a >= 1.0))
                continue
            lo, hi = (0.0, a) if accept else (a, 1.0)  # uncertain ones take the coins in order
            w *= hi - lo
            low.append(lo + DELTA)
            high.append(hi - DELTA)
        if w < 4 * DELTA:
            continue
        for lo, hi in cells:
            first, second = _run(p, q, tokens, low, lo + DELTA), _run(p, q, tokens, high, hi - DELTA)
            assert first == second, f"the kernel changes its output inside a cell: {first} vs {second}"
            out[first] += w * (hi - lo)
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [0, 1, 2, 3])
@pytest.mark.parametrize("with_q", [True, False])
def test_batched_kernel_equals_the_tree_walk_exactly(seed, n, with_q):
    p, q, tokens = _case(seed, n, with_q, zeros=seed % 2 == 1)
    want, got = _walk_distribution(p, q, tokens), _kernel_distribution(p, q, tokens)
    keys = set(want) | set(got)
    assert max(abs(want[k] - got[k]) for k in keys) < 1e-4, (sorted(want.items()), sorted(got.items()))
    assert abs(sum(got.values()) - 1.0) < 1e-4


def test_greedy_rows_equal_the_greedy_walk_and_mix_with_sampled_rows():
    g = torch.Generator().manual_seed(1)
    b, k = 6, 4
    p = torch.softmax(torch.randn(b, k + 1, V, generator=g), -1)
    top = p.argmax(-1)
    tokens = top[:, :k].clone()
    num = torch.tensor([4, 3, 0, 2, 4, 1])
    tokens[0, 2] = (tokens[0, 2] + 1) % V  # row 0 rejects at depth 2
    tokens[3, 0] = (tokens[3, 0] + 1) % V  # row 3 rejects at once
    acc, nxt = accept_chains(tokens, num, p, None, None, True)
    for i in range(b):
        d = Draft.chain(tokens[i, : num[i]].tolist())
        v = accept_greedy(d, p[i, : num[i] + 1])
        assert (int(acc[i]), int(nxt[i])) == (len(v.path), v.next_token)
    greedy = torch.tensor([True, False, True, False, True, False])
    coins = torch.rand(b, k + 1, generator=g)
    mixed = accept_chains(tokens, num, p, None, coins, greedy)
    alone = [accept_chains(tokens[i: i + 1], num[i: i + 1], p[i: i + 1], None, coins[i: i + 1], greedy[i: i + 1])
             for i in range(b)]
    assert mixed[0].tolist() == [int(a[0]) for a in alone] and mixed[1].tolist() == [int(a[1]) for a in alone]
    assert mixed[0][greedy].tolist() == acc[greedy].tolist() and mixed[1][greedy].tolist() == nxt[greedy].tolist()


def test_flat_layout_round_trip_and_accept_flat():
    g = torch.Generator().manual_seed(2)
    num = torch.tensor([3, 0, 2])
    padded = torch.tensor([[1, 2, 3], [0, 0, 0], [4, 1, 0]])
    flat, cu = to_flat(padded, num)
    assert flat.tolist() == [1, 2, 3, 4, 1] and cu.tolist() == [3, 3, 5]
    back, n2 = from_flat(flat, cu)
    assert torch.equal(back, padded) and torch.equal(n2, num)
    p_pad = torch.softmax(torch.randn(3, 4, V, generator=g), -1)
    q_pad = torch.softmax(torch.randn(3, 3, V, generator=g), -1)
    target_flat = torch.cat([p_pad[i, : int(num[i]) + 1] for i in range(3)])  # (T + B, V)
    draft_flat = torch.cat([q_pad[i, : int(num[i])] for i in range(3)])  # (T, V)
    coins = torch.rand(3, 4, generator=g)
    want = accept_chains(padded, num, p_pad, q_pad, coins, False)
    got = accept_flat(flat, cu, target_flat, draft_flat, coins, False)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_coins_of_a_request_do_not_depend_on_the_batch():
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    batch = draw_coins(gens, [3, 0, 2], 3, "cpu")
    for i, (s, n) in enumerate(zip((5, 6, 7), [3, 0, 2])):
        alone = draw_coins([torch.Generator().manual_seed(s)], [n], n, "cpu")
        assert torch.equal(batch[i, :n], alone[0, :n]) and batch[i, 3] == alone[0, n]


@pytest.mark.parametrize("with_q", [True, False])
def test_batched_kernel_and_the_walk_agree_draw_for_draw_on_the_same_coins(with_q):
    """Handed the same coins (decisions in order, the last for the next token), the walk and the batched kernel
    return the same tokens: the loop can mix them (plug-in and relaxed rules walk) without changing any draw."""
    from mmspec.flat_acceptance import draw_from_cdf

    g = torch.Generator().manual_seed(11)
    for trial in range(200):
        n = trial % 4
        p, q, tokens = _case(1000 + trial, n, with_q, zeros=trial % 3 == 0)
        p, q = p.float(), None if q is None else q.float()
        coins = torch.rand(n + 1, generator=g)
        used = iter(coins[:n].tolist())
        draft = Draft(torch.tensor(tokens, dtype=torch.long), torch.arange(-1, n - 1), q)
        kernel = accept_speculative if q is not None else accept_point_mass
        verdict = kernel(draft, p, coin=lambda prob: next(used) < prob)
        walk = (len(verdict.path), int(draw_from_cdf(verdict.residual, coins[n])))
        assert _run(p.double(), None if q is None else q.double(), tokens, coins[:n].tolist(), float(coins[n])) == walk
