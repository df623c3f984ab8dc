"""Verification adapter for stock transformers VLMs (LLaVA, Qwen-VL, Idefics3/SmolVLM, Gemma3, PaliGemma, InternVL).

Prefill runs the model's own forward, row by row, with the processor's inputs (pixel values, grids, token types):
images, bidirectional image attention (Gemma3), prefix-LM masks (PaliGemma) and M-RoPE position ids (Qwen) come out
exactly as in ``model.generate``. The per-row caches are then laid side by side in one ragged cache, and every later
block (draft verification, a chat's next turn) is text, fed with the engine's explicit 4-D masks and positions:

* M-RoPE (Qwen2/2.5/3-VL): positions are 3 rows; after the prompt, text continues at ``len + rope_delta`` in all
  three (``get_rope_index`` of the model gives the prompt's positions and delta), so a draft node at depth d has
  position ``next_pos + d`` in every row.
* Sliding-window layers (Gemma 3/4): as the engine's runner does for any model that types its layers, the cache
  keeps every slot (a rejected draft's window must be restorable), and each block gets two masks, the full one and
  the same one cut to the window by position (query - key < window).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache

from mmspec.cache import RaggedCache, kv_layers
from mmspec.recurrent import RecurrentStates
from mmspec.compat import cache_kwargs
from mmspec.errors import ContextOverflowError, EmptyPromptError
from mmspec.request import Request
from mmspec.state import take_rows
from mmspec.target import BlockOutput, CausalLMRunner, CausalLMTarget, select_hidden, sync_time, text_config

from .attention_probe import AttentionProbe, last_query_mass


@dataclass
class VLMRequest:
    """One row's processor output: the expanded prompt ids and the other model inputs (batch dimension 1)."""

    input_ids: list[int]
    inputs: dict = field(default_factory=dict)  # pixel_values, image_grid_thw, token_type_ids, image_sizes, ...

    @property
    def has_images(self) -> bool:
        return any(k.startswith("pixel_values") for k in self.inputs)

    def as_request(self, **fields) -> Request:
        """The engine's Request for this row (`fields`: the drafter's view, a chat session, ...)."""
        return Request(list(self.input_ids), dict(self.inputs), **fields)


def vlm_request(request) -> VLMRequest:
    """A Request (prompt + processor inputs), a VLMRequest, or plain token ids as a VLMRequest."""
    if isinstance(request, VLMRequest):
        return request
    if isinstance(request, Request):
        return VLMRequest(list(request.prompt), dict(request.inputs))
    return VLMRequest(list(request))


def rope_index_fn(model):
    """The model's M-RoPE position function (Qwen-VL family), or None for 1-D positions."""
    inner = getattr(model, "model", None)
    return getattr(inner, "get_rope_index", None)


