"""EAGLE feature drafter (Li et al. 2024, "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty").

The drafter autoregresses on the target's top-layer features: at position t it reads the pair (token x_{t+1}, feature
f_t), fuses them with one linear layer, runs one decoder layer with its own KV cache, and predicts f_{t+1}; the
target's own (frozen) LM head turns a feature into next-token logits. While drafting, a node's feature is the
drafter's prediction at its parent; after verification the committed tokens are fed again with the target's true
features (the drafted slots are dropped), as in EAGLE. Trees come from the engine: static trees and EAGLE-2 dynamic
trees (Li et al. 2024b) use `ModelDrafter`'s level-batched feeding.

For a VLM target the features of the image positions come from the target's prefill like any other position: the
drafter sees the image through the target's features (the compressors of vision.compressors shorten that view).
"""
from __future__ import annotations

from itertools import groupby
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel

from mmspec.cache import RaggedCache
from mmspec.drafters.features import PendingPairs, padded_features
from mmspec.drafters.model import ModelDrafter
from mmspec.checkpoint import read_kind_config, read_safetensors, write_checkpoint
from mmspec.compat import cache_kwargs
from mmspec.errors import CheckpointError, IncompatibleModelsError, UnsupportedModelError
from mmspec.state import take_rows
from mmspec.target import BlockOutput, CausalLMRunner, PositionMap, text_config


class EagleHead(nn.Module):
    """fc([embed(x_{t+1}); f_t]) -> one LLaMA decoder layer -> predicted f_{t+1}; logits through the target's head.

    The target's input embeddings and LM head are shared and frozen (not part of `trainable_parameters`)."""

    CONFIG_NAME, WEIGHTS_NAME, KIND = "config.json", "model.safetensors", "mmspec.eagle"
    target_positions = False  # pair t sits at position t (the head's own numbering, as trained)

    def __init__(self, target: nn.Module, layers: int = 1, taps: tuple[int, ...] | None = None,
                 image_token_id: int | None = None, compressor: nn.Module | None = None):
        """layers: decoder layers of the head. taps: indices into the target's hidden_states to read (EAGLE-3, Li
        et al. 2025: low, middle and high layers, fused by a linear layer); None reads the last one (EAGLE-1).
        image_token_id: with it, image positions take a projection of their feature alone instead of the fused
        (placeholder embedding, feature) pair (MSD's decoupling of visual and text inputs, Lin et al. 2025).
        compressor: a vision.compressors module for the head's view of images, trained and saved with the head
        (the drafter uses it unless given another)."""
        super().__init__()
        self.layers, self.taps, self.image_token_id = layers, tuple(taps) if taps else None, image_token_id
        self.target_identity = target_identity(target)
        self.target_image_token_id = image_token_id_of(getattr(target, "config", None))  # training's compressed view
        tc = text_config(target)
        hidden = int(tc.hidden_size)
        heads = int(tc.num_attention_heads)
        self.config = LlamaConfig(
            vocab_size=1, hidden_size=hidden, intermediate_size=int(getattr(tc, "intermediate_size", 4 * hidden)),
            num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=int(getattr(tc, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(tc, "head_dim", None) or hidden // heads),
            max_position_embeddings=int(getattr(tc, "max_position_embeddings", 4096)),
            rms_norm_eps=float(getattr(tc, "rms_norm_eps", 1e-6)), tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)
        self.config._attn_implementation = "sdpa"
        self.fc = nn.Linear(2 * hidden, hidden)
        self.tap_fc = nn.Linear(len(self.taps) * hidden, hidden) if self.taps and len(self.taps) > 1 else None
        self.image_proj = nn.Linear(hidden, hidden) if image_token_id is not None else None
        self.body = LlamaModel(self.config)  # its 1-entry embedding table is never used (inputs_embeds)
        embed, head = target.get_input_embeddings(), target.get_output_embeddings()
        if embed is None or head is None:
            raise UnsupportedModelError(f"{type(target).__name__} exposes no input embeddings / LM head to share")
        self._shared = [embed, head]  # kept out of the module tree: frozen, not saved with the drafter
        self.compressor = compressor
        self.to(device=head.weight.device, dtype=head.weight.dtype)

    # --- checkpoints: safetensors weights + a config.json naming the target they were trained for ---------------
    def save_pretrained(self, directory) -> Path:
        weights = {k: v for k, v in self.state_dict().items() if not k.startswith("body.embed_tokens")}
        cfg = {"layers": self.layers, "taps": list(self.taps) if self.taps else None,
               "image_token_id": self.image_token_id, "target": self.target_identity,
               "compressor": self.compressor.config() if self.compressor is not None else None}
        return write_checkpoint(directory, self.KIND, cfg, weights, config_name=self.CONFIG_NAME,
                                weights_name=self.WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, directory, target: nn.Module) -> "EagleHead":
        """Load a head saved by `save_pretrained` for `target` (a head made for another target is refused)."""
        cfg = read_kind_config(Path(directory) / cls.CONFIG_NAME, cls.KIND, cls.__name__)
        check_trained_for(directory, cfg, target, "mmspec train-drafter")
        compressor = None
        if cfg.get("compressor"):
            from vision.compressors import build_compressor

            compressor = build_compressor(cfg["compressor"])
        head = cls(target, layers=int(cfg.get("layers", 1)), taps=cfg.get("taps"),
                   image_token_id=cfg.get("image_token_id"), compressor=compressor)
        weights = read_safetensors(Path(directory) / cls.WEIGHTS_NAME, "drafter checkpoint")
        missing, unexpected = head.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.startswith("body.embed_tokens")]
        if missing or unexpected:
            raise CheckpointError(f"drafter checkpoint {str(directory)!r} does not match an EAGLE head with "
                                  f"{head.layers} layer(s): missing {missing[:4]}, unexpected {unexpected[:4]}")
        return head.to(device=target.get_output_embeddings().weight.device,
                       dtype=target.get_output_embeddings().weight.dtype)

    def get_output_embeddings(self):
        return self._shared[1]

    def trainable_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("body.embed_tokens")]

    def forward(self, input_ids, features, attention_mask=None, position_ids=None, cache=None,
                use_cache=True, output_hidden_states=False, logits_to_keep=0, past_key_values=None, **_):
        embed, head = self._shared
        if self.tap_fc is not None and features.shape[-1] != self.config.hidden_size:
            features = self.tap_fc(features)  # the target's taps (k*H); the head's own predictions are already H
        x = self.fc(torch.cat([embed(input_ids).to(features.dtype), features], dim=-1))
        if self.image_proj is not None:
            is_image = (input_ids == self.image_token_id).unsqueeze(-1)
            x = torch.where(is_image, self.image_proj(features), x)
        cache = cache if cache is not None else past_key_values  # the pre-5.24 spelling, still accepted
        h, extra = self._decode(x, features, attention_mask, position_ids, cache, use_cache)
        logits = head(h[:, -logits_to_keep:] if logits_to_keep else h)
        return SimpleNamespace(logits=logits, hidden_states=(h,), **extra)

    def _decode(self, x, features, attention_mask, position_ids, cache, use_cache):
        """The head's decoder over the fused inputs x (B, M, H): (predicted features, extra outputs)."""
        h = self.body(inputs_embeds=x, attention_mask=attention_mask, position_ids=position_ids,
                      **cache_kwargs(self.body, cache), use_cache=use_cache).last_hidden_state
        return h, {}


