"""Emu3 image generation as an engine target: `Emu3ForConditionalGeneration.generate` with a prefix constraint and CFG.

Wang et al. 2024, "Emu3: Next-Token Prediction is All You Need" (arXiv:2409.18869); the reference is transformers'
documented recipe (`docs/source/en/model_doc/emu3.md`, "Image generation"): `generate(...,
prefix_allowed_tokens_fn=..., negative_prompt_ids=..., guidance_scale=...)`. What `generate` computes per token,
reproduced exactly here:

1. `UnbatchedClassifierFreeGuidanceLogitsProcessor` (transformers adds it *first*): with c, u the conditional and
   unconditional logits over the **full** vocabulary, `g = s * (log_softmax(c) - log_softmax(u)) + log_softmax(u)`
   (c is upcast to float32 before, as `generate` does; u stays in the model's dtype, as there). At s == 1 the
   processor is not added and g = c.
2. `PrefixConstrainedLogitsProcessor` (after CFG): `g + mask`, mask 0 on the allowed tokens of this image position
   and -inf elsewhere (and the mask itself if every allowed token is -inf).
3. temperature, top-k, top-p, softmax (`SamplingSpec`).
The unconditional sequence is the negative prompt followed by the generated tokens; without a negative prompt it is
the *last token of the prompt* followed by the generated tokens (transformers' default `input_ids[:, -1:]`).

Engine token space (the decision): the **full text vocabulary** (`vocab_size = text_config.vocab_size`) and the full
generated sequence, structural tokens included. For a latent grid of (rows, cols) = (H, W) the engine generates
`num_image_tokens = (W + 1) * H + 3` tokens: H rows of W visual tokens each followed by EOL (`<|extra_200|>`), then
EOF (`<|extra_201|>`), EOI (`<|image end|>`) and EOS. This is exactly the slice `generate` appends after the prompt
and exactly what `model.decode_image_tokens(height=H, width=W)` takes. The adapter applies the allowed-token
constraint itself to every verified slot, by the absolute image position the slot predicts, so a drafter may
propose any ids: a structural position has one allowed token (a forced, always-accepted step for a drafter that
knows the layout), a visual position allows the visual tokens only.

The constraint is the docs' `prefix_allowed_tokens_fn` written by position k (0-based) of the generated sequence;
:meth:`Emu3ImageTarget.allowed_tokens` returns it and `reference_generate` passes it to `generate`. The docs'
example tests `offset % (width + 1) == 0` *before* the end tokens, so for width <= 2 it would ask for an EOL where
EOF/EOI/EOS belong; the layout above does not (they agree for width >= 3).

Differences from `generate`: positions of each row start at 0 (`generate` numbers the conditional rows from their
first real token as well, but the unconditional forward in the CFG processor passes no position ids, so left-padded
negative prompts of different lengths shift its positions: a constant per row, invisible to RoPE up to float
rounding); a ragged dynamic cache with explicit masks replaces `generate`'s two caches.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from mmspec.errors import GenerationConfigError, InvalidInputError, UnsupportedModelError
from mmspec.target import CausalLMRunner

from .guided import GuidedImageTarget, as_token_ids, left_pad
from .vq import to_pil

EOL, EOF, EOI = "<|extra_200|>", "<|extra_201|>", "<|image end|>"


class Emu3ImageTarget(GuidedImageTarget):
    """Engine target for `transformers.Emu3ForConditionalGeneration` text-to-image generation.

    model: an Emu3ForConditionalGeneration. grid: (rows, cols) of the VQ latent image (the `H*W` the processor writes
    into the prompt). guidance_scale: CFG scale (read at prefill). negative_prompt_ids: shared negative prompt
    (list of ids / 1-D tensor), used by requests whose condition has none.
    eol/eof/eoi/eos_token_id: override the structural ids (defaults: `config.vocabulary_map` names `<|extra_200|>`,
    `<|extra_201|>`, `<|image end|>`; `generation_config.eos_token_id`).
    Conditions (`requests`): per request, the prompt input_ids as Emu3's processor makes them with
    `return_for_image_generation=True` (ending in `<|image start|>H*W<|image token|>`), or a mapping
    `{"input_ids": ids, "negative_prompt_ids": ids}`.
    """

    def __init__(self, model: nn.Module, grid: tuple[int, int], guidance_scale: float = 3.0,
                 negative_prompt_ids=None, *, eol_token_id: int | None = None, eof_token_id: int | None = None,
                 eoi_token_id: int | None = None, eos_token_id: int | None = None):
        mapping = getattr(model, "vocabulary_mapping", None)
        if mapping is None or not hasattr(model, "decode_image_tokens"):
            raise UnsupportedModelError(f"{type(model).__name__} is not an Emu3ForConditionalGeneration "
                                        "(no vocabulary_mapping / decode_image_tokens)")
        if (not isinstance(grid, (tuple, list)) or len(grid) != 2
                or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in grid)):
            raise InvalidInputError(f"grid={grid!r}: expected (rows, cols), two positive ints (the latent image size)")
        self.model = model.eval()
        self.runner = CausalLMRunner(model)
        self.vocab_size = self.text_vocab = int(self.runner.vocab_size)
        self.context = self.runner.max_positions
        self.grid = (int(grid[0]), int(grid[1]))
        rows, cols = self.grid
        self.num_image_tokens = (cols + 1) * rows + 3
        vmap = model.config.vocabulary_map or {}
        eos = model.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
        ids = {"eol_token_id": (eol_token_id, vmap.get(EOL)), "eof_token_id": (eof_token_id, vmap.get(EOF)),
               "eoi_token_id": (eoi_token_id, vmap.get(EOI)), "eos_token_id": (eos_token_id, eos)}
        for name, (given, default) in ids.items():
            value = default if given is None else given
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.vocab_size:
                raise UnsupportedModelError(f"{name}={value!r}: not an id in [0, {self.vocab_size}); the config's "
                                            "vocabulary_map / generation_config lacks it: pass it to Emu3ImageTarget")
            setattr(self, name, value)
        visual = list(mapping.image_tokens)
        if not visual:
            raise UnsupportedModelError("config.vocabulary_map has no '<|visual token NNNNNN|>' entries")
        self.visual_tokens = visual
        self._visual = torch.zeros(self.vocab_size, dtype=torch.bool)
        self._visual[visual] = True
        self._visual_dev = self._visual.to(self.runner.device)
        # forced[k] = the single allowed id at image position k, -1 where the visual tokens are allowed
        k = torch.arange(self.num_image_tokens)
        forced = torch.where((k + 1) % (cols + 1) == 0, self.eol_token_id, -1)
        forced[(cols + 1) * rows:] = torch.tensor([self.eof_token_id, self.eoi_token_id, self.eos_token_id])
        self._forced_list = forced.tolist()
        self._forced = forced.to(self.runner.device)
        self.negative_prompt_ids = (None if negative_prompt_ids is None else
                                    as_token_ids(negative_prompt_ids, "negative_prompt_ids", self.text_vocab))
        super().__init__(guidance_scale)

    # --- the layout ---------------------------------------------------------------------------------------------
    def allowed_tokens(self, k: int) -> list[int]:
        """Ids allowed at position k (0-based) of the generated sequence (the prefix constraint)."""
        k = min(max(int(k), 0), self.num_image_tokens - 1)
        f = self._forced_list[k]
        return self.visual_tokens if f < 0 else [f]

    def _allowed_mask(self, image_pos: torch.Tensor) -> torch.Tensor:
        """(B, M) image positions -> (B, M, V) bool allowed tokens."""
        pos = image_pos.to(self._forced.device).clamp(0, self.num_image_tokens - 1)
        forced = self._forced[pos]  # (B, M)
        one = torch.nn.functional.one_hot(forced.clamp(min=0), self.vocab_size).bool()  # (B, M, V)
        return torch.where((forced < 0)[..., None], self._visual_dev, one)

    # --- hooks ----------------------------------------------------------------------------------------------------
    def _condition(self, i: int, value) -> tuple[list[int], list[int] | None]:
        negative = None
        if isinstance(value, Mapping):
            unknown = set(value) - {"input_ids", "negative_prompt_ids"}
            if "input_ids" not in value or unknown:
                raise InvalidInputError(f"condition {i} has keys {sorted(value)}; expected 'input_ids' and optionally "
                                        "'negative_prompt_ids'")
            if value.get("negative_prompt_ids") is not None:
                negative = as_token_ids(value["negative_prompt_ids"], f"condition {i} negative_prompt_ids",
                                        self.text_vocab)
            value = value["input_ids"]
        return as_token_ids(value, f"condition {i}", self.text_vocab), negative

    def _negative(self, condition) -> list[int]:
        ids, negative = condition
        if negative is None:
            negative = self.negative_prompt_ids
        return list(negative) if negative is not None else ids[-1:]  # generate's default: the last prompt token

    def _prompt_rows(self, conditions):
        return [list(c[0]) for c in conditions], [self._negative(c) for c in conditions]

    def _guide(self, cond, uncond, image_pos):
        scores = cond.float()  # generate upcasts the conditional logits before the processors
        if uncond is not None:
            scores = torch.log_softmax(scores, dim=-1)
            u = torch.log_softmax(uncond, dim=-1)  # the CFG processor's own forward: the model's dtype
            scores = self._scale * (scores - u) + u
        allowed = self._allowed_mask(image_pos).to(scores.device)
        out = scores.masked_fill(~allowed, float("-inf"))  # = scores + mask
        dead = out.amax(dim=-1, keepdim=True).isneginf()  # every allowed token at -inf: the mask itself
        if bool(dead.any()):
            out = torch.where(dead, torch.zeros_like(out).masked_fill(~allowed, float("-inf")), out)
        return out

    # --- images and the reference ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, tokens) -> list:
        """(B, num_image_tokens) generated sequences -> B RGB PIL images via the model's VQ decoder."""
        tokens = self._check_tokens(tokens)
        rows, cols = self.grid
        grid_part = tokens[:, : (cols + 1) * rows].view(-1, rows, cols + 1)[..., :cols].reshape(-1)
        if not bool(self._visual[grid_part.cpu()].all()):
            raise InvalidInputError("tokens have non-visual ids at visual grid positions; decode takes sequences "
                                    f"laid out as {rows} rows of {cols} visual tokens + EOL, then EOF, EOI, EOS")
        pixels = self.model.decode_image_tokens(image_tokens=tokens.to(self.device), height=rows, width=cols)
        return to_pil(pixels)  # (B, 3, H', W') in [-1, 1]

    @torch.inference_mode()
    def reference_generate(self, conditions, **generate_kwargs) -> torch.Tensor:
        """The model's own `generate` with this layout as `prefix_allowed_tokens_fn`, CFG via `negative_prompt_ids`
        (prompts and negatives left-padded into one batch): (B, num_image_tokens). Defaults: greedy, this target's
        guidance_scale."""
        conds = self.check_conditions(conditions)
        ids, mask = left_pad([c[0] for c in conds], self._pad_id())
        t = ids.shape[1]
        kw = {"do_sample": False, "guidance_scale": self.guidance_scale, "max_new_tokens": self.num_image_tokens,
              "eos_token_id": self.eos_token_id, "pad_token_id": self._pad_id(),
              "prefix_allowed_tokens_fn": lambda batch_id, seq: self.allowed_tokens(seq.shape[0] - t)}
        if any(c[1] is not None for c in conds) or self.negative_prompt_ids is not None:
            neg, neg_mask = left_pad([self._negative(c) for c in conds], self._pad_id())
            kw.update(negative_prompt_ids=neg.to(self.device), negative_prompt_attention_mask=neg_mask.to(self.device))
        kw.update(generate_kwargs)
        out = self.model.generate(ids.to(self.device), attention_mask=mask.to(self.device), **kw)
        seq = out.sequences if hasattr(out, "sequences") else out
        if seq.shape[1] - t != self.num_image_tokens:
            raise GenerationConfigError(f"generate produced {seq.shape[1] - t} tokens, not {self.num_image_tokens}; "
                                        "check max_new_tokens / eos_token_id in generate_kwargs")
        return seq[:, t:]

    def _pad_id(self) -> int:
        pad = self.model.generation_config.pad_token_id
        return int(pad) if isinstance(pad, int) else self.eos_token_id


__all__ = ["Emu3ImageTarget"]
