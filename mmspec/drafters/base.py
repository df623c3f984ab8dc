"""The drafter protocol: how proposals reach the verifier.

The loop calls, per generation:
  ``begin(ctx, prefill)`` once after the target's prefill (``ctx.history[b]`` = prompt + first sampled token),
  ``propose(budgets) -> list[Draft]`` every step (``budgets[b]`` = most nodes deep row b may draft; 0 = none),
  ``commit(updates, verify_out)`` after acceptance (``updates[b]``: accepted node indices and the tokens committed,
  bonus/correction included; ``ctx.history`` is already extended),
  ``select_rows(rows)`` when finished requests leave the batch.
A drafter that needs target features (EAGLE-style) sets ``needs_hidden = True`` and receives them in ``prefill`` and
``verify_out``. Deterministic proposals set ``Draft.q = None``; sampled ones record the exact ``q`` they drew from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from ..request import Request
from ..sampling import SamplingSpec
from ..target import BlockOutput
from ..tree import Draft


@dataclass
class DraftContext:
    spec: SamplingSpec
    generators: list[torch.Generator]
    history: list[list[int]]  # per row: prompt + committed tokens (the last one is pending: not yet verified)
    requests: list[Request] = field(default_factory=list)  # per row: the request (the drafter's view, its inputs)
    specs: list[SamplingSpec] = field(default_factory=list)  # per row: its sampling settings (empty: `spec` for all)
    compiled: bool = False  # the decode runs compiled: a drafter with a model runner calls its `compile_decode`
    reserve: int = 0  # cache slots beyond the prompt the generation may need, padding included (for that call)
    target_cache: object | None = None  # the target's RaggedCache, read only, compacted after every commit: for
    # drafters that attend to the target's own keys (Gemma 4's assistant); None for targets without one

    def spec_of(self, row: int) -> SamplingSpec:
        """Row `row`'s sampling settings (a request's own, or the stream's)."""
        return self.specs[row] if self.specs else self.spec


@dataclass
class RowUpdate:
    path: list[int]  # accepted node indices of the row's last draft
    tokens: list[int]  # tokens committed this step (path tokens, then the correction/bonus token), maybe truncated


@dataclass
class DrafterCounters:
    forwards: int = 0  # drafter model forwards (0 for train-free drafters)


class Drafter(Protocol):
    needs_hidden: bool
    counters: DrafterCounters

    def check_target(self, target) -> None: ...

    def begin(self, ctx: DraftContext, prefill: BlockOutput) -> None: ...

    def propose(self, budgets: Sequence[int]) -> list[Draft]: ...

    def commit(self, updates: Sequence[RowUpdate], verify_out: BlockOutput | None) -> None: ...

    def select_rows(self, rows: Sequence[int]) -> None: ...
