"""Block-parallel drafting (DFlash: Chen et al. 2026, "DFlash: Block Diffusion for Flash Speculative Decoding").

One drafter forward proposes a whole block. The drafter's context is the target's hidden states at a few layers
(``taps``: indices into the target's ``hidden_states``, 0 = embeddings; the checkpoint records them as
transformers' ``target_layer_ids`` = taps - 1), concatenated and projected once per position; its input block is the
pending token followed by ``block_size - 1`` mask slots at the next positions. Every block query attends to all
context positions and, bidirectionally, to the block; slot j predicts the token j positions after the pending one,
so one forward gives ``block_size - 1`` draft tokens. They are verified as a chain, or expanded into a static tree
whose depth-d children are the top ranks (greedy) or draws without replacement (sampling) of slot d's distribution.
Slot distributions do not depend on the tokens drafted before them, so a sampled draft records, per node, exactly
the distribution it was drawn from and verification stays lossless.

The network is transformers' DFlash drafter (``MuseGlimmerAssistantModel``, what ``generate(...,
speculation_type="dflash")`` runs), so one set of weights serves both; the target's input embeddings make the block's
inputs and its LM head the logits (shared, frozen, not saved). mmspec keeps the drafter's context keys in a ragged
cache of its own: each step feeds every row's newly committed positions (their target features come from the
verification forward, as for EAGLE) with the block, keeps the context keys and drops the block's, so rows of a batch
may commit different counts.

For a VLM target the image reaches the drafter through the target's features at the image positions (the drafter
reads every position; training is in ``vision.train.dflash_trainer``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from mmspec.cache import RaggedCache
from mmspec.checkpoint import read_kind_config, read_safetensors, write_checkpoint
from mmspec.drafters.base import DraftContext, DrafterCounters, RowUpdate
from mmspec.drafters.features import PendingPairs, padded_features
from mmspec.errors import (CheckpointError, DeviceMismatchError, DraftError, IncompatibleModelsError,
                           UnsupportedModelError)
from mmspec.inference import inference
from mmspec.state import take_rows
from mmspec.target import BlockOutput, sync_time, text_config
from mmspec.sampling import draw_children
from mmspec.tree import Draft, StaticTree, tree_draft

from .eagle import check_trained_for, target_identity


def default_taps(num_layers: int, count: int = 3) -> tuple[int, ...]:
    """`count` hidden-state indices spread from the first layer's output to the last's (1 .. num_layers)."""
    count = max(1, min(count, num_layers))
    if count == 1:
        return (num_layers,)
    return tuple(sorted({1 + round(i * (num_layers - 1) / (count - 1)) for i in range(count)}))


class DFlashHead(nn.Module):
    """The DFlash network for one target (see the module docstring): `model` is transformers'
    MuseGlimmerAssistantModel; the target's embeddings and LM head are shared (kept out of the module tree)."""

    CONFIG_NAME, WEIGHTS_NAME, KIND = "config.json", "model.safetensors", "mmspec.dflash"

    def __init__(self, target: nn.Module, layers: int = 2, block_size: int = 8, taps: Sequence[int] | None = None,
                 mask_token_id: int | None = None):
        """layers: decoder layers of the drafter (a mask slot needs two: one to gather the pending token and the
        context, one to combine them; on the zoo VLM one layer learns slot-1 agreement 0.2, two 0.86).
        block_size: the pending token + block_size - 1 drafted slots.
        taps: the target's hidden-state indices the drafter reads (default: three spread over the layers).
        mask_token_id: the id whose (target) embedding fills the mask slots (default: the target's pad id, else its
        last id); any fixed id works once trained with it."""
        from transformers import MuseGlimmerAssistantConfig, MuseGlimmerAssistantModel

        super().__init__()
        tc = text_config(target)
        n_layers, hidden = int(tc.num_hidden_layers), int(tc.hidden_size)
        taps = tuple(int(t) for t in (taps if taps else default_taps(n_layers)))
        taps = tuple(t if t >= 0 else n_layers + 1 + t for t in taps)  # -1 = the last hidden state
        if not taps or not all(0 <= t <= n_layers for t in taps):
            raise DraftError(f"taps={list(taps)}: hidden-state indices must lie in 0..{n_layers} (0 = embeddings)")
        if not (isinstance(block_size, int) and block_size >= 2):
            raise DraftError(f"block_size={block_size!r}: must be an integer >= 2 (the pending token + draft slots)")
        embed, head = target.get_input_embeddings(), target.get_output_embeddings()
        if embed is None or head is None:
            raise UnsupportedModelError(f"{type(target).__name__} exposes no input embeddings / LM head to share")
        vocab = int(head.weight.shape[0])
        if mask_token_id is None:
            pad = getattr(tc, "pad_token_id", None)
            mask_token_id = int(pad) if isinstance(pad, int) and 0 <= pad < vocab else vocab - 1
        heads = int(tc.num_attention_heads)
        self.taps, self.block_size, self.layers = taps, block_size, layers
        self.target_identity = target_identity(target)
        self.config = MuseGlimmerAssistantConfig(
            hidden_size=hidden, intermediate_size=int(getattr(tc, "intermediate_size", None) or 4 * hidden),
            num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=int(getattr(tc, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(tc, "head_dim", None) or hidden // heads),
            rms_norm_eps=float(getattr(tc, "rms_norm_eps", 1e-6)),
            max_position_embeddings=int(getattr(tc, "max_position_embeddings", 4096)),
            layer_types=["full_attention"] * layers, block_size=block_size, mask_token_id=int(mask_token_id),
            target_layer_ids=[t - 1 for t in taps], bos_token_id=None, eos_token_id=None, pad_token_id=None)
        self.config._attn_implementation = "sdpa"
        self.model = MuseGlimmerAssistantModel(self.config)
        self._shared = [embed, head]  # the target's: frozen, not saved with the drafter
        self.to(device=head.weight.device, dtype=head.weight.dtype)

    @property
    def mask_token_id(self) -> int:
        return int(self.config.mask_token_id)

    def get_output_embeddings(self):
        return self._shared[1]

    def trainable_parameters(self):
        return list(self.model.parameters())

    def forward(self, noise_ids: torch.Tensor, context: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """noise_ids (B, N): block inputs (pending token and mask ids); context (B, C, len(taps) * H): the target's
        features of C new context positions; position_ids (B, C + N); attention_mask (B, 1, N, K) additive over the
        keys [cached, context, block] (None: everything visible). Returns logits (B, N, V) of the block slots."""
        embed, head = self._shared
        masks = None if attention_mask is None else {"full_attention": attention_mask,
                                                     "sliding_attention": attention_mask}
        h = self.model(noise_embeds=embed(noise_ids).to(context.dtype), context_hidden_states=context,
                       position_ids=position_ids, attention_mask=masks, cache=cache, use_cache=cache is not None
                       ).last_hidden_state
        return head(h)

    # --- checkpoints ----------------------------------------------------------------------------------------
    def save_pretrained(self, directory) -> Path:
        cfg = {"layers": self.layers, "block_size": self.block_size, "taps": list(self.taps),
               "mask_token_id": self.mask_token_id, "target_layer_ids": list(self.config.target_layer_ids),
               "target": self.target_identity}
        return write_checkpoint(directory, self.KIND, cfg, self.model.state_dict(), config_name=self.CONFIG_NAME,
                                weights_name=self.WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, directory, target: nn.Module) -> "DFlashHead":
        """Load a drafter saved by `save_pretrained` for `target` (one made for another target is refused)."""
        cfg = read_kind_config(Path(directory) / cls.CONFIG_NAME, cls.KIND, cls.__name__)
        check_trained_for(directory, cfg, target, "mmspec train-drafter --head dflash")
        head = cls(target, layers=int(cfg.get("layers", 2)), block_size=int(cfg.get("block_size", 8)),
                   taps=cfg.get("taps"), mask_token_id=cfg.get("mask_token_id"))
        weights = read_safetensors(Path(directory) / cls.WEIGHTS_NAME, "drafter checkpoint")
        missing, unexpected = head.model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"drafter checkpoint {str(directory)!r} does not match a DFlash drafter with "
                                  f"{head.layers} layer(s): missing {missing[:4]}, unexpected {unexpected[:4]}")
        ref = target.get_output_embeddings().weight
        return head.to(device=ref.device, dtype=ref.dtype)


def block_mask(lengths: Sequence[int], width: int, counts: Sequence[int], context: int, block: int,
               dtype, device) -> torch.Tensor:
    """Additive mask (B, 1, block, width + context + block): row b's block sees its committed keys [0, lengths[b]),
    its counts[b] new context keys at [width, width + counts[b]) and the whole block (bidirectional)."""
    slot = torch.arange(width + context + block, device=device)
    length = torch.tensor(list(lengths), device=device)[:, None]
    new_end = width + torch.tensor(list(counts), device=device)[:, None]
    allowed = (slot < length) | ((slot >= width) & (slot < new_end)) | (slot >= width + context)  # (B, K)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None, None, :].expand(-1, 1, block, -1)


class DFlashDrafter:
    """A DFlash head in the engine's Drafter protocol: chains of up to block_size - 1 tokens or static trees, one
    drafter forward per step, batches of any size."""

    trusted = True  # drafts are well-formed and within the budgets by construction

    def __init__(self, head: DFlashHead, tree: StaticTree | int | None = None):
        """tree: None = a chain of block_size - 1 tokens; an int k = a chain of up to k (at most the block's
        block_size - 1 slots); a StaticTree no deeper than block_size - 1 (depth-d children from slot d's
        distribution)."""
        self.head = head
        slots = head.block_size - 1
        tree = slots if tree is None else min(tree, slots) if isinstance(tree, int) and tree >= 1 else tree
        self.tree = StaticTree.chain(tree) if isinstance(tree, int) else tree
        if not isinstance(self.tree, StaticTree):
            raise DraftError(f"a DFlash drafter drafts chains or static trees; got {type(tree).__name__} (an EAGLE-2 "
                             "dynamic tree needs a drafter forward per level)")
        if self.tree.depth > slots:
            raise DraftError(f"tree depth {self.tree.depth} exceeds the drafter's {slots} slots (block_size "
                             f"{head.block_size}); use a shallower tree or a drafter trained with a larger block")
        self.needs_hidden = head.taps  # the target hands over these layers' features, concatenated
        self.counters = DrafterCounters()
        self.forward_time = 0.0  # seconds inside the drafter's forwards (the engine's stats split on it)
        self._levels, self._parent, self._rank = self.tree.levels(), self.tree.parent, self.tree.rank

    @property
    def max_depth(self) -> int:
        return self.tree.depth

    @property
    def max_nodes(self) -> int:
        return len(self.tree)

    @property
    def device(self) -> torch.device:
        return self.head.get_output_embeddings().weight.device

    def check_target(self, target) -> None:
        vocab = int(self.head.get_output_embeddings().weight.shape[0])
        if vocab != target.vocab_size:
            raise IncompatibleModelsError(f"the DFlash drafter predicts {vocab} ids but the target has "
                                          f"{target.vocab_size}; load the drafter for this target")
        if self.device != target.device:
            raise DeviceMismatchError(f"drafter is on {self.device} but the target is on {target.device}; move it "
                                      "with the target")

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def begin(self, ctx: DraftContext, prefill: BlockOutput) -> None:
        """The prompt's features wait to be fed with the first block."""
        self.ctx = ctx
        b = len(ctx.history)
        self.kv = RaggedCache.new(self.head.model, b)
        self.next_positions = [0] * b  # context positions fed so far, per row
        feats = [prefill.hidden[i, : len(h) - 1] for i, h in enumerate(ctx.history)]
        self.pairs = PendingPairs([list(h[1:]) for h in ctx.history], feats)

    def propose(self, budgets: Sequence[int]) -> list[Draft]:
        caps = [min(self.max_depth, int(b)) for b in budgets]
        if max(caps, default=0) <= 0:
            return [Draft.empty() for _ in caps]
        logits = self._forward()  # (B, block - 1, V)
        self.counters.forwards += 1
        return [self._draft(r, logits[r], cap) if cap > 0 else Draft.empty() for r, cap in enumerate(caps)]

    def commit(self, updates: Sequence[RowUpdate], verify_out: BlockOutput | None) -> None:
        self.pairs.append_committed(updates, verify_out.hidden)

    def select_rows(self, rows: Sequence[int]) -> None:
        self.kv.select_rows(rows)
        self.pairs.select_rows(rows)
        take_rows(self, rows, "next_positions")

    # --- the block forward --------------------------------------------------------------------------------------
    @inference
    def _forward(self) -> torch.Tensor:
        """Feed every row's new context with its block; keep the context keys, drop the block's."""
        head, kv, dev = self.head, self.kv, self.device
        counts, bs = self.pairs.counts(), head.block_size
        context = padded_features(self.pairs.features).to(dev)  # (B, C, k * H)
        c = context.shape[1]
        pending = torch.tensor([h[-1] for h in self.ctx.history], device=dev)
        noise = torch.full((len(counts), bs), head.mask_token_id, dtype=torch.long, device=dev)
        noise[:, 0] = pending
        start = torch.tensor(self.next_positions, device=dev)[:, None]
        ctx_pos = start + torch.arange(c, device=dev)
        block_pos = start + torch.tensor(counts, device=dev)[:, None] + torch.arange(bs, device=dev)
        width = kv.width
        mask = block_mask(kv.lengths, width, counts, c, bs, context.dtype, dev)
        t0 = sync_time(dev)
        logits = head(noise, context, torch.cat([ctx_pos, block_pos], dim=1), mask, kv.cache)
        self.forward_time += sync_time(dev) - t0
        kv.appended(c + bs)
        kv.compact([range(width, width + n) for n in counts])
        self.next_positions = [p + n for p, n in zip(self.next_positions, counts)]
        self.pairs.clear()
        return logits[:, 1:]

    def _draft(self, row: int, logits: torch.Tensor, cap: int) -> Draft:
        """Row `row`'s draft from its slot logits (block - 1, V): the tree (or chain) cut to depth `cap`; every node
        at depth d draws its children from slot d."""
        spec, gen = self.ctx.spec_of(row), self.ctx.generators[row]
        toks: dict[int, int] = {}
        qs: dict[int, torch.Tensor | None] = {}
        for d, level in enumerate(self._levels[:cap]):
            width = max(self._rank[n] for n in level) + 1
            for p in dict.fromkeys(self._parent[n] for n in level):
                if p >= 0 and p not in toks:
                    continue
                picks, q = draw_children(spec, logits[d], width, gen)
                for n in level:
                    if self._parent[n] == p and self._rank[n] < len(picks):
                        toks[n], qs[n] = picks[self._rank[n]], q
        return tree_draft(toks, qs, self._parent)
