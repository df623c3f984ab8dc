"""LlamaGen: a Llama-architecture GPT over VQ image tokens, class- (c2i) or text-conditional (t2i).

Sun et al. 2024, "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation" (arXiv:2406.06525);
reference code: FoundationVision/LlamaGen, autoregressive/models/gpt.py and generate.py.

Kept from the reference on purpose, so that released checkpoints give the same logits:
- parameter names (`tok_embeddings`, `cls_embedding.embedding_table`, `layers.N.attention.wqkv`, ...): a reference
  state dict loads as is (its `freqs_cis` / KV-cache buffers are dropped);
- 2-D RoPE: each head's dimension is split in halves, the first rotated by the token's grid row, the second by its
  column, over interleaved pairs (gpt-fast's layout). The class/caption prefix gets the reference's *zero* table
  (cos = sin = 0, `precompute_freqs_cis_2d`), not identity rotations: prefix queries and keys are zero vectors, so
  every attention score against a prefix key is 0 and the prefix acts through its values only;
- the null class (CFG) is row `num_classes` of the class table, which exists iff `class_dropout_prob > 0`;
- t2i: caption embeddings (B, L, caption_dim) go through `cap_proj` (Linear, GELU-tanh, Linear; no biases); the
  unconditional caption is the learned buffer `cls_embedding.uncond_embedding` (L, caption_dim).
Ours: explicit positions and 4-D boolean masks (tree verification), an appendable / croppable / gatherable
`BufferCache`, typed errors, the loaders, and `generate_tokens`, the plain AR reference sampler (CFG as a batched
[cond; uncond] pass, logits `u + s (c - u)` before temperature / top-k / top-p, as in the reference's generate.py).
The reference's dropout / drop-path (training regularisers) are left out; class dropout is explicit (`cond_drop`).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmspec.cache import BufferCache
from mmspec.checkpoint import checkpoint_kind, read_kind_config, write_checkpoint
from mmspec.errors import CheckpointError, ContextOverflowError, InvalidInputError, UnsupportedModelError
from mmspec.guidance import combine_logits
from mmspec.sampling import SamplingSpec, make_generators, sample_from

# (dim, n_layer, n_head) of the paper's models (gpt.py's GPT_models); c2i: B..XXXL, t2i: 1B..7B.
PRESETS = {
    "GPT-B": (768, 12, 12), "GPT-L": (1024, 24, 16), "GPT-XL": (1280, 36, 20), "GPT-XXL": (1536, 48, 24),
    "GPT-XXXL": (2560, 48, 40), "GPT-1B": (2048, 22, 32), "GPT-3B": (3200, 24, 32), "GPT-7B": (4096, 32, 32),
}
CONFIG_NAME, WEIGHTS_NAME, KIND = "config.json", "model.safetensors", "mmspec.llamagen"


@dataclass
class LlamaGenConfig:
    """Hyper-parameters (the reference's ModelArgs, minus training-only fields, plus `grid_size` and `ffn_dim`).

    The sequence is `cls_token_num` prefix slots (class label: 1; t2i: caption length) then grid_size**2 image
    tokens in raster order; position p >= cls_token_num is grid cell (p - cls_token_num) -> (row, col).
    `ffn_dim` overrides the reference's SwiGLU width rule (find_multiple(int(8 dim / 3) * multiplier, multiple_of)).
    """

    vocab_size: int = 16384
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    ffn_dim: int | None = None
    grid_size: int = 16
    num_classes: int = 1000
    cls_token_num: int = 1
    model_type: str = "c2i"
    caption_dim: int = 2048
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    class_dropout_prob: float = 0.1

    def __post_init__(self):
        def bad(field, why):
            raise InvalidInputError(f"LlamaGenConfig.{field}={getattr(self, field)!r}: {why}")

        if self.model_type not in ("c2i", "t2i"):
            bad("model_type", "expected 'c2i' (class labels) or 't2i' (caption embeddings)")
        for f in ("vocab_size", "dim", "n_layer", "n_head", "grid_size", "cls_token_num", "multiple_of"):
            if not (isinstance(getattr(self, f), int) and getattr(self, f) > 0):
                bad(f, "must be a positive int")
        if self.dim % self.n_head or (self.dim // self.n_head) % 4:
            bad("n_head", f"dim={self.dim} must split into heads whose size is a multiple of 4 (2-D RoPE)")
        if self.n_head % self.kv_heads:
            bad("n_kv_head", f"must divide n_head={self.n_head}")
        if self.model_type == "c2i" and self.cls_token_num != 1:
            bad("cls_token_num", "a class-conditional model has exactly one prefix slot (the class embedding)")
        if self.model_type == "c2i" and not (isinstance(self.num_classes, int) and self.num_classes > 0):
            bad("num_classes", "a class-conditional model needs a positive number of classes")

    @classmethod
    def preset(cls, name: str, **overrides) -> "LlamaGenConfig":
        """The paper's sizes by name: GPT-B (768/12/12), GPT-L (1024/24/16), GPT-XL (1280/36/20), GPT-XXL, GPT-XXXL,
        and the t2i GPT-1B/3B/7B; every other field from `overrides` or the defaults."""
        if name not in PRESETS:
            raise InvalidInputError(f"unknown LlamaGen preset {name!r}; expected one of {sorted(PRESETS)}")
        dim, n_layer, n_head = PRESETS[name]
        return cls(**{"dim": dim, "n_layer": n_layer, "n_head": n_head, **overrides})

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return -(-hidden // self.multiple_of) * self.multiple_of

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size ** 2

    @property
    def max_seq_len(self) -> int:
        return self.cls_token_num + self.num_image_tokens

    @property
    def has_null_class(self) -> bool:
        """Whether an unconditional input exists (CFG): the null class row (c2i) or the learned null caption (t2i)."""
        return self.model_type == "t2i" or self.class_dropout_prob > 0


@dataclass
class LlamaGenOutput:
    logits: torch.Tensor  # (B, T, V) float32
    hidden: torch.Tensor  # (B, T, D) last hidden states after the final RMSNorm (the output head's input)


# --- layers ----------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rope_2d(pos: torch.Tensor, config: LlamaGenConfig) -> torch.Tensor:
    """cos/sin table for positions pos (B, T) -> (B, T, head_dim/2, 2), float32. Prefix positions get zeros."""
    half = config.head_dim // 2
    inv = 1.0 / (config.rope_base ** (torch.arange(0, half, 2, device=pos.device)[: half // 2].float() / half))
    cell = (pos - config.cls_token_num).clamp(min=0)
    row, col = cell // config.grid_size, cell % config.grid_size  # (B, T) each
    ang = torch.cat([row[..., None] * inv, col[..., None] * inv], dim=-1)  # (B, T, half): row half, col half
    table = torch.stack([torch.cos(ang), torch.sin(ang)], dim=-1)  # (B, T, half, 2)
    return table * (pos >= config.cls_token_num)[..., None, None]


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, T, H, Dh) by table (B, T, Dh/2, 2)."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, Dh/2, 2)
    cos, sin = table[:, :, None, :, 0], table[:, :, None, :, 1]  # (B, T, 1, Dh/2)
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], dim=-1)
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.dim, self.n_head, self.n_kv_head, self.head_dim = (
            config.dim, config.n_head, config.kv_heads, config.head_dim)
        self.wqkv = nn.Linear(config.dim, (config.n_head + 2 * config.kv_heads) * config.head_dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x, rope, mask, cache: BufferCache | None = None, layer: int = 0):
        b, t, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        qk, v = self.wqkv(x).split([self.dim + kv, kv], dim=-1)
        qk = apply_rope(qk.view(b, t, self.n_head + self.n_kv_head, self.head_dim), rope)  # q and k in one call
        q, k = qk.transpose(1, 2).split([self.n_head, self.n_kv_head], dim=1)  # (B, H, T, Dh), (B, Hkv, T, Dh)
        v = v.view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, Dh)
        if self.n_head != self.n_kv_head:
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, Dh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, Dh)
        return self.wo(y.transpose(1, 2).reshape(b, t, self.dim))


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, rope, mask, cache=None, layer=0):
        h = x + self.attention(self.attention_norm(x), rope, mask, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.embedding_table = nn.Embedding(config.num_classes + int(config.class_dropout_prob > 0), config.dim)


class MLP(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden, bias=False)
        self.fc2 = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.cap_proj = MLP(config.caption_dim, config.dim, config.dim)
        uncond = torch.randn(config.cls_token_num, config.caption_dim) / config.caption_dim ** 0.5
        self.register_buffer("uncond_embedding", uncond)  # a buffer in the reference too (saved, not trained)


def causal_mask(batch: int, t: int, s: int, device=None) -> torch.Tensor:
    """(B, 1, T, S) bool: the T queries are the last T of S slots, each sees itself and every slot before it."""
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(s - t).expand(batch, 1, t, s)


# --- the model -------------------------------------------------------------------------------------------------------
class LlamaGen(nn.Module):
    """forward(idx, cond, input_pos=, cache=, mask=) -> LlamaGenOutput(logits (B, T, V), hidden (B, T, D)).

    The input sequence is [prefix from `cond`, if given; embeddings of `idx`, if given] (B, T, D): `cond` alone is
    a prefill, `idx` alone a decode / verification step, both a no-cache (training-style) pass. `input_pos` (B, T)
    or (T,) are sequence positions including the prefix (default: cache.length + arange(T)); `mask` (B, 1, T, S)
    bool, True = may attend, over S = cache.length + T key slots (default: causal over the slots). c2i `cond` is
    class labels (B,) long; t2i `cond` is caption embeddings (B, cls_token_num, caption_dim).
    """

    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.config = config
        self.cls_embedding = LabelEmbedder(config) if config.model_type == "c2i" else CaptionEmbedder(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.output.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.output.weight.dtype

    def new_cache(self, capacity: int | None = None) -> BufferCache:
        """An empty cache; capacity defaults to the whole sequence (prefix + image tokens)."""
        return BufferCache(self.config.n_layer, self.config.max_seq_len if capacity is None else capacity)

    def forward(self, idx: torch.Tensor | None = None, cond=None, *, input_pos: torch.Tensor | None = None,
                cache: BufferCache | None = None, mask: torch.Tensor | None = None,
                cond_drop: torch.Tensor | None = None) -> LlamaGenOutput:
        h = self.embed(idx, cond, cond_drop)  # (B, T, D)
        b, t, _ = h.shape
        past = 0 if cache is None else cache.length
        if cache is not None and cache.batch_size not in (None, b):
            raise InvalidInputError(f"the cache holds {cache.batch_size} rows but the input has {b}")
        pos = self._positions(input_pos, b, t, past, h.device)  # (B, T)
        mask = self._check_mask(mask, b, t, past + t) if mask is not None else causal_mask(b, t, past + t, h.device)
        rope = rope_2d(pos, self.config)  # (B, T, Dh/2, 2)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, mask, cache, i)
        if cache is not None:
            cache.advance(t)
        h = self.norm(h)
        return LlamaGenOutput(logits=self.output(h).float(), hidden=h)

    # --- inputs ------------------------------------------------------------------------------------------------------
    def embed(self, idx, cond=None, cond_drop=None) -> torch.Tensor:
        """[prefix embeddings of cond; token embeddings of idx] -> (B, T, D)."""
        parts = []
        if cond is not None:
            parts.append(self.embed_cond(cond, cond_drop))
        if idx is not None:
            parts.append(self.tok_embeddings(self._check_tokens(idx)))
        if not parts:
            raise InvalidInputError("LlamaGen.forward needs image tokens `idx`, a condition `cond`, or both")
        if len(parts) == 2 and parts[0].shape[0] != parts[1].shape[0]:
            raise InvalidInputError(f"cond has {parts[0].shape[0]} rows but idx has {parts[1].shape[0]}")
        return torch.cat(parts, dim=1) if len(parts) == 2 else parts[0]

    def embed_cond(self, cond, cond_drop=None) -> torch.Tensor:
        """Class labels (B,) / caption embeddings (B, L, C) -> prefix (B, cls_token_num, D). Rows where cond_drop
        (B,) is True take the unconditional input (class dropout for CFG training; needs a null class)."""
        cfg = self.config
        if cfg.model_type == "c2i":
            labels = torch.as_tensor(cond, device=self.device).reshape(-1)  # (B,) also from (B, 1)
            self.check_class_labels(labels, allow_null=True)
            if cond_drop is not None:
                labels = torch.where(cond_drop.to(labels.device), self.null_cond(len(labels)), labels)
            return self.cls_embedding.embedding_table(labels)[:, None]  # (B, 1, D)
        if not (torch.is_tensor(cond) and cond.dim() == 3 and cond.shape[1:] == (cfg.cls_token_num, cfg.caption_dim)):
            shape = tuple(cond.shape) if torch.is_tensor(cond) else type(cond).__name__
            raise InvalidInputError(f"t2i cond must be caption embeddings (B, {cfg.cls_token_num}, "
                                    f"{cfg.caption_dim}); got {shape}")
        if cond_drop is not None:
            cond = torch.where(cond_drop.to(cond.device)[:, None, None], self.null_cond(len(cond)), cond)
        return self.cls_embedding.cap_proj(cond.to(self.dtype))  # (B, L, D)

    def check_class_labels(self, labels: torch.Tensor, allow_null: bool = False) -> torch.Tensor:
        """Raise InvalidInputError unless labels are ints in [0, num_classes) (or == num_classes, the null class,
        with allow_null on a model that has one)."""
        cfg = self.config
        if cfg.model_type != "c2i":
            raise UnsupportedModelError("class labels given to a text-conditional (t2i) LlamaGen; pass caption "
                                        f"embeddings (B, {cfg.cls_token_num}, {cfg.caption_dim})")
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.dim() > 1 or labels.numel() == 0:
            raise InvalidInputError(f"class labels must be a non-empty 1-D integer tensor; got dtype {labels.dtype}, "
                                    f"shape {tuple(labels.shape)}")
        top = cfg.num_classes + int(allow_null and cfg.has_null_class)
        bad = (labels < 0) | (labels >= top)
        if bool(bad.any()):
            raise InvalidInputError(f"class label(s) {labels[bad].tolist()} out of range: valid labels are 0.."
                                    f"{cfg.num_classes - 1}" + (" (and the null class)" if top > cfg.num_classes
                                                                else ""))
        return labels

    def null_cond(self, batch: int) -> torch.Tensor:
        """The unconditional input for CFG: null-class labels (B,) or the learned null caption (B, L, C)."""
        cfg = self.config
        if not cfg.has_null_class:
            raise UnsupportedModelError(
                f"this LlamaGen has no null class (class_dropout_prob={cfg.class_dropout_prob}: the class table has "
                f"{cfg.num_classes} rows), so classifier-free guidance is unavailable; use guidance_scale=1.0")
        if cfg.model_type == "c2i":
            return torch.full((batch,), cfg.num_classes, dtype=torch.long, device=self.device)
        return self.cls_embedding.uncond_embedding.expand(batch, -1, -1)  # (B, L, C)

    def sample_cond_drop(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) bool, True with probability class_dropout_prob: which rows train unconditionally (CFG training)."""
        u = torch.rand(batch, generator=generator, device=generator.device if generator else "cpu")
        return (u < self.config.class_dropout_prob).to(self.device)

    def _check_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(idx) or idx.dim() != 2 or idx.is_floating_point():
            raise InvalidInputError(f"image tokens must be a (B, T) integer tensor; got "
                                    f"{tuple(idx.shape) if torch.is_tensor(idx) else type(idx).__name__}")
        bad = (idx < 0) | (idx >= self.config.vocab_size)
        if bool(bad.any()):
            raise InvalidInputError(f"image token(s) {idx[bad].unique().tolist()[:8]} out of the codebook range "
                                    f"[0, {self.config.vocab_size})")
        return idx

    def _positions(self, input_pos, b: int, t: int, past: int, device) -> torch.Tensor:
        if input_pos is None:
            return (past + torch.arange(t, device=device)).expand(b, t)
        pos = torch.as_tensor(input_pos, device=device)
        if pos.dim() == 1:
            pos = pos.expand(b, -1)
        if pos.shape != (b, t) or pos.is_floating_point():
            raise InvalidInputError(f"input_pos must be integer (B, T) = ({b}, {t}) or (T,); got {tuple(pos.shape)}")
        lo, hi = (int(v) for v in torch.aminmax(pos))
        if lo < 0 or hi >= self.config.max_seq_len:
            raise ContextOverflowError(f"input_pos in [{lo}, {hi}] outside [0, {self.config.max_seq_len}) = prefix "
                                       f"{self.config.cls_token_num} + {self.config.grid_size}x{self.config.grid_size}")
        return pos

    @staticmethod
    def _check_mask(mask: torch.Tensor, b: int, t: int, s: int) -> torch.Tensor:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] not in (1, b) or mask.shape[1:] != (1, t, s):
            raise InvalidInputError(f"mask must be bool (B, 1, T, S) = ({b}, 1, {t}, {s}) with S = cached slots + "
                                    f"new tokens; got {mask.dtype} {tuple(mask.shape)}")
        return mask

    # --- checkpoints -------------------------------------------------------------------------------------------------
    def save_pretrained(self, directory) -> Path:
        """Write `config.json` + `model.safetensors` (the reference's parameter names) to directory."""
        return save_directory(self, directory, KIND)

    @classmethod
    def from_pretrained(cls, path, config: LlamaGenConfig | str | None = None, *, dtype=torch.float32,
                        **overrides) -> "LlamaGen":
        """Load (a) a directory written by `save_pretrained`, or (b) a reference checkpoint file.

        (b) is a `.pt/.pth/.bin/.ckpt` file (read with `torch.load(weights_only=True)`: tensors only, nothing
        executed) or a `.safetensors` file, holding the state dict itself or under `model` (DDP), `module`
        (DeepSpeed) or `state_dict`. Its config is `config` (a LlamaGenConfig, or a preset name such as "GPT-L"
        whose sizes are used with every other field read off the weights) or, when None, inferred from the shapes:
        vocab, width, depth, FFN width, KV heads, classes, caption size and length; n_head from the preset with the
        same (dim, n_layer) — pass config / n_head=... for any other size. Not in the weights, so pass them when
        they differ from the defaults: grid_size (16: 256 px with VQ-16; 24 for the 384 px models) and, for a c2i
        table of N rows, whether the last row is a null class (assumed; class_dropout_prob=0 says it is not).
        `overrides` replace config fields in every case.
        """
        path = Path(path)
        if path.is_dir():
            cfg = config if config is not None else read_config(path / CONFIG_NAME, KIND, LlamaGenConfig, "LlamaGen")
            state = read_state_dict(path / WEIGHTS_NAME)
        elif path.is_file():
            state = reference_state_dict(read_state_dict(path), path)
            cfg = config
        else:
            raise CheckpointError(f"{str(path)!r} does not exist: expected a directory with {CONFIG_NAME} + "
                                  f"{WEIGHTS_NAME} or a LlamaGen checkpoint file (.pt/.pth/.bin/.safetensors)")
        if isinstance(cfg, str) or cfg is None:
            cfg = infer_config(state, path, preset=cfg, **overrides)
        elif overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        model = cls(cfg)
        load_checked(model, state, path)
        return model.to(dtype).eval()


