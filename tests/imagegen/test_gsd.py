"""GSD (grouped speculative decoding) kernels by exact enumeration in float64."""
from __future__ import annotations

import pytest
import torch
from kernel_cases import sampled_drafts, target_rows
from relaxed_cases import (
    EXACT,
    SHAPES,
    assert_same_outcomes,
    coin_probability,
    first_position_distribution,
    joint_tv,
    model,
    rows,
)

from image_ar.acceptance import (
    first_token_distribution,
    gsd,
    gsd_acceptance,
    gsd_output_distribution,
    output_tv,
    tv_distance,
)
from mmspec.errors import GenerationConfigError, InvalidInputError
from mmspec.kernels import accept_point_mass, accept_speculative
from mmspec.tree import Draft

F64 = torch.float64


def embeddings(seed: int, vocab: int, dim: int = 2) -> torch.Tensor:
    return 0.6 * torch.randn(vocab, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def brute_ratio(p, q, x, window, prob_threshold, embed_threshold, emb):
    """min(1, p(G) / q(G)) straight from the definition of G(x)."""
    vocab = p.shape[0]
    order = sorted(range(vocab), key=lambda j: (-float(p[j]), j))
    i = order.index(x)
    group = [j for j in order[max(0, i - window): i + window + 1]
             if j == x or (abs(float(p[j] - p[x])) < prob_threshold
                           and (emb is None or float(((emb[j] - emb[x]) ** 2).sum()) < embed_threshold))]
    return min(1.0, sum(float(p[j]) for j in group) / sum(float(q[j]) for j in group)), group


def test_groups_by_hand():
    p = torch.tensor([0.30, 0.28, 0.20, 0.12, 0.10, 0.0], dtype=F64)
    q = torch.tensor([0.25, 0.40, 0.05, 0.20, 0.05, 0.05], dtype=F64)
    # x = 1 (rank 1), window 1: ranks 0..2 = tokens 0, 1, 2; |p - 0.28| < 0.05 keeps 0 (0.02), drops 2 (0.08)
    a = gsd_acceptance(p, q, rank_window=1, prob_threshold=0.05)
    assert float(a[1]) == pytest.approx((0.30 + 0.28) / (0.25 + 0.40))
    # x = 3 (rank 3): neighbours 2 (0.08 away) and 4 (0.02 away): group {3, 4}
    assert float(a[3]) == pytest.approx((0.12 + 0.10) / (0.20 + 0.05))
    # x = 5 (rank 5, p = 0): |0.10 - 0| = 0.1 >= 0.05 leaves it alone: a = 0 / 0.05
    assert float(a[5]) == 0.0
    emb = torch.tensor([[0.0, 0], [2, 0], [0, 0], [0, 0], [0, 0], [0, 0]], dtype=F64)  # token 1 far from 0
    a = gsd_acceptance(p, q, rank_window=1, prob_threshold=0.05, embed_threshold=0.5, embeddings=emb)
    assert float(a[1]) == pytest.approx(0.28 / 0.40)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("window, pt, et, with_emb", [
    (7, 0.15, 0.5, True), (7, 0.15, 0.5, False), (2, 0.3, 0.8, True), (1, 1.0, 100.0, True), (3, 0.05, 0.2, True),
])
def test_groups_match_the_definition(seed, window, pt, et, with_emb):
    vocab = 8
    p, q = rows(seed, vocab)
    emb = embeddings(seed, vocab) if with_emb else None
    a = gsd_acceptance(p, q, rank_window=window, prob_threshold=pt, embed_threshold=et, embeddings=emb)
    kernel = gsd(rank_window=window, prob_threshold=pt, embed_threshold=et, embeddings=emb)
    for x in q.nonzero().flatten().tolist():
        ratio, _ = brute_ratio(p, q, x, window, pt, et, emb)
        assert float(a[x]) == pytest.approx(ratio, abs=EXACT)
        assert coin_probability(kernel, Draft.chain([x], q=q[None]), torch.stack([p, p])) \
            == pytest.approx(ratio, abs=EXACT)


def test_without_embeddings_the_condition_is_dropped():
    p, q = rows(1, 8)
    far = torch.arange(8, dtype=F64)[:, None] * 10.0  # every pair 100+ apart: singleton groups
    assert torch.equal(gsd_acceptance(p, q, embeddings=torch.zeros(8, 2, dtype=F64)), gsd_acceptance(p, q))
    single = gsd_acceptance(p, q, rank_window=0)
    assert torch.equal(gsd_acceptance(p, q, embeddings=far), single)
    assert not torch.equal(gsd_acceptance(p, q), single)


@pytest.mark.parametrize("shape, siblings", [
    ("chain1", "iid"), ("chain2", "iid"), ("root2", "iid"), ("root2", "without_replacement"), ("tree3", "iid"),
])
@pytest.mark.parametrize("singleton", [dict(rank_window=0), dict(prob_threshold=0.0), "embed"])
@pytest.mark.parametrize("residual", ["speculative", "deficit"])
def test_singleton_groups_are_speculative_sampling(shape, siblings, singleton, residual):
    vocab = 5
    if singleton == "embed":
        singleton = dict(embed_threshold=0.0, embeddings=embeddings(0, vocab))
    kernel = gsd(residual=residual, **singleton)
    P, Q = model(1, vocab), model(2, vocab)
    drafts = sampled_drafts(Q, vocab, SHAPES[shape], siblings)
    for draft, _ in drafts:
        assert_same_outcomes(kernel, accept_speculative, draft, target_rows(P, draft))
    if shape in ("chain2", "tree3"):
        assert joint_tv(kernel, P, drafts, 2) <= 1e-12


def test_singleton_without_q_is_point_mass_verification():
    P = model(1, 5)
    for toks, parent in (([1, 3], [-1, 0]), ([2, 2, 0], [-1, -1, 0])):
        draft = Draft(torch.tensor(toks), torch.tensor(parent))
        assert_same_outcomes(gsd(rank_window=0), accept_point_mass, draft, target_rows(P, draft))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("residual", ["speculative", "deficit"])
def test_reported_tv_is_the_enumerated_tv_of_one_position(seed, residual):
    vocab = 8
    p, q = rows(seed, vocab, sparse=False)
    emb = embeddings(seed, vocab)
    kw = dict(rank_window=3, prob_threshold=0.2, embed_threshold=1.0, embeddings=emb)
    kernel = gsd(residual=residual, report_tv=True, **kw)
    out, acc = first_token_distribution(kernel, p, q)
    assert torch.allclose(out, gsd_output_distribution(p, q, residual=residual, **kw), atol=EXACT, rtol=0)
    a = gsd_acceptance(p, q, **kw)
    assert acc == pytest.approx(float((q * a).sum()), abs=EXACT)
    v = kernel(Draft.chain([int((p * q).argmax())], q=q[None]), torch.stack([p, p]), coin=lambda _: True)
    assert v.tv[0] == pytest.approx(tv_distance(out, p), abs=EXACT) and v.tv[1] == 0.0
    if residual == "deficit":
        assert v.tv[0] == pytest.approx(output_tv(p, q, a), abs=EXACT)


def test_gsd_is_measurably_lossy():
    gaps = []
    for seed in range(4):
        p, q = rows(seed, 8, sparse=False)
        out, _ = first_token_distribution(gsd(), p, q)
        gaps.append(tv_distance(out, p))
    assert max(gaps) > 1e-2
    assert gsd().lossless is False and gsd().name == "gsd" and gsd(tv_budget=0.0).name == "gsd[tv<=0]"


@pytest.mark.parametrize("siblings", ["iid", "without_replacement"])
def test_two_siblings(siblings):
    vocab = 6
    P, Q = model(7, vocab), model(8, vocab)
    drafts = sampled_drafts(Q, vocab, SHAPES["root2"], siblings)
    for residual in ("speculative", "deficit"):
        kernel = gsd(rank_window=2, prob_threshold=0.3, residual=residual, report_tv=True)
        out = first_position_distribution(kernel, P, drafts)
        assert abs(float(out.sum()) - 1.0) < 1e-12 and float(out.min()) >= 0.0
        tv = tv_distance(out, P(()))
        assert tv > 1e-4
        reported = {round(kernel(d, target_rows(P, d), coin=lambda _: False).tv[0], 12) for d, _ in drafts}
        if siblings == "iid":  # residual independent of the rejected token: one upper bound for every draft
            assert len(reported) == 1 and tv <= reported.pop() + EXACT
    assert joint_tv(gsd(rank_window=2, prob_threshold=0.3), P, sampled_drafts(Q, vocab, SHAPES["tree3"], siblings),
                    2) > 1e-4


def test_bad_arguments():
    for kwargs, match in (
        (dict(rank_window=-1), r"rank_window=-1 .*>= 0"),
        (dict(rank_window=1.5), "rank_window=1.5"),
        (dict(prob_threshold=-0.1), r"prob_threshold=-0.1 .*>= 0"),
        (dict(embed_threshold=float("nan")), "embed_threshold=nan"),
        (dict(residual="lantern"), "residual='lantern'"),
        (dict(tv_budget=-0.5), "tv_budget=-0.5"),
        (dict(tv_budget=0.1, residual="speculative"), "deficit"),
    ):
        with pytest.raises(GenerationConfigError, match=match):
            gsd(**kwargs)
    with pytest.raises(InvalidInputError, match="2-D float"):
        gsd(embeddings=torch.zeros(5, dtype=F64))
    p = torch.full((2, 5), 0.2, dtype=F64)
    with pytest.raises(InvalidInputError, match="cover 4 tokens .* vocabulary of 5"):
        gsd(embeddings=torch.zeros(4, 2, dtype=F64))(Draft.chain([1], q=p[:1]), p)
    with pytest.raises(InvalidInputError, match=r"q has shape \(4,\)"):
        gsd_acceptance(p[0], torch.full((4,), 0.25, dtype=F64))
