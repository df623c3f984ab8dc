"""Pluggable image-token compressors for feature-level VLM drafters, and the registry that rebuilds them.

Every compressor maps (B, N, D) image features to a CompressedImage of M tokens (see `base.py`). A drafter
checkpoint stores `compressor.config()` next to its weights; `build_compressor(config)` rebuilds the module
and `load_state_dict` restores the learnable ones.

    "none"             Identity        no compression
    "avg_pool"         AvgPool         2-D average pooling, stride s (train-free)
    "attention_prune"  AttentionPrune  top ceil(r * N) tokens by target attention (DREAM, train-free)
    "conv"             Conv            depthwise-separable strided conv, initialised to avg_pool (SpecVLM)
    "resampler"        Resampler       learnable queries + cross-attention (Perceiver / Q-Former-lite)
    "vispec"           ViSpec          resampler tokens + a global vector fused into text (ViSpec)
    "elastic"          Elastic         picks one of several per input (SpecVLM)
"""
from __future__ import annotations

from mmspec.errors import InvalidInputError

from .attention_prune import AttentionPrune
from .avg_pool import AvgPool
from .base import CompressedImage, Compressor
from .conv import Conv
from .elastic import Elastic
from .identity import Identity
from .resampler import Resampler
from .vispec import ViSpec

COMPRESSORS: dict[str, type[Compressor]] = {
    c.type: c for c in (Identity, AvgPool, AttentionPrune, Conv, Resampler, ViSpec, Elastic)}


def build_compressor(config: dict) -> Compressor:
    """Rebuild a compressor from `Compressor.config()` (after a JSON round trip); nested for `elastic`."""
    if not isinstance(config, dict) or config.get("type") not in COMPRESSORS:
        got = config.get("type") if isinstance(config, dict) else config
        raise InvalidInputError(f"unknown compressor type {got!r}; expected one of {sorted(COMPRESSORS)}")
    cls = COMPRESSORS[config["type"]]
    kwargs = {k: v for k, v in config.items() if k != "type"}
    if cls is Elastic and isinstance(kwargs.get("compressors"), list):
        kwargs["compressors"] = [build_compressor(c) for c in kwargs["compressors"]]
    try:
        return cls(**kwargs)
    except TypeError as e:  # an argument this compressor does not take
        raise InvalidInputError(f"bad arguments {sorted(kwargs)} for compressor type {config['type']!r}: {e}") from e


__all__ = ["Compressor", "CompressedImage", "build_compressor", "COMPRESSORS", "Identity", "AvgPool",
           "AttentionPrune", "Conv", "Resampler", "ViSpec", "Elastic"]
