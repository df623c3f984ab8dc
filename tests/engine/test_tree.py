"""Draft trees without models: ancestor masks, Draft structure, static tree shapes and EAGLE-2 dynamic expansion.

The dynamic expansion is driven by a fake `step` over a tiny vocabulary whose log-probs are a fixed function of the
node's path, so every score can be recomputed independently and the kept set checked against a brute-force
reference of the algorithm (ALGORITHMS.md §2, EAGLE-2).
"""
from __future__ import annotations

import math

import pytest
import torch

from mmspec.errors import DraftError
from mmspec.tree import Draft, DynamicTree, StaticTree, ancestor_mask, cu_offsets, expand_dynamic


def brute_ancestors(parent: list[int]) -> torch.Tensor:
    n = len(parent)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            m[i, j] = True
            j = parent[j]
    return m


# --- ancestor_mask ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parent", [
    [],
    [-1],
    [-1, 0, 1, 2],                 # chain
    [-1, -1, -1],                  # three roots
    [-1, -1, 0, 0, 1, 2, 5, 3],    # bushy tree
    [-1, 0, -1, 2, 1, 3, 0],       # interleaved branches
])
def test_ancestor_mask_matches_hand_closure(parent):
    m = ancestor_mask(parent)
    assert m.dtype == torch.bool and m.shape == (len(parent), len(parent))
    assert torch.equal(m, brute_ancestors(parent))


