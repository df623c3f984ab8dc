"""LlamaGen as an engine target: classifier-free guidance over a ragged KV cache, one forward per verification.

The engine's loop (``mmspec.loop``) sees an ordinary target whose logits are already *guided*: every forward runs
[cond rows; uncond rows] (2B) and returns ``u + s (c - u)`` (B, M, V), before temperature / top-k / top-p, exactly as
the plain sampler ``generate_tokens`` does (ALGORITHMS.md section 5, CFG). Drafters that read features get both halves
side by side: ``hidden`` is (B, M, 2D) = [cond features, uncond features] when guided, (B, M, D) otherwise.

Requests carry no text: :meth:`LlamaGenTarget.requests` puts each condition (class label or caption embeddings, its
mask) and the guidance scale in a :class:`~mmspec.request.Request` whose prompt is one placeholder token. Image position ``i`` (raster order) is sequence position
``cls_token_num + i``; rows accept different numbers of tokens, so each row has its own committed length and the
4-D masks hide the other rows' slots (``LlamaGenRunner``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from mmspec.errors import ContextOverflowError, InvalidInputError
from mmspec.guidance import both_halves, combine_logits, double_rows, is_guided, pair_halves
from mmspec.request import Request
from mmspec.state import StreamStateful
from mmspec.target import BlockOutput, draft_block, sync_time
from mmspec.tree import Draft

from .models.guided import check_guidance_scale
from .models.llamagen import LlamaGen, prefix_mask

PLACEHOLDER = 0  # the loop's one-token "prompt" per image; the condition travels in the request's inputs


def batch_conditions(requests) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """The requests' conditions stacked (class labels (B,) or caption embeddings (B, L, C)), their caption masks
    ((B, L) or None) and the guidance scale they share (typed errors name what is missing or differs)."""
    missing = [i for i, r in enumerate(requests) if not isinstance(r, Request) or "condition" not in r.inputs]
    if missing:
        raise InvalidInputError(f"request(s) {missing} carry no condition: build image requests with "
                                "target.requests(class_labels or caption embeddings)")
    scales = {float(r.inputs.get("guidance_scale", 1.0)) for r in requests}
    if len(scales) != 1:
        raise InvalidInputError(f"the requests of one batch must share guidance_scale; got {sorted(scales)}")
    cond = torch.stack([torch.as_tensor(r.inputs["condition"]) for r in requests])
    masks = [r.inputs.get("condition_mask") for r in requests]
    mask = None if all(m is None for m in masks) else torch.stack([
        torch.ones(cond.shape[1], dtype=torch.bool) if m is None else torch.as_tensor(m, dtype=torch.bool).cpu()
        for m in masks])
    return cond, mask, scales.pop()


def check_guidance(model: LlamaGen, guidance_scale) -> float:
    scale = check_guidance_scale(guidance_scale)
    if scale != 1.0:
        model.null_cond(1)  # UnsupportedModelError when the model has no null class / caption
    return scale


class LlamaGenRunner(StreamStateful):
    """A LlamaGen driven over a ragged cache with CFG: prefill, append blocks, keep slots per row.

    Row b's committed slots are [0, lengths[b]) (prefix + committed image tokens, hole-free), so its next position
    is lengths[b]. A block is appended at the cache's width; `keep` moves each row's kept block slots right after its
    committed ones. Guided: cache rows [0, B) are cond, [B, 2B) uncond, sharing lengths.
    """

    model_class = LlamaGen
    persistent_attributes = frozenset({"model", "config"})

    def __init__(self, model: LlamaGen, guidance_scale: float = 1.0):
        if not isinstance(model, self.model_class):
            raise InvalidInputError(f"expected an image_ar {self.model_class.__name__}, got {type(model).__name__}")
        self.model = model.eval()
        self.config = model.config
        self.guidance_scale = check_guidance(model, guidance_scale)
        self.cache = None
        self.lengths: list[int] = []
        self.prefix_ok: torch.Tensor | None = None  # (R, L) bool: caption slots that are real (t2i padding)
        self.forward_time = 0.0

    @property
    def guided(self) -> bool:
        return is_guided(self.guidance_scale)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return double_rows(x, self.guidance_scale)

    def _combine(self, logits: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.guided:
            return logits, hidden
        return combine_logits(logits, self.guidance_scale), pair_halves(hidden, self.guidance_scale)

    def _forward(self, idx, cond, pos, mask):
        t0 = sync_time(self.device)
        with torch.no_grad():  # not inference_mode: the cache is compacted in place afterwards
            out = self.model(idx, cond, input_pos=pos, cache=self.cache, mask=mask)
        self.forward_time += sync_time(self.device) - t0
        return out

    # --- prefill --------------------------------------------------------------------------------------------------
    def start(self, cond, cond_mask: torch.Tensor | None = None, capacity: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the prefix of every request: cond = class labels (B,) or caption embeddings (B, L, C).
        Returns guided logits (B, V) and features (B, D or 2D) at the last prefix position."""
        model, cfg = self.model, self.config
        cond = torch.as_tensor(cond, device=model.device)
        if cfg.model_type == "c2i":
            cond = model.check_class_labels(cond.reshape(-1))
        b = cond.shape[0]
        if self.guided:
            cond = torch.cat([cond, model.null_cond(b).to(cond.dtype)])
        n = cfg.cls_token_num
        keys = torch.ones(len(cond), n, dtype=torch.bool, device=model.device)
        if cond_mask is not None:
            cond_mask = torch.as_tensor(cond_mask, dtype=torch.bool, device=model.device)
            if cond_mask.shape != (b, n):
                raise InvalidInputError(f"cond_mask must be bool (B, L) = ({b}, {n}); got {tuple(cond_mask.shape)}")
            keys = self._rows(cond_mask)
        self.prefix_ok = keys
        self.cache = model.new_cache(max(capacity, n + 1))
        mask = None if cond_mask is None else prefix_mask(keys, n, n)
        out = self._forward(None, cond, None, mask)
        self.lengths = [n] * b
        return self._combine(None if out.logits is None else out.logits[:, -1], out.hidden[:, -1])

    # --- blocks ---------------------------------------------------------------------------------------------------
    def block_mask(self, allowed: torch.Tensor | None, m: int) -> torch.Tensor:
        """(R, 1, M, width + M) bool: each row's committed slots (real prefix slots only) + block visibility."""
        width, dev = self.cache.length, self.device
        lengths = self._rows(torch.tensor(self.lengths, device=dev))  # (R,)
        slots = torch.arange(width, device=dev)
        committed = slots[None, :] < lengths[:, None]  # (R, width)
        committed[:, : self.prefix_ok.shape[1]] &= self.prefix_ok
        if allowed is None:
            allowed = torch.ones(m, m, dtype=torch.bool, device=dev).tril_().expand(len(lengths), m, m)
        else:
            allowed = self._rows(allowed.to(dev))
        r = len(lengths)
        return torch.cat([committed[:, None, :].expand(r, m, width), allowed], dim=-1)[:, None]

    def forward_block(self, tokens: torch.Tensor, offsets: torch.Tensor,
                      allowed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a (B, M) block at positions lengths[b] + offsets (B, M); allowed (B, M, M) or None (causal).
        Returns guided logits (B, M, V) and features (B, M, D or 2D)."""
        dev = self.device
        m = tokens.shape[1]
        pos = torch.tensor(self.lengths, device=dev)[:, None] + offsets.to(dev)  # (B, M)
        top = int(pos.max())
        if top >= self.config.max_seq_len:
            raise ContextOverflowError(f"block reaches position {top}, past the image's last position "
                                       f"{self.config.max_seq_len - 1}")
        mask = self.block_mask(allowed, m)
        out = self._forward(self._rows(tokens.to(dev)), None, self._rows(pos), mask)
        return self._combine(out.logits, out.hidden)

    def keep(self, keep: Sequence[Sequence[int]], block_start: int) -> None:
        """Row b keeps block slots keep[b] (indices within the block appended at `block_start`, ascending) right
        after its committed slots; everything else written since is dropped."""
        start = min(self.lengths)
        index = [list(range(start, n)) + [block_start + j for j in ks] for n, ks in zip(self.lengths, keep)]
        width = max(len(ix) for ix in index)
        if width == 0:
            self.cache.crop(start)
        else:
            padded = [ix + [ix[-1] if ix else 0] * (width - len(ix)) for ix in index]  # pads are never visible
            self.cache.compact(start, self._rows(torch.tensor(padded, dtype=torch.long)))
        self.lengths = [n + len(ks) for n, ks in zip(self.lengths, keep)]

    def rollback(self, lengths: Sequence[int]) -> None:
        """Forget each row's slots past lengths[b] (<= its current length): a drafter dropping rejected tokens."""
        if any(n > old for n, old in zip(lengths, self.lengths)):
            raise InvalidInputError(f"rollback to {list(lengths)} past the committed lengths {self.lengths}")
        self.lengths = list(lengths)
        self.cache.crop(max(self.lengths))

    def select_rows(self, rows: Sequence[int]) -> None:
        rows = list(rows)
        b = len(self.lengths)
        full = both_halves(rows, b, self.guidance_scale)
        self.cache.select_rows(full)
        self.prefix_ok = self.prefix_ok[torch.tensor(full, device=self.prefix_ok.device)]
        self.lengths = [self.lengths[r] for r in rows]


class RunnerTarget:
    """Engine-side bookkeeping shared by targets over a LlamaGenRunner-style runner: device, the default guidance
    scale, forward time, commit (keep the pending slot + accepted path of the last block) and select_rows. The
    guidance scale a generation runs with comes with its requests (the runner holds it for that stream)."""

    runner: LlamaGenRunner
    _block_start = 0

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def guidance_scale(self) -> float:
        """The scale requests get when they name none."""
        return self._default_scale

    @guidance_scale.setter
    def guidance_scale(self, value) -> None:
        self._default_scale = check_guidance(self.model, value)

    @property
    def forward_time(self) -> float:
        return self.runner.forward_time

    def _start(self, requests, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        cond, cond_mask, scale = batch_conditions(requests)
        self.runner.guidance_scale = check_guidance(self.model, scale)
        return self.runner.start(cond, cond_mask, capacity=capacity)

    def commit(self, paths: Sequence[Sequence[int] | None]) -> None:
        keep = [[] if p is None else [0] + [1 + i for i in p] for p in paths]
        self.runner.keep(keep, self._block_start)

    def select_rows(self, rows: Sequence[int]) -> None:
        self.runner.select_rows(rows)


class LlamaGenTarget(RunnerTarget):
    """The engine's Target protocol for a LlamaGen with CFG (see the module docstring)."""

    def __init__(self, model: LlamaGen, guidance_scale: float = 1.0):
        self.runner = LlamaGenRunner(model, guidance_scale)
        self.model, cfg = model, model.config
        self.guidance_scale = guidance_scale
        self.vocab_size = cfg.vocab_size
        self.num_image_tokens = cfg.num_image_tokens
        self.grid = (cfg.grid_size, cfg.grid_size)
        self.max_positions = cfg.num_image_tokens + 1  # the placeholder prompt + the image tokens

    def requests(self, cond, cond_mask=None, guidance_scale: float | None = None) -> list[Request]:
        """One request per image: class labels (B,) or caption embeddings (B, L, C) with an optional (B, L) mask of
        real caption tokens; guidance_scale None = this target's default. Each prompt is one placeholder token."""
        cfg = self.model.config
        if cfg.model_type == "c2i":
            cond = self.model.check_class_labels(torch.as_tensor(cond).reshape(-1))
        elif not (torch.is_tensor(cond) and cond.dim() == 3):
            raise InvalidInputError(f"a text-conditional LlamaGen needs caption embeddings (B, {cfg.cls_token_num}, "
                                    f"{cfg.caption_dim}); got {type(cond).__name__}")
        if cond_mask is not None:
            cond_mask = torch.as_tensor(cond_mask, dtype=torch.bool)
            if cond_mask.shape != (len(cond), cfg.cls_token_num):
                raise InvalidInputError(f"cond_mask must be bool (B, L) = ({len(cond)}, {cfg.cls_token_num}); got "
                                        f"{tuple(cond_mask.shape)}")
        scale = self.guidance_scale if guidance_scale is None else check_guidance(self.model, guidance_scale)
        return [Request([PLACEHOLDER], {"condition": cond[i], "condition_mask": None if cond_mask is None
                                        else cond_mask[i], "guidance_scale": scale}) for i in range(len(cond))]

    def prefill(self, requests: Sequence[Request], want_hidden: bool = False, reserve: int = 0) -> BlockOutput:
        logits, hidden = self._start(requests, capacity=self.model.config.cls_token_num + reserve + 1)
        return BlockOutput(logits[:, None], hidden[:, None] if want_hidden else None)

    def verify(self, pending: Sequence[int], drafts: Sequence[Draft], want_hidden: bool = False) -> BlockOutput:
        tokens, offsets, allowed = draft_block(pending, drafts)
        self._block_start = self.runner.cache.length
        logits, hidden = self.runner.forward_block(tokens, offsets.expand_as(tokens), allowed)
        return BlockOutput(logits, hidden if want_hidden else None)
