"""Janus image generation as an engine target: `JanusForConditionalGeneration.generate(generation_mode="image")`.

Chen et al. 2025, "Janus-Pro: Unified Multimodal Understanding and Generation with Data and Model Scaling"
(arXiv:2501.17811); transformers' `models/janus/modeling_janus.py` (`JanusForConditionalGeneration.generate`) is the
reference this adapter reproduces, step for step:

- rows: the batch is doubled, [cond; uncond]. The unconditional prompt is the conditional one with every token that
  is neither BOS nor BOI (`generation_config.generation_kwargs["boi_token_id"]`) replaced by the pad token; it has
  the same length and attention pattern as the conditional prompt.
- inputs: prompt tokens go through the text embeddings; every image token through `generation_embeddings` then
  `generation_aligner` (`prepare_embeddings_for_image_generation`), for both rows.
- logits: `generation_head(language_model(...).last_hidden_state)` over the VQ codebook (not `lm_head`).
- guidance: `ClassifierFreeGuidanceLogitsProcessor`, `u + (c - u) * s` on the raw head logits (no log-softmax), in
  the model's dtype, then temperature, top-k, top-p (transformers' order, which `SamplingSpec` follows).

Engine token space: the VQ codebook, `vocab_size = vq_config.num_embeddings`; the engine generates exactly
`vision_config.num_image_tokens` tokens (what `generate` emits), raster order over `grid` (VQ `quant_state_dims`).
The engine prompt is a one-token placeholder `[0]`; the real conditioning is bound with :meth:`bind`.

Differences from `generate`, all deliberate and documented:
- `guidance_scale == 1` runs the conditional rows only (logits `c`, hidden (B, M, H)); transformers' own generate
  needs `guidance_scale > 1` (at <= 1 its CFG processor is skipped and it fails on the doubled batch). Any finite
  scale works here (`s < 1` included).
- positions: each request's prompt starts at position 0. `generate` left-pads a batch and lets positions run over
  the pads (it passes no `position_ids`), a constant shift per row to which RoPE attention is invariant up to float
  rounding; with prompts of equal length the two are identical.
- generate's processors other than CFG + warpers (repetition penalty, ...) see only the *prompt* ids there (Janus
  never appends image tokens to `input_ids`); this adapter supports what `SamplingSpec` expresses with temperature,
  top-k and top-p only. In bf16 `generate` warps in bf16 while `SamplingSpec` upcasts first: equal in fp32.
- the cache is a ragged dynamic cache with explicit masks (no static cache), so rejected draft slots can be dropped.

:class:`GuidedImageTarget` holds the [cond; uncond] row bookkeeping shared with the Emu3 adapter (`emu3.py`).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Sequence

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from mmspec.errors import (ContextOverflowError, EmptyPromptError, GenerationConfigError, InvalidInputError,
                           UnsupportedModelError)
from mmspec.target import BlockOutput, CausalLMRunner, draft_block
from mmspec.tree import Draft

from .vq import to_pil


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
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise GenerationConfigError(f"guidance_scale={scale!r}: must be a finite number (1.0 = no guidance)")
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

    def bind(self, conditions: Sequence) -> list[list[int]]:
        """Store per-request conditions for the next prefill; returns the engine prompts ([0] per request)."""
        self._conditions = self.check_conditions(conditions)
        return [[0] for _ in self._conditions]

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
    def prefill(self, prompts: Sequence[Sequence[int]], want_hidden=False, reserve: int = 0) -> BlockOutput:
        """Run both rows' prompts. logits (B, 1, V): the guided logits of the first image token; hidden (B, 1, 2H)
        (cond ‖ uncond features at the last prompt token; (B, 1, H) unguided)."""
        if self._conditions is None:
            raise InvalidInputError("no conditions are bound: call bind(conditions) and pass the prompts it returns")
        if len(prompts) != len(self._conditions):
            raise InvalidInputError(f"got {len(prompts)} prompt(s) for {len(self._conditions)} bound condition(s); "
                                    "pass the prompts bind() returned")
        bad = [i for i, p in enumerate(prompts) if len(p) != 1]
        if bad:
            raise InvalidInputError(f"prompt(s) {bad} are not the one-token placeholder bind() returned")
        self._scale = check_guidance_scale(self.guidance_scale)
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
        if self._guided:
            tokens, offsets = tokens.repeat(2, 1), offsets.repeat(2, 1)
            allowed = None if allowed is None else allowed.repeat(2, 1, 1)
        self._block_start = self.runner.kv.width
        out = self.runner.forward_block(tokens, offsets, allowed, want_hidden)
        b = len(drafts)
        pos = offsets[:b] + torch.tensor(self.image_pos, dtype=torch.long)[:, None]  # (B, M) image positions predicted
        return BlockOutput(self._combine(out.logits, pos), self._pair(out.hidden) if want_hidden else None)

    def commit(self, paths: Sequence[Sequence[int] | None]) -> None:
        """paths[b]: accepted node indices of request b's draft (None: keep nothing, it just finished)."""
        keep = [[] if p is None else [0] + [1 + i for i in p] for p in paths]
        self.image_pos = [g + (0 if p is None else len(p) + 1) for g, p in zip(self.image_pos, paths)]
        self.runner.commit(keep + keep if self._guided else keep, self._block_start)

    def select_rows(self, rows: Sequence[int]) -> None:
        """Finished requests leave the batch (their cond and uncond rows both)."""
        rows = list(rows)
        b = len(self.image_pos)
        self.runner.select_rows(rows + [b + r for r in rows] if self._guided else rows)
        self.image_pos = [self.image_pos[r] for r in rows]
        if self._conditions is not None:
            self._conditions = [self._conditions[r] for r in rows]

    # --- helpers --------------------------------------------------------------------------------------------------
    def _combine(self, logits: torch.Tensor, image_pos: torch.Tensor) -> torch.Tensor:
        b = logits.shape[0] // 2 if self._guided else logits.shape[0]
        uncond = logits[b:] if self._guided else None
        return self._guide(logits[:b], uncond, image_pos)

    def _pair(self, hidden: torch.Tensor) -> torch.Tensor:
        """(R, M, H) row features -> (B, M, 2H) cond ‖ uncond (unchanged when unguided)."""
        if not self._guided:
            return hidden
        b = hidden.shape[0] // 2
        return torch.cat([hidden[:b], hidden[b:]], dim=-1)

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


