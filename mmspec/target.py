"""Target protocol and the adapter for transformers causal LMs.

A target turns a batch of drafts into next-token logits with **one** forward: the block fed for request b is
``[pending_b, draft_b nodes..., padding]`` with a 4-D float attention mask (its committed prefix + the ancestor
closure inside the block) and explicit ``position_ids`` (``next_pos_b + depth``), appended to a transformers cache.
This works for every model that accepts a 4-D mask and position ids (LLaMA, Mistral, Qwen2/3, Gemma, Phi, ...).
VLM and image adapters subclass :class:`CausalLMRunner` and override how prompts are prefilled and how positions
are made (M-RoPE, images).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from transformers import DynamicCache

from .cache import RaggedCache
from .compat import cache_name
from .compile import CompiledForward, bucket, cache_capacity, pad_block
from .errors import ContextOverflowError, EmptyPromptError, UnsupportedModelError
from .inference import inference
from .recurrent import RecurrentStates, block_mode, block_parents, prompt_mode, recurrent_layers
from .request import Request, prompt_ids
from .state import StreamStateful, take_rows
from .tree import Draft, ancestor_mask


@dataclass
class BlockOutput:
    logits: torch.Tensor  # (B, M, V) float
    hidden: torch.Tensor | None = None  # (B, M, H) last hidden state (or EAGLE-3 taps, concatenated), when asked
    # for (prefill: (B, T, H), every
    # prompt position, right-padded, for feature-level drafters that read the target's features of the whole prompt)
    attention: torch.Tensor | None = None  # prefill of targets that offer it: (B, T) attention mass the last prompt
    # token pays each prompt position in the last layer (summed over heads), right-padded with 0
    positions: list[torch.Tensor | None] | None = None  # prefill of targets whose positions are not token indices
    # (M-RoPE after an image): per row (R, T + 1), the prompt tokens' position ids then the next token's; None for
    # a row (or every row) whose token t sits at position t


@dataclass
class PositionMap:
    """Explicit position ids for a runner whose token indices are not its model's positions: a drafter that runs
    its target's own layers (an MTP head) over a prompt laid out by M-RoPE. Row b's index t < lengths[b] takes
    ``table[:, b, t]``; a later index continues the text at ``t - lengths[b] + next_position[b]`` in every row."""

    table: torch.Tensor  # (R, B, T_max) long
    lengths: torch.Tensor  # (B,) long: indices covered by the table
    next_position: torch.Tensor  # (B,) long: the position of index lengths[b]

    @classmethod
    def from_rows(cls, rows: Sequence[torch.Tensor | None], lengths: Sequence[int], device) -> "PositionMap":
        """rows[b]: (R, T_b + 1) position ids of the first T_b indices then the next one (`BlockOutput.positions`),
        or None for a row whose index t is position t (its length from `lengths`)."""
        r = next(p.shape[0] for p in rows if p is not None)
        full = [p if p is not None else torch.arange(n + 1).expand(r, n + 1) for p, n in zip(rows, lengths)]
        t_max = max(p.shape[1] - 1 for p in full)
        table = torch.zeros(r, len(full), max(t_max, 1), dtype=torch.long)
        for b, p in enumerate(full):
            table[:, b, : p.shape[1] - 1] = p[:, :-1]
        return cls(table.to(device), torch.tensor([p.shape[1] - 1 for p in full], device=device),
                   torch.tensor([int(p[0, -1]) for p in full], device=device))

    def __call__(self, absolute: torch.Tensor) -> torch.Tensor:
        """Indices (B or 1, M) -> position ids (R, B, M)."""
        r, b, t_max = self.table.shape
        absolute = absolute.to(self.table.device).expand(b, -1)
        looked = self.table.gather(2, absolute.clamp(0, t_max - 1).unsqueeze(0).expand(r, -1, -1))
        after = absolute - self.lengths[:, None] + self.next_position[:, None]
        return torch.where((absolute < self.lengths[:, None]).unsqueeze(0), looked, after.unsqueeze(0))

    def select(self, rows: Sequence[int]) -> "PositionMap":
        idx = torch.as_tensor(list(rows), device=self.table.device)
        return PositionMap(self.table[:, idx], self.lengths[idx], self.next_position[idx])


def sync_time(device: torch.device) -> float:
    """perf_counter after the device has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def text_config(model: torch.nn.Module):
    """The decoder's config (a VLM's text model; the model's own config for a causal LM)."""
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def output_vocab(model: torch.nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "out_features"):
        return int(head.out_features)
    cfg = text_config(model)
    return int(cfg.vocab_size)


