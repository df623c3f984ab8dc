"""The runner for models written against :class:`~mmspec.cache.BufferCache` (the engine's second storage backend).

A model of this kind is called as ``model(tokens, cond, input_pos=, cache=, mask=)`` and returns ``.logits`` and
``.hidden`` (image_ar's LlamaGen, ContinuousAR); ``model.config.max_seq_len`` bounds its positions. The runner adds
what the engine needs on top: ragged rows (:class:`~mmspec.cache.RaggedRows`: each request's committed slots
[0, lengths[b]) hole-free, so its next position is lengths[b]), blocks appended at the cache's length with explicit
positions and visibility, keep / rollback / select_rows, and classifier-free guidance (`mmspec.guidance`): cache
rows [0, B) cond, [B, 2B) uncond, sharing lengths; logits combined, features paired. Subclasses run the prefix
(`start`), which is model specific.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .cache import BufferCache, RaggedRows
from .errors import ContextOverflowError
from .guidance import combine_logits, double_rows, is_guided, pair_halves
from .state import StreamStateful
from .target import sync_time


class BufferRunner(StreamStateful):
    """Ragged, optionally guided blocks over a BufferCache model (see the module docstring)."""

    persistent_attributes = frozenset({"model", "config"})

    def __init__(self, model: torch.nn.Module, guidance_scale: float = 1.0):
        self.model = model.eval()
        self.config = model.config
        self.guidance_scale = guidance_scale
        self.cache: BufferCache | None = None
        self.ragged: RaggedRows | None = None  # per-request committed lengths over the cache
        self.prefix_ok: torch.Tensor | None = None  # (R, L) bool: prefix slots that are real (caption padding)
        self.forward_time = 0.0

    @property
    def guided(self) -> bool:
        return is_guided(self.guidance_scale)

    @property
    def lengths(self) -> list[int]:
        """Committed slots per request (its next position: slots are hole-free)."""
        return [] if self.ragged is None else self.ragged.lengths

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return double_rows(x, self.guidance_scale)

    def _combine(self, logits: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Guided logits (B, ..., V) and paired features (B, ..., 2D); unchanged without guidance."""
        if not self.guided:
            return logits, hidden
        return combine_logits(logits, self.guidance_scale), pair_halves(hidden, self.guidance_scale)

    def _forward(self, idx, cond, pos, mask):
        t0 = sync_time(self.device)
        with torch.no_grad():  # not inference_mode: the cache is compacted in place afterwards
            out = self.model(idx, cond, input_pos=pos, cache=self.cache, mask=mask)
        self.forward_time += sync_time(self.device) - t0
        return out

    def _started(self, cache: BufferCache, lengths: Sequence[int], prefix_ok: torch.Tensor | None) -> None:
        """Record a prefix run by a subclass's `start`: its cache, each request's committed length, real slots."""
        self.cache, self.prefix_ok = cache, prefix_ok
        self.ragged = RaggedRows(cache, lengths, self.guidance_scale)

    # --- blocks ---------------------------------------------------------------------------------------------------
    def block_mask(self, allowed: torch.Tensor | None, m: int) -> torch.Tensor:
        """(R, 1, M, width + M) bool: each row's committed slots (real prefix slots only) + block visibility."""
        width, dev = self.cache.length, self.device
        committed = self.ragged.committed(dev, self.prefix_ok)  # (R, width)
        r = committed.shape[0]
        if allowed is None:
            allowed = torch.ones(m, m, dtype=torch.bool, device=dev).tril_().expand(r, m, m)
        else:
            allowed = self._rows(allowed.to(dev))
        return torch.cat([committed[:, None, :].expand(r, m, width), allowed], dim=-1)[:, None]

    def forward_block(self, tokens: torch.Tensor, offsets: torch.Tensor,
                      allowed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a (B, M) block (ids, or (B, M, C) vectors) at positions lengths[b] + offsets (B, M); allowed
        (B, M, M) or None (causal). Returns guided logits (B, M, V) and features (B, M, D or 2D)."""
        dev = self.device
        m = tokens.shape[1]
        pos = torch.tensor(self.lengths, device=dev)[:, None] + offsets.to(dev)  # (B, M)
        top = int(pos.max())
        if top >= self.config.max_seq_len:
            raise ContextOverflowError(f"block reaches position {top}, past the model's last position "
                                       f"{self.config.max_seq_len - 1}")
        mask = self.block_mask(allowed, m)
        out = self._forward(self._rows(tokens.to(dev)), None, self._rows(pos), mask)
        return self._combine(out.logits, out.hidden)

    def keep(self, keep: Sequence[Sequence[int]], block_start: int) -> None:
        """Row b keeps block slots keep[b] (indices within the block appended at `block_start`, ascending) right
        after its committed slots; everything else written since is dropped."""
        self.ragged.keep(keep, block_start)

    def rollback(self, lengths: Sequence[int]) -> None:
        """Forget each row's slots past lengths[b] (<= its current length): a drafter dropping rejected tokens."""
        self.ragged.rollback(lengths)

    def select_rows(self, rows: Sequence[int]) -> None:
        full = self.ragged.select_rows(rows)
        if self.prefix_ok is not None:
            self.prefix_ok = self.prefix_ok[torch.tensor(full, device=self.prefix_ok.device)]
