"""Train-free n-gram drafter: prompt lookup decoding (Saxena 2023, "Prompt Lookup Decoding"; vLLM's ngram proposer).

The last n tokens of the history (n from ``max_ngram`` down to ``min_ngram``) are searched for earlier in the same
history; the tokens that followed the most recent matches are proposed. With ``branches > 1`` several distinct
continuations are merged into a trie, giving a tree draft. Proposals are deterministic (``q = None``), so sampling
targets verify them with the point-mass rule, which is lossless for any proposal.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import DraftError
from ..target import BlockOutput
from ..tree import Draft
from .base import DraftContext, DrafterCounters, RowUpdate


class NGramDrafter:
    needs_hidden = False
    trusted = True  # its drafts are well-formed and within the budgets by construction: the loop skips checking them

    def __init__(self, k: int = 4, max_ngram: int = 3, min_ngram: int = 1, branches: int = 1):
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (k, max_ngram, min_ngram, branches))
        if not (ints and k >= 1 and 1 <= min_ngram <= max_ngram and branches >= 1):
            raise DraftError(f"NGramDrafter(k={k}, max_ngram={max_ngram}, min_ngram={min_ngram}, branches={branches}):"
                             " need k >= 1, 1 <= min_ngram <= max_ngram, branches >= 1")
        self.k, self.max_ngram, self.min_ngram, self.branches = k, max_ngram, min_ngram, branches
        self.counters = DrafterCounters()
        self.ctx: DraftContext | None = None

    @property
    def max_nodes(self) -> int:
        return self.k * self.branches

    @property
    def max_depth(self) -> int:
        return self.k

    def check_target(self, target) -> None:  # shares the target's tokens by construction
        return None

    def begin(self, ctx: DraftContext, prefill: BlockOutput) -> None:
        self.ctx = ctx

    def continuations(self, hist: Sequence[int], depth: int) -> list[list[int]]:
        """Up to `branches` distinct continuations (each <= depth tokens), longest n-gram match first."""
        h = torch.as_tensor(list(hist), dtype=torch.long)
        found: list[list[int]] = []
        for n in range(min(self.max_ngram, len(h) - 1), self.min_ngram - 1, -1):
            windows = h[:-1].unfold(0, n, 1)  # (L - n, n): windows whose continuation exists
            hits = (windows == h[-n:]).all(-1).nonzero().flatten().flip(0)  # most recent first
            for i in hits.tolist():
                cont = h[i + n: i + n + depth].tolist()
                if cont and cont not in found:
                    found.append(cont)
                    if len(found) == self.branches:
                        return found
        return found

    def propose(self, budgets: Sequence[int]) -> list[Draft]:
        drafts = []
        for hist, budget in zip(self.ctx.history, budgets):
            depth = min(self.k, budget)
            conts = self.continuations(hist, depth) if depth > 0 else []
            drafts.append(trie_draft(conts))
        return drafts

    def commit(self, updates: Sequence[RowUpdate], verify_out: BlockOutput | None) -> None:
        return None  # history lives in ctx and is extended by the loop

    def select_rows(self, rows: Sequence[int]) -> None:
        return None  # ctx.history is re-indexed by the loop


def trie_draft(sequences: Sequence[Sequence[int]]) -> Draft:
    """Merge token sequences sharing prefixes into one tree draft."""
    tokens: list[int] = []
    parents: list[int] = []
    index: dict[tuple[int, ...], int] = {}
    for seq in sequences:
        for d in range(len(seq)):
            key = tuple(seq[: d + 1])
            if key not in index:
                index[key] = len(tokens)
                tokens.append(int(seq[d]))
                parents.append(index[key[:-1]] if d else -1)
    return Draft(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))