def image_token_id_of(config) -> int | None:
    """The image placeholder id a VLM config names (None for a text-only model)."""
    for name in ("image_token_id", "image_token_index"):
        if isinstance(getattr(config, name, None), int):
            return int(getattr(config, name))
    return None


def target_identity(target: nn.Module) -> dict:
    """What a drafter checkpoint records of its target: loading it on a different one is an error."""
    tc = text_config(target)
    return {"architecture": type(target).__name__, "hidden_size": int(tc.hidden_size),
            "vocab_size": int(target.get_output_embeddings().weight.shape[0])}


def check_trained_for(directory, cfg: dict, target: nn.Module, train_with: str) -> None:
    """Refuse a drafter checkpoint (its config `cfg`) recorded for another target than `target`."""
    want, have = cfg.get("target", {}), target_identity(target)
    diff = {k: (want.get(k), have[k]) for k in have if want.get(k) != have[k]}
    if diff:
        raise IncompatibleModelsError(
            f"drafter checkpoint {str(directory)!r} was trained for another target: " + ", ".join(
                f"{k} {a!r} in the checkpoint vs {b!r} here" for k, (a, b) in diff.items())
            + f"; train a drafter for this target ({train_with})")


def compressed_view(tokens: list[int], feats: torch.Tensor, compressor, image_token_id: int,
                    attention: torch.Tensor | None = None):
    """A feature drafter's view of a sequence of pairs (x_{t+1}, f_t): each run of image placeholders is replaced
    by the compressor's tokens (placeholder id, compressed feature); square runs are pooled as a grid, others as a
    sequence. attention (len(tokens),): the target's attention mass at each token's position (for pruning). With a
    global vector (ViSpec) every text pair after an image gets it fused into its feature.

    Returns (tokens, features (M, H), source (M,) long: the input pair each output slot is, -1 for compressed
    slots, the last image's global vector (H,) or None). Differentiable in the compressor (training uses it)."""
    out_tok, out_feat, source, g, i = [], [], [], None, 0
    for is_image, run in groupby(tokens, key=lambda t: t == image_token_id):
        j = i + len(list(run))
        if not is_image:
            text = feats[i:j]
            out_feat.append(text if g is None else compressor.fuse(text.unsqueeze(0), g.unsqueeze(0))[0])
            out_tok += tokens[i:j]
            source += range(i, j)
        else:
            side = int(round((j - i) ** 0.5))
            grid = (side, side) if side * side == j - i else None
            att = attention[i:j].unsqueeze(0).to(feats.device) if attention is not None else None
            comp = compressor(feats[i:j].unsqueeze(0), grid=grid, attention=att)
            out_tok += [image_token_id] * comp.tokens.shape[1]
            out_feat.append(comp.tokens[0].to(feats.dtype))
            source += [-1] * comp.tokens.shape[1]
            g = comp.global_vec[0] if comp.global_vec is not None else g
        i = j
    return out_tok, torch.cat(out_feat), torch.tensor(source, dtype=torch.long), g