def select_hidden(hidden_states: Sequence[torch.Tensor], want) -> torch.Tensor:
    """The features a drafter asked for: `True` = the last hidden state; a tuple of indices into the model's
    `hidden_states` (0 = embeddings, -1 = last) = those layers concatenated on the feature axis (EAGLE-3 taps)."""
    if want is True:
        return hidden_states[-1]
    return torch.cat([hidden_states[i] for i in want], dim=-1)


def fit_vocab(logits: torch.Tensor, size: int) -> torch.Tensor:
    """Logits (..., V) over the first `size` ids: cut, or padded with -inf (ids the model cannot produce).

    For a drafter whose tokenizer agrees with the target's on the shared ids but whose embedding matrix is padded
    differently (e.g. a text LM drafting for a VLM whose vocabulary adds image tokens)."""
    v = logits.shape[-1]
    if v >= size:
        return logits[..., :size]
    pad = logits.new_full((*logits.shape[:-1], size - v), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


def sliding_window_of(model) -> int | None:
    """The window of the model's sliding-attention layers (typed by its config's `layer_types`), or None when every
    layer is full attention."""
    cfg = text_config(model)
    types = getattr(cfg, "layer_types", None) or []
    return int(cfg.sliding_window) if "sliding_attention" in types else None


def context_limit(model: torch.nn.Module) -> int | None:
    cfg = text_config(model)
    return getattr(cfg, "max_position_embeddings", None)


class CausalLMRunner(StreamStateful):
    """A transformers causal LM driven over a ragged :class:`RaggedCache` with explicit masks and positions.

    Its attributes hold one generation's state (cache, positions); streams own it (`mmspec.state`)."""

    persistent_attributes = frozenset({"model", "cache_kind", "max_cache_len", "device", "dtype", "vocab_size",
                                       "out_vocab", "max_positions", "compiled_forward", "compile_time",
                                       "static_capacity", "recurrent_layers", "window"})

    def __init__(self, model: torch.nn.Module, cache: str = "dynamic", max_cache_len: int | None = None):
        if not hasattr(model, "config"):
            raise UnsupportedModelError(f"{type(model).__name__} is not a transformers model (no .config)")
        self.check_model(model)
        self.model = model.eval()
        self.cache_kind, self.max_cache_len = cache, max_cache_len
        self.device, self.dtype = model_device(model), model_dtype(model)
        self.vocab_size = output_vocab(model)
        self.out_vocab: int | None = None  # set to pad/cut logits to another model's vocabulary (shared tokenizer)
        self.max_positions = context_limit(model)
        self.kv: RaggedCache | None = None
        self.forward_time = 0.0  # seconds spent inside the model's forward (engine overhead = the rest)
        self.compile_time = 0.0  # seconds of forwards that compiled a shape (kept out of forward_time)
        self.compiled_forward: CompiledForward | None = None  # made on the first compiled decode, then reused
        self.static_capacity = 0  # slots of the compiled path's static caches (grows, never shrinks)
        self._takes_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._cache_arg = cache_name(model)  # "cache" (transformers >= 5.24) or "past_key_values": read once
        self.next_positions: list[int] = []  # per row: position id of the next token fed
        self._arange: torch.Tensor | None = None  # (1, n) cached positions for `position_slice`
        self._zeros: torch.Tensor | None = None  # cached additive zeros for `open_prefix`
        self._zero: torch.Tensor | None = None  # 0-dim zero in the model's dtype, for `additive`
        self._tree_templates: dict[int, tuple] = {}  # id(tree visibility) -> (it, its additive form), see verify
        self.recurrent_layers = recurrent_layers(model)  # index -> module of each linear-attention layer ({}: none)
        # Sliding-window layers (Gemma 2/3/4, gpt-oss): the cache keeps every slot (a rejected draft's window must
        # stay restorable) and each block gets the full mask and the same one cut to the window by position
        self.window = sliding_window_of(model)
        if self.window is not None and cache == "static":
            raise UnsupportedModelError(f"{type(model).__name__} has sliding-window layers, which a static cache "
                                        "would evict from; use cache='dynamic'")
        self.states: RecurrentStates | None = None  # their per-request states (`mmspec.recurrent`)
        self.position_map: PositionMap | None = None  # explicit positions of this generation's rows (None: indices)

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse models this adapter cannot drive exactly: sliding-window layers it cannot mask itself."""
        if sliding_window_of(model) is None and any(
                getattr(layer, "is_sliding", False) for layer in DynamicCache(config=model.config).layers):
            # transformers' own rule decides which layers slide (layer_types, or sliding_window for Mistral)
            raise UnsupportedModelError(
                f"{type(model).__name__} slides its attention window over every layer (no layer_types naming the "
                "sliding ones), and a sliding cache evicts keys a rejected draft needs; models that type their "
                "layers (Gemma 2/3/4, gpt-oss) are supported")

    def model_inputs(self, ids: torch.Tensor, allowed: torch.Tensor | None, positions: torch.Tensor) -> dict:
        """Keyword arguments of the model's forward for a block: ids (B, M), visibility (B, M, K) bool or None for
        the model's own causal mask, positions from `positions()`. Subclasses add family-specific inputs."""
        mask = None if allowed is None else self._float_mask(allowed)
        if mask is not None and self.recurrent_layers:  # the recurrent layers take no mask (mmspec.recurrent)
            mask = {"full_attention": mask, "linear_attention": None}
        elif mask is not None and self.window is not None:  # sliding layers: the same visibility cut to the window
            if allowed.is_floating_point():  # an additive (B, 1, M, K) mask from a hot path: visibility back
                allowed = (allowed[:, 0] == 0).cpu()
            text = positions[0] if positions.dim() == 3 else positions  # M-RoPE: text rows are equal
            mask = {"full_attention": mask, "sliding_attention": self._float_mask(self._windowed(allowed, text))}
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}

    def _windowed(self, allowed: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Cut visibility (B, M, K) to the sliding window. Committed slot j holds position j (1-D positions, no holes
        inside a row's prefix); block slots hold the block's positions (B, M)."""
        b, m, k = allowed.shape
        q = positions.cpu().expand(b, m)
        width = k - m
        keys = torch.cat([torch.arange(width).expand(b, width), q], dim=1)  # (B, K)
        near = (q[:, :, None] - keys[:, None, :]) < self.window
        return allowed & near

    # --- masks and positions ------------------------------------------------------------------------------------
    def _float_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """bool (B, M, K) -> additive float mask (B, 1, M, K) in the model's dtype. A float mask is taken to be that
        already (the hot paths build theirs from cached float templates) and passes through."""
        if allowed.is_floating_point():
            return allowed
        return self.additive(allowed).unsqueeze(1)

    def additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """bool visibility of any shape -> additive float mask of the same shape: 0 where visible, the dtype's
        minimum elsewhere (one op)."""
        if self._zero is None:
            self._zero = torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.where(allowed.to(self.device), self._zero, torch.finfo(self.dtype).min)

    def open_prefix(self, b: int, m: int, width: int) -> torch.Tensor:
        """(B, 1, M, width) additive zeros (every slot visible), a view of a cached buffer: the hole-free prefix part
        of a float mask, to be concatenated with the block's template (callers must not write to it)."""
        buf = self._zeros
        if buf is None or m > buf.shape[2] or width > buf.shape[3]:
            old = (0, 0) if buf is None else buf.shape[2:]
            shape = (1, 1, max(32, m, old[0]), max(256, 2 * width, old[1]))
            buf = self._zeros = torch.zeros(shape, dtype=self.dtype, device=self.device)
        return buf[:, :, :m, :width].expand(b, 1, m, width)

    def block_mask(self, block_allowed: torch.Tensor | None, existing: torch.Tensor | str | None = None,
                   m: int | None = None) -> torch.Tensor | None:
        """Visibility (B, M, K) bool for a block of M tokens appended at `width`.

        block_allowed: (B, M, M) bool visibility inside the block, or None for causal.
        existing: (B, M, width) bool over the slots already written; None = each row's committed prefix;
          "all" = every written slot.
        Returns None when the result is the plain causal mask over a hole-free dynamic cache: the model then builds
        its own, exactly as in plain decoding (and faster than an explicit 4-D mask). Over a hole-free dynamic cache
        the result is already the additive float mask (B, 1, M, K) (`_float_mask` passes it through).
        """
        kv = self.kv
        if block_allowed is None and not kv.static and (
                existing == "all" or (existing is None and min(kv.lengths) == kv.width)):
            return None
        if block_allowed is None:
            block_allowed = torch.ones(m, m, dtype=torch.bool).tril_().expand(len(kv.lengths), m, m)
        b, m, _ = block_allowed.shape
        if existing is None and not kv.static and min(kv.lengths) == kv.width:  # hole-free: the whole prefix, as
            # an additive float mask straight away (open prefix + the block's part; see `_float_mask`)
            return torch.cat([self.open_prefix(b, m, kv.width), self.additive(block_allowed).unsqueeze(1)], dim=-1)
        key_len = kv.key_len if kv.static else kv.width + m
        allowed = torch.zeros(b, m, key_len, dtype=torch.bool)
        if existing is None:
            slots = torch.arange(kv.width)
            existing = (slots[None, :] < kv.length[:, None]).unsqueeze(1)  # committed prefix
        elif isinstance(existing, str):
            existing = True
        allowed[:, :, : kv.width] = existing
        allowed[:, :, kv.width: kv.width + m] = block_allowed
        return allowed

    def empty_mask(self, b: int, m: int) -> torch.Tensor:
        """All-False (B, M, K) visibility for a block of M appended at `width` (K = key slots attention sees)."""
        kv = self.kv
        return torch.zeros(b, m, kv.key_len if kv.static else kv.width + m, dtype=torch.bool)

    @property
    def next_pos(self) -> torch.Tensor:
        """(B,) tensor view of `next_positions`."""
        return torch.tensor(self.next_positions, dtype=torch.long)

    @next_pos.setter
    def next_pos(self, value) -> None:
        self.next_positions = [int(v) for v in value]

    def positions(self, offsets: torch.Tensor) -> torch.Tensor:
        """Position ids for a block: offsets (B, M) added to each row's next position."""
        if len(self.next_positions) == 1:
            return self.position_ids((offsets + self.next_positions[0]).to(self.device))
        return self.position_ids((offsets + self.next_pos[:, None]).to(self.device))

    def position_ids(self, absolute: torch.Tensor) -> torch.Tensor:
        """What the model's forward takes for absolute text positions (B, M): themselves, or their `position_map`
        (a drafter running its target's own layers over an M-RoPE prompt). Overridden for M-RoPE targets (3 rows)."""
        return absolute if self.position_map is None else self.position_map(absolute)

    def position_slice(self, start: int, m: int) -> torch.Tensor:
        """Absolute positions start .. start + m - 1 as a (1, m) long tensor on the device: a view of a cached
        arange, so the hot path allocates nothing (callers must not write to it)."""
        buf = self._arange
        if buf is None or start + m > buf.shape[1]:
            n = max(256, 2 * (start + m))
            buf = self._arange = torch.arange(n, device=self.device).view(1, n)
        return buf[:, start: start + m]

    @inference
    def forward_token(self, ids: torch.Tensor, absolute: torch.Tensor) -> torch.Tensor:
        """The lean path for one request's chain step: ids (1, 1) on the device (no host round trip), absolute
        position (1, 1); the token sees every slot written so far, so the model builds its own causal mask.
        Returns the logits (1, 1, V) as the model gives them (their argmax(-1) is the next (1, 1) input). Static
        caches take the general path."""
        kv = self.kv
        if kv.static:
            return self.forward_block(ids, absolute - self.next_positions[0], None, existing="all").logits
        inputs = self.model_inputs(ids, None, self.position_ids(absolute))
        t0 = sync_time(self.device)
        out = self.model(**inputs, **{self._cache_arg: kv.cache}, use_cache=True)
        self.forward_time += sync_time(self.device) - t0
        kv.appended(1)
        return self._fit(out.logits)

    def _fit(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over the target's vocabulary when this runner drafts for a target of another size."""
        if self.out_vocab and logits.shape[-1] != self.out_vocab:
            return fit_vocab(logits, self.out_vocab)
        return logits

    # --- forwards -----------------------------------------------------------------------------------------------
    @inference
    def forward_block(self, tokens: torch.Tensor, offsets: torch.Tensor, block_allowed: torch.Tensor | None,
                      want_hidden: bool = False, existing: torch.Tensor | str | None = None,
                      full_mask: torch.Tensor | None = None, keep_last: int | None = None,
                      inputs: dict | None = None, prompt_lengths: Sequence[int] | None = None) -> BlockOutput:
        """Append a (B, M) block: tokens, position offsets (B, M), intra-block visibility (B, M, M) or None for
        causal, and which already-written slots each block token sees (see `block_mask`); or the whole visibility
        at once as `full_mask`: (B, M, K) bool (see `empty_mask`) or an additive float (B, 1, M, K) mask.

        keep_last: compute logits only for the last `keep_last` positions (transformers' `logits_to_keep`), so a
        long prompt never materialises a (T, V) logits tensor; the returned logits are (B, keep_last, V).
        inputs: more keyword arguments of the model's forward for this block (a feature drafter's `features`).
        prompt_lengths: the block is the requests' prompts, of these lengths (prefill; see `mmspec.recurrent`)."""
        kv = self.kv
        m = tokens.shape[1]
        if kv.static and kv.width + m > kv.key_len:
            raise ContextOverflowError(
                f"static cache of {kv.key_len} slots is full (width {kv.width} + block {m}); "
                "raise max_cache_len")
        if self.out_vocab and self.out_vocab > self.vocab_size:  # a drafter with a smaller vocabulary than the
            tokens = tokens.masked_fill(tokens >= self.vocab_size, 0)  # target's: ids it cannot embed become 0
        allowed = full_mask if full_mask is not None else self.block_mask(block_allowed, existing, m)
        model_in = self.model_inputs(tokens.to(self.device), allowed, self.positions(offsets))
        if inputs:
            model_in.update(inputs)
        if kv.compiled:
            return self._forward_compiled(model_in, m, want_hidden, keep_last)
        t0 = sync_time(self.device)
        extra = {"logits_to_keep": keep_last} if keep_last and self._takes_logits_to_keep else {}
        with self._recurrent_mode(block_allowed, full_mask, tokens.shape[0], m, prompt_lengths):
            out = self.model(**model_in, **{self._cache_arg: kv.cache}, use_cache=True,
                             output_hidden_states=bool(want_hidden), **extra)
        self.forward_time += sync_time(self.device) - t0
        kv.appended(m)
        hidden = select_hidden(out.hidden_states, want_hidden) if want_hidden else None
        logits = out.logits[:, -keep_last:] if keep_last and out.logits.shape[1] > keep_last else out.logits
        return BlockOutput(self._fit(logits), hidden)

    def _recurrent_mode(self, block_allowed, full_mask, b: int, m: int, prompt_lengths):
        """How the recurrent layers run this forward (`mmspec.recurrent`): each prompt alone, or node by node from
        the parents the block's visibility gives; nothing for models without such layers."""
        if not self.recurrent_layers:
            return contextlib.nullcontext()
        if prompt_lengths is not None:
            self._prompt_states = {}
            return prompt_mode(self.recurrent_layers, prompt_lengths, self._prompt_states)
        if full_mask is not None:
            width = self.kv.width
            block = full_mask[:, 0, :, width: width + m] == 0 if full_mask.is_floating_point() else \
                full_mask[:, :, width: width + m]
            return block_mode(self.recurrent_layers, self.states, block_parents(block, b, m))
        return block_mode(self.recurrent_layers, self.states, block_parents(block_allowed, b, m))

    def _forward_compiled(self, model_in: dict, m: int, want_hidden, keep_last: int | None) -> BlockOutput:
        """`forward_block`'s model call on the compiled path: the block padded to its bucket (`mmspec.compile`),
        the static cache's write pointer moved back over the padding afterwards. Logits are computed at every
        position (one graph whatever `keep_last`) and cut to the last `keep_last` real ones."""
        kv = self.kv
        size = bucket(m)
        if kv.width + size > kv.key_len:
            raise ContextOverflowError(f"static cache of {kv.key_len} slots is full (width {kv.width} + block {m} "
                                       f"padded to {size}); raise max_cache_len")
        if self.compiled_forward is None:
            self.compiled_forward = CompiledForward(self.model, self.device)
        out, seconds, compiling = self.compiled_forward(
            self.device, **pad_block(model_in, kv.width, size), **{self._cache_arg: kv.cache}, use_cache=True,
            output_hidden_states=bool(want_hidden))
        if compiling:
            self.compile_time += seconds
        else:
            self.forward_time += seconds
        kv.appended(m)
        kv.write_at(kv.width)
        hidden = select_hidden(out.hidden_states, want_hidden)[:, :m] if want_hidden else None
        first = m - keep_last if keep_last and keep_last < m else 0
        return BlockOutput(self._fit(out.logits[:, first:m]), hidden)

    def cannot_compile(self) -> str | None:
        """Why this runner cannot decode compiled (`compile_decode`), or None when it can."""
        if self.recurrent_layers:
            return (f"{type(self.model).__name__} has linear-attention layers, whose per-node state steps "
                    "(mmspec.recurrent) run eagerly")
        if self.window is not None:
            return (f"{type(self.model).__name__} has sliding-window layers, whose windowed masks the compiled "
                    "static-cache path does not build")
        return None

    def compile_decode(self, reserve: int) -> None:
        """Run the rest of this generation's blocks compiled over a static cache with `reserve` free slots (see
        `mmspec.compile`); the prefill has run. The cache's keys are copied once."""
        self.static_capacity = cache_capacity(self.kv.width + reserve, self.static_capacity)
        self.kv.to_static(self.model, self.static_capacity)
        self.kv.compiled = True

    @inference
    def prefill(self, requests: Sequence[Request | Sequence[int]], want_hidden: bool = False,
                reserve: int = 0) -> BlockOutput:
        """Run the requests' prompts (right-padded, one forward). Returns logits (B, V) at each prompt's last token,
        and with want_hidden the last hidden state at every prompt position (B, T, H), right-padded.

        requests: Requests or plain token-id lists. reserve: slots a static cache must keep free beyond the prompt
        (new tokens + draft size).
        """
        prompts = [prompt_ids(r) for r in requests]
        lens = [len(p) for p in prompts]
        if not prompts or min(lens) == 0:
            bad = [i for i, n in enumerate(lens) if n == 0]
            raise EmptyPromptError(f"prompt(s) {bad or '[]'} have no tokens; every request needs >= 1 token")
        if self.max_positions and max(lens) > self.max_positions:
            raise ContextOverflowError(f"prompt of {max(lens)} tokens exceeds the model's context of "
                                       f"{self.max_positions} positions")
        b, t = len(prompts), max(lens)
        if self.cache_kind == "static" and self.max_cache_len and self.max_cache_len < t + reserve:
            raise ContextOverflowError(
                f"max_cache_len={self.max_cache_len} is too small for a prompt of {t} tokens plus {reserve} slots "
                f"(new tokens + the largest draft); use max_cache_len >= {t + reserve}")
        self.kv = RaggedCache.new(self.model, b, self.cache_kind, self.max_cache_len or (t + reserve))
        self.next_positions = [0] * b
        ids = torch.zeros(b, t, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : lens[i]] = torch.as_tensor(list(p), dtype=torch.long)
        length = torch.tensor(lens)
        q_idx, k_idx = torch.arange(t)[:, None], torch.arange(t)[None, :]
        causal = (k_idx <= q_idx).unsqueeze(0)  # (1, T, T)
        # Padding queries may see anything causal; their slots are never marked valid.
        allowed = causal & ((k_idx.unsqueeze(0) < length[:, None, None]) | (q_idx.unsqueeze(0) >= length[:, None, None]))
        keep = t - min(lens) + 1  # logits are needed at each row's last prompt token only
        out = self.forward_block(ids, torch.arange(t).expand(b, t), allowed, want_hidden, keep_last=keep,
                                 prompt_lengths=lens)
        if self.recurrent_layers:
            self.states = RecurrentStates(self._prompt_states["conv"], self._prompt_states["rec"])
            del self._prompt_states
        self.kv.lengths = list(lens)
        self.next_positions = list(lens)
        last = (length - 1).to(out.logits.device)
        rows = torch.arange(b, device=out.logits.device)
        return BlockOutput(out.logits[rows, last - (t - keep)], out.hidden if want_hidden else None)

    def commit(self, keep: Sequence[Sequence[int]], block_start: int) -> None:
        """Keep block slots `keep[b]` (indices within the last block, ascending) for each row."""
        if self.states is not None:  # each row's recurrent state: its last kept node's
            self.states.keep([ks[-1] if ks else None for ks in keep])
        self.kv.compact([[block_start + j for j in ks] for ks in keep])
        self.next_positions = [p + len(k) for p, k in zip(self.next_positions, keep)]

    def select_rows(self, rows: Sequence[int]) -> None:
        self.kv.select_rows(rows)
        if self.states is not None:
            self.states.select_rows(rows)
        if self.position_map is not None:
            self.position_map = self.position_map.select(rows)
        take_rows(self, rows, "next_positions")


@functools.lru_cache(maxsize=64)
def chain_offsets(m: int) -> torch.Tensor:
    """Offsets 0 .. m - 1 as a cached (1, m) tensor (read-only by convention: callers only add to it)."""
    return torch.arange(m).view(1, m)


@functools.lru_cache(maxsize=256)
def _tree_block(parent: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets (1, M) and visibility (1, M, M) of one request's block [pending, nodes...] for a tree of this shape.
    Static trees repeat their shape every step, so each is built once (read-only by convention, like the memo of
    `ancestor_mask`)."""
    m = len(parent) + 1
    depth = [0]
    for p in parent:
        depth.append(depth[p + 1] + 1)
    allowed = torch.ones(1, m, m, dtype=torch.bool).tril_()
    allowed[0, 1:, 1:] = ancestor_mask(parent)
    return torch.tensor([depth], dtype=torch.long), allowed


def draft_block(pending: Sequence[int], drafts: Sequence[Draft]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block for verification: [pending, nodes..., pad] per row.

    Returns tokens (B, M), position offsets (B, M) = depth (0 for the pending token), visibility (B, M, M) (None
    when causal: every row a chain). In tree blocks padding slots see only themselves; either way no real node ever
    sees a pad.
    """
    b = len(drafts)
    m = 1 + max((len(d) for d in drafts), default=0)
    if b == 1:  # one request: no padding; a chain needs no mask at all
        d = drafts[0]
        tokens = torch.tensor([[pending[0]] + d.token_list], dtype=torch.long)
        if d.is_chain:
            return tokens, chain_offsets(m), None
        offsets, allowed = _tree_block(tuple(d.parent_list))
        return tokens, offsets, allowed
    if all(d.is_chain for d in drafts):  # chains (or nothing): causal attention inside the block serves every row,
        # since a row's pads come after its real nodes, which therefore never see them (pads are never kept)
        tokens = torch.tensor([[tok] + d.token_list + [0] * (m - 1 - len(d)) for tok, d in zip(pending, drafts)])
        depth = torch.tensor([[len(d)] for d in drafts])  # pads repeat their row's last position: none reaches
        return tokens, torch.minimum(chain_offsets(m), depth), None  # past what the row itself uses
    tokens = torch.zeros(b, m, dtype=torch.long)
    offsets = torch.zeros(b, m, dtype=torch.long)
    allowed = torch.eye(m, dtype=torch.bool).repeat(b, 1, 1)
    for i, (tok, d) in enumerate(zip(pending, drafts)):
        n = len(d)
        tokens[i, 0] = tok
        if n:
            tokens[i, 1: n + 1] = d.tokens.cpu()
            offsets[i, 1: n + 1] = torch.tensor(d.depth)
            allowed[i, 1: n + 1, 1: n + 1] = ancestor_mask(d.parent_list)
            allowed[i, 1: n + 1, 0] = True
    return tokens, offsets, allowed


class Target(Protocol):
    """What the decode loop needs from a target model."""

    vocab_size: int
    device: torch.device

    def prefill(self, requests: Sequence[Request], want_hidden: bool = False, reserve: int = 0) -> BlockOutput:
        """Run the requests' prompts with their inputs (`mmspec.request.Request`)."""

    def verify(self, pending: Sequence[int], drafts: Sequence[Draft], want_hidden: bool = False) -> BlockOutput: ...

    def commit(self, paths: Sequence[Sequence[int] | None]) -> None: ...

    def select_rows(self, rows: Sequence[int]) -> None: ...


class CausalLMTarget(CausalLMRunner):
    """Target adapter for transformers causal LMs (anything taking a 4-D mask and explicit position ids)."""

    def verify(self, pending: Sequence[int], drafts: Sequence[Draft], want_hidden: bool = False) -> BlockOutput:
        """One forward over [pending, draft nodes] for every row. logits[:, 0] is p for the root's children."""
        tokens, offsets, allowed = draft_block(pending, drafts)
        kv = self.kv
        self._block_start = kv.width
        if (allowed is not None and len(drafts) == 1 and not kv.static and kv.lengths[0] == kv.width
                and not self.recurrent_layers):
            # One request's tree over a hole-free cache: `allowed` is its shape's cached visibility, so its additive
            # form is cached too and the mask is one concatenation with the open prefix.
            mask = torch.cat([self.open_prefix(1, tokens.shape[1], kv.width), self._tree_template(allowed)], dim=-1)
            return self.forward_block(tokens, offsets, None, want_hidden, full_mask=mask)
        return self.forward_block(tokens, offsets, allowed, want_hidden)

    def _tree_template(self, allowed: torch.Tensor) -> torch.Tensor:
        """Additive (1, 1, M, M) form of a tree shape's visibility from `_tree_block`, made once per shape. Keyed by
        the tensor's identity; the entry holds the tensor, so the id cannot be reused while it is cached."""
        memo = self._tree_templates
        got = memo.get(id(allowed))
        if got is None or got[0] is not allowed:
            if len(memo) >= 256:
                memo.clear()
            got = memo[id(allowed)] = (allowed, self.additive(allowed).unsqueeze(1))
        return got[1]

    def commit(self, paths: Sequence[Sequence[int] | None]) -> None:
        """paths[b]: accepted node indices of row b's draft (None: row keeps nothing, e.g. it just finished)."""
        keep = [[] if p is None else [0] + [1 + i for i in p] for p in paths]
        CausalLMRunner.commit(self, keep, self._block_start)
