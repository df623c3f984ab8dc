"""A small independent LlamaGen as drafter: it samples a chain of k image tokens, the target verifies them.

Classic draft-model speculative decoding (Leviathan et al. 2023; Chen et al. 2023) applied to visual AR models, as
in LANTERN's and Jang et al.'s baselines: the drafter shares the target's codebook (same VQ tokenizer) and its
condition, runs its own [cond; uncond] rows with the *target's* guidance scale, and records q, the guided and
warped distribution each draft token was drawn from (ALGORITHMS.md section 5: the same combined distribution for p
and q). A copy of the target as drafter accepts every token at temperature 0 (the bookkeeping test).
"""
from __future__ import annotations

from typing import Sequence

import torch

from mmspec.drafters.base import DraftContext, DrafterCounters, RowUpdate
from mmspec.errors import InvalidInputError, UnsupportedModelError
from mmspec.sampling import probs_by_row
from mmspec.state import take_rows
from mmspec.target import BlockOutput
from mmspec.tree import Draft

from ..models.llamagen import LlamaGen
from ..target import LlamaGenRunner, batch_conditions


def check_draft_depth(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInputError(f"k={k!r}: the number of drafted tokens per step must be an int >= 1")
    return k


def draw_step(specs, logits: torch.Tensor, gens) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One draft token per row from guided logits (B, V): the argmax at temperature 0 (q None), else a sample from
    q = spec.probs(logits) with the row's own generator; returns (tokens (B,), q (B, V) or None). specs: one
    SamplingSpec for every row, or a list with one per row (requests with their own settings; a greedy row among
    sampled ones takes its argmax, recorded as a one-hot q, which greedy verification ignores)."""
    specs = specs if isinstance(specs, (list, tuple)) else [specs] * len(logits)
    if all(s.greedy for s in specs):
        return specs[0].processed_logits(logits).argmax(-1), None
    q = probs_by_row(specs, logits)
    toks = [q[b].argmax().view(1) if s.greedy else torch.multinomial(q[b], 1, generator=gens[b])
            for b, s in enumerate(specs)]
    return torch.cat(toks), q


def chains(toks: list[torch.Tensor], qs: list[torch.Tensor | None], lengths: Sequence[int]) -> list[Draft]:
    """Per-step tokens (B,) and q (B, V) -> one chain per row, cut to lengths[b] nodes."""
    toks_b = torch.stack(toks, 1).cpu()  # (B, depth)
    q_b = None if qs[0] is None else torch.stack(qs, 1)  # (B, depth, V)
    return [Draft.chain(toks_b[b, :n], None if q_b is None else q_b[b, :n]) for b, n in enumerate(lengths)]


class ImageModelDrafter:
    needs_hidden = False
    trusted = True
    model_class, runner_class = LlamaGen, LlamaGenRunner

    def __init__(self, model: LlamaGen, k: int = 4):
        if not isinstance(model, self.model_class):
            raise InvalidInputError(f"drafter model must be an image_ar {self.model_class.__name__}, got "
                                    f"{type(model).__name__}")
        self.model, self.k = model.eval(), check_draft_depth(k)
        self.max_depth = self.max_nodes = k
        self.counters = DrafterCounters()
        self.runner: LlamaGenRunner | None = None

    @property
    def forward_time(self) -> float:
        return 0.0 if self.runner is None else self.runner.forward_time

    def check_target(self, target) -> None:
        mine, cfg = self.model.config, getattr(target, "model", None)
        cfg = getattr(cfg, "config", None)
        if cfg is None or not hasattr(target, "requests") or not hasattr(cfg, "cls_token_num"):
            raise UnsupportedModelError(f"a LlamaGen drafter needs a LlamaGen target (image_ar.LlamaGenTarget); got "
                                        f"{type(target).__name__}")
        for field in ("vocab_size", "grid_size", "model_type", "cls_token_num"):
            if getattr(mine, field) != getattr(cfg, field):
                raise UnsupportedModelError(f"drafter {field}={getattr(mine, field)} but the target's is "
                                            f"{getattr(cfg, field)}: the drafter must share the target's codebook, "
                                            "grid and condition")
        if mine.model_type == "c2i" and mine.num_classes != cfg.num_classes:
            raise UnsupportedModelError(f"drafter has {mine.num_classes} classes, the target {cfg.num_classes}")

    def begin(self, ctx: DraftContext, prefill: BlockOutput) -> None:
        """Prefill the drafter's own [cond; uncond] rows with the requests' conditions and guidance scale."""
        self.ctx = ctx
        cond, cond_mask, scale = batch_conditions(ctx.requests)
        if self.runner is None:
            self.runner = self.runner_class(self.model, scale)
        self.runner.guidance_scale = scale
        self.runner.start(cond, cond_mask, capacity=self.model.config.max_seq_len)
        self.counters.forwards += 1
        self.uncached = [[h[-1]] for h in ctx.history]  # committed tokens not yet in the drafter's cache
        self.base = list(self.runner.lengths)
        self.fed, self.carry = 0, [[] for _ in ctx.history]

    def _block(self, feed: list[list[int]], m: int) -> torch.Tensor:
        """Each row's tokens right-padded to m: (B, m) ids."""
        return torch.tensor([f + [0] * (m - len(f)) for f in feed], dtype=torch.long)

    def _feed(self, feed: list[list[int]]) -> torch.Tensor:
        """Append each row's tokens (ragged, right-padded; an empty row gets a dummy it does not keep), keep the real
        ones; the runner's output (guided logits, or a continuous model's conditions) at each row's last (garbage for
        an empty row)."""
        m = max(1, max(len(f) for f in feed))
        tokens = self._block(feed, m)
        start = self.runner.cache.length
        logits, _ = self.runner.forward_block(tokens, torch.arange(m).expand(len(feed), m), None)
        self.runner.keep([list(range(len(f))) for f in feed], start)
        self.counters.forwards += 1
        last = torch.tensor([max(len(f) - 1, 0) for f in feed], device=logits.device)
        return logits[torch.arange(len(feed), device=logits.device), last]  # (B, V)

    def _begin_step(self, want: list[int]) -> torch.Tensor | None:
        """Feed the committed tokens the cache lacks and return the output at each row's last; None (nothing fed:
        they wait for the next step) when no row drafts. want[b]: nodes row b drafts this step."""
        if max(want, default=0) <= 0:
            self.fed, self.carry, self.want = 0, self.uncached, list(want)
            self.base = list(self.runner.lengths)
            return None
        out = self._feed(self.uncached)
        self.carry = [[] for _ in want]
        self.base = list(self.runner.lengths)  # committed + pending: the drafts come after
        return out

    def propose(self, budgets: Sequence[int]) -> list[Draft]:
        spec, gens = [self.ctx.spec_of(b) for b in range(len(budgets))], self.ctx.generators
        want = [min(self.k, b) for b in budgets]  # rows near the image's end draft less (and feed nothing past it)
        logits = self._begin_step(want)
        if logits is None:
            return [Draft.empty() for _ in budgets]
        depth = max(want)
        toks, qs = [], []
        for step in range(depth):
            tok, q = draw_step(spec, logits, gens)
            toks.append(tok)
            qs.append(q)
            if step < depth - 1:
                logits = self._feed([[t] if step < n - 1 else [] for t, n in zip(tok.tolist(), want)])
        self.fed, self.want = depth - 1, want  # the last draft token of a row is sampled but not fed
        return chains(toks, qs, want)

    def commit(self, updates: Sequence[RowUpdate], verify_out: BlockOutput | None) -> None:
        lengths, uncached = [], []
        for b, up in enumerate(updates):
            a = len(up.path)
            cached = min(a, self.fed, max(self.want[b] - 1, 0))  # accepted drafts already in the drafter's cache
            lengths.append(self.base[b] + cached)
            uncached.append(self.carry[b] + list(up.tokens[cached:]))
        self.runner.rollback(lengths)
        self.uncached = uncached

    def select_rows(self, rows: Sequence[int]) -> None:
        self.runner.select_rows(rows)
        take_rows(self, rows, "uncached", "base", "carry")
