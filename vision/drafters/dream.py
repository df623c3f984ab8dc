"""DREAM drafter (Hu et al. 2025, "DREAM: Drafting with Refined Target Features and Entropy-Adaptive Cross-Attention
Fusion for Multimodal Speculative Decoding", NeurIPS 2025).

The head keeps EAGLE's interface (it reads the pairs (x_{t+1}, f_t), predicts f_{t+1}, and shares the target's
frozen embeddings and LM head), but its decoder is three blocks:

    self-attention block  ->  gated cross-attention block  ->  self-attention block

In the middle block the queries come from the draft's hidden states and the keys/values from the target feature
stream the head is fed (f_t at pair t: the target's hidden states shifted by one; while drafting, the head's own
predictions at drafted positions, exactly as EAGLE feeds them). Both residual branches of that block are scaled by
tanh(g) with g = 0 at initialisation (Flamingo-style gating), so the untrained head starts as a two-layer EAGLE
head. The keys/values live in the head's KV cache like any layer's, so tree masks, positions and cache compaction
of the engine apply unchanged.

Training (vision.train, loss="dream") adds DREAM's intermediate-feature loss: the output of the cross-attention
block at position t+1 regresses onto the target's hidden state at t+1 entering the layer whose attention (at that
token) has minimum entropy among the first 40% of the target's layers (`vision.attention_probe`). DREAM's visual
compression, keeping the image tokens the target attends to most, is `vision.compressors.AttentionPrune` fed the
target's last-layer attention mass (`EagleDrafter(..., compressor=AttentionPrune(r))`).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, apply_rotary_pos_emb

from mmspec.compat import cache_kwargs
from mmspec.errors import InvalidInputError

from .eagle import EagleDrafter, EagleHead


class GatedCrossAttention(nn.Module):
    """h + tanh(g_a) * Attn(q = h, k/v = features) followed by h + tanh(g_m) * MLP(h), pre-norm, causal."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        hidden = config.hidden_size
        self.query_norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.source_norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.attn = LlamaAttention(config, layer_idx)
        self.mlp_norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, h, source, mask, position_embeddings, cache=None) -> torch.Tensor:
        a = self.attn
        shape = (*h.shape[:-1], -1, a.head_dim)
        q = a.q_proj(self.query_norm(h)).view(shape).transpose(1, 2)  # (B, heads, M, D)
        src = self.source_norm(source.to(h.dtype))
        k = a.k_proj(src).view(shape).transpose(1, 2)  # (B, kv_heads, M, D)
        v = a.v_proj(src).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, a.layer_idx)  # (B, kv_heads, K, D): the features of every visible slot
        o, _ = sdpa_attention_forward(a, q, k, v, mask, scaling=a.scaling, dropout=0.0)
        h = h + torch.tanh(self.attn_gate) * a.o_proj(o.reshape(*h.shape[:-1], -1))
        return h + torch.tanh(self.mlp_gate) * self.mlp(self.mlp_norm(h))


class DreamHead(EagleHead):
    """An EAGLE-compatible feature head whose middle decoder block is DREAM's gated cross-attention."""

    KIND = "mmspec.dream"

    def __init__(self, target: nn.Module, layers: int = 3, taps: tuple[int, ...] | None = None,
                 image_token_id: int | None = None, compressor: nn.Module | None = None):
        """layers: decoder blocks, odd and >= 3 (DREAM: 3); the middle one is the cross-attention block."""
        if not isinstance(layers, int) or layers < 3 or layers % 2 == 0:
            raise InvalidInputError(f"layers={layers!r}: a DREAM head has an odd number >= 3 of blocks (self-attention "
                                    "around one cross-attention block)")
        super().__init__(target, layers=layers, taps=taps, image_token_id=image_token_id, compressor=compressor)
        self.cross_index = layers // 2
        self.body.layers[self.cross_index] = GatedCrossAttention(self.config, self.cross_index)
        self.to(device=self.fc.weight.device, dtype=self.fc.weight.dtype)

    def _decode(self, x, features, attention_mask, position_ids, cache, use_cache):
        """(predicted features (B, M, H), {"cross_hidden": the cross-attention block's output (B, M, H)})."""
        body = self.body
        cache = cache if use_cache else None
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(x.shape[1], device=x.device) + seen).unsqueeze(0)
        mask = create_causal_mask(config=body.config, inputs_embeds=x, attention_mask=attention_mask,
                                  position_ids=position_ids, **cache_kwargs(create_causal_mask, cache))
        rope = body.rotary_emb(x, position_ids=position_ids)
        h, cross = x, None
        for i, layer in enumerate(body.layers):
            if i == self.cross_index:
                h = cross = layer(h, features, mask, rope, cache)
            else:
                h = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=position_ids,
                          use_cache=use_cache, **cache_kwargs(layer, cache))
        return body.norm(h), {"cross_hidden": cross}


class DreamDrafter(EagleDrafter):
    """The DREAM head in the engine's Drafter protocol: EAGLE's feeding (chains, static and EAGLE-2 dynamic trees,
    committed tokens re-fed with the target's features), a DREAM head inside."""

    def __init__(self, head: DreamHead, tree=4, compressor=None, image_token_id: int | None = None):
        if not isinstance(head, DreamHead):
            raise InvalidInputError(f"head must be a DreamHead, got {type(head).__name__} (use EagleDrafter)")
        super().__init__(head, tree=tree, compressor=compressor, image_token_id=image_token_id)
