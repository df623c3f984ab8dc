"""Output-TV measurement of relaxed rules and the TV-budget mode, by exact enumeration in float64."""
from __future__ import annotations

import pytest
import torch
from kernel_cases import sampled_drafts, target_rows
from relaxed_cases import (
    EXACT,
    SHAPES,
    assert_same_outcomes,
    codebook,
    first_position_distribution,
    joint_tv,
    model,
    rows,
)

from image_ar.acceptance import (
    first_token_distribution,
    gsd,
    lantern,
    lantern_acceptance,
    lantern_output_distribution,
    latent_neighbours,
    output_distribution,
    output_tv,
    tv_distance,
)
from mmspec.errors import GenerationConfigError, InvalidInputError
from mmspec.kernels import accept_speculative
from mmspec.tree import Draft

F64 = torch.float64
BUDGETS = [0.0, 0.005, 0.02, 0.08, 1.0]


def kernels(vocab: int, seed: int, tv_budget):
    """Budgeted kernels of every rule, with generous relaxations so that the budget is what binds
    (tv_budget=None: the same rules unbudgeted, with the deficit residual)."""
    nb = latent_neighbours(codebook(seed, vocab), vocab - 1)
    kw = dict(tv_budget=tv_budget, residual="deficit")
    return {
        "lantern": lantern(nb, delta=0.5, **kw),
        "lantern++": lantern(nb, lam=6.0, k=3, **kw),
        "gsd": gsd(rank_window=4, prob_threshold=0.5, **kw),
    }


# --- the formula -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_output_tv_formula(seed):
    vocab = 8
    p, q = rows(seed, vocab)
    a = torch.rand(vocab, generator=torch.Generator().manual_seed(seed), dtype=F64)
    out = output_distribution(p, q, a)
    # the output distribution by its definition: draw x ~ q, keep it with a(x), else sample the deficit residual
    residual = (p - q * a).clamp_min(0.0)
    mixture = q * a + (1 - float((q * a).sum())) * residual / residual.sum()
    assert torch.allclose(out, mixture, atol=EXACT, rtol=0) and abs(float(out.sum()) - 1) < EXACT
    assert output_tv(p, q, a) == pytest.approx(tv_distance(out, p), abs=EXACT)
    assert float((q * a).sum()) <= float(torch.minimum(p, q).sum()) + output_tv(p, q, a) + EXACT
    lossless = torch.where(q > 0, torch.clamp(p / torch.where(q > 0, q, 1.0), max=1.0), 1.0)
    assert output_tv(p, q, lossless) <= EXACT
    assert torch.allclose(output_distribution(p, q, lossless), p, atol=EXACT, rtol=0)
    assert output_tv(p, q, torch.ones_like(p)) == pytest.approx(tv_distance(p, q), abs=EXACT)


def test_output_tv_bad_arguments():
    p = torch.full((4,), 0.25, dtype=F64)
    with pytest.raises(InvalidInputError, match=r"q has shape \(3,\)"):
        output_tv(p, p[:3], p)
    with pytest.raises(InvalidInputError, match=r"\[0, 1\]"):
        output_tv(p, p, p * 8)


# --- the budget, one position ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("rule", ["lantern", "lantern++", "gsd"])
def test_budget_holds_on_one_position(seed, rule):
    vocab = 7
    p, q = rows(seed, vocab, sparse=seed != 0)
    floor = float(torch.minimum(p, q).sum())  # speculative sampling's acceptance
    unbudgeted, full = first_token_distribution(kernels(vocab, seed, None)[rule], p, q)
    if seed < 2:
        assert full > floor + 1e-2  # the relaxation (so the budget) matters here
    accepted = []
    for eps in BUDGETS:
        kernel = kernels(vocab, seed, eps)[rule]
        out, acc = first_token_distribution(kernel, p, q)
        tv = tv_distance(out, p)
        assert tv <= eps + EXACT, (eps, tv)
        assert tv >= min(eps, tv_distance(unbudgeted, p)) - 1e-4  # the budget is used, not only respected
        assert floor - EXACT <= acc <= floor + eps + EXACT
        v = kernel(Draft.chain([int(q.argmax())], q=q[None]), torch.stack([p, p]), coin=lambda _: False)
        assert v.tv[0] == pytest.approx(tv, abs=EXACT)  # the deficit residual: the formula is the exact TV
        accepted.append(acc)
    assert accepted[0] == pytest.approx(floor, abs=EXACT)
    assert accepted[-1] == pytest.approx(full, abs=EXACT)  # eps = 1 leaves the rule as it is
    if rule != "gsd":  # TV and acceptance are monotone in LANTERN's relaxation, so in the budget
        assert all(b >= a - EXACT for a, b in zip(accepted, accepted[1:]))


def test_a_large_budget_is_the_unbudgeted_rule():
    vocab = 7
    for seed in range(3):
        p, q = rows(seed, vocab)
        nb = latent_neighbours(codebook(seed, vocab), vocab - 1)
        for kw in (dict(delta=0.3), dict(lam=4.0)):
            full, acc_full = first_token_distribution(lantern(nb, residual="deficit", **kw), p, q)
            budgeted, acc = first_token_distribution(lantern(nb, tv_budget=1.0, **kw), p, q)
            assert torch.allclose(full, budgeted, atol=EXACT, rtol=0) and acc == pytest.approx(acc_full, abs=EXACT)
            assert acc == pytest.approx(float((q * lantern_acceptance(p, q, nb, **kw)).sum()), abs=EXACT)


