"""Acceptance kernels by exact enumeration in float64 (ALGORITHMS.md §3.5), no Monte Carlo.

A synthetic target P(prefix) and drafter Q(prefix) over a tiny vocabulary; every draft the drafter can produce for
a tree shape is enumerated with its probability, and for each draft every sequence of coin outcomes (the kernel's
only randomness) is enumerated with its probability. Path tokens + residual give a distribution over emitted
prefixes; extending each with P's own conditionals to D + 1 tokens must reproduce P's joint over D + 1 tokens.
"""
from __future__ import annotations

import itertools
from collections import defaultdict

import pytest
import torch

from mmspec.errors import DraftError, GenerationConfigError, NonFiniteLogitsError
from mmspec.kernels import (
    KERNELS,
    Verdict,
    accept_greedy,
    accept_point_mass,
    accept_speculative,
    accept_typical,
    finalize,
    select_kernel,
    typical,
)
from mmspec.testing.enumerate import enumerate_verdicts
from mmspec.testing import exact
from kernel_cases import ancestors, sampled_drafts, synthetic, target_rows
from mmspec.tree import Draft, StaticTree

F64 = torch.float64
LOSSLESS_TV = 1e-9

SHAPES = {
    "chain1": StaticTree.chain(1),
    "chain2": StaticTree.chain(2),
    "chain3": StaticTree.chain(3),
    "tree5": StaticTree(((0,), (1,), (0, 0), (1, 0), (0, 1))),
    "root3": StaticTree.full((3, 1)),
    "root2": StaticTree.full((2,)),
}


# --- synthetic models (tests/kernel_cases.py) ---------------------------------------------------------------------
def target(vocab):
    return lambda prefix: synthetic(1, vocab, tuple(prefix))


def drafter(vocab):
    return lambda prefix: synthetic(2, vocab, tuple(prefix))


def one_hot_of(model):
    def P(prefix):
        d = model(prefix)
        return torch.zeros_like(d).scatter_(0, d.argmax().view(1), 1.0)
    return P


# --- drafts ------------------------------------------------------------------------------------------------------
def node_prefixes(parent, toks):
    """Prefix (tokens before the node) of every node."""
    return [tuple(ancestors(parent, toks, parent[i])) for i in range(len(parent))]


def make_draft(Q, parent, toks, siblings="iid", with_q=True):
    q = torch.stack([Q(pre) for pre in node_prefixes(parent, toks)]) if with_q and toks else None
    if with_q and not toks:
        q = torch.zeros(0, Q(()).shape[0], dtype=F64)
    return Draft(torch.tensor(toks, dtype=torch.long), torch.tensor(parent, dtype=torch.long), q, siblings)


def topk_draft(Q, shape: StaticTree):
    """Deterministic draft: node token = rank-th most likely token of Q at its prefix (Medusa/EAGLE static tree)."""
    parent, toks = shape.parent, []
    for i, r in enumerate(shape.rank):
        prefix = tuple(ancestors(parent, toks, parent[i]))
        toks.append(int(Q(prefix).argsort(descending=True, stable=True)[r]))
    return make_draft(Q, parent, toks, with_q=False)


# --- exact enumeration of coin outcomes --------------------------------------------------------------------------
def coin_outcomes(kernel, draft, p):
    """[(probability, verdict)] over every sequence of coin results the kernel can ask for."""
    out = enumerate_verdicts(kernel, draft, p)
    assert abs(sum(w for w, _ in out) - 1.0) < 1e-12
    return out


def emitted_mass(kernel, P, weighted_drafts):
    """{accepted tokens: (V,) mass of the next token}, summed over drafts and coin outcomes."""
    acc = defaultdict(lambda: 0.0)
    for draft, w in weighted_drafts:
        p = target_rows(P, draft)
        for cw, v in coin_outcomes(kernel, draft, p):
            assert v.next_token is None or kernel is accept_greedy
            acc[tuple(v.tokens)] = acc[tuple(v.tokens)] + (w * cw) * v.residual
    return acc


extend = exact._extend  # P's continuation of `start` to `length` tokens, weighted by `mass`, into `out`


def output_tv(kernel, P, weighted_drafts, depth):
    out, ref = defaultdict(float), defaultdict(float)
    for toks, residual in emitted_mass(kernel, P, weighted_drafts).items():
        assert float(residual.min()) >= 0.0
        for y, m in enumerate(residual.tolist()):
            extend(P, toks + (y,), m, depth + 1, out)
    extend(P, (), 1.0, depth + 1, ref)
    assert abs(sum(out.values()) - 1.0) < 1e-9
    return 0.5 * sum(abs(out[s] - ref[s]) for s in set(out) | set(ref))


