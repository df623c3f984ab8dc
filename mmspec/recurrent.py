"""Targets whose layers keep a recurrent state instead of keys and values (hybrid linear attention: Qwen3.5's Gated
DeltaNet layers between full-attention ones, and any transformers model built the same way).

A recurrent layer cannot be cropped after a rejection, and a tree of drafts needs one state per branch. So the
engine keeps these layers' states itself, per request (:class:`RecurrentStates`: the depthwise convolution's last
inputs and the recurrence's state, per layer), and verifies a block with per-node state snapshots, as STree does for
trees on state-space models (Wu et al. 2025): in topological order, each node runs the layer's own one-token decode
step from its parent's state (the committed state for the block's first token), so node j's state is exactly the
state sequential decoding reaches after the path root .. j. After acceptance, each request keeps the state of its
last accepted node (`keep`). Padding nodes start from the committed state and are never kept.

The layer's own code does the arithmetic (its decode step is called once per node, its prefill path once per
request), through a small cache object that holds one node's state (`_NodeCache`); only the order of calls and
where the states go are the engine's. The transformers cache keeps the full-attention layers' keys and values as for
any model (`mmspec.cache.kv_layers` skips the recurrent layers).

Prompts are run per request (no padding enters a recurrence), through the layer's own prefill path.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import UnsupportedModelError


class _NodeCache:
    """The part of transformers' cache API a linear-attention layer calls, over one state: conv (B, C, K) and the
    recurrence's state, both None for a prompt (the layer's prefill path)."""

    def __init__(self, conv: torch.Tensor | None = None, rec: torch.Tensor | None = None):
        self.conv, self.rec = conv, rec

    def get_conv_state(self, layer_idx: int, state_idx: int = 0):
        return self.conv

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        return self.rec

    def is_recording_past(self, layer_idx: int | None = None) -> bool:
        return False

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        return 0

    def increase_count(self, layer_idx: int, state_idx: int = 0) -> None:
        return None

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                          conv_kernel_size: int | None = None, **kwargs) -> torch.Tensor:
        """A prompt's inputs (B, C, T): keep the last K (left-padded with zeros), return them padded to K as the
        layer's own cache does."""
        k = conv_kernel_size or conv_states.shape[-1]
        full = conv_states if conv_states.shape[-1] >= k else torch.nn.functional.pad(
            conv_states, (k - conv_states.shape[-1], 0))
        self.conv = full[..., -k:].clone()
        return full

    def update_recurrent_state(self, state, layer_idx: int, state_idx: int = 0, **kwargs):
        self.rec = state if isinstance(state, torch.Tensor) else state[-1]
        return self.rec


def recurrent_layers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Layer index -> the module of each recurrent (linear-attention) layer of a transformers model; {} when none.

    A layer counts when the decoder's config names it "linear_attention" in `layer_types`; its module is the
    decoder layer's `linear_attn` (the transformers convention for hybrid models)."""
    cfg = model.config
    cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    types = list(getattr(cfg, "layer_types", None) or [])
    if "linear_attention" not in types:
        return {}
    layers = None
    for module in model.modules():
        candidate = getattr(module, "layers", None)
        if isinstance(candidate, torch.nn.ModuleList) and len(candidate) >= len(types) and all(
                hasattr(candidate[i], "linear_attn") for i, t in enumerate(types) if t == "linear_attention"):
            layers = candidate
            break
    if layers is None:
        raise UnsupportedModelError(f"{type(model).__name__} has linear-attention layers but no decoder layer holds "
                                    "them as `.linear_attn`; its recurrent states cannot be kept per draft node")
    return {i: layers[i].linear_attn for i, t in enumerate(types) if t == "linear_attention"}


