"""LANTERN / LANTERN++ kernels and latent neighbourhoods, by exact enumeration in float64 (no Monte Carlo).

The enumeration helpers (synthetic target/drafter, the joint output distribution) are in relaxed_cases.py.
"""
from __future__ import annotations

import pytest
import torch

from image_ar.acceptance import (
    RelaxedVerdict,
    enumerate_verdicts,
    first_token_distribution,
    lantern,
    lantern_acceptance,
    lantern_output_distribution,
    lantern_relaxed_target,
    latent_neighbours,
    output_tv,
    tv_distance,
)
from image_ar.acceptance import neighbours as neighbours_module
from mmspec.errors import GenerationConfigError, InvalidInputError
from mmspec.kernels import accept_point_mass, accept_speculative
from kernel_cases import sampled_drafts, target_rows
from mmspec.tree import Draft

from relaxed_cases import (EXACT, F64, SHAPES, assert_same_outcomes, codebook, coin_probability,  # noqa: E402
                           first_position_distribution, joint_tv, model, rows)


# --- latent neighbourhoods -----------------------------------------------------------------------------------------
def brute_neighbours(cb: torch.Tensor, k: int) -> torch.Tensor:
    vocab = cb.shape[0]
    out = []
    for v in range(vocab):
        d = [(float(((cb[v] - cb[u]) ** 2).sum()), u) for u in range(vocab) if u != v]
        out.append([u for _, u in sorted(d)[:k]])
    return torch.tensor(out)


def test_neighbours_are_the_nearest_codes_in_order():
    cb = codebook(0, 9)
    cb[6] = cb[2]  # duplicate codes: equal distances are ordered by index
    for k in (0, 3, 8):
        table = latent_neighbours(cb, k)
        assert table.shape == (9, k) and table.dtype == torch.long
        assert torch.equal(table, brute_neighbours(cb, k))
        assert torch.equal(latent_neighbours(cb.clone(), k, chunk_size=2), table)  # chunking changes nothing
    assert latent_neighbours(cb, 8)[2, 0] == 6 and latent_neighbours(cb, 8)[6, 0] == 2


def test_neighbours_of_a_large_codebook_in_chunks():
    cb = codebook(1, 2048, dim=8)
    table = latent_neighbours(cb, 16, chunk_size=300)
    d = torch.cdist(cb, cb).fill_diagonal_(float("inf"))
    ref = d.topk(16, dim=1, largest=False).indices
    assert torch.equal(table, ref)


def test_neighbours_are_cached_in_memory_and_on_disk(tmp_path):
    cb = codebook(2, 12)
    first = latent_neighbours(cb, 5, cache_dir=tmp_path)
    assert latent_neighbours(cb.clone(), 5, cache_dir=tmp_path) is first  # same content, same table
    files = list(tmp_path.glob("neighbours-*-k5.safetensors"))
    assert len(files) == 1
    neighbours_module._MEMO.clear()
    assert torch.equal(latent_neighbours(cb, 5, cache_dir=tmp_path), first)  # read back from disk
    files[0].write_bytes(b"not a safetensors file")
    neighbours_module._MEMO.clear()
    assert torch.equal(latent_neighbours(cb, 5, cache_dir=tmp_path), first)  # unreadable: recomputed
    other = cb.clone()
    other[0, 0] += 1.0
    assert neighbours_module.codebook_hash(other) != neighbours_module.codebook_hash(cb)


def test_neighbours_follow_the_geometry_passed():
    # LlamaGen looks codes up after l2 normalisation: rays through the origin are then neighbours.
    cb = torch.tensor([[1.0, 0.0], [10.0, 0.5], [0.0, 1.0], [0.9, 0.9]], dtype=F64)
    assert latent_neighbours(cb, 1)[0, 0] == 3  # raw: (0.9, 0.9) is closest to (1, 0)
    assert latent_neighbours(torch.nn.functional.normalize(cb, dim=-1), 1)[0, 0] == 1  # same direction


@pytest.mark.parametrize("bad, k, match", [
    (torch.zeros(5, dtype=F64), 1, "2-D"),
    (torch.zeros(5, 2, dtype=torch.long), 1, "float"),
    (torch.full((5, 2), float("nan"), dtype=F64), 1, "NaN"),
    (torch.zeros(5, 2, dtype=F64), 5, r"k=5 .*\[0, 4\]"),
    (torch.zeros(5, 2, dtype=F64), -1, r"k=-1 .*\[0, 4\]"),
])
def test_neighbours_bad_arguments(bad, k, match):
    with pytest.raises(InvalidInputError, match=match):
        latent_neighbours(bad, k)