class VLMRunner(CausalLMRunner):
    """A VLM driven over a ragged cache: native multimodal prefill, explicit text blocks afterwards."""

    persistent_attributes = CausalLMRunner.persistent_attributes | {"window", "want_attention", "rope_index",
                                                                    "prefix_lm", "position_offset"}

    def __init__(self, model: torch.nn.Module):
        super().__init__(model, cache="dynamic")
        self.want_attention = False  # prefill also returns the last token's last-layer attention (DREAM pruning)
        self.rope_index = rope_index_fn(model)
        self.prefix_lm = "paligemma" in type(model).__name__.lower()
        self.position_offset = 1 if self.prefix_lm else 0  # PaliGemma numbers positions from 1 (its own forward)
        self.row_ids: list[list[int]] = []  # ids whose keys sit in the cache, per row (for chat reuse)
        self.owner = None  # the chat session whose conversation the cache holds (None: nobody may resume it)
        self.last_prefill = {"tokens": 0, "resumed": False}  # prompt tokens the last prefill ran through the model

    def forget(self) -> None:
        """Never resume the current cache (after an interrupted or failed turn)."""
        self.owner = None

    # --- positions and masks ------------------------------------------------------------------------------------
    def position_ids(self, absolute: torch.Tensor) -> torch.Tensor:
        """Text positions (B, M); M-RoPE models take them as 3 equal rows (temporal, height, width)."""
        return absolute.unsqueeze(0).expand(3, *absolute.shape) if self.rope_index is not None else absolute

    # --- prefill ------------------------------------------------------------------------------------------------
    def _positions(self, reqs: list[VLMRequest], ids: torch.Tensor) -> tuple[torch.Tensor | None, list[int]]:
        """Explicit prompt positions (M-RoPE: (3, G, T), from the model's own get_rope_index) and each row's next
        text position; None / the lengths for 1-D positions."""
        n = ids.shape[1]
        if self.rope_index is None or not reqs[0].has_images:
            return None, [n + self.position_offset] * len(reqs)
        params = inspect.signature(self.rope_index).parameters
        kw = {k: v.to(self.device) for k, v in batch_inputs(reqs).items() if k in params and torch.is_tensor(v)}
        pos, delta = self.rope_index(ids, attention_mask=torch.ones_like(ids), **kw)
        return pos, [n + int(d) for d in delta.reshape(-1).tolist()]

    @torch.inference_mode()
    def _prefill_group(self, reqs: list[VLMRequest], want_hidden: bool):
        """One native forward over rows of equal length and input shapes (batched exactly as the processor would)."""
        ids = torch.tensor([r.input_ids for r in reqs], device=self.device)
        pos, next_pos = self._positions(reqs, ids)
        # Full layers only: nothing is evicted (sliding windows are masked instead); a hybrid model's cache needs its
        # config to know which layers are recurrent (their states are kept by the engine: mmspec.recurrent)
        cache = DynamicCache(config=self.model.config) if self.recurrent_layers else DynamicCache()
        extra = {"logits_to_keep": 1} if self._takes_logits_to_keep else {}
        inputs = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch_inputs(reqs).items()}
        t0 = sync_time(self.device)
        probe = AttentionProbe(self.model, [-1], last_query_mass) if self.want_attention else None
        lengths = [ids.shape[1]] * ids.shape[0]
        with probe or contextlib.nullcontext(), self._recurrent_mode(None, None, *ids.shape, lengths):
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=pos,
                             **cache_kwargs(self.model, cache), use_cache=True,
                             output_hidden_states=bool(want_hidden), **inputs, **extra)
        self.forward_time += sync_time(self.device) - t0
        states = getattr(self, "_prompt_states", None)
        self.__dict__.pop("_prompt_states", None)
        cache.recurrent = states  # this group's recurrent states (None without recurrent layers), for the merge
        hidden = select_hidden(out.hidden_states, want_hidden) if want_hidden else None  # (G, T, H): every position
        attention = probe.records[0][-1] if probe is not None else None  # (G, T) the last token's, last layer
        rows = None if pos is None else [torch.cat([pos[:, j].cpu(), torch.full((pos.shape[0], 1), n)], dim=1)
                                         for j, n in enumerate(next_pos)]  # (3, T + 1) per row
        return out.logits[:, -1], hidden, attention, cache, next_pos, rows

    def prefill(self, requests: Sequence[Request], want_hidden: bool = False, reserve: int = 0) -> BlockOutput:
        """Run each request's prompt with its processor inputs (`Request.inputs`: pixel values, grids, ...). A
        request whose `session` left the cache (a chat's previous turn) may continue it: images in a cache are not
        visible in its token ids, so only the session that made a cache may resume it."""
        reqs = [vlm_request(r) for r in requests]
        sessions = {id(getattr(r, "session", None)) for r in requests}
        owner = getattr(requests[0], "session", None) if len(sessions) == 1 else None
        for i, r in enumerate(reqs):
            if not r.input_ids:
                raise EmptyPromptError(f"prompt {i} has no tokens; every request needs >= 1 token")
            if self.max_positions and len(r.input_ids) > self.max_positions:
                raise ContextOverflowError(f"prompt {i} has {len(r.input_ids)} tokens (images expanded), more than "
                                           f"the model's context of {self.max_positions} positions")
        resume = (len(reqs) == 1 and owner is not None and owner is self.owner and not want_hidden
                  and self._can_resume(reqs[0]))  # feature drafters read the whole prompt's features: prefill it
        self.owner = None  # until this prefill has succeeded
        if resume:
            out = self._resume(reqs[0], want_hidden)
            self.owner = owner
            return out
        b = len(reqs)
        logits, hidden, caches, next_pos = [None] * b, [None] * b, [None] * b, [0] * b
        attention, positions = [None] * b, [None] * b
        for group in group_rows(reqs):
            lg, hd, att, cache, pos, rows = self._prefill_group([reqs[i] for i in group], want_hidden)
            for j, i in enumerate(group):
                logits[i], next_pos[i] = lg[j], pos[j]
                positions[i] = rows[j] if rows is not None else None
                hidden[i] = hd[j] if want_hidden else None
                attention[i] = att[j] if att is not None else None
                caches[i] = (cache, j)
        self.kv = merge_row_caches(caches, [len(r.input_ids) for r in reqs])
        if self.recurrent_layers:  # each row's states, from its group's prefill
            self.states = RecurrentStates(*({i: torch.cat([c.recurrent[key][i][j: j + 1] for c, j in caches])
                                             for i in self.recurrent_layers} for key in ("conv", "rec")))
        self.last_prefill = {"tokens": sum(len(r.input_ids) for r in reqs), "resumed": False}
        self.next_positions = next_pos
        self.row_ids = [list(r.input_ids) for r in reqs]
        self.owner = owner
        # (B, T_max, H) hidden and (B, T_max) attention, right-padded like the engine's own prefill
        hidden = pad_sequence(hidden, batch_first=True) if want_hidden else None
        attention = pad_sequence(attention, batch_first=True) if self.want_attention else None
        return BlockOutput(torch.stack(logits), hidden, attention,
                           positions if any(p is not None for p in positions) else None)

    # --- chat: continue a cached conversation -------------------------------------------------------------------
    def _can_resume(self, req: VLMRequest) -> bool:
        """A text-only continuation of what the cache holds (one row, same images, new text after them)."""
        if self.kv is None or len(self.row_ids) != 1 or self.prefix_lm or self.kv.width != self.kv.lengths[0]:
            return False
        cached, new = self.row_ids[0], req.input_ids
        n = common_prefix(cached, new)
        if n == 0 or n == len(new) or (self.recurrent_layers and n < len(cached)):
            return False  # (a recurrent state cannot go back before the cache's end)
        image_ids = self.image_token_ids()
        return not any(t in image_ids for t in cached[n:]) and not any(t in image_ids for t in new[n:])

    def image_token_ids(self) -> set[int]:
        cfg = self.model.config
        names = ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id",
                 "vision_end_token_id", "boi_token_id", "boi_token_index", "eoi_token_id", "eoi_token_index")
        return {int(getattr(cfg, n)) for n in names if isinstance(getattr(cfg, n, None), int)}

    @torch.inference_mode()
    def _resume(self, req: VLMRequest, want_hidden: bool) -> BlockOutput:
        cached = self.row_ids[0]
        n = common_prefix(cached, req.input_ids)
        drop = len(cached) - n
        if drop:  # the re-rendered history tokenised differently after position n: recompute from there
            self.kv.lengths = [n]
            self.kv.compact([[]])  # drops every slot beyond the common prefix (no copy)
            self.next_positions = [self.next_positions[0] - drop]
        suffix = req.input_ids[n:]
        m = len(suffix)
        if self.kv.static:  # a compiled turn's cache: the new text runs eagerly over it, with room made for it
            self.kv.compiled = False
            self.kv.to_static(self.model, self.kv.width + m)
        out = self.forward_block(torch.tensor([suffix]), torch.arange(m)[None], None, keep_last=1)
        if self.states is not None:
            self.states.keep([m - 1])  # the suffix ran as a chain: its last token's state
        self.kv.lengths = [self.kv.width]
        self.next_positions = [self.next_positions[0] + m]
        self.last_prefill = {"tokens": m, "resumed": True}
        self.row_ids = [list(req.input_ids)]
        return BlockOutput(out.logits[:, -1])  # never with want_hidden: feature drafters prefill the whole prompt

    def note_committed(self, tokens: Sequence[Sequence[int]]) -> None:
        for ids, new in zip(self.row_ids, tokens):
            ids.extend(new)

    def select_rows(self, rows: Sequence[int]) -> None:
        super().select_rows(rows)
        take_rows(self, rows, "row_ids")


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def batch_inputs(reqs: list[VLMRequest]) -> dict:
    """Concatenate rows' processor outputs along dim 0, as the processor does for a batch (per-row tensors such as
    token types gain rows; per-image tensors such as pixel values, grids and sizes gain images)."""
    if len(reqs) == 1:
        return dict(reqs[0].inputs)
    return {k: torch.cat([r.inputs[k] for r in reqs]) if torch.is_tensor(v) else v for k, v in reqs[0].inputs.items()}