# --- the lossless kernels ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, siblings, vocab", [
    ("chain1", "iid", 5), ("chain2", "iid", 5), ("chain3", "iid", 5),
    ("tree5", "iid", 4), ("tree5", "without_replacement", 4),
    ("root3", "iid", 4), ("root3", "without_replacement", 5),
])
def test_speculative_is_lossless(shape, siblings, vocab):
    drafts = sampled_drafts(drafter(vocab), vocab, SHAPES[shape], siblings)
    assert output_tv(accept_speculative, target(vocab), drafts, SHAPES[shape].depth) <= LOSSLESS_TV


@pytest.mark.parametrize("shape, siblings, vocab", [
    ("chain2", "iid", 5), ("tree5", "iid", 4), ("root3", "without_replacement", 4),
])
def test_point_mass_is_lossless_for_sampled_drafts(shape, siblings, vocab):
    drafts = sampled_drafts(drafter(vocab), vocab, SHAPES[shape], siblings)
    assert output_tv(accept_point_mass, target(vocab), drafts, SHAPES[shape].depth) <= LOSSLESS_TV


FIXED = [  # (parent, tokens): duplicates among siblings, tokens P gives zero mass, a deep chain
    ([-1, -1, -1, 0, 3], [2, 2, 0, 1, 1]),
    ([-1, 0, 1], [1, 0, 0]),
    ([-1, -1, 0, 0, 1], [3, 1, 1, 1, 4]),
    ([], []),
]


@pytest.mark.parametrize("kernel", [accept_point_mass, accept_speculative])
def test_deterministic_drafts_are_lossless(kernel):
    vocab, P, Q = 5, target(5), drafter(5)
    drafts = [topk_draft(Q, SHAPES[name]) for name in ("chain3", "tree5", "root3")]
    drafts += [make_draft(Q, parent, toks) for parent, toks in FIXED]
    assert any(bool((target_rows(P, d)[d.parent + 1, d.tokens] == 0).any()) for d in drafts), \
        "some fixed draft should hold a token the target gives no mass"
    for draft in drafts:
        for siblings in ("iid", "without_replacement"):
            # A deterministic draft was "sampled" from q = onehot(token); with that q speculative sampling must
            # reduce to point mass (WOR duplicates leave no mass: the q_s(x) = 0 fallback). Point mass ignores q.
            q = torch.nn.functional.one_hot(draft.tokens, vocab).to(F64)
            d = Draft(draft.tokens, draft.parent, q, siblings)
            tv = output_tv(kernel, P, [(d, 1.0)], d.max_depth())
            assert tv <= LOSSLESS_TV, (draft.token_list, draft.parent_list, siblings)


def test_synthetic_models_cover_disjoint_supports():
    P, Q = target(5), drafter(5)
    prefixes = [()] + [(a,) for a in range(5)] + [(a, b) for a in range(5) for b in range(5)]
    assert any(bool(((P(s) == 0) & (Q(s) > 0)).any()) for s in prefixes)
    assert any(bool(((P(s) > 0) & (Q(s) == 0)).any()) for s in prefixes)


# --- greedy ------------------------------------------------------------------------------------------------------
def argmax_chain(P, length):
    seq = ()
    for _ in range(length):
        seq += (int(P(seq).argmax()),)
    return list(seq)


def greedy_cases():
    vocab, Q = 5, drafter(5)
    for name in ("chain3", "tree5", "root3"):
        for draft, _ in sampled_drafts(Q, vocab, SHAPES[name], "iid"):
            yield draft
    for parent, toks in FIXED:
        yield make_draft(Q, parent, toks)
    a, b, c = argmax_chain(target(5), 3)
    yield make_draft(Q, [-1, -1, 1], [a, a, b])  # duplicate siblings, the second with the deeper match
    yield make_draft(Q, [-1, 0, 1], [a, b, c])  # the whole argmax chain
    yield make_draft(Q, [-1, -1, 0, 1, 1], [(a + 1) % 5, a, b, c, b])


def test_greedy_emits_the_argmax_path():
    P = target(5)
    best = argmax_chain(P, 5)
    deepest = 0
    for draft in greedy_cases():
        v = accept_greedy(draft, target_rows(P, draft))
        assert v.emitted == best[: len(v.path) + 1]
        assert v.residual.tolist() == torch.nn.functional.one_hot(torch.tensor(v.next_token), 5).tolist()
        assert v.bonus == (not draft.children[v.path[-1] + 1 if v.path else 0])
        deepest = max(deepest, len(v.path))
    assert deepest == 3  # some drafts match all the way down


def test_greedy_matches_stochastic_kernels_on_one_hot_targets():
    P = one_hot_of(target(5))

    def never(prob):
        raise AssertionError(f"a one-hot target leaves nothing to chance, got a coin of {prob}")

    for draft in greedy_cases():
        p = target_rows(P, draft)
        g = accept_greedy(draft, p)
        for kernel in (accept_point_mass, accept_speculative):
            v = kernel(draft, p, coin=never)
            assert (v.path, v.bonus) == (g.path, g.bonus), kernel.name
            assert torch.equal(v.residual, g.residual), kernel.name


