"""An EAGLE-style feature head drafting for a LlamaGen target: LANTERN's drafter.

Li et al. 2024, "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty" (arXiv:2401.15077), as used
by Jang et al. 2025, "LANTERN: Accelerating Visual Autoregressive Models with Relaxed Speculative Decoding"
(arXiv:2410.03355), whose drafter is an EAGLE-2 head trained on LlamaGen's own samples.

The head autoregresses on the target's top-layer features (the final-normed hidden state, the output layer's input).
Image token j sits at sequence position p = cls_token_num + j; f_p is the target's feature there, and f_{p-1}
predicts token j. The head's element j is the pair (f_{p-1}, x_j):

    x = fc([e(x_j); f_{p-1}])  ->  n_layer LlamaGen blocks, 2-D RoPE at x_j's grid cell p  ->  g_p ~ f_p
    logits_{j+1} = W_out g_p                                            (EAGLE eq. 4-5; LANTERN section 4)

so the pair takes the position of its token, exactly where the target computes the f_p it imitates. `e` and
`W_out` are the target's own `tok_embeddings` and `output`, shared and frozen (EAGLE freezes both; the head's
feature space then *is* the target's, and a checkpoint holds only fc + blocks). The head sees image positions only:
the condition reaches it through the features (f at the last prefix slot and every later one).

Classifier-free guidance (ALGORITHMS.md section 5): the head keeps [cond; uncond] rows like the target, fed with the
two halves of the target's (B, M, 2D) features and the same tokens; its draft distribution is `u + s (c - u)` of
the two rows' logits with the target's scale, then the sampling spec's warping: the same combination as p.

Drafting (`ImageHeadDrafter`): after each verification the pairs that became known are fed with the target's true
features (features of pending + accepted path, tokens = accepted path + correction); k tokens are then rolled out on
the head's own predicted features, and the head's cache is cropped back to the true pairs (EAGLE re-feeds accepted
drafts with the target's features). Rows accept different numbers of tokens: each row has its own committed length,
a 4-D mask hides the others' slots, positions are explicit (the `LlamaGenRunner` pattern).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from mmspec.cache import BufferCache, RaggedRows
from mmspec.drafters.base import DraftContext, DrafterCounters, RowUpdate
from mmspec.drafters.features import PendingPairs
from mmspec.checkpoint import checkpoint_kind, read_kind_config, read_safetensors, write_checkpoint
from mmspec.errors import (CheckpointError, IncompatibleModelsError, InvalidInputError, UnsupportedModelError,
                           VocabularyMismatchError)
from mmspec.guidance import combine_logits, double_rows, is_guided, split_halves
from mmspec.target import BlockOutput, sync_time
from mmspec.tree import Draft

from .model import chains, check_draft_depth, draw_step
from ..models.llamagen import LlamaGen, LlamaGenConfig, TransformerBlock, causal_mask, rope_2d
from ..target import batch_guidance_scale

CONFIG_NAME, WEIGHTS_NAME, KIND = "config.json", "model.safetensors", "image_ar.head"
IDENTITY = ("vocab_size", "dim", "grid_size", "cls_token_num")  # what a head must share with its target


class ImageHead(nn.Module):
    """fc([e(x_j); f_{p-1}]) -> n_layer LlamaGen blocks -> predicted f_p; logits via the target's frozen output.

    forward(tokens (R, T), features (R, T, D), input_pos (R, T), cache=, mask=) -> predicted features (R, T, D).
    input_pos are the tokens' sequence positions (cls_token_num + image index). Only fc and the blocks are
    parameters (and saved); the target's embedding / output layer are held outside the module tree.
    """

    def __init__(self, target_model: LlamaGen, n_layer: int = 1, *, config: LlamaGenConfig | None = None):
        super().__init__()
        if not isinstance(target_model, LlamaGen):
            raise UnsupportedModelError(f"an ImageHead drafts for an image_ar LlamaGen; got "
                                        f"{type(target_model).__name__}")
        if config is None:
            if isinstance(n_layer, bool) or not isinstance(n_layer, int) or n_layer < 1:
                raise InvalidInputError(f"n_layer={n_layer!r}: the head needs an int >= 1 of transformer blocks")
            config = dataclasses.replace(target_model.config, n_layer=n_layer)
        check_identity(config, target_model.config, "the head")
        self.config = config
        self.fc = nn.Linear(2 * config.dim, config.dim)  # EAGLE's fusion layer (with bias)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self._shared = [target_model.tok_embeddings, target_model.output]  # frozen, not registered, not saved
        self.to(device=target_model.device, dtype=target_model.dtype)

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    def new_cache(self) -> BufferCache:
        return BufferCache(self.config.n_layer, self.config.num_image_tokens)

    def forward(self, tokens: torch.Tensor, features: torch.Tensor, input_pos: torch.Tensor,
                cache: BufferCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        r, t = tokens.shape
        if features.shape != (r, t, self.config.dim):
            raise InvalidInputError(f"features must be (R, T, D) = ({r}, {t}, {self.config.dim}) for tokens "
                                    f"{tuple(tokens.shape)}; got {tuple(features.shape)}")
        embed = self._shared[0](tokens).to(features.dtype)  # (R, T, D)
        x = self.fc(torch.cat([embed, features], dim=-1))  # (R, T, D)
        past = 0 if cache is None else cache.length
        if mask is None:
            mask = causal_mask(r, t, past + t, x.device)
        rope = rope_2d(input_pos.to(x.device).expand(r, t), self.config)  # (R, T, Dh/2, 2)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, cache, i)
        if cache is not None:
            cache.advance(t)
        return x

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Next-token logits of (predicted) features (..., D) through the target's output layer, float32."""
        return self._shared[1](features).float()

    # --- checkpoints ----------------------------------------------------------------------------------------------
    def save_pretrained(self, directory) -> Path:
        """Write `config.json` ({"kind": "image_ar.head", "config": the blocks' LlamaGenConfig}) + `model.safetensors`
        (fc and blocks only: the shared target layers are not copied)."""
        return write_checkpoint(directory, KIND, {"config": dataclasses.asdict(self.config)}, self.state_dict(),
                                config_name=CONFIG_NAME, weights_name=WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, directory, target_model: LlamaGen) -> "ImageHead":
        """Load a head written by `save_pretrained` onto `target_model` (same dim, vocabulary, grid and prefix;
        IncompatibleModelsError / VocabularyMismatchError otherwise, CheckpointError for missing or corrupt files)."""
        directory = Path(directory)
        raw = read_kind_config(directory / CONFIG_NAME, KIND, "ImageHead")
        fields = {f.name for f in dataclasses.fields(LlamaGenConfig)}
        cfg = raw.get("config")
        if not isinstance(cfg, dict) or set(cfg) - fields:
            raise CheckpointError(f"{str(directory / CONFIG_NAME)!r}: 'config' must be a LlamaGenConfig dict; got "
                                  f"{sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__}")
        try:
            config = LlamaGenConfig(**cfg)
        except (InvalidInputError, TypeError) as e:
            raise CheckpointError(f"{str(directory / CONFIG_NAME)!r}: invalid head config ({e})") from e
        if not isinstance(target_model, LlamaGen):
            raise UnsupportedModelError(f"target_model must be an image_ar LlamaGen; got {type(target_model).__name__}")
        check_identity(config, target_model.config, f"head checkpoint {str(directory)!r}")
        head = cls(target_model, config=config)
        state = read_safetensors(directory / WEIGHTS_NAME, "head checkpoint")
        own = head.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or bad:
            raise CheckpointError(f"{str(directory)!r} does not match an ImageHead with {config.n_layer} layer(s): "
                                  f"missing {missing[:4]}, unexpected {unexpected[:4]}, wrong shape {bad[:4]}")
        head.load_state_dict(state)
        return head.to(device=target_model.device, dtype=target_model.dtype).eval()


