"""KV-cache bookkeeping for ragged batches, on two storage backends: transformers' caches (DynamicCache and
StaticCache, :class:`RaggedCache`) and preallocated per-layer buffers moved by index (:class:`BufferCache` with
:class:`RaggedRows`, for models written against it).

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
from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin, StaticLayer

from .errors import ContextOverflowError, InvalidInputError, UnsupportedModelError
from .guidance import both_halves, double_rows
from .inference import inference
from .state import take_rows


def kv_layers(cache: Cache) -> list:
    """The per-layer objects holding `.keys` / `.values` (B, H, T, D): every layer but a hybrid model's recurrent
    (linear-attention) ones, whose states the engine keeps itself (`mmspec.recurrent`)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise UnsupportedModelError(f"cache of type {type(cache).__name__} has no `.layers`; "
                                    "use transformers' DynamicCache or StaticCache")
    for layer in layers:
        if getattr(layer, "is_sliding", False):
            raise UnsupportedModelError(
                "sliding-window cache layers evict keys that a rejected draft would need back; this adapter "
                "supports full-attention layers only (see the Gemma3 adapter in vision/ for sliding windows)")
    return [layer for layer in layers if not _recurrent_only(layer)]


def _recurrent_only(layer) -> bool:
    return isinstance(layer, LinearAttentionCacheLayerMixin) and not isinstance(layer, (DynamicLayer, StaticLayer))


