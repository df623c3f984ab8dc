"""Speculative Jacobi Decoding: the target drafts for itself from its previous iteration (no drafter model).

Teng et al. 2024, "Accelerating Auto-regressive Text-to-Image Generation with Training-free Speculative Jacobi
Decoding" (arXiv:2410.01699), Alg. 1. A window of ``window`` tokens [pending, x_1 .. x_{window-1}] is verified in one
forward; x_i is accepted with min(1, p(x_i) / q(x_i)) where q is the distribution x_i was sampled from in the
*previous* iteration (speculative sampling, so the output is exactly the target's). After a rejection the engine
samples the correction from the residual; the unaccepted drafts are then redrawn from this iteration's target rows
(the Jacobi update: row j conditions on the old draft prefix, which is fine, since q records what was drawn), and
empty slots at the end of the window are initialised fresh:

* ``init="random"``: a uniform token, proposed with a one-hot q (the point-mass rule; ALGORITHMS.md section 5);
* ``init="neighbour"``: a copy of the left neighbour in the image grid (the upper one at a row start), one-hot q.

At temperature 0 this is Jacobi decoding: drafts are the previous iteration's argmax, and the output equals greedy
plain decoding. Works with any image target that has ``grid`` (rows, cols) and ``vocab_size``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from mmspec.drafters.base import DraftContext, DrafterCounters, RowUpdate
from mmspec.errors import InvalidInputError
from mmspec.target import BlockOutput
from mmspec.state import take_rows
from mmspec.tree import Draft

INITS = ("random", "neighbour")


class JacobiDrafter:
    needs_hidden = False
    trusted = True  # tokens in range and q shaped by construction

    def __init__(self, window: int = 16, init: str = "random"):
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise InvalidInputError(f"window={window!r}: must be an int >= 2 (the pending token + >= 1 draft)")
        if init not in INITS:
            raise InvalidInputError(f"init={init!r}: expected one of {INITS}")
        self.window, self.init = window, init
        self.max_depth = self.max_nodes = window - 1
        self.counters = DrafterCounters()
        self.vocab = 0
        self.cols = 1

    def check_target(self, target) -> None:
        self.vocab = int(target.vocab_size)
        self.cols = int(getattr(target, "grid", (0, 1))[1])
        if self.init == "neighbour" and not hasattr(target, "grid"):
            raise InvalidInputError(f"init='neighbour' needs an image target with a grid; {type(target).__name__} "
                                    "has none (use init='random')")

    def begin(self, ctx: DraftContext, prefill: BlockOutput) -> None:
        self.ctx = ctx
        self.prompt_len = [len(h) - 1 for h in ctx.history]  # the first image token is already in the history
        self.pending: list[list[tuple[int, torch.Tensor | None]]] = [[] for _ in ctx.history]  # (token, q row)
        self.last: list[int] = [0] * len(ctx.history)

    # --- proposing ------------------------------------------------------------------------------------------------
    def _fresh(self, row: int, known: list[int]) -> int:
        """A new token for image position len(known) given the tokens before it."""
        pos = len(known)
        if self.init == "neighbour" and pos > 0:
            return known[pos - 1] if pos % self.cols or pos < self.cols else known[pos - self.cols]
        g = self.ctx.generators[row]
        return int(torch.randint(self.vocab, (), generator=g, device=g.device if g is not None else "cpu"))

    def propose(self, budgets: Sequence[int]) -> list[Draft]:
        out = []
        for b, budget in enumerate(budgets):
            n = min(self.window - 1, budget)
            state = self.pending[b][:n]
            known = self.ctx.history[b][self.prompt_len[b]:] + [t for t, _ in state]
            while len(state) < n:
                tok = self._fresh(b, known)
                known.append(tok)
                state.append((tok, None))
            self.pending[b], self.last[b] = state, n
            out.append(Draft.chain([t for t, _ in state], self._q(state, b)))
        return out

    def _q(self, state, row: int) -> torch.Tensor | None:
        if self.ctx.spec_of(row).greedy or not state:
            return None
        rows = [q for _, q in state if q is not None]
        ref = rows[0] if rows else None
        q = torch.zeros(len(state), self.vocab, dtype=ref.dtype if ref is not None else torch.float32,
                        device=ref.device if ref is not None else "cpu")
        for i, (tok, row) in enumerate(state):
            if row is None:
                q[i, tok] = 1.0  # freshly initialised: a deterministic proposal
            else:
                q[i] = row
        return q

    # --- the Jacobi update ----------------------------------------------------------------------------------------
    def commit(self, updates: Sequence[RowUpdate], verify_out: BlockOutput | None) -> None:
        for b, up in enumerate(updates):
            spec = self.ctx.spec_of(b)
            a, n = len(up.path), self.last[b]
            if a >= n:  # everything accepted: the window restarts fresh after the bonus token
                self.pending[b] = []
                continue
            logits = verify_out.logits[b, a + 1: n + 1]  # rows after the first rejected draft: its stale successors
            if spec.greedy:
                self.pending[b] = [(t, None) for t in spec.processed_logits(logits).argmax(-1).tolist()]
                continue
            probs = spec.probs(logits)  # (n - a, V)
            toks = torch.multinomial(probs, 1, generator=self.ctx.generators[b]).view(-1).tolist()
            self.pending[b] = list(zip(toks, probs))

    def select_rows(self, rows: Sequence[int]) -> None:
        take_rows(self, rows, "prompt_len", "pending", "last")