# --- the budget on chains and trees ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, siblings", [
    ("chain2", "iid"), ("root2", "iid"), ("root2", "without_replacement"), ("tree3", "iid"),
])
def test_zero_budget_is_speculative_sampling(shape, siblings):
    vocab = 5
    P, Q = model(1, vocab), model(2, vocab)
    for kernel in kernels(vocab, 0, 0.0).values():
        for draft, _ in sampled_drafts(Q, vocab, SHAPES[shape], siblings):
            assert_same_outcomes(kernel, accept_speculative, draft, target_rows(P, draft))


@pytest.mark.parametrize("shape, siblings", [
    ("root2", "iid"), ("root2", "without_replacement"), ("tree3", "iid"), ("tree3", "without_replacement"),
])
@pytest.mark.parametrize("eps", [0.01, 0.05])
def test_budget_holds_with_siblings(shape, siblings, eps):
    vocab = 5
    P, Q = model(3, vocab), model(4, vocab)
    drafts = sampled_drafts(Q, vocab, SHAPES[shape], siblings)
    for name, kernel in kernels(vocab, 1, eps).items():
        tv = tv_distance(first_position_distribution(kernel, P, drafts), P(()))
        assert eps / 2 <= tv <= eps + EXACT, (name, tv)
        assert joint_tv(kernel, P, drafts, 2) <= 2 * eps + EXACT  # per position, so at most eps per token


def test_budget_holds_on_a_chain_of_two():
    vocab = 5
    P, Q = model(5, vocab), model(6, vocab)
    drafts = sampled_drafts(Q, vocab, SHAPES["chain2"])
    for eps in (0.01, 0.04):
        for name, kernel in kernels(vocab, 2, eps).items():
            assert joint_tv(kernel, P, drafts, 2) <= 2 * eps + EXACT, name
            for draft, _ in drafts:
                v = kernel(draft, target_rows(P, draft), coin=lambda _: True)
                assert len(v.tv) == len(v.path) + 1 and max(v.tv) <= eps + EXACT
                assert v.tv[-1] == 0.0 if v.bonus else v.tv[-1] >= 0.0


# --- LANTERN's caveat (ALGORITHMS.md §5) -------------------------------------------------------------------------------
def test_delta_bounds_the_borrowed_mass_not_the_drift():
    """Flat p over V = 1024, delta = 0.1, k = 1000 (LANTERN's defaults), q peaked.

    Every token borrows m* = 102 neighbours (c_102 = 102/1024 <= 0.1 < c_103), so r~(y) = 103/1024 ~ 0.1006 for every
    y, whatever the codebook. q = 0.5 uniform + 0.5 on five tokens puts q = 0.1 + 0.5/1024 ~ 0.1005 on the peaks and
    0.5/1024 elsewhere: r~ >= q everywhere, so everything is accepted, the output is q itself, and its TV to p is
    TV(p, q) = 0.5 (1 - 5/1024) ~ 0.4976, though each candidate moved at most 0.1 of mass.
    """
    vocab = 1024
    nb = latent_neighbours(codebook(9, vocab, dim=8), 1000)
    p = torch.full((vocab,), 1 / vocab, dtype=F64)
    peaks = torch.tensor([3, 100, 517, 800, 1023])
    q = torch.full((vocab,), 0.5 / vocab, dtype=F64)
    q[peaks] += 0.5 / len(peaks)
    a = lantern_acceptance(p, q, nb, delta=0.1)
    assert float((q * a).sum()) == pytest.approx(1.0, abs=EXACT) and bool((a == 1.0).all())
    assert output_tv(p, q, a) == pytest.approx(tv_distance(p, q), abs=EXACT)
    assert tv_distance(p, q) == pytest.approx(0.5 * (1 - 5 / vocab), abs=EXACT) and tv_distance(p, q) > 0.49
    assert torch.allclose(lantern_output_distribution(p, q, nb, delta=0.1), q, atol=EXACT, rtol=0)
    # the kernel: a peak is accepted without a coin (LANTERN's residual never comes into play)
    kernel = lantern(nb, delta=0.1, report_tv=True)
    never = lambda prob: pytest.fail(f"acceptance is certain, got a coin of {prob}")  # noqa: E731
    v = kernel(Draft.chain([517], q=q[None]), torch.stack([p, p]), coin=never)
    assert v.path == [0] and v.tv[0] == pytest.approx(tv_distance(p, q), abs=1e-9)
    # with a budget, the same rule stays within it and accepts at most sum min(p, q) + eps
    eps = 0.05
    budgeted = lantern(nb, delta=0.1, tv_budget=eps)
    level, m, _, tv = budgeted.rule.search(p, q, eps)
    assert 0.0 < level < 1.0 and eps - 1e-4 <= tv <= eps
    assert float(torch.minimum(p, q).sum()) <= float(m.sum()) <= float(torch.minimum(p, q).sum()) + eps + EXACT
    for x in (517, 10):
        asked = []
        v = budgeted(Draft.chain([x], q=q[None]), torch.stack([p, p]), coin=lambda prob: asked.append(prob) or True)
        assert v.tv[0] == pytest.approx(tv, abs=EXACT)
        assert (asked[0] if asked else 1.0) == pytest.approx(float(m[x] / q[x]), abs=EXACT)


def test_bad_budgets():
    nb = latent_neighbours(codebook(0, 5), 4)
    for bad in (-0.01, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(GenerationConfigError, match="tv_budget"):
            lantern(nb, delta=0.1, tv_budget=bad)
        with pytest.raises(GenerationConfigError, match="tv_budget"):
            gsd(tv_budget=bad)
    k = lantern(nb, delta=0.1, tv_budget=0.02)
    assert k.name == "lantern[tv<=0.02]" and k.lossless is False and k.residual == "deficit"
