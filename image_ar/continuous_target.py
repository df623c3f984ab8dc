"""A continuous-token AR model (:class:`~image_ar.models.continuous_ar.ContinuousAR`) as an engine target.

The engine's loop drives it like any target; what differs is the token type: tokens are vectors (C,), and where a
discrete target returns logits this one returns *head condition rows* (B, M, W + 1) = [z_cond | z_uncond | scale]
(z alone without guidance): everything the target's diffusion head needs to define p(token) at each block position.
The acceptance rule (:class:`~image_ar.acceptance.cspd.CSpD`) turns rows into tokens and verdicts.

Cache bookkeeping is LlamaGen's (:class:`~image_ar.target.LlamaGenRunner`: [cond; uncond] rows, ragged per-row
lengths, explicit 2-D-RoPE positions). Sequence position p >= 1 holds token p - 1 and its output conditions token p.
"""
from __future__ import annotations

from typing import Sequence

import torch

from mmspec.errors import DraftError, InvalidInputError
from mmspec.guidance import pair_halves
from mmspec.request import Request
from mmspec.target import BlockOutput
from mmspec.tree import Draft

from .acceptance.cspd import head_rows
from .models.continuous_ar import CFG_SCHEDULES, ContinuousAR, guidance_scales
from .target import PLACEHOLDER, LlamaGenRunner, RunnerTarget, batch_guidance_scale, check_guidance


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise InvalidInputError(f"temperature={temperature!r}: continuous tokens need temperature > 0 (it scales the "
                                "diffusion noise)")
    return float(temperature)


def check_schedule(schedule) -> str:
    if schedule not in CFG_SCHEDULES:
        raise InvalidInputError(f"guidance_schedule={schedule!r}: expected one of {CFG_SCHEDULES}")
    return schedule


def sampling_settings(request: Request) -> tuple[float, str, float]:
    """(guidance_scale, guidance_schedule, temperature) a continuous request samples with."""
    x = request.inputs
    return float(x.get("guidance_scale", 1.0)), x.get("guidance_schedule", "constant"), float(x.get("temperature", 1.0))


def token_scales(request: Request, token_index: torch.Tensor, num_image_tokens: int) -> torch.Tensor:
    """The CFG scale of the request's token(s) at these image indices."""
    scale, schedule, _ = sampling_settings(request)
    return guidance_scales(scale, schedule, token_index, num_image_tokens)


class ContinuousRunner(LlamaGenRunner):
    """LlamaGenRunner over a ContinuousAR: blocks are (B, M, C) float tokens, outputs are conditions z."""

    model_class = ContinuousAR

    def _combine(self, logits, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = pair_halves(hidden, self.guidance_scale)  # (B, ..., 2D) = [cond | uncond] when guided
        return z, z


def vector_block(pending: Sequence[torch.Tensor], drafts: Sequence[Draft]) -> tuple[torch.Tensor, torch.Tensor]:
    """[pending, nodes..., pad] per row for chains of vector tokens: tokens (B, M, C) and position offsets (B, M).
    Causal attention serves every row: a pad only ever follows its row's real slots and is never kept; its offset
    repeats the row's last one so that no pad reaches past the image."""
    b, m = len(drafts), 1 + max((len(d) for d in drafts), default=0)
    c = pending[0].shape[-1]
    tokens = torch.zeros(b, m, c)
    offsets = torch.zeros(b, m, dtype=torch.long)
    for i, (tok, d) in enumerate(zip(pending, drafts)):
        n = len(d)
        if n and not d.is_chain:
            raise DraftError("continuous drafts must be chains (parent = [-1, 0, 1, ...])")
        tokens[i, 0] = tok.detach().float().cpu()
        if n:
            tokens[i, 1: n + 1] = d.tokens.detach().float().cpu()
        offsets[i] = torch.arange(m).clamp(max=n)
    return tokens, offsets


class ContinuousARTarget(RunnerTarget):
    """The engine's Target protocol for a ContinuousAR with CFG on eps (see the module docstring).

    guidance_scale / guidance_schedule ("constant" | MAR's "linear") and temperature define the sampling
    distribution: these are the defaults of :meth:`requests`, which puts each request's own in its inputs; the
    acceptance rule and the drafter read them from the requests."""

    vocab_size = 1  # the loop's placeholder prompts only
    continuous = True

    def __init__(self, model: ContinuousAR, guidance_scale: float = 1.0, guidance_schedule: str = "constant",
                 temperature: float = 1.0):
        self.runner = ContinuousRunner(model, guidance_scale)
        self.model, cfg = model, model.config
        self.guidance_scale = guidance_scale
        self.num_image_tokens = cfg.num_image_tokens
        self.grid = (cfg.grid_size, cfg.grid_size)
        self.max_positions = cfg.num_image_tokens + 1
        self.guidance_schedule = check_schedule(guidance_schedule)
        self.temperature = check_temperature(temperature)
        self._request: Request | None = None  # the running batch's settings (they are shared by its requests)

    @property
    def head(self):
        return self.model.diffloss

    def requests(self, labels, guidance_scale: float | None = None, guidance_schedule: str | None = None,
                 temperature: float | None = None) -> list[Request]:
        """One request per image for class labels (B,); None settings take this target's defaults."""
        labels = self.model.check_class_labels(torch.as_tensor(labels).reshape(-1))
        inputs = {"guidance_scale": self.guidance_scale if guidance_scale is None
                  else check_guidance(self.model, guidance_scale),
                  "guidance_schedule": check_schedule(self.guidance_schedule if guidance_schedule is None
                                                      else guidance_schedule),
                  "temperature": check_temperature(self.temperature if temperature is None else temperature)}
        return [Request([PLACEHOLDER], {"condition": labels[i], **inputs}) for i in range(len(labels))]

    def rows(self, z: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
        return head_rows(z, token_scales(self._request, token_index.to(z.device), self.num_image_tokens))

    def prefill(self, requests: Sequence[Request], want_hidden: bool = False, reserve: int = 0) -> BlockOutput:
        batch_guidance_scale(requests)  # every request has a condition (a typed error names the ones without)
        settings = {sampling_settings(r) for r in requests}
        if len(settings) > 1:
            raise InvalidInputError(f"the requests of one batch must share guidance and temperature; got "
                                    f"{sorted(settings)}")
        z, _ = self._start(requests, capacity=reserve + 2)
        self._request = requests[0]
        return BlockOutput(self.rows(z, torch.zeros(len(z), dtype=torch.long))[:, None])

    def verify(self, pending: Sequence[torch.Tensor], drafts: Sequence[Draft], want_hidden: bool = False):
        tokens, offsets = vector_block(pending, drafts)
        self._block_start = self.runner.cache.length
        z, _ = self.runner.forward_block(tokens, offsets, None)  # (B, M, W)
        index = torch.tensor(self.runner.lengths)[:, None] + offsets  # image index each slot's output conditions
        return BlockOutput(self.rows(z, index))
