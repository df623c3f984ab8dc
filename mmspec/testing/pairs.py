"""Offline target/drafter pairs for benchmarks: a tiny random LLaMA and a layer-truncated self-draft of it.

This is a stand-in for a real (target, drafter) pair until the project's trained zoo exists; nothing here touches
the hub. A random drafter would agree with a random target almost never, and an exact copy always; neither says
anything about an engine. `layer_pair` builds a pair in between by construction:

* the target is a ``tiny_llama`` whose weights are widened (N(0, std) on every matrix, so greedy continuations are
  diverse, not one repeated token) and whose layers 1..L-1 have their residual-branch output projections
  (``self_attn.o_proj`` and ``mlp.down_proj``) scaled by ``damp``: those layers only nudge the residual stream
  that layer 0 wrote;
* the drafter is a 1-layer LLaMA with the target's config otherwise, holding copies of the target's embeddings,
  layer 0, final norm and lm_head (a layer-truncated self-draft, as in LayerSkip / Draft&Verify, without the
  training). It predicts the target's next token exactly when the damped layers do not flip the argmax.

``damp`` sets the agreement: 0 gives an exact copy (everything accepted), 1 an ordinary 4-layer model whose first
layer is a poor predictor (alpha ~ 0.05). The default 0.15 (with std 0.15) gives greedy depth-1 acceptance of about
0.6-0.7 on random prompts, i.e. both the accept and the reject paths are taken often, as with a real small drafter.
"""
from __future__ import annotations

import copy

import torch
from transformers import LlamaForCausalLM

from .tiny import tiny_llama


@torch.no_grad()
def layer_pair(seed: int = 0, vocab: int = 512, hidden: int = 256, layers: int = 4, damp: float = 0.15,
               dtype=torch.float32, *, std: float = 0.15) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """(target, drafter): an L-layer random LLaMA with damped upper layers and its 1-layer self-draft (see module).

    Deterministic in `seed`. Both models are in eval mode, in `dtype`, and share the vocabulary (as a drafter must).
    """
    if layers < 2:
        raise ValueError(f"layers={layers}: the target needs at least 2 layers for a 1-layer self-draft to differ")
    target = tiny_llama(seed=seed, vocab=vocab, hidden=hidden, layers=layers, std=std, dtype=torch.float32)
    for layer in target.model.layers[1:]:
        layer.self_attn.o_proj.weight.mul_(damp)
        layer.mlp.down_proj.weight.mul_(damp)

    cfg = copy.deepcopy(target.config)
    cfg.num_hidden_layers = 1
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:1]
    with torch.random.fork_rng(devices=[]):  # the init is overwritten below; leave the caller's RNG alone
        drafter = LlamaForCausalLM(cfg)
    wanted = drafter.state_dict().keys()  # embed_tokens, layers.0.*, norm, lm_head (+ nothing else)
    source = target.state_dict()
    missing = [k for k in wanted if k not in source]
    if missing:
        raise RuntimeError(f"target has no weights for drafter parameters {missing}")
    drafter.load_state_dict({k: source[k] for k in wanted}, strict=True)
    return target.to(dtype).eval(), drafter.to(dtype).eval()


def distinct_fraction(tokens) -> float:
    """Distinct tokens / tokens: near 1 for diverse text, near 0 for a model stuck on one token."""
    tokens = list(tokens)
    return len(set(tokens)) / len(tokens) if tokens else 0.0