# --- Janus ----------------------------------------------------------------------------------------------------------
class JanusGenerationLM(nn.Module):
    """Janus's decoder as a causal LM over input embeddings with the image-generation head (`generation_head`), the
    function each step of `generate(generation_mode="image")` evaluates."""

    def __init__(self, janus: nn.Module):
        super().__init__()
        self.janus = janus
        self.config = janus.config.text_config

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True,
                output_hidden_states=False, logits_to_keep: int = 0):
        out = self.janus.model.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                              position_ids=position_ids, past_key_values=past_key_values,
                                              use_cache=use_cache, output_hidden_states=output_hidden_states)
        h = out.last_hidden_state  # (R, M, H)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=self.janus.model.generation_head(h), past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states)


class _JanusRunner(CausalLMRunner):
    """Embeds prompt ids with the text embeddings (prefill) and image ids with the generation embeddings."""

    text_prompt = False

    def model_inputs(self, ids, allowed, positions) -> dict:
        janus = self.model.janus
        embed = janus.get_input_embeddings() if self.text_prompt else janus.prepare_embeddings_for_image_generation
        mask = None if allowed is None else self._float_mask(allowed)
        return {"inputs_embeds": embed(ids), "attention_mask": mask, "position_ids": positions}


class JanusImageTarget(GuidedImageTarget):
    """Engine target for `transformers.JanusForConditionalGeneration` image generation (see the module docstring).

    model: a JanusForConditionalGeneration. guidance_scale: CFG scale (Janus-Pro's default is 5; read at prefill).
    bos_token_id / boi_token_id / pad_token_id: override `model.generation_config` (bos, pad,
    `generation_kwargs["boi_token_id"]`), which make the unconditional prompt.
    Conditions (`bind`): per request, the prompt input_ids formatted as Janus's processor does for image generation
    (chat template + `<begin_of_image>`), a 1-D integer tensor or a list of ints, unpadded.
    """

    def __init__(self, model: nn.Module, guidance_scale: float = 5.0, *, bos_token_id: int | None = None,
                 boi_token_id: int | None = None, pad_token_id: int | None = None):
        inner = getattr(model, "model", None)
        if not (hasattr(model, "prepare_embeddings_for_image_generation") and hasattr(inner, "generation_head")):
            raise UnsupportedModelError(f"{type(model).__name__} is not a JanusForConditionalGeneration (no image "
                                        "generation embeddings/head)")
        self.model = model.eval()
        self.runner = _JanusRunner(JanusGenerationLM(model))
        self.vocab_size = int(inner.generation_head.vision_head.out_features)
        self.runner.vocab_size = self.vocab_size
        self.num_image_tokens = int(inner.vision_model.config.num_image_tokens)
        rows, cols = (int(d) for d in inner.vqmodel.quantize.quant_state_dims)
        if rows * cols != self.num_image_tokens:
            raise UnsupportedModelError(
                f"vision_config.num_image_tokens={self.num_image_tokens} (what generate emits) does not match the VQ "
                f"grid {rows}x{cols} (what decode_image_tokens takes); fix the config")
        self.grid = (rows, cols)
        self.text_vocab = int(model.config.text_config.vocab_size)
        self.context = getattr(model.config.text_config, "max_position_embeddings", None)
        gen = model.generation_config
        extra = getattr(gen, "generation_kwargs", None) or {}
        self.bos_token_id = gen.bos_token_id if bos_token_id is None else bos_token_id
        self.boi_token_id = extra.get("boi_token_id") if boi_token_id is None else boi_token_id
        self.pad_token_id = gen.pad_token_id if pad_token_id is None else pad_token_id
        missing = [n for n in ("bos_token_id", "boi_token_id", "pad_token_id")
                   if not isinstance(getattr(self, n), int) or isinstance(getattr(self, n), bool)]
        if missing:
            raise UnsupportedModelError(
                f"{missing} unknown: model.generation_config has no int bos_token_id / pad_token_id / "
                "generation_kwargs['boi_token_id']; pass them to JanusImageTarget(...)")
        super().__init__(guidance_scale)

    # --- hooks ----------------------------------------------------------------------------------------------------
    def _condition(self, i: int, value) -> list[int]:
        return as_token_ids(value, f"condition {i}", self.text_vocab)

    def _uncond(self, ids: list[int]) -> list[int]:
        keep = (self.bos_token_id, self.boi_token_id)
        return [t if t in keep else self.pad_token_id for t in ids]

    def _prompt_rows(self, conditions):
        return [list(c) for c in conditions], [self._uncond(c) for c in conditions]

    def _guide(self, cond, uncond, image_pos):
        if uncond is None:
            return cond
        return uncond + (cond - uncond) * self._scale  # ClassifierFreeGuidanceLogitsProcessor, same op order

    @contextmanager
    def _prompt_mode(self):
        self.runner.text_prompt = True
        try:
            yield
        finally:
            self.runner.text_prompt = False

    # --- images and the reference ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, tokens) -> list:
        """(B, num_image_tokens) codebook ids -> B RGB PIL images via the model's VQ decoder."""
        tokens = self._check_tokens(tokens)
        pixels = self.model.decode_image_tokens(tokens.to(self.device))  # (B, H, W, 3) in [-1, 1]
        return to_pil(pixels.permute(0, 3, 1, 2))

    @torch.inference_mode()
    def reference_generate(self, conditions, **generate_kwargs) -> torch.Tensor:
        """The model's own `generate(generation_mode="image")` on the conditions (left-padded into one batch):
        (B, num_image_tokens). Defaults: greedy, this target's guidance_scale and special tokens."""
        conds = self.check_conditions(conditions)
        kw = {"do_sample": False, "guidance_scale": self.guidance_scale, "bos_token_id": self.bos_token_id,
              "pad_token_id": self.pad_token_id, "generation_kwargs": {"boi_token_id": self.boi_token_id}}
        kw.update(generate_kwargs)
        if not (kw["guidance_scale"] or 0) > 1:
            raise GenerationConfigError(f"guidance_scale={kw['guidance_scale']!r}: Janus's own generate needs a scale "
                                        "> 1 (its CFG processor is skipped otherwise and the doubled batch fails)")
        ids, mask = left_pad(conds, self.pad_token_id)
        return self.model.generate(ids.to(self.device), attention_mask=mask.to(self.device), generation_mode="image",
                                   **kw)


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids (B, T), attention_mask (B, T)) left-padded, as transformers' generate expects."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, t - len(r):] = 1
    return ids, mask


__all__ = ["GuidedImageTarget", "JanusGenerationLM", "JanusImageTarget", "as_token_ids", "check_guidance_scale",
           "left_pad"]
