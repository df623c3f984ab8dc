"""A scripted drafter for engine tests on any target: it drafts a known reference continuation, each node right with
a set probability, so steps accept some nodes and reject the rest."""
from __future__ import annotations

import torch

from mmspec.drafters.base import DrafterCounters
from mmspec.tree import Draft, StaticTree


class OracleDrafter:
    """Drafts the reference continuation in the tree's all-top-rank path, each node right with probability p (a
    random token otherwise; other ranks are random): steps accept some nodes and reject the rest."""

    needs_hidden, trusted = False, False

    def __init__(self, refs, tree: StaticTree, p: float, vocab: int = 96, seed: int = 0):
        self.refs, self.tree, self.p, self.vocab = refs, tree, p, vocab
        self.g = torch.Generator().manual_seed(seed)
        self.counters = DrafterCounters()
        self.max_nodes, self.max_depth = len(tree), tree.depth

    def check_target(self, target):
        return None

    def begin(self, ctx, prefill):
        self.ctx, self.rows = ctx, list(range(len(ctx.history)))
        self.start = [len(h) - 1 for h in ctx.history]  # prompt lengths

    def propose(self, budgets):
        drafts = []
        for i, (h, budget) in enumerate(zip(self.ctx.history, budgets)):
            ref, done = self.refs[self.rows[i]], len(h) - self.start[i]  # tokens generated so far
            tokens, parents = [], []
            for n, (par, rank) in enumerate(zip(self.tree.parent, self.tree.rank)):
                depth = 1 if par < 0 else self.tree_depth(par) + 1
                if depth > budget:
                    break
                on_path = rank == 0 and all(self.tree.rank[a] == 0 for a in self.ancestors(n))
                right = on_path and done + depth - 1 < len(ref) and float(torch.rand((), generator=self.g)) < self.p
                tokens.append(ref[done + depth - 1] if right else int(torch.randint(3, self.vocab, (), generator=self.g)))
                parents.append(par)
            drafts.append(Draft(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long)))
        return drafts

    def tree_depth(self, n):
        return len(self.ancestors(n)) + 1

    def ancestors(self, n):
        out, a = [], self.tree.parent[n]
        while a >= 0:
            out.append(a)
            a = self.tree.parent[a]
        return out

    def commit(self, updates, verify_out):
        return None

    def select_rows(self, rows):
        self.rows = [self.rows[r] for r in rows]
        self.start = [self.start[r] for r in rows]
