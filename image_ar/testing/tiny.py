"""Tiny random models built offline: LlamaGen GPTs and VQ tokenizers, and continuous-token ARs (MAR-style heads).

Default initialisation makes tiny models repeat one token, which would let equality tests pass vacuously
(ARCHITECTURE.md, Tests): every matrix of the GPT is redrawn from N(0, std).
"""
from __future__ import annotations

import copy

import torch

from mmspec.errors import InvalidInputError
from mmspec.testing import widen_

from ..models.continuous_ar import ContinuousAR, ContinuousARConfig
from ..models.llamagen import LlamaGen, LlamaGenConfig
from ..models.vq import VQTokenizer, llamagen_vq_config


def tiny_llamagen(seed: int = 0, vocab_size: int = 64, grid_size: int = 4, num_classes: int = 10,
                  model_type: str = "c2i", dim: int = 64, n_layer: int = 2, n_head: int = 4,
                  n_kv_head: int | None = 2, cls_token_num: int | None = None, caption_dim: int = 16,
                  class_dropout_prob: float = 0.1, std: float = 0.2, dtype=torch.float32) -> LlamaGen:
    """A LlamaGen of a few thousand parameters (c2i: one class slot; t2i: 3 caption slots of caption_dim)."""
    cfg = LlamaGenConfig(vocab_size=vocab_size, dim=dim, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                         multiple_of=16, grid_size=grid_size, num_classes=num_classes, model_type=model_type,
                         cls_token_num=cls_token_num or (1 if model_type == "c2i" else 3), caption_dim=caption_dim,
                         class_dropout_prob=class_dropout_prob)
    torch.manual_seed(seed)
    model = LlamaGen(cfg)
    widen_(model, std, seed)
    if model_type == "t2i":
        g = torch.Generator().manual_seed(seed + 1)
        model.cls_embedding.uncond_embedding.copy_(torch.randn(cfg.cls_token_num, caption_dim, generator=g))
    return model.to(dtype).eval()


def tiny_vq(kind: str = "llamagen", codebook_size: int = 64, embed_dim: int = 8, image_size: int = 8,
            channels: tuple[int, ...] = (32, 64), z_channels: int = 32, seed: int = 0) -> VQTokenizer:
    """A VQ tokenizer with downsample factor 2**(len(channels)-1) (default 8x8 images <-> 4x4 codes).

    kind "llamagen": LlamaGen's architecture (attention at the lowest resolution, l2-normalised codebook);
    "diffusers": a plain diffusers VQModel (no attention in the levels, raw codebook, Euclidean lookup).
    """
    from diffusers import VQModel

    torch.manual_seed(seed)
    if kind == "llamagen":
        vq = VQModel(**llamagen_vq_config(channels, layers_per_block=1, z_channels=z_channels, embed_dim=embed_dim,
                                          codebook_size=codebook_size, image_size=image_size))
    elif kind == "diffusers":
        n = len(channels)
        vq = VQModel(block_out_channels=tuple(channels), layers_per_block=1, latent_channels=z_channels,
                     down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                     vq_embed_dim=embed_dim, num_vq_embeddings=codebook_size, sample_size=image_size,
                     norm_num_groups=8)
    else:
        raise InvalidInputError(f"tiny_vq kind {kind!r}: expected 'llamagen' or 'diffusers'")
    with torch.no_grad():  # spread the codes out (diffusers draws them from U(-1/V, 1/V))
        g = torch.Generator().manual_seed(seed)
        vq.quantize.embedding.weight.copy_(torch.randn(codebook_size, embed_dim, generator=g))
    return VQTokenizer(vq.eval(), l2_norm=kind == "llamagen")


def tiny_continuous_config(**kw) -> ContinuousARConfig:
    base = dict(token_dim=2, grid_size=2, dim=32, n_layer=2, n_head=2, num_classes=3, head_width=32, head_depth=2,
                train_steps=100, sampling_steps=4, noise_schedule="linear")
    base.update(kw)
    return ContinuousARConfig(**base)


def tiny_continuous(seed: int = 0, head_scale: float = 0.05, **kw) -> ContinuousAR:
    """Random weights everywhere (the head's AdaLN-Zero init would output zeros: give it random weights too)."""
    torch.manual_seed(seed)
    model = ContinuousAR(tiny_continuous_config(**kw)).eval()
    with torch.no_grad():
        for p in model.diffloss.parameters():
            p.normal_(0, head_scale)
    return model


def perturbed(model: ContinuousAR, sigma: float, seed: int = 1) -> ContinuousAR:
    """A copy whose every weight moves by N(0, sigma^2): a drafter close to the target."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(sigma * torch.randn(p.shape, generator=g))
    return out
