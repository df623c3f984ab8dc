"""Requests: everything one generation needs travels through the loop in one object, never through a side channel.

A :class:`Request` holds the prompt the target continues and the target's other inputs (a VLM's pixel values and
grids, an image generator's class label or caption embeddings and guidance settings), the drafter's view of the same
prompt (a text-only drafter's ids, a draft VLM's own processor output) and, optionally, the request's own random
generator. The loop hands the requests to ``target.prefill`` and, through :class:`~mmspec.drafters.DraftContext`,
to ``drafter.begin``; nothing is bound to a component beforehand, so one target and drafter serve any number of
streams (vLLM's ``SamplingParams`` + multimodal data per request plays the same role).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class Request:
    """One generation request.

    prompt: token ids the target continues (image generators: one placeholder id; the condition is in ``inputs``).
    inputs: the target's other inputs, by name (``pixel_values``, ``image_grid_thw``, ``condition``,
      ``guidance_scale``, ...): what the target's ``requests()`` / the pipeline put there.
    draft_prompt: the drafter's view of the prompt (None: the same ids as the target's).
    draft_inputs: the drafter's other inputs (a draft VLM's pixel values, a drafter setting such as CSpD's
      ``prefill_ratio``).
    generator: this request's own random generator (None: one derived from the stream's seed / generator).
    session: a conversation this request continues; a target may resume the cache the same session left.
    sampling: this request's own `SamplingSpec` (temperature, top-k, top-p, repetition penalty); None: the stream's.
      Requests of one batch may differ; each then draws what it would draw alone.
    """

    prompt: list[int]
    inputs: dict = field(default_factory=dict)
    draft_prompt: list[int] | None = None
    draft_inputs: dict = field(default_factory=dict)
    generator: torch.Generator | None = None
    session: object | None = None
    sampling: object | None = None  # mmspec.sampling.SamplingSpec

    @property
    def drafter_view(self) -> list[int]:
        """The ids the drafter prefills: ``draft_prompt``, or the target's prompt."""
        return self.prompt if self.draft_prompt is None else self.draft_prompt

    def for_drafter(self) -> "Request":
        """The request as a drafter's own runner sees it: its view of the prompt and its inputs."""
        return replace(self, prompt=list(self.drafter_view), inputs=dict(self.draft_inputs), draft_prompt=None,
                       draft_inputs={})


def prompt_ids(request) -> list[int]:
    """The token ids of a Request, or of a plain id list (targets accept both)."""
    return request.prompt if isinstance(request, Request) else list(request)


def as_request(value) -> Request:
    return value if isinstance(value, Request) else Request(list(value))