def group_rows(reqs: list[VLMRequest]) -> list[list[int]]:
    """Row indices grouped by prompt length and input shapes: each group is one prefill forward without padding."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(reqs):
        key = (len(r.input_ids), tuple(sorted((k, tuple(v.shape) if torch.is_tensor(v) else repr(v))
                                              for k, v in r.inputs.items())))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def merge_row_caches(rows: list[tuple[DynamicCache, int]], lengths: list[int]) -> RaggedCache:
    """Rows given as (cache, row index in it), each with lengths[b] slots -> one right-padded ragged cache (holes
    beyond a row's length are masked by the engine)."""
    first = rows[0][0]
    if all(c is first for c, _ in rows) and [j for _, j in rows] == list(range(len(rows))) and \
            len(set(lengths)) == 1:  # one group in order: the cache is already the batch
        return RaggedCache(first, list(lengths), lengths[0], peak_width=lengths[0])
    width = max(lengths)
    merged, attention = {}, {id(layer) for layer in kv_layers(first)}
    for layer_idx, layer in enumerate(first.layers):
        if id(layer) not in attention:
            continue  # a recurrent layer: its states are the engine's (mmspec.recurrent)
        ks, vs = [], []
        for c, j in rows:
            k, v = c.layers[layer_idx].keys[j: j + 1], c.layers[layer_idx].values[j: j + 1]
            pad = width - k.shape[2]
            ks.append(torch.nn.functional.pad(k, (0, 0, 0, pad)))
            vs.append(torch.nn.functional.pad(v, (0, 0, 0, pad)))
        merged[layer_idx] = (torch.cat(ks), torch.cat(vs))
    if len(merged) == len(first.layers):
        cache = DynamicCache(ddp_cache_data=[merged[i] for i in range(len(first.layers))])
    else:  # a hybrid model's cache (its layers typed by its config): the attention layers take the merged keys
        cache = first
        for i, (k, v) in merged.items():
            cache.layers[i].keys, cache.layers[i].values = k, v
    return RaggedCache(cache, list(lengths), width, peak_width=width)


class VLMTarget(VLMRunner, CausalLMTarget):
    """Target adapter for stock transformers VLMs; see the module docstring."""

    def verify(self, pending, drafts, want_hidden: bool = False) -> BlockOutput:
        self._block_tokens = [[p] + d.token_list for p, d in zip(pending, drafts)]
        return CausalLMTarget.verify(self, pending, drafts, want_hidden)

    def commit(self, paths) -> None:
        kept = [[] if p is None else [blk[0]] + [blk[1 + i] for i in p] for blk, p in zip(self._block_tokens, paths)]
        CausalLMTarget.commit(self, paths)
        self.note_committed(kept)