def load_checked(model: nn.Module, state: dict, path) -> None:
    """load_state_dict with errors naming the file, the parameter and both shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{str(path)!r} does not match the model: missing {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''}; was it made for another model / config?")
    for k, t in own.items():
        if tuple(state[k].shape) != tuple(t.shape):
            raise CheckpointError(f"{str(path)!r}: parameter {k!r} has shape {tuple(state[k].shape)} in the checkpoint "
                                  f"but {tuple(t.shape)} for the config; pass the config the checkpoint was made with")
    model.load_state_dict(state, strict=True)


def read_state_dict(path: Path) -> dict:
    """Tensors of a `.safetensors` file, or of a pickle read with `torch.load(weights_only=True)` (never a full
    unpickle: argparse.Namespace, which training scripts store next to the weights, is the one class allowed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} is missing")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt / truncated / unsafe pickle: every reader has its own exception types
        raise CheckpointError(f"{str(path)!r} is not a readable checkpoint ({type(e).__name__}: {e}); the file is "
                              "corrupt, truncated, or holds more than tensors") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict")
    return obj


_IGNORED = re.compile(r"(^|\.)(freqs_cis|causal_mask|kv_cache\.[kv]_cache)$")


def reference_state_dict(obj: dict, path) -> dict:
    """The GPT weights of a reference checkpoint: unwrap model/module/state_dict, strip DDP / torch.compile
    prefixes, drop the non-parameter buffers (freqs_cis, KV caches)."""
    for key in ("model", "module", "state_dict"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {}
    for k, v in obj.items():
        k = re.sub(r"^(module\.|_orig_mod\.)+", "", str(k))
        if not _IGNORED.search(k):
            state[k] = v
    if "tok_embeddings.weight" not in state:
        raise CheckpointError(f"{str(path)!r}: unknown checkpoint layout, no 'tok_embeddings.weight' (top-level keys: "
                              f"{list(obj)[:8]}); expected LlamaGen GPT weights, alone or under 'model', 'module' "
                              "or 'state_dict'")
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{str(path)!r}: entries {bad[:5]} are not tensors")
    return state


def infer_config(state: dict, path, preset: str | None = None, **overrides) -> LlamaGenConfig:
    """A LlamaGenConfig read off the weights' shapes (see `LlamaGen.from_pretrained`)."""
    vocab, dim = state["tok_embeddings.weight"].shape
    n_layer = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("layers.")), default=-1)
    kw = {"vocab_size": int(vocab), "dim": int(dim), "n_layer": n_layer}
    if preset is not None:
        if preset not in PRESETS:
            raise InvalidInputError(f"unknown LlamaGen preset {preset!r}; expected one of {sorted(PRESETS)}")
        kw.update(zip(("dim", "n_layer", "n_head"), PRESETS[preset]))  # a mismatch shows as a named shape error
    else:
        match = [name for name, (d, n, _) in PRESETS.items() if (d, n) == (dim, n_layer)]
        if match:
            kw["n_head"] = PRESETS[match[0]][2]
    kw.update(overrides)
    if "n_head" not in kw:
        raise CheckpointError(f"{str(path)!r}: dim={dim}, n_layer={n_layer} match no preset ({sorted(PRESETS)}), so "
                              "n_head cannot be inferred; pass config=LlamaGenConfig(...) or n_head=...")
    head_dim = kw["dim"] // kw["n_head"]
    if "layers.0.attention.wqkv.weight" in state and "n_kv_head" not in overrides and kw["dim"] == dim:
        n_kv = (state["layers.0.attention.wqkv.weight"].shape[0] // head_dim - kw["n_head"]) // 2
        kw["n_kv_head"] = None if n_kv == kw["n_head"] else n_kv
    if "layers.0.feed_forward.w1.weight" in state:
        kw.setdefault("ffn_dim", int(state["layers.0.feed_forward.w1.weight"].shape[0]))
    if "cls_embedding.embedding_table.weight" in state:
        rows = int(state["cls_embedding.embedding_table.weight"].shape[0])
        null = overrides.get("class_dropout_prob", 0.1) > 0
        kw.setdefault("num_classes", rows - int(null))
        kw.setdefault("model_type", "c2i")
    elif "cls_embedding.cap_proj.fc1.weight" in state:
        kw.setdefault("model_type", "t2i")
        kw.setdefault("caption_dim", int(state["cls_embedding.cap_proj.fc1.weight"].shape[1]))
        if "cls_embedding.uncond_embedding" in state:
            kw.setdefault("cls_token_num", int(state["cls_embedding.uncond_embedding"].shape[0]))
    try:
        return LlamaGenConfig(**kw)
    except (InvalidInputError, TypeError) as e:
        raise CheckpointError(f"{str(path)!r}: the weights' shapes give no valid config ({e}); pass config=") from e


def save_directory(model: nn.Module, directory, kind: str) -> Path:
    """`model.safetensors` (the state dict) + `config.json` ({"kind": kind, **config fields}) in directory."""
    return write_checkpoint(directory, kind, dataclasses.asdict(model.config), model.state_dict(),
                            config_name=CONFIG_NAME, weights_name=WEIGHTS_NAME)


def directory_kind(path) -> str | None:
    """The "kind" a `save_directory` folder declares, or None for anything else."""
    return checkpoint_kind(path)


def read_config(path: Path, kind: str, config_cls, owner: str):
    """The config of a `save_directory` folder, with CheckpointErrors naming the file and what is wrong."""
    raw = dict(read_kind_config(path, kind, owner))
    raw.pop("kind")
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(config_cls)})
    if unknown:
        raise CheckpointError(f"{str(path)!r}: unknown config field(s) {unknown}")
    try:
        return config_cls(**raw)
    except InvalidInputError as e:
        raise CheckpointError(f"{str(path)!r}: invalid config ({e})") from e