def test_ancestor_mask_hand_made_tree():
    #      root
    #     /    \
    #    0      1
    #   / \      \
    #  2   3      4
    #  |
    #  5
    m = ancestor_mask([-1, -1, 0, 0, 1, 2])
    expect = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 0, 0, 1, 0, 0],
        [0, 1, 0, 0, 1, 0],
        [1, 0, 1, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(m, expect)
    assert not m.triu(1).any()  # topological order: nobody sees a later node


def test_ancestor_mask_is_not_shared_between_calls():
    # ancestor_mask memoises shapes; a caller that edits its result (e.g. to add a prefix column) must not corrupt
    # the mask every later caller gets for the same shape.
    from mmspec.tree import _ancestor_mask

    parent = [-1, 0, 0, 1, -1, 4, 3]
    try:
        first = ancestor_mask(parent)
        first[0, 3] = True
        first[2, 1] = True
        assert torch.equal(ancestor_mask(parent), brute_ancestors(parent))
    finally:
        _ancestor_mask.cache_clear()  # never leave a corrupted shape behind for other tests


# --- Draft structure -------------------------------------------------------------------------------------------
def make_draft(tokens, parent) -> Draft:
    return Draft(torch.tensor(tokens, dtype=torch.long), torch.tensor(parent, dtype=torch.long))


def test_draft_structure_of_a_tree():
    d = make_draft([10, 11, 12, 13, 14, 15], [-1, -1, 0, 0, 1, 2])
    assert len(d) == 6
    assert d.depth == [1, 1, 2, 2, 2, 3]
    assert d.max_depth() == 3
    assert d.children == [[0, 1], [2, 3], [4], [5], [], [], []]
    assert d.path_to(5) == [0, 2, 5]
    assert d.path_to(4) == [1, 4]
    assert d.path_to(1) == [1]
    assert not d.is_chain
    d.validate(16)


def test_draft_chain_and_empty():
    c = Draft.chain([7, 8, 9])
    assert c.parent.tolist() == [-1, 0, 1]
    assert c.tokens.dtype == torch.long
    assert c.is_chain and c.depth == [1, 2, 3] and c.path_to(2) == [0, 1, 2]
    assert c.children == [[0], [1], [2], []]
    c.validate(10)
    e = Draft.empty()
    assert len(e) == 0 and e.is_chain and e.max_depth() == 0 and e.children == [[]]
    e.validate(10)
    # Two roots are not a chain even though both have depth 1.
    assert not make_draft([1, 2], [-1, -1]).is_chain


def test_cu_offsets():
    drafts = [Draft.chain([1, 2]), Draft.empty(), make_draft([3, 4, 5], [-1, -1, 0])]
    assert cu_offsets(drafts).tolist() == [0, 2, 2, 5]
    assert cu_offsets([]).tolist() == [0]


@pytest.mark.parametrize("tokens, parent, needle", [
    ([1, 2], [0, -1], "parent=[0, -1]"),            # a node its own parent
    ([1, 2], [-1, 1], "parent=[-1, 1]"),            # self-reference
    ([1, 2, 3], [-1, 2, 0], "parent=[-1, 2, 0]"),   # parent after the child
    ([1, 2], [-1, -2], "parent=[-1, -2]"),          # below -1
    ([1, 96], [-1, 0], "96"),                        # token out of the vocabulary
    ([-3, 1], [-1, 0], "-3"),                        # negative token
])
def test_draft_validate_rejects_bad_drafts(tokens, parent, needle):
    with pytest.raises(DraftError) as err:
        make_draft(tokens, parent).validate(96)
    assert needle in str(err.value)


def test_draft_validate_rejects_bad_shapes_q_and_siblings():
    with pytest.raises(DraftError, match="same length"):
        Draft(torch.tensor([1, 2]), torch.tensor([-1])).validate(96)
    with pytest.raises(DraftError, match="same length"):
        Draft(torch.tensor([[1, 2]]), torch.tensor([[-1, 0]])).validate(96)
    with pytest.raises(DraftError, match=r"\(2, 96\)"):
        Draft.chain([1, 2], q=torch.full((2, 95), 1 / 95)).validate(96)
    with pytest.raises(DraftError, match="siblings='sorted'"):
        Draft(torch.tensor([1]), torch.tensor([-1]), siblings="sorted").validate(96)


def test_draft_validate_rejects_non_integer_tokens():
    # Token ids must be integers: a float 5.7 would be silently truncated in the verify block and then break
    # indexing in the sampling kernels (IndexError instead of a typed error).
    with pytest.raises(DraftError):
        Draft(torch.tensor([5.7, 3.0]), torch.tensor([-1, 0])).validate(96)


# --- StaticTree ------------------------------------------------------------------------------------------------
def test_static_chain():
    t = StaticTree.chain(3)
    assert t.choices == ((0,), (0, 0), (0, 0, 0))
    assert t.parent == [-1, 0, 1] and t.rank == [0, 0, 0] and t.depth == 3 and len(t) == 3
    assert t.is_chain and t.levels() == [[0], [1], [2]]
    for k in (0, -2):
        with pytest.raises(DraftError, match=f"k={k}"):
            StaticTree.chain(k)


def test_static_full():
    t = StaticTree.full((2, 2, 1))
    assert len(t) == 2 + 4 + 4 and t.depth == 3 and not t.is_chain
    # Depth-first preorder: the all-top-rank path is nodes 0, 1, 2 (contiguous slots when greedy accepts it).
    assert t.choices[:6] == ((0,), (0, 0), (0, 0, 0), (0, 1), (0, 1, 0), (1,))
    assert t.parent == [-1, 0, 1, 0, 3, -1, 5, 6, 5, 8]
    assert t.rank == [0, 0, 0, 1, 0, 1, 0, 0, 1, 0]
    assert t.levels() == [[0, 5], [1, 3, 6, 8], [2, 4, 7, 9]]
    # Every node's path of ranks is its parent's path plus its own rank.
    for i, c in enumerate(t.choices):
        p = t.parent[i]
        assert (() if p < 0 else t.choices[p]) + (t.rank[i],) == c
    assert StaticTree.full((1, 1, 1)) == StaticTree.chain(3)


def test_static_choices_sorted_and_deduplicated():
    t = StaticTree([[1, 0], [0], [1], [0, 0], [0]])
    assert t.choices == ((0,), (0, 0), (1,), (1, 0))
    assert t.parent == [-1, 0, -1, 2] and t.depth == 2
    assert t.truncated(1) == StaticTree([[0], [1]])
    assert t.truncated(5) == t
    assert t.truncated(0) is None


@pytest.mark.parametrize("choices, needle", [
    ([[0], [1, 0]], "[1]"),             # parent path [1] missing
    ([[0], [0, 0, 0]], "[0, 0]"),        # skips a level
    ([[0], [-1]], "ranks >= 0"),         # negative rank
    ([[0], [0, -2]], "ranks >= 0"),
    ([], "need non-empty"),              # no nodes at all
    ([[0], []], "need non-empty"),       # an empty path
])
def test_static_choices_validation(choices, needle):
    with pytest.raises(DraftError) as err:
        StaticTree(choices)
    assert needle in str(err.value)


def test_static_choices_rank_gap_is_rejected():
    # Node [2] is "the rank-2 proposal of the root", but without a rank-1 sibling the model drafter asks its
    # distribution for only len(siblings) = 2 candidates and silently drops the node; with sampling siblings
    # (drawn without replacement) the skipped draw would also make the recorded q wrong. A gap must be refused.
    with pytest.raises(DraftError):
        StaticTree([[0], [2]])
    with pytest.raises(DraftError):
        StaticTree([[0], [0, 1]])


def test_dynamic_tree_validation():
    DynamicTree(1, 1, 1)
    for bad in (dict(topk=0), dict(depth=0), dict(total=0), dict(topk=-3)):
        with pytest.raises(DraftError) as err:
            DynamicTree(**bad)
        name, value = next(iter(bad.items()))
        assert f"{name}={value}" in str(err.value)


# --- EAGLE-2 dynamic expansion -------------------------------------------------------------------------------
V = 6


def fake_logprobs(path: tuple[int, ...], row: int) -> torch.Tensor:
    """Draft log-probs (V,) after the node whose root-to-node tokens are `path` (a deterministic function)."""
    g = torch.Generator().manual_seed(hash((row,) + path) % (2**31))
    return torch.log_softmax(torch.randn(V, generator=g) * 2.0, -1)


def node_path(tokens: list[int], parents: list[int], i: int) -> tuple[int, ...]:
    out = []
    while i >= 0:
        out.append(tokens[i])
        i = parents[i]
    return tuple(out[::-1])


class FakeStep:
    """Records every call: per row, the frontier paths in creation order."""

    def __init__(self):
        self.calls = []
        self.created: list[dict[int, tuple[int, ...]]] | None = None  # per row: creation index -> path

    def __call__(self, tokens, parents, frontier):
        self.calls.append([[node_path(tokens[r], parents[r], f) for f in frontier[r]] for r in range(len(tokens))])
        if self.created is None:
            self.created = [dict() for _ in tokens]
        for r in range(len(tokens)):
            for j in range(len(tokens[r])):
                self.created[r][j] = node_path(tokens[r], parents[r], j)
            for f in frontier[r]:
                assert 0 <= f < len(tokens[r])
        return [torch.stack([fake_logprobs(node_path(tokens[r], parents[r], f), r) for f in frontier[r]])
                if frontier[r] else torch.zeros(0, V) for r in range(len(tokens))]


def reference_expansion(spec: DynamicTree, row: int, cap: int):
    """Brute-force EAGLE-2: all created nodes as (path, score) in creation order."""
    if cap <= 0:
        return []
    root = fake_logprobs((), row)
    lp, tok = root.topk(min(spec.topk, V))
    nodes = [((int(t),), float(s)) for t, s in zip(tok, lp)]
    frontier = list(range(len(nodes)))
    for level in range(1, min(spec.depth, cap)):
        cands = []
        for f in frontier:
            path, score = nodes[f]
            lpc = fake_logprobs(path, row)
            for t in range(V):
                cands.append((score + float(lpc[t]), path + (t,)))
        cands.sort(key=lambda c: -c[0])
        frontier = []
        for score, path in cands[: spec.topk]:
            nodes.append((path, score))
            frontier.append(len(nodes) - 1)
    return nodes


def run_expand(spec: DynamicTree, caps: list[int]):
    root = torch.stack([fake_logprobs((), r) for r in range(len(caps))])
    step = FakeStep()
    out = expand_dynamic(spec, root, step, caps)
    return out, step


@pytest.mark.parametrize("spec", [DynamicTree(topk=2, depth=3, total=5), DynamicTree(topk=3, depth=4, total=7),
                                  DynamicTree(topk=4, depth=5, total=30), DynamicTree(topk=8, depth=2, total=4)])
def test_expand_dynamic_properties(spec):
    caps = [spec.depth, 0, 1, 2, spec.depth + 3]
    out, step = run_expand(spec, caps)
    assert len(out) == len(caps)
    for r, (tokens, parents, kept) in enumerate(out):
        n = len(tokens)
        assert len(parents) == n == len(kept)
        assert n <= spec.total
        if caps[r] == 0:
            assert n == 0
            continue
        assert n > 0
        # Topological and closed under ancestors: every parent is kept and comes first.
        assert all(-1 <= p < i for i, p in enumerate(parents))
        draft = make_draft(tokens, parents)
        draft.validate(V)
        depth_cap = min(caps[r], spec.depth)
        assert draft.max_depth() <= depth_cap
        if caps[r] == 1:
            assert parents == [-1] * n
        # kept is strictly increasing creation indices, and parents map through it.
        assert kept == sorted(set(kept))
        # Brute-force reference: same created nodes, and kept = top-`total` by cumulative log-prob.
        ref = reference_expansion(spec, r, caps[r])
        ref_paths = [p for p, _ in ref]
        kept_paths = [node_path(tokens, parents, i) for i in range(n)]
        assert kept_paths == [ref_paths[j] for j in kept]
        for j, path in zip(kept, kept_paths):
            # Score of a node = sum of the fake log-probs along its path.
            score = sum(float(fake_logprobs(path[:d], r)[path[d]]) for d in range(len(path)))
            assert math.isclose(score, ref[j][1], rel_tol=0, abs_tol=1e-5)
        order = sorted(range(len(ref)), key=lambda j: (-ref[j][1], j))
        assert kept == sorted(order[: spec.total])
        # kept indices refer to the creation order `step` saw.
        if step.created is not None:
            for j, path in zip(kept, kept_paths):
                if j in step.created[r]:
                    assert step.created[r][j] == path
    # Depth caps per row: the callback never sees a frontier that would create nodes beyond a row's cap.
    for level, call in enumerate(step.calls, start=1):
        for r, frontier_paths in enumerate(call):
            if frontier_paths:
                assert caps[r] > level and spec.depth > level
                assert all(len(p) == level for p in frontier_paths)
                assert len(frontier_paths) <= spec.topk


def test_expand_dynamic_step_sees_each_level_in_creation_order():
    spec = DynamicTree(topk=2, depth=3, total=20)
    out, step = run_expand(spec, [3])
    (tokens, parents, kept), = out
    assert len(step.calls) == 2
    ref = reference_expansion(spec, 0, 3)
    # Without truncation (total >= created), every created node is kept in creation order.
    assert kept == list(range(len(ref))) == list(range(2 + 2 + 2))
    assert [node_path(tokens, parents, i) for i in range(len(tokens))] == [p for p, _ in ref]
    # Level 1 expands the two root children; level 2 expands the two best depth-2 candidates.
    assert step.calls[0][0] == [ref[0][0], ref[1][0]]
    assert step.calls[1][0] == [ref[2][0], ref[3][0]]
    assert step.created[0] == {i: ref[i][0] for i in range(4)}


def test_expand_dynamic_scores_never_increase_along_paths():
    spec = DynamicTree(topk=4, depth=5, total=12)
    (tokens, parents, kept), = run_expand(spec, [5])[0]
    assert len(tokens) == spec.total
    ref = reference_expansion(spec, 0, 5)
    for i, p in enumerate(parents):
        if p >= 0:
            assert ref[kept[i]][1] <= ref[kept[p]][1]


def test_expand_dynamic_ties_keep_ancestors():
    # A certain child (log-prob 0) ties its parent's score; the tie must go to the parent so the set stays closed.
    v = 4
    root = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]]))
    certain = torch.full((v,), float("-inf"))
    certain[1] = 0.0

    def step(tokens, parents, frontier):
        return [torch.stack([certain for _ in frontier[0]])]

    (tokens, parents, kept), = expand_dynamic(DynamicTree(topk=1, depth=4, total=2), root, step, [4])
    assert parents == [-1, 0] and tokens == [0, 1]
    (tokens, parents, kept), = expand_dynamic(DynamicTree(topk=2, depth=3, total=3), root, step, [3])
    assert all(-1 <= p < i for i, p in enumerate(parents))
    assert make_draft(tokens, parents).max_depth() <= 3


def test_expand_dynamic_topk_larger_than_vocabulary():
    root = torch.log_softmax(torch.tensor([[1.0, 2.0, 0.5]]), -1)
    child = torch.log_softmax(torch.tensor([0.1, 0.2, 0.3]), -1)

    def step(tokens, parents, frontier):
        return [torch.stack([child for _ in frontier[0]])]

    (tokens, parents, kept), = expand_dynamic(DynamicTree(topk=10, depth=2, total=100), root, step, [2])
    assert tokens[:3] == [1, 0, 2] and parents[:3] == [-1, -1, -1]
    assert len(tokens) == 3 + 9  # every depth-2 candidate of 3 x 3 fits in topk = 10
    assert sorted(zip(parents[3:], tokens[3:])) == [(p, t) for p in range(3) for t in range(3)]