class EagleDrafter(ModelDrafter):
    """The EAGLE drafter in the engine's Drafter protocol (chains, static trees, EAGLE-2 dynamic trees)."""

    needs_hidden = True
    feeds_features = True  # every block is fed with its features (`inputs`) and returns predicted ones
    lean_chain = False  # every chain step needs its parent's feature: the generic loop with `_chain_feed`
    lean_tree = False  # likewise every tree level (`_feed_nodes` carries the features)

    def __init__(self, head: EagleHead, tree=4, compressor=None, image_token_id: int | None = None):
        """compressor: a vision.compressors module that shortens the drafter's view of each image (None: the
        drafter reads every image position's feature). image_token_id: the target's image placeholder id (read
        from the target's config when the drafter is checked against it)."""
        super().__init__(runner=CausalLMRunner(head), tree=tree)
        compressor = compressor if compressor is not None else head.compressor
        self.head, self.compressor, self.image_token_id = head, compressor, image_token_id
        self.needs_hidden = head.taps if head.taps else True  # what the target hands over: last layer or taps
        self.prompt_slots: list[int] = []  # drafter slots each prompt took (after compression), for inspection

    @classmethod
    def from_pretrained(cls, path, target, tree=4) -> "EagleDrafter":
        """The feature drafter in `path` for `target`: an mmspec checkpoint (EAGLE, EAGLE-3, MSD, DREAM, DFlash) or an
        EAGLE-3 drafter in the layout vLLM's speculators or SGLang load (`vision.export`)."""
        from .load import load_feature_drafter

        return load_feature_drafter(path, target, tree)

    @property
    def needs_attention(self) -> bool:
        """An attention-driven compressor asks the target's prefill for the last-layer attention mass."""
        return bool(getattr(self.compressor, "uses_attention", False))

    def check_target(self, target) -> None:
        super().check_target(target)
        if self.image_token_id is None:
            self.image_token_id = image_token_id_of(getattr(getattr(target, "model", None), "config", None))

    def _view(self, tokens: list[int], feats: torch.Tensor,
              attention: torch.Tensor | None = None) -> tuple[list[int], torch.Tensor, torch.Tensor | None]:
        """The drafter's pairs for a prompt (`compressed_view`): (tokens, features (M, H), global vector or None)."""
        if self.compressor is None or self.image_token_id is None:
            return tokens, feats, None
        out_tok, out_feat, _, g = compressed_view(tokens, feats, self.compressor, self.image_token_id, attention)
        return out_tok, out_feat, g

    @torch.inference_mode()
    def _fuse(self, feats: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        """ViSpec: the image's global vector fused into text features (M, H); unchanged without one."""
        return feats if g is None else self.compressor.fuse(feats.unsqueeze(0), g.unsqueeze(0))[0]

    @torch.inference_mode()
    def _head_features(self, feats: torch.Tensor) -> torch.Tensor:
        """The target's features as the head fuses them: EAGLE-3 taps (k*H) through the head's tap_fc (H)."""
        tap_fc = self.head.tap_fc
        return tap_fc(feats) if tap_fc is not None and feats.shape[-1] != self.head.config.hidden_size else feats

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def begin(self, ctx, prefill: BlockOutput) -> None:
        """Nothing is run here: the first propose feeds the pairs (x_{t+1}, f_t) of the whole prompt at once."""
        self.ctx = ctx
        b = len(ctx.history)
        self.runner.kv = RaggedCache.new(self.head, b)
        self.runner.next_positions = [0] * b
        self.runner.position_map = None  # pair t sits at position t, unless the head runs the target's own layers:
        if getattr(self.head, "target_positions", False) and prefill.positions is not None:  # then the target's
            self.runner.position_map = PositionMap.from_rows(prefill.positions, [len(h) - 1 for h in ctx.history],
                                                             self.runner.device)
        tokens, feats, self.global_vecs = [], [], []
        for i, h in enumerate(ctx.history):  # pairs (x_{t+1}, f_t): prompt[1:] + the first generated token
            with torch.inference_mode():
                att = prefill.attention[i, 1: len(h)] if prefill.attention is not None else None
                f = self._head_features(prefill.hidden[i, : len(h) - 1])
                t, f, g = self._view(list(h[1:]), f, att)
            tokens.append(t)
            feats.append(f)
            self.global_vecs.append(g)
        self.pairs = PendingPairs(tokens, feats)
        self.prompt_slots = self.pairs.counts()
        self.round = None
        self.compile_after_feed = ctx.compiled  # the prompt's pairs are fed eagerly (every length), then compiled

    def propose(self, budgets):
        drafts = super().propose(budgets)
        if self.compile_after_feed and self.round is not None:
            self.runner.compile_decode(self.ctx.reserve)
            self.compile_after_feed = False
        return drafts

    @property
    def uncached(self) -> list[list[int]]:
        """The tokens of the pending pairs (what ModelDrafter's feed reads)."""
        return self.pairs.tokens

    @property
    def uncached_feats(self) -> list[torch.Tensor]:
        """The features (n, H) of the pending pairs, per row, as the head fuses them."""
        return self.pairs.features

    def commit(self, updates, verify_out: BlockOutput | None) -> None:
        """Drop every drafted slot; the committed tokens are fed next time with the target's own features."""
        rnd = self.round
        self.pairs.append_committed(updates, verify_out.hidden,
                                    lambda b, f: self._fuse(self._head_features(f), self.global_vecs[b]))
        if rnd is not None:
            keep = [list(range(rnd.start, rnd.start + n)) for n in rnd.n_uncached]
            self.runner.kv.compact(keep)
            self.runner.next_positions = [p + len(k) for p, k in zip(self.runner.next_positions, keep)]
        self.round = None

    def select_rows(self, rows) -> None:
        self.runner.select_rows(rows)
        self.pairs.select_rows(rows)
        take_rows(self, rows, "global_vecs")

    # --- feeding ------------------------------------------------------------------------------------------------
    def _feed_uncached(self, inputs: dict | None = None) -> torch.Tensor:
        """The base feed, each uncached token with its target feature; the root's predicted feature is kept."""
        n = self.pairs.counts()
        logits = super()._feed_uncached({"features": padded_features(self.pairs.features)})
        self.pairs.clear()  # fed: the next pairs are this step's committed tokens
        hidden = self.fed_features  # (B, M, H) predicted features of the fed block
        last = torch.tensor(n, device=hidden.device) - 1
        self._root_hidden = hidden[torch.arange(len(n), device=hidden.device), last]
        self._node_hidden = [dict() for _ in n]
        return logits

    def _feed_nodes(self, feed, inputs: dict | None = None):
        """Each fed node reads its parent's predicted feature (the root's for depth 1)."""
        m, h = max(len(f) for f in feed), self._root_hidden.shape[-1]
        feats = self._root_hidden.new_zeros(len(feed), m, h)
        for r, row in enumerate(feed):
            for j, (node, _, anc) in enumerate(row):
                parent = self._node_hidden[r][anc[-1]] if anc else self._root_hidden[r]
                feats[r, j] = self._fuse(parent[None], self.global_vecs[r])[0]
        logits = super()._feed_nodes(feed, {"features": feats})
        for r, row in enumerate(feed):
            for j, (node, _, _) in enumerate(row):
                self._node_hidden[r][node] = self.fed_features[r, j]
        return logits

    def _chain_feed(self, tok: int, offset: int, inputs: dict | None = None) -> torch.Tensor:
        """A chain node reads its parent's predicted feature (the root's for depth 1)."""
        first = offset == self.round.n_uncached[0]  # depth 1
        parent = (self._root_hidden[0] if first else self._chain_feature).view(1, -1)
        features = self._fuse(parent, self.global_vecs[0]).unsqueeze(0)  # (1, 1, H)
        logits = super()._chain_feed(tok, offset, {"features": features})
        self._chain_feature = self.fed_features[0, 0]
        return logits
