"""Gemma 4's assistant model as a drafter (`Gemma4AssistantForCausalLM`: multi-token prediction over the target's
own KV cache, as transformers' ``SinglePositionMultiTokenCandidateGenerator`` runs it).

The assistant has no keys of its own: every one of its layers attends, with a single query per drafted token, to
the keys and values of the target's last non-shared layer of the same type (full or sliding attention), i.e. to
the target's cache itself. Its input is ``[embed(x); h]``: the target's embedding of the token it continues and a
hidden state, first the target's last hidden state before the pending token, then its own projected output; every
query sits at the pending token's position. So a draft of depth d costs d assistant forwards over one query per
row (a tree level: one forward over that level's nodes, which never see each other).

mmspec reads the target's cache after each verification has compacted it (``DraftContext.target_cache``, read
only): a row sees exactly its committed keys, never a rejected draft's (for the sliding layers, the last `window`
of them), whatever the other rows of the batch committed. Chains and static trees; greedy or sampled (children drawn
without replacement from the warped distribution, recorded per node), any batch size (transformers: batch 1).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from mmspec.drafters.base import DraftContext, DrafterCounters, RowUpdate
from mmspec.drafters.features import committed_features
from mmspec.errors import DraftError, IncompatibleModelsError, UnsupportedModelError
from mmspec.inference import inference
from mmspec.target import BlockOutput, sync_time, text_config
from mmspec.sampling import draw_children
from mmspec.tree import Draft, StaticTree, tree_draft


def store_layers(config) -> dict[str, int]:
    """Layer type -> index of the target's layer whose keys the KV-shared layers (and the assistant) read: the last
    non-shared layer of that type (transformers' ``kv_sharing_modes`` "store")."""
    modes = getattr(config, "kv_sharing_modes", None) or []
    types = list(getattr(config, "layer_types", None) or [])
    found = {types[i]: i for i, m in enumerate(modes) if m == "store"}
    if not found:
        raise UnsupportedModelError(f"{type(config).__name__} shares no KV cache (num_kv_shared_layers = 0): a "
                                    "Gemma 4 assistant needs a target whose last layers share keys")
    return found


class AssistantDrafter:
    """`Gemma4AssistantForCausalLM` in the engine's Drafter protocol (see the module docstring)."""

    needs_hidden = True  # the target's last hidden state before the pending token
    trusted = True

    def __init__(self, assistant: nn.Module, tree: StaticTree | int = 4):
        if not type(assistant).__name__.startswith(("Gemma4Assistant", "Gemma4UnifiedAssistant")):
            raise UnsupportedModelError(f"{type(assistant).__name__} is not a Gemma 4 assistant model "
                                        "(Gemma4AssistantForCausalLM)")
        self.assistant = assistant.eval()
        self.tree = StaticTree.chain(tree) if isinstance(tree, int) else tree
        if not isinstance(self.tree, StaticTree):
            raise DraftError(f"the assistant drafts chains or static trees; got {type(tree).__name__}")
        self._levels, self._parent, self._rank = self.tree.levels(), self.tree.parent, self.tree.rank
        self._n_children = self.tree.topology()[0]  # [root, node 0, node 1, ...]
        self.counters = DrafterCounters()
        self.forward_time = 0.0
        self.layers: dict[str, int] | None = None  # the target's store layer per type (check_target)
        self.window: int | None = None
        self.embed = None

    @property
    def max_depth(self) -> int:
        return self.tree.depth

    @property
    def max_nodes(self) -> int:
        return len(self.tree)

    @property
    def device(self) -> torch.device:
        return self.assistant.lm_head.weight.device

    def check_target(self, target) -> None:
        model = getattr(target, "model", None)
        tc = text_config(model)
        self.layers = store_layers(tc)
        missing = sorted(set(self.assistant.config.get_text_config().layer_types) - set(self.layers))
        if missing:  # (transformers would fail on a KeyError in the assistant's forward)
            raise IncompatibleModelsError(f"the assistant has {' and '.join(missing)} layers, but this target stores "
                                          f"no keys of that type (its layers: {sorted(set(tc.layer_types))})")
        self.window = int(tc.sliding_window) if "sliding_attention" in self.layers else None
        backbone = int(self.assistant.config.backbone_hidden_size)
        vocab = int(self.assistant.config.get_text_config().vocab_size)
        if backbone != int(tc.hidden_size) or vocab != target.vocab_size:
            raise IncompatibleModelsError(f"the assistant was made for a target of hidden size {backbone} and "
                                          f"vocabulary {vocab}; this target has {tc.hidden_size} and "
                                          f"{target.vocab_size}")
        self.embed = model.get_input_embeddings()  # the target's (scaled) embedding, as transformers feeds it

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def begin(self, ctx: DraftContext, prefill: BlockOutput) -> None:
        if ctx.target_cache is None:
            raise UnsupportedModelError("the assistant reads the target's KV cache, which this target does not "
                                        "expose (DraftContext.target_cache)")
        self.ctx = ctx
        self.hidden = torch.stack([prefill.hidden[i, len(h) - 2] for i, h in enumerate(ctx.history)])  # (B, H)

    def commit(self, updates: Sequence[RowUpdate], verify_out: BlockOutput | None) -> None:
        self.hidden = torch.stack([committed_features(u, verify_out.hidden[b])[-1] for b, u in enumerate(updates)])

    def select_rows(self, rows: Sequence[int]) -> None:
        self.hidden = self.hidden[torch.as_tensor(list(rows), device=self.hidden.device)]

    # --- drafting -----------------------------------------------------------------------------------------------
    def propose(self, budgets: Sequence[int]) -> list[Draft]:
        caps = [min(self.max_depth, int(b)) for b in budgets]
        if max(caps, default=0) <= 0:
            return [Draft.empty() for _ in caps]
        kv, masks, pos = self._view()
        b = len(caps)
        toks: list[dict[int, int]] = [dict() for _ in range(b)]
        qs: list[dict[int, torch.Tensor | None]] = [dict() for _ in range(b)]
        # per row, the nodes whose children this level drafts: (node id, -1 for the root; its token; its hidden)
        frontier = [[(-1, self.ctx.history[r][-1], self.hidden[r])] for r in range(b)]
        for d, level in enumerate(self._levels):
            rows = [r for r in range(b) if caps[r] > d and frontier[r]]
            if not rows:
                break
            logits, proj = self._forward([frontier[r] for r in rows], kv, masks, pos, rows)
            nxt = {r: [] for r in rows}
            for i, r in enumerate(rows):
                for j, (node, _, _) in enumerate(frontier[r]):
                    kids = [n for n in level if self._parent[n] == node]
                    if not kids:
                        continue
                    picks, q = draw_children(self.ctx.spec_of(r), logits[i, j], max(self._rank[n] for n in kids) + 1,
                                             self.ctx.generators[r])
                    for n in kids:
                        if self._rank[n] < len(picks):
                            toks[r][n], qs[r][n] = picks[self._rank[n]], q
                            nxt[r].append((n, picks[self._rank[n]], proj[i, j]))
            frontier = [[f for f in nxt.get(r, []) if self._n_children[f[0] + 1]] for r in range(b)]
        return [tree_draft(toks[r], qs[r], self._parent) for r in range(b)]

    def _view(self):
        """The target's store-layer keys / values (B, h, K, d) per type, each row's additive mask per type (B, K)
        and each row's query position (the pending token's)."""
        rc = self.ctx.target_cache
        layers = rc.cache.layers
        kv = {t: (layers[i].keys[:, :, : rc.width], layers[i].values[:, :, : rc.width]) for t, i in self.layers.items()}
        dtype = next(iter(kv.values()))[0].dtype
        slot = torch.arange(rc.width, device=self.device)
        length = torch.tensor(rc.lengths, device=self.device)[:, None]
        pos = torch.tensor([len(h) - 1 for h in self.ctx.history], device=self.device)
        visible = {"full_attention": slot < length}
        if self.window is not None:
            visible["sliding_attention"] = (slot < length) & (pos[:, None] - slot < self.window)
        masks = {t: torch.zeros(v.shape, dtype=dtype, device=self.device).masked_fill_(~v, torch.finfo(dtype).min)
                 for t, v in visible.items()}
        return kv, masks, pos

    @inference
    def _forward(self, nodes, kv, masks, pos, rows):
        """One assistant forward over each given row's nodes (right-padded): (logits (R, N, V), projected (R, N, H))."""
        a, n = self.assistant, max(len(f) for f in nodes)
        tok = torch.zeros(len(rows), n, dtype=torch.long, device=self.device)
        hid = self.hidden.new_zeros(len(rows), n, self.hidden.shape[-1])
        for i, f in enumerate(nodes):
            for j, (_, t, h) in enumerate(f):
                tok[i, j], hid[i, j] = t, h
        idx = torch.tensor(rows, device=self.device)
        x = torch.cat([self.embed(tok).to(hid.dtype), hid], dim=-1)
        shared = {t: (k[idx], v[idx]) for t, (k, v) in kv.items()}
        mask = {t: m[idx][:, None, None, :].expand(-1, 1, n, -1) for t, m in masks.items()}
        t0 = sync_time(self.device)
        out = a.model(inputs_embeds=a.pre_projection(x), attention_mask=mask,
                      position_ids=pos[idx][:, None].expand(-1, n), shared_kv_states=shared, use_cache=False)
        last = out.last_hidden_state
        logits = a.masked_embedding(last, a.lm_head.weight) if a.config.use_ordered_embeddings else a.lm_head(last)
        proj = a.post_projection(last)
        self.forward_time += sync_time(self.device) - t0
        self.counters.forwards += 1
        return logits, proj