def test_greedy_is_lossless_on_one_hot_targets():
    vocab, P = 4, one_hot_of(target(4))
    drafts = sampled_drafts(drafter(vocab), vocab, SHAPES["tree5"], "iid")
    assert output_tv(accept_greedy, P, drafts, 2) <= LOSSLESS_TV


def test_greedy_duplicate_siblings_take_the_first():
    P = target(5)
    a, b = argmax_chain(P, 2)
    draft = make_draft(drafter(5), [-1, -1, 1], [a, a, b])  # the second duplicate has the deeper match
    v = accept_greedy(draft, target_rows(P, draft))
    assert v.path == [0] and v.next_token == b and v.bonus


# --- the harness is not vacuous ----------------------------------------------------------------------------------
def test_typical_is_flagged_and_measurably_lossy():
    assert accept_typical.lossless is False and accept_typical.name == "typical"
    assert all(KERNELS[n].lossless for n in ("greedy", "point_mass", "speculative"))
    vocab = 4
    drafts = sampled_drafts(drafter(vocab), vocab, SHAPES["tree5"], "iid")
    assert output_tv(accept_typical, target(vocab), drafts, 2) > 1e-3


def resample_from_p(draft, p, *, generator=None, coin=None):
    """Broken on purpose: after a rejection, sample from p instead of the residual."""
    v = accept_speculative(draft, p, coin=coin)
    return Verdict(v.path, v.tokens, p[v.path[-1] + 1 if v.path else 0], None, v.bonus)


def siblings_as_iid(draft, p, *, generator=None, coin=None):
    """Broken on purpose: ignore that siblings were drawn without replacement."""
    return accept_speculative(Draft(draft.tokens, draft.parent, draft.q, "iid"), p, coin=coin)


@pytest.mark.parametrize("broken, shape, siblings, vocab", [
    (resample_from_p, "chain2", "iid", 4),
    (siblings_as_iid, "root2", "without_replacement", 6),  # (small vocabularies can hide this one: V = 4 does)
])
def test_harness_catches_broken_rules(broken, shape, siblings, vocab):
    drafts = sampled_drafts(drafter(vocab), vocab, SHAPES[shape], siblings)
    assert output_tv(broken, target(vocab), drafts, SHAPES[shape].depth) > 1e-3


def test_typical_thresholds():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25] * 4], dtype=F64)
    draft = Draft.chain([2])
    assert accept_typical(draft, p, coin=lambda _: True).path == [0]  # min(0.09, 0.3 exp(-H) ~ 0.096) = 0.09 < 0.15
    strict = typical(epsilon=0.2, delta=1.0)  # threshold min(0.2, exp(-H) ~ 0.31) = 0.2
    assert strict.lossless is False and strict(draft, p, coin=lambda _: True).path == []
    with pytest.raises(GenerationConfigError):
        typical(epsilon=0.0)


def test_typical_prefers_the_longest_then_most_likely_path():
    p = torch.tensor([[0.4, 0.35, 0.25, 0.0]] + [[0.9, 0.1, 0.0, 0.0]] * 4, dtype=F64)
    draft = Draft(torch.tensor([0, 1, 3, 0]), torch.tensor([-1, -1, 0, 1]))  # node 2 fails, node 3 passes
    v = accept_typical(draft, p, coin=lambda _: True)
    assert v.path == [1, 3] and v.bonus and torch.equal(v.residual, p[4])
    draft = Draft(torch.tensor([1, 0]), torch.tensor([-1, -1]))  # both pass at depth 1: more likely one wins
    assert accept_typical(draft, p[:3], coin=lambda _: True).path == [1]


# --- API: finalize, generator draws, selection, errors -----------------------------------------------------------
def test_kernels_sample_next_token_with_the_generator():
    P, Q = target(5), drafter(5)
    draft = topk_draft(Q, SHAPES["tree5"])
    draft.q = torch.stack([Q(pre) for pre in node_prefixes(draft.parent_list, draft.token_list)])
    p = target_rows(P, draft)
    for kernel in (accept_point_mass, accept_speculative, accept_typical, accept_greedy):
        a = kernel(draft, p, generator=torch.Generator().manual_seed(7))
        b = kernel(draft, p, generator=torch.Generator().manual_seed(7))
        assert a.next_token is not None and (a.path, a.next_token) == (b.path, b.next_token)
        assert float(a.residual[a.next_token]) > 0
        assert a.emitted == a.tokens + [a.next_token]
    unsampled = accept_point_mass(draft, p, coin=lambda prob: False)
    assert unsampled.next_token is None and unsampled.path == [] and not unsampled.bonus
    assert finalize(unsampled, torch.Generator().manual_seed(0)).next_token is not None


