"""Looking inside a decode: every step's drafts and accepted paths, and the speedup the forward costs predict.

    with record_steps(svlm.decoder) as steps:       # any SpeculativeDecoder (SpeculativeVLM.decoder, ...)
        out = svlm.generate(images=[img], prompt="Describe the image.")
    step = steps[3]                                 # Step(drafts, paths): one Draft and one accepted path per request
    step.drafts[0].token_list, step.paths[0]        # the draft tree and the node indices the target accepted

`record_steps` wraps the decoder's drafter (`propose`) and target (`commit`) for the duration of the ``with`` block
only, and records what the loop passed between them; nothing else changes (the same tokens, the same stats).
`predicted_speedup` is the speedup a method would reach with no engine overhead, from tau and the model forward
times the loop measured (`GenerationStats.time_target_model` / `time_drafter_model`), as `mmspec bench vlm` computes
it: (prefill + tokens x plain forward) / (prefill + tokens / tau x (verify forward + drafter forwards per step)).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from .stats import GenerationStats
from .tree import Draft


@dataclass(eq=False)
class Step:
    """One verification step: each live request's draft and the node indices of its accepted path."""

    drafts: list[Draft]
    paths: list[list[int]] = field(default_factory=list)

    @property
    def accepted(self) -> list[int]:
        """Accepted draft tokens per request (the committed tokens are one more: the correction or bonus)."""
        return [len(p) for p in self.paths]


@contextmanager
def record_steps(decoder) -> Iterator[list[Step]]:
    """Record every step of the decodes run inside the block (a list that fills as they run)."""
    steps: list[Step] = []
    drafter, target = decoder.drafter, decoder.target
    propose, commit = drafter.propose, target.commit

    def recording_propose(budgets):
        drafts = propose(budgets)
        steps.append(Step([d for d in drafts]))
        return drafts

    def recording_commit(paths):
        if steps and not steps[-1].paths:
            steps[-1].paths = [list(p or []) for p in paths]
        return commit(paths)

    drafter.propose, target.commit = recording_propose, recording_commit
    try:
        yield steps
    finally:  # the instance attributes go; the class methods show through again
        del drafter.propose, target.commit


def plain_forward_cost(plain: Sequence[GenerationStats]) -> tuple[float, float, int]:
    """(seconds per plain decoding forward, prefill seconds, tokens) of runs without a drafter."""
    fwd = sum(s.target_forwards - s.requests for s in plain)
    return (sum(s.time_target_model for s in plain) / max(1, fwd), sum(s.time_prefill for s in plain),
            sum(s.new_tokens for s in plain))


def predicted_speedup(plain: Sequence[GenerationStats], spec: Sequence[GenerationStats]) -> float:
    """The speedup over plain decoding that tau and the measured model forward times predict (no engine overhead)."""
    t1, prefill0, tokens0 = plain_forward_cost(plain)
    tokens = sum(s.new_tokens for s in spec)
    steps = sum(s.steps for s in spec)
    tau = sum(s.committed_tokens for s in spec) / max(1, steps)
    fwd = max(1, sum(s.target_forwards - s.requests for s in spec))
    step_cost = sum(s.time_target_model + s.time_drafter_model for s in spec) / fwd
    predicted = (sum(s.time_prefill for s in spec) + tokens / tau * step_cost) / max(1, tokens)
    return ((prefill0 + tokens0 * t1) / max(1, tokens0)) / predicted
