"""KV-cache bookkeeping for ragged batches on transformers caches (DynamicCache and StaticCache).

Layout (one cache tensor per layer, (B, H, T, D)): row b's committed keys live in slots [0, length[b]); slots
[length[b], width) of a shorter row are holes, hidden by the attention mask. A verification block of M slots is
written at [width, width + M) for every row. After acceptance, :meth:`RaggedCache.compact` gathers each row's kept
slots (root + accepted path) to [length[b], length[b] + n_b) and drops the rest: only the kept slots are copied,
never the whole cache, and the width falls back to max(length). Positions are explicit and stored separately
(``next_pos``), so a slot index never has to equal a position (left-over holes, M-RoPE deltas, images).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import Cache, DynamicCache, StaticCache

from .errors import UnsupportedModelError
from .inference import inference


def kv_layers(cache: Cache) -> list:
    """The per-layer objects holding `.keys` / `.values` (B, H, T, D)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise UnsupportedModelError(f"cache of type {type(cache).__name__} has no `.layers`; "
                                    "use transformers' DynamicCache or StaticCache")
    for layer in layers:
        if getattr(layer, "is_sliding", False):
            raise UnsupportedModelError(
                "sliding-window cache layers evict keys that a rejected draft would need back; this adapter "
                "supports full-attention layers only (see the Gemma3 adapter in vision/ for sliding windows)")
    return list(layers)


@dataclass
class RaggedCache:
    """A transformers cache plus per-row valid lengths. `width` is the number of slots in use for all rows."""

    cache: Cache
    lengths: list[int]  # committed slots per row (Python ints: the hot path never needs a tensor for them)
    width: int = 0
    static: bool = False
    peak_width: int = 0  # largest width reached (memory accounting in benchmarks)
    _plain: bool | None = field(default=None, repr=False, compare=False)  # see _plain_layers

    def __post_init__(self):
        self.lengths = [int(v) for v in self.lengths]  # accept a tensor or any int sequence

    @staticmethod
    def new(model, batch: int, kind: str = "dynamic", max_cache_len: int | None = None) -> "RaggedCache":
        config = model.config
        if kind == "dynamic":
            cache = DynamicCache(config=config)
        elif kind == "static":
            if not max_cache_len:
                raise UnsupportedModelError("a static cache needs max_cache_len (prompt + new tokens + draft size)")
            cache = StaticCache(config=config, max_cache_len=int(max_cache_len))
        else:
            raise UnsupportedModelError(f"cache kind {kind!r}: expected 'dynamic' or 'static'")
        rc = RaggedCache(cache, [0] * batch, 0, kind == "static")
        kv_layers(cache)  # fail early on sliding layers
        return rc

    @property
    def length(self) -> torch.Tensor:
        """(B,) long tensor view of `lengths`, for mask building."""
        return torch.tensor(self.lengths, dtype=torch.long)

    @length.setter
    def length(self, value) -> None:
        self.lengths = [int(v) for v in value]

    @property
    def key_len(self) -> int:
        """Number of key slots attention sees after appending nothing (static: the whole buffer)."""
        if self.static:
            return kv_layers(self.cache)[0].max_cache_len
        return self.width

    def appended(self, m: int) -> None:
        """Record that a forward wrote m new slots at [width, width + m) for every row."""
        self.width += m
        self.peak_width = max(self.peak_width, self.width)

    @inference
    def compact(self, keep: Sequence[Sequence[int]]) -> None:
        """Keep, for each row b, the absolute slots `keep[b]` (ascending) at [length[b], length[b] + len(keep[b])).

        Rows whose kept slots are already in place are not touched; the others' kept slots are moved with one
        gather and one scatter per layer tensor (for all moving rows at once): only the kept slots are copied. Then
        every slot at or beyond max(new length) is dropped.
        """
        moves = []  # (row, src slots, dst slots) for rows whose kept slots are not already in place
        new_len = list(self.lengths)
        for b, slots in enumerate(keep):
            start = new_len[b]
            if list(slots) != list(range(start, start + len(slots))):
                moves.append((b, list(slots), list(range(start, start + len(slots)))))
            new_len[b] = start + len(slots)
        if len(moves) == 1:  # one row: index_select + index_copy_ on its (H, T, D) view
            b, src, dst = moves[0]
            layers = kv_layers(self.cache)
            sd = torch.tensor([src, dst], device=layers[0].keys.device)
            for layer in layers:
                for t in (layer.keys[b], layer.values[b]):
                    t.index_copy_(1, sd[1], t.index_select(1, sd[0]))  # select copies first: overlap-safe
        elif moves:  # several rows: one gather and one scatter per layer tensor for all of them (the gather
            layers = kv_layers(self.cache)  # copies first, so overlapping source and target slots are safe)
            rows = [b for b, src, _ in moves for _ in src]
            row, src, dst = torch.tensor([rows, [s for _, src, _ in moves for s in src],
                                          [d for _, _, dst in moves for d in dst]], device=layers[0].keys.device)
            for layer in layers:
                for t in (layer.keys, layer.values):
                    t[row, :, dst] = t[row, :, src]
        self.lengths = new_len
        self._truncate(max(new_len, default=0))

    def _truncate(self, width: int) -> None:
        drop = self.width - width
        if drop > 0:
            if self.static:
                for layer in kv_layers(self.cache):
                    layer.cumulative_length.fill_(width)
            elif self._plain_layers():  # the hot path: slice the plain layers' tensors directly (views, no copy)
                for layer in self.cache.layers:
                    layer.keys = layer.keys[:, :, :width]
                    layer.values = layer.values[:, :, :width]
            else:
                self.cache.crop(-drop)  # transformers 5.x: a negative count removes slots (a view, no copy)
        self.width = width

    def _plain_layers(self) -> bool:
        """Every layer is transformers' plain DynamicLayer (no extra per-layer state for crop to keep in step)."""
        if self._plain is None:
            from transformers.cache_utils import DynamicLayer

            layers = getattr(self.cache, "layers", [])
            if not layers or not all(getattr(layer, "is_initialized", True) for layer in layers):
                return False  # decide once every layer holds tensors
            self._plain = all(type(layer) is DynamicLayer for layer in layers)
        return self._plain

    @inference
    def select_rows(self, rows: Sequence[int]) -> None:
        """Keep only the given batch rows (finished requests leave the batch)."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        for layer in kv_layers(self.cache):
            if getattr(layer, "keys", None) is None or not getattr(layer, "is_initialized", True):
                continue
            layer.keys = layer.keys[idx.to(layer.keys.device)]
            layer.values = layer.values[idx.to(layer.values.device)]
            if hasattr(layer, "batch_size"):
                layer.batch_size = len(idx)
        self.lengths = [self.lengths[r] for r in rows]
        self._truncate(max(self.lengths, default=0))

    def slot_bytes(self) -> int:
        """Bytes held by the key/value tensors (storage actually allocated), for memory benchmarks."""
        total = 0
        for layer in kv_layers(self.cache):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if t is not None:
                    total += t.untyped_storage().nbytes()
        return total