@dataclass
class RecurrentStates:
    """Per layer index: conv (B, C, K) and recurrent state (B, ...) of each request; `pending` holds the last
    block's per-node states (B, M, ...) until `keep` picks each request's."""

    conv: dict[int, torch.Tensor]
    rec: dict[int, torch.Tensor]
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def keep(self, last: Sequence[int | None]) -> None:
        """Row b takes the state of block node last[b] (None: the row keeps its state, e.g. it just finished)."""
        if self.pending is None:
            return
        rows = [b for b, j in enumerate(last) if j is not None]
        if rows:
            r = torch.tensor(rows)
            j = torch.tensor([last[b] for b in rows])
            for i, (conv, rec) in self.pending.items():
                dev = conv.device
                self.conv[i] = self.conv[i].index_put((r.to(dev),), conv[r.to(dev), j.to(dev)])
                self.rec[i] = self.rec[i].index_put((r.to(rec.device),), rec[r.to(rec.device), j.to(rec.device)])
        self.pending = None

    def select_rows(self, rows: Sequence[int]) -> None:
        for store in (self.conv, self.rec):
            for i, t in store.items():
                store[i] = t[torch.tensor(list(rows), device=t.device)]
        self.pending = None


def block_parents(allowed: torch.Tensor | None, b: int, m: int) -> torch.Tensor:
    """Each block token's parent (B, M) in the block (-1: the committed state) from the block's visibility (B, M, M)
    (ancestor closure: the parent is the latest ancestor), or a chain when None."""
    idx = torch.arange(m)
    if allowed is None:
        return (idx - 1).expand(b, m)
    earlier = allowed.cpu() & (idx[None, :] < idx[:, None])[None]
    return (earlier.long() * (idx + 1)).max(-1).values - 1


@contextlib.contextmanager
def prompt_mode(layers: dict[int, torch.nn.Module], lengths: Sequence[int], store: dict):
    """Within it, each recurrent layer runs every request's prompt alone (its first lengths[b] tokens; padding never
    enters the recurrence) through its own prefill path; the final states go to store["conv"/"rec"][layer]."""
    store.update(conv={}, rec={})

    def make(i, module):
        def forward(hidden_states, cache=None, attention_mask=None, **kwargs):
            out = torch.zeros(*hidden_states.shape[:2], module.out_proj.out_features, dtype=hidden_states.dtype,
                              device=hidden_states.device)
            convs, recs = [], []
            for b, n in enumerate(lengths):
                node = _NodeCache()
                out[b, :n] = type(module).forward(module, hidden_states[b: b + 1, :n], cache=node)[0]
                convs.append(node.conv)
                recs.append(node.rec)
            store["conv"][i], store["rec"][i] = torch.cat(convs), torch.cat(recs)
            return out
        return forward

    with _replaced(layers, make):
        yield


@contextlib.contextmanager
def block_mode(layers: dict[int, torch.nn.Module], states: RecurrentStates, parents: torch.Tensor):
    """Within it, each recurrent layer runs a block node by node (topological order), each node's one-token step
    starting from its parent's state (`parents` (B, M), -1 = the committed state); the per-node states go to
    `states.pending` for `keep`."""
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def make(i, module):
        def forward(hidden_states, cache=None, attention_mask=None, **kwargs):
            b, m = hidden_states.shape[:2]
            par = parents.to(hidden_states.device)
            rows = torch.arange(b, device=hidden_states.device)
            conv0, rec0 = states.conv[i], states.rec[i]
            convs = conv0.new_empty((b, m, *conv0.shape[1:]))
            recs = rec0.new_empty((b, m, *rec0.shape[1:]))
            outs = []
            for j in range(m):
                p = par[:, j]
                root = (p < 0).view(-1, *([1] * (conv0.dim() - 1)))
                conv = torch.where(root, conv0, convs[rows, p.clamp(min=0)])
                rec = torch.where(root.view(-1, *([1] * (rec0.dim() - 1))), rec0, recs[rows, p.clamp(min=0)])
                node = _NodeCache(conv.clone(), rec)
                outs.append(type(module).forward(module, hidden_states[:, j: j + 1], cache=node))
                convs[:, j], recs[:, j] = node.conv, node.rec
            pending[i] = (convs, recs)
            return torch.cat(outs, dim=1)
        return forward

    with _replaced(layers, make):
        yield
    states.pending = pending


@contextlib.contextmanager
def _replaced(layers: dict[int, torch.nn.Module], make):
    """Give each layer module the forward `make(index, module)` for the duration (an instance attribute, removed
    afterwards, so the model is left exactly as it was)."""
    try:
        for i, module in layers.items():
            module.forward = make(i, module)
        yield
    finally:
        for module in layers.values():
            module.__dict__.pop("forward", None)