def test_empty_draft_is_a_plain_bonus_sample():
    p = target(5)(()).unsqueeze(0)
    for kernel in (accept_point_mass, accept_speculative, accept_typical, accept_greedy):
        draft = Draft.empty()
        draft.q = torch.zeros(0, 5, dtype=F64)
        v = kernel(draft, p, coin=lambda _: True)
        assert v.path == [] and v.bonus
        if kernel is not accept_greedy:
            assert torch.equal(v.residual, p[0])


def test_select_kernel():
    assert select_kernel(greedy=True, has_q=True) is accept_greedy
    assert select_kernel(greedy=False, has_q=True) is accept_speculative
    assert select_kernel(greedy=False, has_q=False) is accept_point_mass
    assert select_kernel(greedy=True, has_q=False, name="typical") is accept_typical
    assert set(KERNELS) == {"greedy", "point_mass", "speculative", "typical"}
    with pytest.raises(GenerationConfigError, match="point_mass"):
        select_kernel(greedy=False, has_q=False, name="nope")


@pytest.mark.parametrize("kernel", list(KERNELS.values()))
def test_bad_inputs(kernel):
    draft = make_draft(drafter(5), [-1, 0], [1, 2])
    p = target_rows(target(5), draft)
    with pytest.raises(DraftError, match=r"\(2, 5\)"):
        kernel(draft, p[:2])
    with pytest.raises(DraftError):
        kernel(draft, p[:, :3])  # q is (2, 5), token 2 out of range
    bad = p.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(NonFiniteLogitsError):
        kernel(draft, bad)


def test_speculative_needs_q():
    draft = Draft.chain([1, 2])
    with pytest.raises(DraftError, match="q is None"):
        accept_speculative(draft, torch.full((3, 5), 0.2, dtype=F64))
    draft.siblings = "sorted"
    draft.q = torch.full((2, 5), 0.2, dtype=F64)
    with pytest.raises(DraftError, match="siblings"):
        accept_speculative(draft, torch.full((3, 5), 0.2, dtype=F64))


def test_kernels_do_not_modify_their_inputs():
    P, Q, vocab = target(4), drafter(4), 4
    for draft, _ in itertools.islice(sampled_drafts(Q, vocab, SHAPES["root3"], "without_replacement"), 20):
        p = target_rows(P, draft)
        p0, q0 = p.clone(), draft.q.clone()
        for kernel in KERNELS.values():
            for _ in coin_outcomes(kernel, draft, p):
                pass
        assert torch.equal(p, p0) and torch.equal(draft.q, q0)


# --- zero-mass guards (reachable only through rounding) -----------------------------------------------------------
def test_rounding_rejections_fall_back_instead_of_dividing_by_zero():
    # Rows that miss 1 by one ulp: the kernels see a rejection probability of ~1e-16 whose residual has no mass
    # at all (max(0, p - q) = 0; p without x = 0). Without the guard this is 0 / 0.
    below_one = 1 - 2.0 ** -53
    p = torch.tensor([[0.5 * below_one, 0.5, 0.0], [1 / 3] * 3], dtype=F64)
    spec = Draft.chain([0], q=torch.tensor([[0.5, 0.5, 0.0]], dtype=F64))
    p_point = torch.tensor([[below_one, 0.0, 0.0], [1 / 3] * 3], dtype=F64)
    for kernel, draft, rows in ((accept_speculative, spec, p), (accept_point_mass, Draft.chain([0]), p_point)):
        asked = []
        v = kernel(draft, rows, coin=lambda prob: asked.append(prob) or False)  # force the rejection
        assert len(asked) == 1 and 1 - asked[0] < 1e-15
        assert v.path == [] and not v.bonus
        assert torch.isfinite(v.residual).all() and torch.equal(v.residual, rows[0]), kernel.name


def test_exhausted_without_replacement_proposal_is_verified_as_a_point_mass():
    p = torch.tensor([[0.1, 0.6, 0.3, 0.0]] + [[0.25] * 4] * 2, dtype=F64)
    q = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2, dtype=F64)  # sibling 2 had no mass left after sibling 1
    draft = Draft(torch.tensor([0, 1]), torch.tensor([-1, -1]), q, "without_replacement")
    asked = []
    v = accept_speculative(draft, p, coin=lambda prob: asked.append(prob) or False)
    # sibling 1: min(1, 0.1 / 1); residual max(0, p - q) = (0, .6, .3, 0) / .9; sibling 2 as a point mass: r(1)
    assert asked == pytest.approx([0.1, 0.6 / 0.9])
    assert v.residual.tolist() == pytest.approx([0.0, 0.0, 1.0, 0.0])
