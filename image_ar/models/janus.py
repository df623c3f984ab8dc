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
The engine prompt is a one-token placeholder `[0]`; the condition travels in the request (:meth:`requests`).

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

:class:`~image_ar.models.guided.GuidedImageTarget` holds the [cond; uncond] row bookkeeping shared with Emu3.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from mmspec.compat import cache_kwargs, output_cache, output_cache_field
from mmspec.errors import GenerationConfigError, UnsupportedModelError
from mmspec.target import CausalLMRunner

from .guided import GuidedImageTarget, as_token_ids, left_pad
from .vq import to_pil

_CACHE_FIELD = output_cache_field(CausalLMOutputWithPast)  # where the output dataclass keeps the cache


# --- Janus ----------------------------------------------------------------------------------------------------------
class JanusGenerationLM(nn.Module):
    """Janus's decoder as a causal LM over input embeddings with the image-generation head (`generation_head`), the
    function each step of `generate(generation_mode="image")` evaluates."""

    def __init__(self, janus: nn.Module):
        super().__init__()
        self.janus = janus
        self.config = janus.config.text_config

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None, cache=None, use_cache=True,
                output_hidden_states=False, logits_to_keep: int = 0, past_key_values=None):
        lm = self.janus.model.language_model
        cache = cache if cache is not None else past_key_values  # the pre-5.24 spelling, still accepted
        out = lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                 **cache_kwargs(lm, cache), use_cache=use_cache, output_hidden_states=output_hidden_states)
        h = out.last_hidden_state  # (R, M, H)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=self.janus.model.generation_head(h), hidden_states=out.hidden_states,
                                      **{_CACHE_FIELD: output_cache(out)})


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
    Conditions (`requests`): per request, the prompt input_ids formatted as Janus's processor does for image generation
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


__all__ = ["JanusGenerationLM", "JanusImageTarget"]