# --- the rule --------------------------------------------------------------------------------------------------------
def test_relaxed_target_by_hand():
    p = torch.tensor([0.4, 0.05, 0.1, 0.2, 0.25], dtype=F64)
    nb = torch.tensor([[1, 2, 3, 4], [0, 2, 3, 4], [1, 0, 3, 4], [4, 2, 1, 0], [3, 2, 1, 0]])
    # token 0: c = (0.05, 0.15, 0.35, 0.6); delta = 0.2 -> m* = 2 -> 0.4 + 0.15. Token 1: c_1 = 0.4 -> m* = 0.
    got = lantern_relaxed_target(p, nb, delta=0.2)
    assert got.tolist() == pytest.approx([0.55, 0.05, 0.1 + 0.05, 0.2 + 0.0, 0.25 + 0.2])
    # lambda = 1.5: bound 0.5 p(x); token 4: 0.125 < c_1 = 0.2 -> m* = 0; token 0: 0.2 -> m* = 2
    got = lantern_relaxed_target(p, nb, lam=1.5)
    assert got.tolist() == pytest.approx([0.55, 0.05, 0.1 + 0.05, 0.2, 0.25])
    assert lantern_relaxed_target(p, nb, delta=0.2, k=1).tolist() == pytest.approx([0.45, 0.05, 0.15, 0.2, 0.45])


@pytest.mark.parametrize("shape, siblings", [
    ("chain1", "iid"), ("chain2", "iid"), ("root2", "iid"), ("root2", "without_replacement"), ("tree3", "iid"),
])
@pytest.mark.parametrize("mode", [dict(delta=0.0), dict(lam=1.0), dict(delta=0.6, k=0)])
@pytest.mark.parametrize("residual", ["lantern", "speculative", "deficit"])
def test_lossless_limits_are_speculative_sampling(shape, siblings, mode, residual):
    vocab = 5
    nb = latent_neighbours(codebook(3, vocab), vocab - 1)
    kernel = lantern(nb, residual=residual, **mode)
    P, Q = model(1, vocab), model(2, vocab)
    drafts = sampled_drafts(Q, vocab, SHAPES[shape], siblings)
    for draft, _ in drafts:
        assert_same_outcomes(kernel, accept_speculative, draft, target_rows(P, draft))
    if shape in ("chain2", "tree3"):
        assert joint_tv(kernel, P, drafts, max(d.max_depth() for d, _ in drafts)) <= 1e-12


def test_lossless_limit_without_q_is_point_mass_verification():
    vocab = 5
    P = model(1, vocab)
    nb = latent_neighbours(codebook(3, vocab), vocab - 1)
    for toks, parent in (([1, 3], [-1, 0]), ([2, 2, 0], [-1, -1, 0]), ([4, 0], [-1, -1])):
        draft = Draft(torch.tensor(toks), torch.tensor(parent))
        for mode in (dict(delta=0.0), dict(lam=1.0)):
            assert_same_outcomes(lantern(nb, **mode), accept_point_mass, draft, target_rows(P, draft))


def test_neighbours_without_mass_do_not_trigger_zeroing():
    # x = 0's nearest neighbours carry no target mass (top-k zeroed them): c_1 = c_2 = 0 <= delta = 0, m* = 2, but
    # nothing was borrowed, so the residual must stay Leviathan's (LANTERN's code would zero N_1..N_{k+1} here).
    p = torch.tensor([0.1, 0.0, 0.0, 0.5, 0.4], dtype=F64)
    q = torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1], dtype=F64)
    nb = torch.tensor([[1, 2, 3, 4], [0, 2, 3, 4], [1, 0, 3, 4], [4, 2, 1, 0], [3, 2, 1, 0]])
    draft = Draft.chain([0], q=q[None])
    v = lantern(nb, delta=0.0)(draft, torch.stack([p, p]), coin=lambda prob: False)
    assert v.residual.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.4 / 0.7, 0.3 / 0.7])


