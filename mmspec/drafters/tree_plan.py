"""A static draft tree compiled into a fixed tensor program, for the greedy single-request hot path.

`ModelDrafter` drafts a static tree level by level. Its general path keeps per-node Python bookkeeping (ranks,
parents, slots, masks) that every batch shape and sampling mode needs. When one request drafts the whole tree
greedily, everything except the tokens is the same every step: which parent's top-k row each node reads, which
nodes are fed, where they land in the cache, what they see, and the finished draft's structure. `TreePlan` derives
all of that once from the shape, so a step is only top-k, one gather per level, the level feeds and one transfer of
the tokens at the end. After a model forward every tensor op costs several times its warm cost (the forward evicts
the caches), so the op count is what the engine overhead is made of.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tree import Draft, StaticTree


@dataclass
class PlanLevel:
    """One level of the tree: its nodes' tokens are `topk(width)` of the previous level's fed logits, picked at
    `pick` (flat index into the (P, width) candidates; None = all of them in order)."""

    width: int
    pick: torch.Tensor | None
    fed: torch.Tensor | None  # indices of this level's nodes that are fed (have children); None = all
    n_fed: int
    visible: torch.Tensor | None  # (1, F, K) bool over this round's drafted slots (K = slots fed so far + F)
    depth_before: torch.Tensor | None  # (1, F) long: ancestors of each fed node (its position offset minus the
    # uncached block's length)


@dataclass
class TreePlan:
    levels: list[PlanLevel]
    order: torch.Tensor  # on the device: position in the levels' concatenation of each node id
    parent: torch.Tensor  # (N,) the draft's parents (node ids in depth-first preorder, see StaticTree)
    parent_list: list[int]
    depth: list[int]
    children: list[list[int]]
    slot: dict[int, int]  # fed node -> its slot relative to the round's first drafted slot

    @staticmethod
    def build(tree: StaticTree, device="cpu") -> "TreePlan | None":
        """The plan of a static tree, or None for a chain (chains have their own lean path). The index tensors the
        steps use live on `device` (the drafter's)."""
        if tree.is_chain:
            return None
        parent, rank, levels = tree.parent, tree.rank, tree.levels()
        n_children, ancestors = tree.topology()
        plan_levels, slot, prev_fed = [], {}, [-1]
        for nodes in levels:
            parents = list(dict.fromkeys(parent[n] for n in nodes))
            # In depth-first numbering a level's parents, in order, are exactly the previous level's fed nodes.
            assert parents == prev_fed, (parents, prev_fed)
            width = max(n_children[p + 1] for p in parents)
            flat = [parents.index(parent[n]) * width + rank[n] for n in nodes]
            fed = [j for j, n in enumerate(nodes) if n_children[n + 1]]
            visible = depth_before = None
            if fed:
                before = len(slot)
                for j2, j in enumerate(fed):
                    slot[nodes[j]] = before + j2
                visible = torch.zeros(1, len(fed), before + len(fed), dtype=torch.bool)
                for j2, j in enumerate(fed):
                    visible[0, j2, [slot[a] for a in ancestors[nodes[j]]] + [slot[nodes[j]]]] = True
                depth_before = torch.tensor([[len(ancestors[nodes[j]]) for j in fed]])
            plan_levels.append(PlanLevel(
                width, None if flat == list(range(len(parents) * width)) else torch.tensor(flat, device=device),
                None if len(fed) == len(nodes) else torch.tensor(fed, device=device), len(fed), visible, depth_before))
            prev_fed = [nodes[j] for j in fed]
        concat = [n for nodes in levels for n in nodes]
        order = torch.empty(len(concat), dtype=torch.long)
        order[torch.tensor(concat)] = torch.arange(len(concat))
        probe = Draft(torch.zeros(len(parent), dtype=torch.long), torch.tensor(parent))
        return TreePlan(plan_levels, order.to(device), probe.parent, probe.parent_list, probe.depth, probe.children,
                        slot)

    def draft(self, level_tokens: list[torch.Tensor]) -> Draft:
        """The finished draft from each level's tokens (1-D, on any device), with its structure filled in."""
        tokens = torch.cat(level_tokens)[self.order]
        if tokens.device.type != "cpu":
            tokens = tokens.cpu()
        d = Draft(tokens, self.parent, None, siblings="without_replacement")
        d._cache.update(tokens=tokens.tolist(), parent=self.parent_list, depth=self.depth, children=self.children,
                        chain=False)  # shared read-only structure (a Draft is never mutated)
        return d