def check_identity(head: LlamaGenConfig, target: LlamaGenConfig, what: str) -> None:
    """Raise unless the head's config shares the target's vocabulary, width, grid and prefix length."""
    if head.vocab_size != target.vocab_size:
        raise VocabularyMismatchError(f"{what} has vocab_size={head.vocab_size} but the target's codebook has "
                                      f"{target.vocab_size} codes: a head drafts for the target it was made for")
    for field in IDENTITY[1:]:
        if getattr(head, field) != getattr(target, field):
            raise IncompatibleModelsError(f"{what} has {field}={getattr(head, field)} but the target has "
                                          f"{getattr(target, field)}: a head drafts for the target it was made for")


def is_head_checkpoint(path) -> bool:
    """Whether `path` is a directory holding an ImageHead checkpoint (config.json with kind "image_ar.head")."""
    return checkpoint_kind(path) == KIND


# --- the drafter ------------------------------------------------------------------------------------------------------
class ImageHeadDrafter:
    """The engine's Drafter protocol for an ImageHead on an image_ar `LlamaGenTarget`: chains of k tokens.

    State: a KV cache with [cond; uncond] rows (guided) whose row b holds, hole-free in slots [0, lengths[b]), the
    pairs fed with true target features; `pairs` the known pairs not yet in it (features (D or 2D,) per token: the
    engine's feature-drafter core, `mmspec.drafters.features.PendingPairs`, which vision's EAGLE drafters use too).
    """

    needs_hidden = True
    trusted = True  # tokens in range and q shaped by construction

    def __init__(self, head: ImageHead, k: int = 4):
        if not isinstance(head, ImageHead):
            raise InvalidInputError(f"head must be an ImageHead, got {type(head).__name__}")
        self.head, self.k = head.eval(), check_draft_depth(k)
        self.max_depth = self.max_nodes = k
        self.counters = DrafterCounters()
        self.forward_time = 0.0
        self.scale = 1.0

    def check_target(self, target) -> None:
        cfg = getattr(getattr(target, "model", None), "config", None)
        if not isinstance(cfg, LlamaGenConfig) or not hasattr(target, "guidance_scale"):
            raise UnsupportedModelError(f"an ImageHead drafter needs a LlamaGen target (image_ar.LlamaGenTarget); "
                                        f"got {type(target).__name__}")
        check_identity(self.head.config, cfg, "the head")

    @property
    def guided(self) -> bool:
        return is_guided(self.scale)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return double_rows(x, self.scale)

    def _split(self, feats: torch.Tensor) -> torch.Tensor:
        """Target features (B, T, D or 2D) -> head rows (R, T, D): [cond; uncond] halves when guided."""
        return split_halves(feats, self.scale)

    # --- protocol -------------------------------------------------------------------------------------------------
    def begin(self, ctx: DraftContext, prefill: BlockOutput) -> None:
        self.ctx = ctx
        self.scale = batch_guidance_scale(ctx.requests)  # the scale the target runs this batch with
        d = self.head.config.dim * (2 if self.guided else 1)
        hidden = prefill.hidden
        if hidden is None or hidden.shape[0] != len(ctx.history) or hidden.shape[-1] != d:
            raise InvalidInputError(f"the target's prefill features must be (B, 1, {d}) for B={len(ctx.history)} at "
                                    f"guidance_scale={self.scale}; got "
                                    f"{None if hidden is None else tuple(hidden.shape)}")
        self.ragged = RaggedRows(self.head.new_cache(), [0] * len(ctx.history), self.scale)
        self.pairs = PendingPairs([[h[-1]] for h in ctx.history], [hidden[b, -1:] for b in range(len(ctx.history))])

    @torch.no_grad()
    def propose(self, budgets: Sequence[int]) -> list[Draft]:
        depth = min(self.k, max(budgets, default=0))
        if depth <= 0:  # nothing to draft: the known pairs wait for the next step
            return [Draft.empty() for _ in budgets]
        spec, gens = [self.ctx.spec_of(b) for b in range(len(budgets))], self.ctx.generators
        feats = self._feed_known()  # (R, D): predicted features after each row's last true pair
        base = list(self.ragged.lengths)
        toks, qs = [], []
        for step in range(depth):
            logits = self.head.logits(feats)  # (R, V)
            logits = combine_logits(logits, self.scale) if self.guided else logits  # (B, V)
            tok, q = draw_step(spec, logits, gens)
            toks.append(tok)
            qs.append(q)
            if step < depth - 1:  # the pair (own predicted feature, drafted token) at the next position
                feats = self._append(tok[:, None], feats[:, None], [n + step for n in base], causal=False)[:, -1]
        self.ragged.discard()  # forget the drafted pairs: only true features stay
        return chains(toks, qs, [min(depth, n) for n in budgets])

    def commit(self, updates: Sequence[RowUpdate], verify_out: BlockOutput | None) -> None:
        hidden = None if verify_out is None else verify_out.hidden  # (B, M, D or 2D): [pending, draft nodes...]
        if hidden is None or hidden.shape[0] != len(updates):
            raise InvalidInputError(f"ImageHeadDrafter.commit needs the verification's features for {len(updates)} "
                                    "row(s) (the loop asks for them: needs_hidden = True); got "
                                    f"{None if hidden is None else tuple(hidden.shape)}")
        self.pairs.append_committed(updates, hidden)

    def select_rows(self, rows: Sequence[int]) -> None:
        self.ragged.select_rows(rows)
        self.pairs.select_rows(rows)

    # --- the ragged cache -----------------------------------------------------------------------------------------
    def _feed_known(self) -> torch.Tensor:
        """Append each row's unfed true pairs (right-padded), keep the real ones; predicted features (R, D) at each
        row's last one. Every row has at least one unfed pair (the step's correction or bonus token)."""
        tokens, feats, n = self.pairs.take(self.head.device)
        start = self.ragged.cache.length
        out = self._append(tokens, self._split(feats), self.ragged.lengths, causal=True)  # (R, m, D)
        self.ragged.keep_first(n, start)
        last = self._rows(torch.tensor(n, device=out.device) - 1)  # (R,)
        return out[torch.arange(len(last), device=out.device), last]

    def _append(self, tokens: torch.Tensor, feats: torch.Tensor, first: Sequence[int], causal: bool) -> torch.Tensor:
        """Run a (B, m) block at each row's positions cls_token_num + first[b] + arange(m), appended at the cache's
        width. A row sees its committed slots, then (causal=False: drafting) the slots drafted since, then the block
        causally. Positions past the image are clamped: only drafts beyond a row's budget get there (discarded)."""
        cfg, dev = self.head.config, self.head.device
        cache = self.ragged.cache
        width, m = cache.length, tokens.shape[1]
        lengths = self._rows(torch.tensor(self.ragged.lengths, device=dev))  # (R,)
        first = self._rows(torch.tensor(list(first), device=dev))  # (R,)
        slots = torch.arange(width, device=dev)
        seen = self.ragged.committed(dev)  # (R, width): committed slots
        if not causal:  # this row's drafted slots: the tail of the cache written since the feed
            drafted = width - (first - lengths)  # (R,) where this row's drafted slots start
            seen |= slots[None] >= drafted[:, None]
        block = torch.ones(m, m, dtype=torch.bool, device=dev).tril().expand(len(lengths), m, m)
        mask = torch.cat([seen[:, None, :].expand(-1, m, -1), block], dim=-1)[:, None]  # (R, 1, m, width + m)
        pos = (cfg.cls_token_num + first[:, None] + torch.arange(m, device=dev)).clamp(max=cfg.max_seq_len - 1)
        t0 = sync_time(dev)
        with torch.no_grad():
            out = self.head(self._rows(tokens.to(dev)), feats, pos, cache=cache, mask=mask)
        self.forward_time += sync_time(dev) - t0
        self.counters.forwards += 1
        return out