def test_reference_residual_with_a_point_mass_draft():
    # With q = onehot(x) (the reference's qx = 1.0) a rejection zeroes x and N_1..N_{k+1}(x), then renormalises.
    p = torch.tensor([0.1, 0.05, 0.05, 0.3, 0.2, 0.3], dtype=F64)
    nb = torch.tensor([[1, 2, 3, 4, 5], [0, 2, 3, 4, 5], [1, 0, 3, 4, 5],
                       [4, 2, 1, 0, 5], [3, 2, 1, 0, 5], [4, 3, 2, 1, 0]])
    rows = torch.stack([p, p])
    asked = []
    v = lantern(nb, delta=0.1, k=2)(Draft.chain([0]), rows, coin=lambda prob: asked.append(prob) or False)
    assert asked == pytest.approx([0.2])  # p~(0) = 0.1 + 0.05 + 0.05
    assert v.residual.tolist() == pytest.approx([0, 0, 0, 0, 0.4, 0.6])  # x, N_1, N_2, N_3 zeroed
    v = lantern(nb, delta=0.1, k=2, residual="speculative")(Draft.chain([0]), rows, coin=lambda prob: False)
    assert v.residual.tolist() == pytest.approx((p * torch.tensor([0, 1, 1, 1, 1, 1.0]) / 0.9).tolist())


@pytest.mark.parametrize("seed", range(4))
def test_acceptance_is_monotone_in_delta_and_lambda(seed):
    vocab = 7
    p, q = rows(seed, vocab)
    nb = latent_neighbours(codebook(seed, vocab), vocab - 1)
    for grid, key in (([0.0, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0], "delta"), ([1.0, 1.2, 1.5, 2.0, 5.0, 50.0], "lam")):
        accepted = []
        for value in grid:
            kernel = lantern(nb, **{key: value})
            _, acc = first_token_distribution(kernel, p, q)
            a = lantern_acceptance(p, q, nb, **{key: value})
            assert acc == pytest.approx(float((q * a).sum()), abs=EXACT)
            for x in q.nonzero().flatten().tolist():  # the vectorised a(y) is the kernel's coin, token by token
                assert coin_probability(kernel, Draft.chain([x], q=q[None]), torch.stack([p, p])) \
                    == pytest.approx(float(a[x]), abs=EXACT)
            accepted.append(acc)
        assert all(b >= a - EXACT for a, b in zip(accepted, accepted[1:])), (key, accepted)
        assert accepted[0] == pytest.approx(float(torch.minimum(p, q).sum()), abs=EXACT)
        assert accepted[-1] > accepted[0] + 1e-3  # the relaxation does something


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mode", [dict(delta=0.15), dict(lam=3.0), dict(delta=0.4, k=2)])
@pytest.mark.parametrize("residual", ["lantern", "speculative", "deficit"])
def test_reported_tv_is_the_enumerated_tv_of_one_position(seed, mode, residual):
    vocab = 6
    p, q = rows(seed, vocab)
    nb = latent_neighbours(codebook(seed, vocab), vocab - 1)
    kernel = lantern(nb, residual=residual, report_tv=True, **mode)
    out, _ = first_token_distribution(kernel, p, q)
    assert torch.allclose(out, lantern_output_distribution(p, q, nb, residual=residual, **mode), atol=EXACT, rtol=0)
    v = kernel(Draft.chain([int((p * q).argmax())], q=q[None]), torch.stack([p, p]), coin=lambda prob: True)
    assert isinstance(v, RelaxedVerdict) and v.bonus and v.tv[1] == 0.0 and len(v.tv) == len(v.path) + 1
    assert v.tv[0] == pytest.approx(tv_distance(out, p), abs=EXACT)
    if residual == "deficit":  # the budget module's O(V) formula is exact for the deficit residual
        assert v.tv[0] == pytest.approx(output_tv(p, q, lantern_acceptance(p, q, nb, **mode)), abs=EXACT)


def test_lanterns_own_residual_is_not_the_deficit_formula():
    # Documented difference: zeroing the neighbours moves the correction's mass, so the O(V) formula (exact for the
    # deficit residual) does not give the TV of LANTERN's residual; the kernel reports the exact value instead.
    vocab, gaps = 6, []
    for seed in range(6):
        p, q = rows(seed, vocab, sparse=False)
        nb = latent_neighbours(codebook(seed, vocab), vocab - 1)
        out, _ = first_token_distribution(lantern(nb, delta=0.2, k=1), p, q)
        gaps.append(abs(tv_distance(out, p) - output_tv(p, q, lantern_acceptance(p, q, nb, delta=0.2, k=1))))
    assert max(gaps) > 1e-3


def test_reported_tv_per_position_on_a_chain():
    vocab = 5
    P, Q = model(1, vocab), model(2, vocab)
    nb = latent_neighbours(codebook(4, vocab), vocab - 1)
    kernel = lantern(nb, delta=0.2, report_tv=True)
    for draft, _ in sampled_drafts(Q, vocab, SHAPES["chain2"]):
        p = target_rows(P, draft)
        for _, v in enumerate_verdicts(kernel, draft, p):
            assert len(v.tv) == len(v.path) + 1
            for depth, t in enumerate(v.tv):
                if depth < 2:  # a decision at row `depth` with the q of node `depth`
                    ref = lantern_output_distribution(p[depth], draft.q[depth], nb, delta=0.2)
                    assert t == pytest.approx(tv_distance(ref, p[depth]), abs=EXACT)
                else:
                    assert t == 0.0  # bonus