@dataclass
class RaggedCache:
    """A transformers cache plus per-row valid lengths. `width` is the number of slots in use for all rows."""

    cache: Cache
    lengths: list[int]  # committed slots per row (Python ints: the hot path never needs a tensor for them)
    width: int = 0
    static: bool = False
    peak_width: int = 0  # largest width reached (memory accounting in benchmarks)
    compiled: bool = False  # blocks run the compiled forward at bucketed lengths (`mmspec.compile`; static only)
    _plain: bool | None = field(default=None, repr=False, compare=False)  # see _plain_layers
    _kv: tuple | None = field(default=None, repr=False, compare=False)  # (number of layers, kv layers): see layers

    def __post_init__(self):
        self.lengths = [int(v) for v in self.lengths]  # accept a tensor or any int sequence

    @staticmethod
    def new(model, batch: int, kind: str = "dynamic", max_cache_len: int | None = None) -> "RaggedCache":
        config = model.config
        if kind == "dynamic":
            cache = DynamicCache(config=config)
            if any(getattr(layer, "is_sliding", False) for layer in cache.layers) and "sliding_attention" in (
                    getattr(config.get_text_config(), "layer_types", None) or []):
                cache = DynamicCache()  # every slot kept: the runner cuts its masks to the window (mmspec.target)
        elif kind == "static":
            if not max_cache_len:
                raise UnsupportedModelError("a static cache needs max_cache_len (prompt + new tokens + draft size)")
            cache = StaticCache(config=config, max_cache_len=int(max_cache_len))
        else:
            raise UnsupportedModelError(f"cache kind {kind!r}: expected 'dynamic' or 'static'")
        rc = RaggedCache(cache, [0] * batch, 0, kind == "static")
        kv_layers(cache)  # fail early on sliding layers
        return rc

    def layers(self) -> list:
        """`kv_layers` of the cache, listed again only when its number of layers changed (a cache made without a
        config adds its layers on the first forward)."""
        n = len(getattr(self.cache, "layers", ()))
        if self._kv is None or self._kv[0] != n:
            self._kv = (n, kv_layers(self.cache))
        return self._kv[1]

    @inference
    def to_static(self, model, capacity: int) -> None:
        """Move the cache into a transformers StaticCache of `capacity` slots (the compiled decode path's
        preallocated buffers): every written slot is copied once; lengths and width are unchanged. A static cache
        with enough room is kept as it is."""
        if self.static and self.key_len >= capacity:
            return
        if capacity < self.width:
            raise ContextOverflowError(f"a static cache of {capacity} slots cannot hold the {self.width} written")
        static = StaticCache(config=model.config, max_cache_len=int(capacity))
        old, new = self.layers(), kv_layers(static)
        if len(old) != len(new):
            raise UnsupportedModelError(f"{type(model).__name__}'s cache has {len(old)} layers but a static cache for "
                                        f"its config has {len(new)}; it cannot decode over a static cache")
        for src, dst in zip(old, new):
            dst.lazy_initialization(src.keys, src.values)
            dst.keys[:, :, : self.width] = src.keys[:, :, : self.width]
            dst.values[:, :, : self.width] = src.values[:, :, : self.width]
            dst.cumulative_length.fill_(self.width)
        self.cache, self.static, self._plain, self._kv = static, True, None, None

    def write_at(self, slot: int) -> None:
        """Point a static cache's next write at `slot` (after a padded block, at `width`: its padding slots are then
        overwritten by the next block)."""
        for layer in self.layers():
            layer.cumulative_length.fill_(slot)

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
            return self.layers()[0].max_cache_len
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
            layers = self.layers()
            sd = torch.tensor([src, dst], device=layers[0].keys.device)
            for layer in layers:
                for t in (layer.keys[b], layer.values[b]):
                    t.index_copy_(1, sd[1], t.index_select(1, sd[0]))  # select copies first: overlap-safe
        elif moves:  # several rows: one gather and one scatter per layer tensor for all of them (the gather
            layers = self.layers()  # copies first, so overlapping source and target slots are safe)
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
                self.write_at(width)
            elif self._plain_layers():  # the hot path: slice the plain layers' tensors directly (views, no copy)
                for layer in self.layers():
                    layer.keys = layer.keys[:, :, :width]
                    layer.values = layer.values[:, :, :width]
            else:
                for layer in self.layers():  # transformers 5.x: a negative count removes slots (a view)
                    layer.crop(-drop)
        self.width = width

    def _plain_layers(self) -> bool:
        """Every layer is transformers' plain DynamicLayer (no extra per-layer state for crop to keep in step)."""
        if self._plain is None:
            layers = self.layers()
            if not layers or not all(getattr(layer, "is_initialized", True) for layer in layers):
                return False  # decide once every layer holds tensors
            self._plain = all(type(layer) is DynamicLayer for layer in layers)
        return self._plain

    @inference
    def select_rows(self, rows: Sequence[int]) -> None:
        """Keep only the given batch rows (finished requests leave the batch)."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        for layer in self.layers():
            if getattr(layer, "keys", None) is None or not getattr(layer, "is_initialized", True):
                continue
            layer.keys = layer.keys[idx.to(layer.keys.device)]
            layer.values = layer.values[idx.to(layer.values.device)]
            if hasattr(layer, "batch_size"):
                layer.batch_size = len(idx)
            if self.compiled:  # new buffers: CUDA graphs update them in place only at marked addresses
                torch._dynamo.mark_static_address(layer.keys)
                torch._dynamo.mark_static_address(layer.values)
        take_rows(self, rows, "lengths")
        self._truncate(max(self.lengths, default=0))

    def slot_bytes(self) -> int:
        """Bytes held by the key/value tensors (storage actually allocated), for memory benchmarks."""
        total = 0
        for layer in self.layers():
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if t is not None:
                    total += t.untyped_storage().nbytes()
        return total


# --- preallocated buffers moved by index (gpt-fast's layout) ---------------------------------------------------------
class BufferCache:
    """Keys and values of every layer in one buffer per layer, (B, H_kv, capacity, head_dim), moved by a pointer.

    The storage backend for models written against it (image_ar's LlamaGen, ContinuousAR and image head): the model's
    attention calls ``update(layer, k, v)`` and the model calls ``advance(t)`` once after its last layer, so a
    forward that fails half-way leaves the cache as it was. Slots [0, length) are in use for every row; a slot's
    position is whatever the forward said when it was written (positions are not stored). Rollback is moving the
    pointer (`crop`); compaction is one gather into the same buffer (`compact`). Buffers are allocated on the first
    write (device / dtype of the keys) and grow by doubling.
    """

    def __init__(self, n_layer: int, capacity: int = 0):
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self.length = 0
        self.capacity = int(capacity)

    @property
    def batch_size(self) -> int | None:
        return None if self.keys[0] is None else self.keys[0].shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, T, Dh) at [length, length + T); return the layer's (B, H_kv, length + T, Dh) views."""
        end = self.length + k.shape[2]
        buf = self.keys[layer]
        if buf is None or end > buf.shape[2]:
            self._grow(layer, k, max(end, self.capacity, 2 * (0 if buf is None else buf.shape[2])))
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def _grow(self, layer: int, k: torch.Tensor, capacity: int) -> None:
        b, h, _, d = k.shape
        for bufs in (self.keys, self.values):
            new = k.new_zeros(b, h, capacity, d)
            if bufs[layer] is not None:
                new[:, :, :self.length] = bufs[layer][:, :, :self.length]
            bufs[layer] = new

    def advance(self, t: int) -> None:
        """Commit the t slots the last forward wrote in every layer."""
        self.length += t

    def crop(self, length: int) -> None:
        """Keep slots [0, length) (length <= current length)."""
        if not 0 <= length <= self.length:
            raise InvalidInputError(f"{type(self).__name__}.crop({length}): must be in [0, {self.length}]")
        self.length = length

    def gather(self, index: torch.Tensor) -> None:
        """Keep exactly the slots `index` (S',) or (B, S') per row, in that order, at [0, S')."""
        self.compact(0, index)

    def compact(self, start: int, index: torch.Tensor) -> None:
        """Move slots `index` (n,) or (B, n) per row to [start, start + n) and make that the new length.

        After acceptance: `compact(prefix_len, accepted_slots)` keeps prefix + accepted path, copying only n slots.
        """
        index = torch.as_tensor(index, dtype=torch.long)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.length):
            raise InvalidInputError(f"{type(self).__name__} slots {index.tolist()} out of range [0, {self.length})")
        if not 0 <= start <= self.length:
            raise InvalidInputError(f"{type(self).__name__}.compact start={start}: must be in [0, {self.length}]")
        n = index.shape[-1]
        if torch.equal(index, torch.arange(start, start + n, device=index.device).expand_as(index)):
            self.length = start + n  # the kept slots are already in place (a row that accepted a prefix)
            return
        for bufs in (self.keys, self.values):
            for layer, buf in enumerate(bufs):
                if buf is None:
                    continue
                b, h, _, d = buf.shape
                idx = index.to(buf.device).expand(b, n)[:, None, :, None].expand(b, h, n, d)  # (B, H, n, Dh)
                buf[:, :, start:start + n] = buf.gather(2, idx)  # gather copies first: overlap-safe
        self.length = start + n

    def select_rows(self, rows) -> None:
        """Keep only the given batch rows (e.g. finished requests leave the batch)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        for bufs in (self.keys, self.values):
            for layer, buf in enumerate(bufs):
                if buf is not None:
                    bufs[layer] = buf[rows.to(buf.device)]


class RaggedRows:
    """Per-request committed lengths over a :class:`BufferCache` whose rows may be doubled for guidance.

    Request b owns cache rows ``both_halves([b])`` ([cond; uncond] when guided) and their slots [0, lengths[b]),
    hole-free; a block appended at the cache's length is shared by every row. `keep` moves each request's kept block
    slots right after its committed ones with one gather (`BufferCache.compact`); `rollback` moves lengths back.
    The bookkeeping of every ragged runner over a BufferCache (image_ar's LlamaGen target and drafters, the image
    head drafter).
    """

    def __init__(self, cache: BufferCache, lengths, scale: float = 1.0):
        self.cache, self.lengths, self.scale = cache, [int(n) for n in lengths], scale

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """Per-request rows -> cache rows (doubled when guided)."""
        return double_rows(x, self.scale)

    def committed(self, device, prefix_ok: torch.Tensor | None = None) -> torch.Tensor:
        """(R, width) bool: each cache row's committed slots; prefix_ok (R, L) further hides padded prefix slots."""
        lengths = self.rows(torch.tensor(self.lengths, device=device))
        seen = torch.arange(self.cache.length, device=device)[None, :] < lengths[:, None]
        if prefix_ok is not None:
            seen[:, : prefix_ok.shape[1]] &= prefix_ok
        return seen

    def keep(self, keep: Sequence[Sequence[int]], block_start: int) -> None:
        """Request b keeps block slots keep[b] (indices within the block appended at `block_start`, ascending) right
        after its committed slots; everything else written since is dropped."""
        start = min(self.lengths)
        index = [list(range(start, n)) + [block_start + j for j in ks] for n, ks in zip(self.lengths, keep)]
        width = max(len(ix) for ix in index)
        if width == 0:
            self.cache.crop(start)
        else:
            padded = [ix + [ix[-1] if ix else 0] * (width - len(ix)) for ix in index]  # pads are never visible
            self.cache.compact(start, self.rows(torch.tensor(padded, dtype=torch.long)))
        self.lengths = [n + len(ks) for n, ks in zip(self.lengths, keep)]

    def keep_first(self, counts: Sequence[int], block_start: int) -> None:
        """Request b keeps the first counts[b] slots of the block appended at `block_start`."""
        self.keep([range(n) for n in counts], block_start)

    def discard(self) -> None:
        """Forget every slot written since the last keep (drafted slots): the cache ends at max(lengths)."""
        self.cache.crop(max(self.lengths, default=0))

    def rollback(self, lengths: Sequence[int]) -> None:
        """Forget each request's slots past lengths[b] (<= its current length)."""
        if any(n > old for n, old in zip(lengths, self.lengths)):
            raise InvalidInputError(f"rollback to {list(lengths)} past the committed lengths {self.lengths}")
        self.lengths = list(lengths)
        self.cache.crop(max(self.lengths))

    def select_rows(self, rows: Sequence[int]) -> list[int]:
        """Keep the given requests; returns the cache rows kept (both halves when guided)."""
        rows = list(rows)
        full = both_halves(rows, len(self.lengths), self.scale)
        self.cache.select_rows(full)
        take_rows(self, rows, "lengths")
        return full
