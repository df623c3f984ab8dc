"""The compiled static-tree path (`TreePlan`) proposes exactly what the general level-by-level path proposes."""
from __future__ import annotations

import pytest
import torch

from mmspec import SpeculativeDecoder
from mmspec.drafters import ModelDrafter
from mmspec.drafters.tree_plan import TreePlan
from mmspec.tree import StaticTree

TREES = {
    "full221": StaticTree.full((2, 2, 1)),
    # uneven: parents with 2, 1 and 0 children, a fed subset at depth 2, a leaf at depth 1
    "uneven": StaticTree([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0], [0, 1, 0, 0]]),
}


def _recording(drafter: ModelDrafter, log: list) -> ModelDrafter:
    propose = drafter.propose

    def wrapped(budgets):
        drafts = propose(budgets)
        log.append([(d.token_list, d.parent_list) for d in drafts])
        return drafts

    drafter.propose = wrapped
    return drafter


@pytest.mark.parametrize("name", list(TREES))
def test_plan_drafts_equal_the_general_path(target, drafters, prompts, reference, name):
    tree = TREES[name]
    logs = {}
    for lean in (True, False):
        drafter = ModelDrafter(drafters["noisy"], tree=tree)
        drafter.lean_tree = lean
        planned = []
        general = drafter._propose_static
        drafter._propose_static = lambda *a, **k: (planned.append(1), general(*a, **k))[1]
        dec = SpeculativeDecoder(target, _recording(drafter, logs.setdefault(lean, [])), tree=tree)
        out = [dec.generate([p], max_new_tokens=24).sequences[0] for p in prompts[:8]]
        assert out == reference[:8]
        if lean:  # the plan served every full-depth step; the general path only the last, budget-capped ones
            assert 0 < len(planned) < len(logs[lean]) / 2
    assert logs[True] == logs[False]  # same tokens, same structure (node order included), every step


def test_plan_structure():
    tree = TREES["uneven"]
    plan = TreePlan.build(tree)
    assert plan.parent_list == tree.parent
    assert [lv.n_fed for lv in plan.levels] == [2, 2, 1, 0]  # nodes with children, level by level
    # Feeding order: the fed nodes of each level in node order; each sees its fed ancestors and itself.
    fed = [n for n in sorted(plan.slot, key=plan.slot.get)]
    assert all(tree.parent[n] < 0 or plan.slot[tree.parent[n]] < plan.slot[n] for n in fed)
    second = plan.levels[1].visible[0]
    assert second.shape == (2, 4) and second.sum(1).tolist() == [2, 2]
    levels = [torch.arange(len(nodes)) * 10 + i for i, nodes in enumerate(tree.levels())]  # distinct tokens
    d = plan.draft(levels)
    by_node = {n: int(t) for i, nodes in enumerate(tree.levels()) for n, t in zip(nodes, levels[i])}
    assert d.token_list == [by_node[n] for n in range(len(tree))]
    assert TreePlan.build(StaticTree.chain(3)) is None
