"""Classifier-free-guided image targets over a transformers causal LM: [cond; uncond] rows kept in step.

Shared by the Janus and Emu3 adapters (`janus.py`, `emu3.py`): validation of token-id conditions, left padding as
transformers' generate does it, and :class:`GuidedImageTarget`, the engine side (requests / prefill / verify / commit /
select_rows) of a generator whose every forward runs each request's conditional and unconditional rows.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch

from mmspec.checks import check_number
from mmspec.errors import ContextOverflowError, EmptyPromptError, InvalidInputError
from mmspec.guidance import both_halves, double_rows, pair_halves, per_row
from mmspec.request import Request
from mmspec.state import take_rows
from mmspec.target import BlockOutput, CausalLMRunner, draft_block
from mmspec.tree import Draft


# --- shared: validation and [cond; uncond] rows ---------------------------------------------------------------------
def as_token_ids(value, what: str, vocab: int) -> list[int]:
    """A 1-D integer tensor or a list/tuple of ints -> list of ids in [0, vocab); typed errors naming `what`."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise InvalidInputError(f"{what} has dtype {value.dtype}; expected integer token ids (torch.long)")
        if value.dim() != 1:
            raise InvalidInputError(f"{what} has shape {tuple(value.shape)}; expected a 1-D tensor of token ids "
                                    "(one request per condition, no padding)")
        ids = value.tolist()
    elif isinstance(value, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        ids = list(value)
    else:
        raise InvalidInputError(f"{what} is {type(value).__name__}; expected a 1-D integer tensor or a list of int "
                                "token ids")
    if not ids:
        raise EmptyPromptError(f"{what} has no tokens; a condition needs at least one token id")
    bad = sorted({t for t in ids if not 0 <= t < vocab})
    if bad:
        raise InvalidInputError(f"{what} has token id(s) {bad[:8]} outside the text vocabulary [0, {vocab})")
    return ids


def check_guidance_scale(scale) -> float:
    """A CFG scale: a finite number >= 0 (1.0 = no guidance, 0 = the unconditional model)."""
    check_number(scale, "guidance_scale", low=0)
    return float(scale)


class GuidedImageTarget:
    """Engine side of a classifier-free-guided image generator over one :class:`CausalLMRunner`.

    Rows of the runner: [cond_0..cond_{B-1}; uncond_0..uncond_{B-1}] when guided, the cond rows alone otherwise.
    Every verification block is the same for a request's two rows (same tokens, depth offsets and tree mask); each row
    keeps its own committed length and positions (the unconditional prompt may be shorter). Subclasses say how the
    prompts of both rows are made (`_prompt_rows`), how the two logits combine (`_guide`) and embed prompts
    (`_prompt_mode`). `image_pos[b]` counts the image tokens request b has produced (the pending one included), so
    block slot j of a verification predicts image position `image_pos[b] + depth_j`.
    """

    runner: CausalLMRunner
    vocab_size: int
    num_image_tokens: int
    grid: tuple[int, int]
    text_vocab: int
    context: int | None = None

    def __init__(self, guidance_scale: float):
        self.guidance_scale = check_guidance_scale(guidance_scale)
        self.max_positions = self.num_image_tokens + 1
        self._conditions: list | None = None
        self._guided = False
        self._scale = 1.0
        self.image_pos: list[int] = []
        self._block_start = 0

    # --- subclass hooks -----------------------------------------------------------------------------------------
    def _condition(self, i: int, value):
        """Validate and normalise condition i (raise typed errors)."""
        raise NotImplementedError

    def _prompt_rows(self, conditions: list) -> tuple[list[list[int]], list[list[int]]]:
        """(cond prompts, uncond prompts) as token-id lists."""
        raise NotImplementedError

    def _guide(self, cond: torch.Tensor, uncond: torch.Tensor | None, image_pos: torch.Tensor) -> torch.Tensor:
        """Guided logits (B, M, V) from the rows' logits (B, M, V) (uncond None when unguided); image_pos (B, M) is
        the image position each slot's logits predict."""
        raise NotImplementedError

    @contextmanager
    def _prompt_mode(self):
        yield

    # --- engine API ---------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def forward_time(self) -> float:
        return self.runner.forward_time

    @property
    def compile_time(self) -> float:
        return self.runner.compile_time

    def cannot_compile(self) -> str | None:
        return self.runner.cannot_compile()

    def compile_decode(self, reserve: int) -> None:
        """Decode the rest compiled over a static cache (`mmspec.compile`): both rows of every request."""
        self.runner.compile_decode(reserve)

    def requests(self, conditions: Sequence, guidance_scale: float | None = None) -> list[Request]:
        """One engine request per condition (validated here): prompt [0], the condition and the guidance scale
        (None: this target's default) in its inputs."""
        conds = self.check_conditions(conditions)
        scale = self.guidance_scale if guidance_scale is None else check_guidance_scale(guidance_scale)
        return [Request([0], {"condition": c, "guidance_scale": scale}) for c in conds]

    def check_conditions(self, conditions: Sequence) -> list:
        """Validated, normalised conditions (typed errors name the offending one); changes no state."""
        if isinstance(conditions, torch.Tensor) or not isinstance(conditions, (list, tuple)):
            raise InvalidInputError(f"conditions is {type(conditions).__name__}; expected a list with one condition "
                                    "per request (wrap a single prompt in a list)")
        if not conditions:
            raise EmptyPromptError("conditions is empty: pass at least one request's condition")
        conds = [self._condition(i, c) for i, c in enumerate(conditions)]
        cond_rows, uncond_rows = self._prompt_rows(conds)
        if self.context:
            longest = max(len(p) for p in cond_rows + uncond_rows)
            if longest + self.num_image_tokens > self.context:
                raise ContextOverflowError(
                    f"a prompt of {longest} tokens + {self.num_image_tokens} image tokens exceeds the model's context "
                    f"of {self.context} positions; shorten the condition")
        return conds

    @torch.inference_mode()
    def prefill(self, requests: Sequence[Request], want_hidden=False, reserve: int = 0) -> BlockOutput:
        """Run both rows' prompts. logits (B, 1, V): the guided logits of the first image token; hidden (B, 1, 2H)
        (cond ‖ uncond features at the last prompt token; (B, 1, H) unguided)."""
        bad = [i for i, r in enumerate(requests) if not isinstance(r, Request) or "condition" not in r.inputs]
        if bad:
            raise InvalidInputError(f"request(s) {bad} carry no condition: build them with target.requests(conditions)")
        scales = {float(r.inputs.get("guidance_scale", self.guidance_scale)) for r in requests}
        if len(scales) != 1:
            raise InvalidInputError(f"the requests of one batch must share guidance_scale; got {sorted(scales)}")
        self._conditions = [r.inputs["condition"] for r in requests]
        self._scale = check_guidance_scale(scales.pop())
        self._guided = self._scale != 1.0
        cond_rows, uncond_rows = self._prompt_rows(self._conditions)
        rows = cond_rows + uncond_rows if self._guided else cond_rows
        with self._prompt_mode():
            out = self.runner.prefill(rows, want_hidden=want_hidden)
        b = len(cond_rows)
        logits = self._combine(out.logits[:, None], torch.zeros(b, 1, dtype=torch.long))
        hidden = None
        if want_hidden:
            last = torch.tensor([len(r) - 1 for r in rows], device=out.hidden.device)
            hidden = self._pair(out.hidden[torch.arange(len(rows), device=last.device), last][:, None])
        self.image_pos = [1] * b  # the loop commits the token sampled from these logits as pending
        return BlockOutput(logits, hidden)

    def verify(self, pending: Sequence[int], drafts: Sequence[Draft], want_hidden=False) -> BlockOutput:
        """One forward over [pending, nodes] for every request's cond and uncond rows; guided logits (B, M, V)."""
        tokens, offsets, allowed = draft_block(pending, drafts)  # (B, M), (B, M), (B, M, M) | None
        tokens, offsets = double_rows(tokens, self._scale), double_rows(offsets, self._scale)
        allowed = None if allowed is None else double_rows(allowed, self._scale)
        self._block_start = self.runner.kv.width
        out = self.runner.forward_block(tokens, offsets, allowed, want_hidden)
        b = len(drafts)
        pos = offsets[:b] + torch.tensor(self.image_pos, dtype=torch.long)[:, None]  # (B, M) image positions predicted
        return BlockOutput(self._combine(out.logits, pos), self._pair(out.hidden) if want_hidden else None)

    def commit(self, paths: Sequence[Sequence[int] | None]) -> None:
        """paths[b]: accepted node indices of request b's draft (None: keep nothing, it just finished)."""
        keep = [[] if p is None else [0] + [1 + i for i in p] for p in paths]
        self.image_pos = [g + (0 if p is None else len(p) + 1) for g, p in zip(self.image_pos, paths)]
        self.runner.commit(per_row(keep, self._scale), self._block_start)

    def select_rows(self, rows: Sequence[int]) -> None:
        """Finished requests leave the batch (their cond and uncond rows both)."""
        rows = list(rows)
        b = len(self.image_pos)
        self.runner.select_rows(both_halves(rows, b, self._scale))
        take_rows(self, rows, "image_pos", *(("_conditions",) if self._conditions is not None else ()))

    # --- helpers --------------------------------------------------------------------------------------------------
    def _combine(self, logits: torch.Tensor, image_pos: torch.Tensor) -> torch.Tensor:
        b = logits.shape[0] // 2 if self._guided else logits.shape[0]
        uncond = logits[b:] if self._guided else None
        return self._guide(logits[:b], uncond, image_pos)

    def _pair(self, hidden: torch.Tensor) -> torch.Tensor:
        """(R, M, H) row features -> (B, M, 2H) cond ‖ uncond (unchanged when unguided)."""
        return pair_halves(hidden, self._scale)

    def _check_tokens(self, tokens) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):
            try:
                tokens = torch.as_tensor(tokens)
            except (TypeError, ValueError, RuntimeError) as e:
                raise InvalidInputError(f"tokens of type {type(tokens).__name__} cannot become a tensor: {e}") from e
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise InvalidInputError(f"tokens have dtype {tokens.dtype}; expected integer image token ids")
        if tokens.dim() != 2 or tokens.shape[1] != self.num_image_tokens or tokens.shape[0] == 0:
            raise InvalidInputError(f"tokens have shape {tuple(tokens.shape)}; expected (B, {self.num_image_tokens}) "
                                    "(B >= 1: what generation returns)")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size:
            raise InvalidInputError(f"tokens have ids outside [0, {self.vocab_size})")
        return tokens.long()


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids (B, T), attention_mask (B, T)) left-padded, as transformers' generate expects."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, t - len(r):] = 1
    return ids, mask


