"""LlamaGen as an engine target: classifier-free guidance over a ragged KV cache, one forward per verification.

The engine's loop (``mmspec.loop``) sees an ordinary target whose logits are already *guided*: every forward runs
[cond rows; uncond rows] (2B) and returns ``u + s (c - u)`` (B, M, V), before temperature / top-k / top-p, exactly as
the plain sampler ``generate_tokens`` does (ALGORITHMS.md section 5, CFG). Drafters that read features get both halves
side by side: ``hidden`` is (B, M, 2D) = [cond features, uncond features] when guided, (B, M, D) otherwise.

Requests carry no text: :meth:`LlamaGenTarget.requests` puts each condition (class label or caption embeddings, its
mask) and the guidance scale in a :class:`~mmspec.request.Request` whose prompt is one placeholder token. Image
position ``i`` (raster order) is sequence position ``cls_token_num + i``; rows accept different numbers of tokens, so
each row has its own committed length and the 4-D masks hide the other rows' slots (the engine's
``mmspec.buffer_runner.BufferRunner``, which ``LlamaGenRunner`` extends with LlamaGen's prefix).
"""
from __future__ import annotations

from typing import Sequence

import torch

from mmspec.buffer_runner import BufferRunner
from mmspec.errors import InvalidInputError
from mmspec.request import Request
from mmspec.target import BlockOutput, draft_block
from mmspec.tree import Draft

from .models.guided import check_guidance_scale
from .models.llamagen import LlamaGen, prefix_mask

PLACEHOLDER = 0  # the loop's one-token "prompt" per image; the condition travels in the request's inputs


def batch_conditions(requests) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """The requests' conditions stacked (class labels (B,) or caption embeddings (B, L, C)), their caption masks
    ((B, L) or None) and the guidance scale they share (typed errors name what is missing or differs)."""
    scale = batch_guidance_scale(requests)
    cond = torch.stack([torch.as_tensor(r.inputs["condition"]) for r in requests])
    masks = [r.inputs.get("condition_mask") for r in requests]
    mask = None if all(m is None for m in masks) else torch.stack([
        torch.ones(cond.shape[1], dtype=torch.bool) if m is None else torch.as_tensor(m, dtype=torch.bool).cpu()
        for m in masks])
    return cond, mask, scale


def batch_guidance_scale(requests) -> float:
    """The guidance scale image requests share (typed errors for requests without a condition or with differing
    scales)."""
    missing = [i for i, r in enumerate(requests) if not isinstance(r, Request) or "condition" not in r.inputs]
    if missing:
        raise InvalidInputError(f"request(s) {missing} carry no condition: build image requests with "
                                "target.requests(class_labels or caption embeddings)")
    scales = {float(r.inputs.get("guidance_scale", 1.0)) for r in requests}
    if len(scales) != 1:
        raise InvalidInputError(f"the requests of one batch must share guidance_scale; got {sorted(scales)}")
    return scales.pop()


def check_guidance(model: LlamaGen, guidance_scale) -> float:
    scale = check_guidance_scale(guidance_scale)
    if scale != 1.0:
        model.null_cond(1)  # UnsupportedModelError when the model has no null class / caption
    return scale


class LlamaGenRunner(BufferRunner):
    """A LlamaGen driven by the engine's BufferRunner (ragged rows, CFG, keep / rollback / select_rows); what is
    LlamaGen's own is the prefix: class or caption tokens, their null condition and caption padding (`start`)."""

    model_class = LlamaGen

    def __init__(self, model: LlamaGen, guidance_scale: float = 1.0):
        if not isinstance(model, self.model_class):
            raise InvalidInputError(f"expected an image_ar {self.model_class.__name__}, got {type(model).__name__}")
        super().__init__(model, check_guidance(model, guidance_scale))

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
        self.cache = model.new_cache(max(capacity, n + 1))
        mask = None if cond_mask is None else prefix_mask(keys, n, n)
        out = self._forward(None, cond, None, mask)
        self._started(self.cache, [n] * b, keys)
        return self._combine(None if out.logits is None else out.logits[:, -1], out.hidden[:, -1])


class RunnerTarget:
    """Engine-side bookkeeping shared by targets over a LlamaGenRunner-style runner: device, the default guidance
    scale, forward time, commit (keep the pending slot + accepted path of the last block) and select_rows. The
    guidance scale a generation runs with comes with its requests (the runner holds it for that stream)."""

    runner: BufferRunner
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

    def cannot_compile(self) -> str | None:
        return (f"{type(self.runner).__name__}'s BufferCache attends over the slots written so far, a length that "
                "grows every step; the compiled path needs attention over a fixed-size buffer")

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