@pytest.mark.parametrize("siblings", ["iid", "without_replacement"])
def test_two_siblings(siblings):
    vocab = 5
    P, Q = model(5, vocab), model(6, vocab)
    nb = latent_neighbours(codebook(5, vocab), vocab - 1)
    drafts = sampled_drafts(Q, vocab, SHAPES["root2"], siblings)
    lossless = first_position_distribution(accept_speculative, P, drafts)
    assert torch.allclose(lossless, P(()), atol=EXACT, rtol=0)
    for residual in ("lantern", "deficit"):
        kernel = lantern(nb, delta=0.3, residual=residual, report_tv=True)
        out = first_position_distribution(kernel, P, drafts)
        assert abs(float(out.sum()) - 1.0) < 1e-12 and float(out.min()) >= 0.0
        tv = tv_distance(out, P(()))
        assert tv > 1e-4
        reported = {round(kernel(d, target_rows(P, d), coin=lambda _: False).tv[0], 12) for d, _ in drafts}
        if residual == "deficit" and siblings == "iid":
            # The residual does not depend on the rejected token and siblings are iid: one bound for every draft.
            assert len(reported) == 1 and tv <= reported.pop() + EXACT
    assert joint_tv(lantern(nb, delta=0.3), P, sampled_drafts(Q, vocab, SHAPES["tree3"], siblings), 2) > 1e-4


def test_kernel_flags_and_sampling():
    nb = latent_neighbours(codebook(0, 5), 4)
    k1, k2 = lantern(nb, delta=0.1), lantern(nb, lam=5.0, k=2)
    assert (k1.name, k1.lossless, k1.delta, k1.lam, k1.k, k1.residual) == ("lantern", False, 0.1, None, 4, "lantern")
    assert (k2.name, k2.lossless, k2.lam, k2.k) == ("lantern++", False, 5.0, 2)
    P, Q = model(1, 5), model(2, 5)
    draft, _ = sampled_drafts(Q, 5, SHAPES["tree3"])[7]
    p = target_rows(P, draft)
    a = k1(draft, p, generator=torch.Generator().manual_seed(3))
    b = k1(draft, p, generator=torch.Generator().manual_seed(3))
    assert a.next_token is not None and (a.path, a.next_token) == (b.path, b.next_token) and a.tv is None
    assert float(a.residual[a.next_token]) > 0


def test_bad_arguments():
    nb = latent_neighbours(codebook(0, 5), 4)
    for kwargs, match in (
        (dict(delta=-0.1), r"delta=-0.1 .*\[0, 1\]"),
        (dict(delta=3.0), "lam="),
        (dict(lam=0.5), r"lam=0.5 .*>= 1"),
        (dict(lam=float("inf")), "lam=inf"),
        (dict(), "exactly one"),
        (dict(delta=0.1, lam=2.0), "exactly one"),
        (dict(delta=0.1, k=-1), r"k=-1 .*\[0, 4\]"),
        (dict(delta=0.1, k=5), r"k=5 .*\[0, 4\]"),
        (dict(delta=0.1, residual="nope"), "residual='nope'"),
        (dict(delta=0.1, tv_budget=-1.0), r"tv_budget=-1.0: .*\[0, 1\]"),
        (dict(delta=0.1, tv_budget=0.1, residual="lantern"), "deficit"),
    ):
        with pytest.raises(GenerationConfigError, match=match):
            lantern(nb, **kwargs)
    with pytest.raises(InvalidInputError, match="2-D integer"):
        lantern(nb.double(), delta=0.1)
    with pytest.raises(InvalidInputError, match="outside"):
        lantern(nb + 1, delta=0.1)
    kernel = lantern(nb, delta=0.1)
    p = torch.full((2, 6), 1 / 6, dtype=F64)
    with pytest.raises(InvalidInputError, match="covers 5 codes .* vocabulary of 6"):
        kernel(Draft.chain([1], q=p[:1]), p)
    with pytest.raises(InvalidInputError, match=r"q has shape \(4,\)"):
        lantern_acceptance(torch.full((5,), 0.2, dtype=F64), torch.full((4,), 0.25, dtype=F64), nb, delta=0.1)