# --- plain autoregressive sampling (the reference the speculative pipeline is compared to) -------------------------
cfg_logits = combine_logits  # u + scale * (c - u) over a [cond; uncond] batch: mmspec.guidance, under this module's name


def prefix_mask(key_valid: torch.Tensor, t: int, s: int) -> torch.Tensor:
    """Causal (B, 1, T, S) mask that also hides prefix slots where key_valid (B, S0) is False (padded caption
    tokens, as LlamaGen's t2i `emb_masks`), except from themselves."""
    b, s0 = key_valid.shape
    keys = torch.ones(b, s, dtype=torch.bool, device=key_valid.device)
    keys[:, :min(s0, s)] = key_valid[:, :s]
    mask = causal_mask(b, t, s, key_valid.device) & keys[:, None, None, :]  # (B, 1, T, S)
    own = torch.arange(t, device=key_valid.device)
    mask[:, :, own, s - t + own] = True
    return mask


@torch.no_grad()
def generate_tokens(model: LlamaGen, cond, *, num_tokens: int | None = None, guidance_scale: float = 1.0,
                    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                    generator: torch.Generator | list[torch.Generator] | None = None,
                    cond_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain AR decoding, one token per step on a KV cache -> image tokens (B, num_tokens) long.

    cond: class labels (B,) or caption embeddings (B, L, C); cond_mask (B, L) bool marks real caption tokens (t2i).
    guidance_scale != 1 runs [cond; uncond] as one batch and samples from `u + s (c - u)` (before temperature,
    top-k, top-p: mmspec's SamplingSpec, the engine's warping). temperature 0 is greedy. generator: one per row, or
    one shared (rows draw in order); None draws fresh seeds.
    """
    cfg = model.config
    n = cfg.num_image_tokens if num_tokens is None else int(num_tokens)
    if not 0 < n <= cfg.num_image_tokens:
        raise ContextOverflowError(f"num_tokens={n}: must be in [1, {cfg.num_image_tokens}] ({cfg.grid_size}x"
                                   f"{cfg.grid_size} grid)")
    spec = SamplingSpec(temperature=temperature, top_k=top_k or 0, top_p=1.0 if top_p is None else top_p)
    if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale)):
        raise InvalidInputError(f"guidance_scale={guidance_scale!r}: must be a finite number (1.0 = no guidance)")
    guided = guidance_scale != 1.0
    cond, keys = _batched_inputs(model, cond, cond_mask, guided)  # (2B or B, ...), (2B or B, L) or None
    b = len(cond) // 2 if guided else len(cond)
    gens = None
    if not spec.greedy:
        gens = (list(generator) if isinstance(generator, (list, tuple)) else [generator] * b
                if generator is not None else make_generators(None, b, model.device))
        if len(gens) != b:
            raise InvalidInputError(f"got {len(gens)} generators for {b} rows: pass one per row or a single one")
    p = cfg.cls_token_num
    cache = model.new_cache(p + n)
    mask = None if keys is None else prefix_mask(keys, p, p)
    logits = model(None, cond, cache=cache, mask=mask).logits[:, -1]  # (2B or B, V)
    out = []
    for i in range(n):
        step = combine_logits(logits, guidance_scale) if guided else logits  # (B, V)
        tok = _sample(spec, step, gens)  # (B,)
        out.append(tok)
        if i == n - 1:
            break
        x = torch.cat([tok, tok]) if guided else tok
        mask = None if keys is None else prefix_mask(keys, 1, p + i + 1)
        logits = model(x[:, None], input_pos=torch.full((len(x), 1), p + i, device=x.device), cache=cache,
                       mask=mask).logits[:, -1]
    return torch.stack(out, dim=1)


def _batched_inputs(model: LlamaGen, cond, cond_mask, guided: bool):
    """Validated condition and caption key mask, followed by their unconditional copies when guided."""
    cfg = model.config
    cond = torch.as_tensor(cond, device=model.device)
    if cfg.model_type == "c2i":
        cond = model.check_class_labels(cond.reshape(-1))  # user labels: the null class is not one of them
    b = cond.shape[0]
    if guided:
        cond = torch.cat([cond, model.null_cond(b).to(cond.dtype)])  # (2B, ...)
    if cond_mask is None:
        return cond, None
    keys = torch.as_tensor(cond_mask, dtype=torch.bool, device=model.device)
    if keys.shape != (b, cfg.cls_token_num):
        raise InvalidInputError(f"cond_mask must be bool (B, L) = ({b}, {cfg.cls_token_num}); got {tuple(keys.shape)}")
    return cond, torch.cat([keys, keys]) if guided else keys  # the null caption keeps the caption's padding


def _sample(spec: SamplingSpec, logits: torch.Tensor, gens) -> torch.Tensor:
    if spec.greedy:
        return spec.processed_logits(logits).argmax(-1)
    probs = spec.probs(logits)  # (B, V)
    return torch.tensor([sample_from(probs[r], gens[r]) for r in range(len(probs))], device=logits.device)
