"""Reading a target's attention without switching it to eager attention.

DREAM (Hu et al. 2025, "DREAM: Drafting with Refined Target Features and Entropy-Adaptive Cross-Attention Fusion for
Multimodal Speculative Decoding") needs two statistics of the target's attention maps: the entropy of each query's
attention distribution in the early layers (to pick, per token, the intermediate feature its drafter is taught to
reproduce) and the attention mass the last prompt token pays each image token in the last layer (to decide which
image tokens the drafter keeps). `output_attentions=True` would force every layer of the model onto the slow eager
path and materialise every map. Instead `AttentionProbe` wraps transformers' attention dispatch for the duration of a
``with`` block: the watched layers' attention still runs through the model's own implementation (SDPA, eager, ...),
and the probe additionally recomputes softmax(q k^T * scale + mask) from the very query/key tensors that call
received, reduces it at once to a small statistic and drops the map. Unwatched modules (the vision tower, the
other layers) are not touched.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import nn

from mmspec.errors import UnsupportedModelError

Reducer = Callable[[torch.Tensor], torch.Tensor]  # attention weights (B, heads, Q, K) -> a statistic


def query_entropy(weights: torch.Tensor) -> torch.Tensor:
    """(B, heads, Q, K) -> (B, Q): entropy of each query's attention, averaged over heads."""
    return -torch.special.xlogy(weights, weights).sum(-1).mean(1)


def last_query_mass(weights: torch.Tensor) -> torch.Tensor:
    """(B, heads, Q, K) -> (B, K): the last query's attention to each key, summed over heads."""
    return weights[:, :, -1, :].sum(1)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The text decoder's layers of a causal LM or a VLM (the language model inside it)."""
    candidates = []
    if hasattr(model, "get_decoder"):
        try:
            candidates.append(model.get_decoder())
        except (AttributeError, NotImplementedError, TypeError):
            pass
    inner = getattr(model, "model", None)
    candidates += [getattr(inner, "language_model", None), inner, getattr(model, "language_model", None)]
    for c in candidates:
        layers = getattr(c, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(layers[0], "self_attn"):
            return list(layers)
    raise UnsupportedModelError(f"cannot find the text decoder layers of {type(model).__name__} (looked for "
                                ".get_decoder().layers and .model.language_model.layers with .self_attn)")


def attention_weights(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                      scaling: float | None) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) in float32: query (B, Hq, Q, D), key (B, Hkv, K, D) -> (B, Hq, Q, K).
    mask: bool (True = visible) or additive float, broadcastable to (B, Hq, Q, K); None = causal, the queries
    being the last Q positions of the K keys."""
    b, hq, q_len, d = query.shape
    k = key.repeat_interleave(hq // key.shape[1], dim=1) if key.shape[1] != hq else key
    scores = torch.matmul(query.float(), k.float().transpose(-1, -2)) * (scaling or d ** -0.5)  # (B, Hq, Q, K)
    if mask is None:
        k_len = k.shape[2]
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask[..., -k.shape[2]:], float("-inf"))
    else:
        scores = scores + mask[..., -k.shape[2]:].float()
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


class AttentionProbe:
    """``with AttentionProbe(model, layers=[0, 1], reduce=query_entropy) as probe: model(...)``, then
    ``probe.records[i]`` is the list of statistics layer ``layers[i]`` produced, one per forward call (a model
    called once gives one entry per layer)."""

    def __init__(self, model: nn.Module, layers: list[int], reduce: Reducer | list[Reducer] = query_entropy):
        """reduce: one reducer for every layer, or one per layer."""
        all_layers = decoder_layers(model)
        bad = [i for i in layers if not -len(all_layers) <= i < len(all_layers)]
        if bad:
            raise UnsupportedModelError(f"layers {bad} out of range: the model has {len(all_layers)} decoder layers")
        self.watched = {id(all_layers[i].self_attn): n for n, i in enumerate(layers)}
        self.reducers = list(reduce) if isinstance(reduce, (list, tuple)) else [reduce] * len(layers)
        self.records: list[list[torch.Tensor]] = [[] for _ in layers]
        self._saved: dict[str, tuple[bool, Callable | None]] = {}

    def __enter__(self) -> "AttentionProbe":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as registry

        for name in set(registry.keys()) | {"eager"}:
            had = name in registry._local_mapping
            self._saved[name] = (had, registry._local_mapping.get(name))
            registry[name] = self._wrap(name, registry.get(name))
        return self

    def __exit__(self, *exc) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as registry

        for name, (had, fn) in self._saved.items():
            if had:
                registry[name] = fn
            else:
                del registry[name]
        self._saved = {}

    def _wrap(self, name: str, inner: Callable | None) -> Callable:
        def probed(module, query, key, value, attention_mask, *args, **kwargs):
            fn = inner or sys.modules[type(module).__module__].eager_attention_forward  # eager: the family's own
            out = fn(module, query, key, value, attention_mask, *args, **kwargs)
            slot = self.watched.get(id(module))
            if slot is not None:
                with torch.no_grad():
                    w = attention_weights(query, key, attention_mask, kwargs.get("scaling"))
                    self.records[slot].append(self.reducers[slot](w))
            return out

        return probed
