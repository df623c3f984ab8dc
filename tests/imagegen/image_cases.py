"""Shared pieces of the image adapters' tests (Janus, Emu3): references, the loop, a scripted drafter."""
from __future__ import annotations

import torch

from mmspec.drafters.base import DrafterCounters
from mmspec.loop import SpeculativeDecoder
from mmspec.tree import Draft


def reference_outputs(target, prompts) -> dict:
    """The model's own greedy generate: each prompt alone and all in one left-padded batch."""
    return {"single": [target.reference_generate([p])[0].tolist() for p in prompts],
            "batch": target.reference_generate(prompts).tolist()}


def speculative(target, prompts, drafter=None, **kw):
    """The engine's loop over a whole image per prompt (greedy unless told otherwise)."""
    return SpeculativeDecoder(target, drafter).generate(target.requests(prompts), max_new_tokens=target.num_image_tokens,
                                                        **{"temperature": 0.0, **kw})


class ScriptedDrafter:
    """Chains (or random trees) of 3-5 nodes, q=None. Node at depth d is the reference's token at that position with
    probability p_correct[b] (per request), a uniformly random id otherwise: p=0 random drafts, p=1 an oracle whose
    every draft is accepted. Records the hidden-feature shapes the target hands over."""

    trusted = False
    max_nodes = max_depth = 5

    def __init__(self, refs, vocab: int, p_correct, tree: bool = False, needs_hidden: bool = False, seed: int = 0):
        self.refs, self.vocab, self.tree, self.needs_hidden = [list(r) for r in refs], vocab, tree, needs_hidden
        self.p = list(p_correct) if isinstance(p_correct, (list, tuple)) else [p_correct] * len(self.refs)
        self.g = torch.Generator().manual_seed(seed)
        self.counters = DrafterCounters()
        self.hidden_shapes: list[tuple] = []

    def check_target(self, target):
        return None

    def begin(self, ctx, prefill):
        self.ctx = ctx
        if self.needs_hidden:
            self.hidden_shapes.append(("prefill", tuple(prefill.logits.shape), tuple(prefill.hidden.shape)))

    def _token(self, b: int, pos: int) -> int:
        if pos < len(self.refs[b]) and float(torch.rand((), generator=self.g)) < self.p[b]:
            return self.refs[b][pos]
        return int(torch.randint(0, self.vocab, (), generator=self.g))

    def propose(self, budgets):
        drafts = []
        for b, budget in enumerate(budgets):
            n = min(budget, int(torch.randint(3, 6, (), generator=self.g)))
            if n <= 0:
                drafts.append(Draft.empty())
                continue
            done = len(self.ctx.history[b]) - 1  # tokens generated so far (the prompt is the one-token placeholder)
            if self.tree:
                parent = [-1] + [int(torch.randint(-1, i, (), generator=self.g)) for i in range(1, n)]
                depth = []
                for p in parent:
                    depth.append(1 if p < 0 else depth[p] + 1)
                tokens = [self._token(b, done + d - 1) for d in depth]
                drafts.append(Draft(torch.tensor(tokens), torch.tensor(parent)))
            else:
                drafts.append(Draft.chain([self._token(b, done + d) for d in range(n)]))
        return drafts

    def commit(self, updates, verify_out):
        if self.needs_hidden:
            self.hidden_shapes.append(("verify", tuple(verify_out.logits.shape), tuple(verify_out.hidden.shape)))

    def select_rows(self, rows):
        self.refs = [self.refs[r] for r in rows]
        self.p = [self.p[r] for r in rows]
