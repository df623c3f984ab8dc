"""A continuous-token autoregressive image model: a causal transformer over VAE latent tokens + MAR's diffusion head.

Li et al. 2024, "Autoregressive Image Generation without Vector Quantization" (arXiv:2406.11838): tokens are
continuous vectors (KL-16 VAE latents, 16 channels), the transformer produces a condition z per position and a small
diffusion head (:mod:`.diffusion_head`) models p(token | z). The paper's "AR" variant is a causal transformer in
raster order, which is what this module implements (its masked, random-order "MAR" variant predicts several tokens
per step from a bidirectional encoder-decoder; CSpD needs per-position conditionals along one order, which the
causal variant gives in one forward).

The trunk is the LlamaGen block stack (:mod:`.llamagen`: RMSNorm, SwiGLU, 2-D RoPE, an appendable / croppable KV
cache, explicit positions and 4-D masks), so the engine drives it the same way. Parameter names follow the MAR
reference where a part has a counterpart: ``class_emb``, ``fake_latent`` (the unconditional class embedding for
CFG), ``z_proj`` (token -> width) and ``diffloss.net.*`` (the head).

Position i of the sequence is [class slot, token_0, ..., token_{L-2}]; the condition for token i is the output at
position i. CFG (on eps, in the head) runs [cond; uncond] rows through the trunk; MAR's "linear" schedule gives
token i the scale ``1 + (s - 1) (i + 1) / L``.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mmspec.cache import BufferCache
from mmspec.errors import CheckpointError, ContextOverflowError, InvalidInputError, UnsupportedModelError
from mmspec.guidance import pair_halves

from .diffusion import SCHEDULES
from .diffusion_head import TokenDiffusion
from .llamagen import (CONFIG_NAME, WEIGHTS_NAME, LlamaGenConfig, RMSNorm, TransformerBlock, causal_mask,
                       load_checked, read_config, read_state_dict, rope_2d, save_directory)

KIND = "image_ar.continuous_ar"
CFG_SCHEDULES = ("constant", "linear")


@dataclass
class ContinuousARConfig:
    """Sizes of the trunk (dim, n_layer, n_head), the tokens (token_dim, grid_size), the classes and the head
    (head_width, head_depth, diffusion steps and schedule; MAR: 1000 train steps, cosine, 100 sampling steps)."""

    token_dim: int = 16
    grid_size: int = 16
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    ffn_dim: int | None = None
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    head_width: int = 1024
    head_depth: int = 6
    train_steps: int = 1000
    sampling_steps: int = 100
    noise_schedule: str = "cosine"
    norm_eps: float = 1e-5
    rope_base: float = 10000.0

    model_type = "c2i"  # what the shared runner reads
    cls_token_num = 1

    def __post_init__(self):
        for f in ("token_dim", "grid_size", "dim", "n_layer", "n_head", "num_classes", "head_width", "head_depth",
                  "train_steps", "sampling_steps"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InvalidInputError(f"ContinuousARConfig.{f}={v!r}: must be a positive int")
        if self.noise_schedule not in SCHEDULES:
            raise InvalidInputError(f"ContinuousARConfig.noise_schedule={self.noise_schedule!r}: expected one of "
                                    f"{SCHEDULES}")
        self.trunk()  # head / RoPE divisibility errors now, with LlamaGenConfig's messages

    def trunk(self) -> LlamaGenConfig:
        return LlamaGenConfig(vocab_size=1, dim=self.dim, n_layer=self.n_layer, n_head=self.n_head,
                              ffn_dim=self.ffn_dim, grid_size=self.grid_size, num_classes=self.num_classes,
                              norm_eps=self.norm_eps, rope_base=self.rope_base)

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size ** 2

    @property
    def max_seq_len(self) -> int:
        return 1 + self.num_image_tokens

    @property
    def has_null_class(self) -> bool:
        return True  # fake_latent always exists


@dataclass
class ContinuousAROutput:
    hidden: torch.Tensor  # (B, T, dim): the head's condition for the token after each position
    logits: None = None  # no vocabulary: the head defines each token's distribution


class ContinuousAR(nn.Module):
    """forward(tokens (B, T, C) float, cond labels (B,), input_pos=, cache=, mask=) -> ContinuousAROutput.

    Like :class:`~image_ar.models.llamagen.LlamaGen`: ``cond`` alone is a prefill, ``tokens`` alone a decode /
    verification block, both a training pass. Label ``num_classes`` is the null class (``fake_latent``)."""

    def __init__(self, config: ContinuousARConfig):
        super().__init__()
        self.config = config
        trunk = config.trunk()
        self.trunk_config = trunk
        self.class_emb = nn.Embedding(config.num_classes, config.dim)
        self.fake_latent = nn.Parameter(torch.zeros(1, config.dim))
        self.z_proj = nn.Linear(config.token_dim, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(trunk) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.diffloss = TokenDiffusion(config.token_dim, config.dim, config.head_width, config.head_depth,
                                       config.train_steps, config.sampling_steps, config.noise_schedule)
        nn.init.normal_(self.class_emb.weight, std=0.02)
        nn.init.normal_(self.fake_latent, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.z_proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.z_proj.weight.dtype

    @property
    def head(self) -> TokenDiffusion:
        return self.diffloss

    def new_cache(self, capacity: int | None = None) -> BufferCache:
        return BufferCache(self.config.n_layer, self.config.max_seq_len if capacity is None else capacity)

    def forward(self, tokens: torch.Tensor | None = None, cond=None, *, input_pos=None, cache: BufferCache | None = None,
                mask: torch.Tensor | None = None, cond_drop: torch.Tensor | None = None) -> ContinuousAROutput:
        h = self.embed(tokens, cond, cond_drop)
        b, t, _ = h.shape
        past = 0 if cache is None else cache.length
        if cache is not None and cache.batch_size not in (None, b):
            raise InvalidInputError(f"the cache holds {cache.batch_size} rows but the input has {b}")
        pos = self._positions(input_pos, b, t, past, h.device)
        if mask is None:
            mask = causal_mask(b, t, past + t, h.device)
        elif mask.dtype != torch.bool or mask.shape[1:] != (1, t, past + t):
            raise InvalidInputError(f"mask must be bool (B, 1, {t}, {past + t}); got {mask.dtype} {tuple(mask.shape)}")
        rope = rope_2d(pos, self.trunk_config)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, mask, cache, i)
        if cache is not None:
            cache.advance(t)
        return ContinuousAROutput(self.norm(h))

    def embed(self, tokens, cond=None, cond_drop=None) -> torch.Tensor:
        parts = []
        if cond is not None:
            labels = self.check_class_labels(torch.as_tensor(cond, device=self.device).reshape(-1), allow_null=True)
            if cond_drop is not None:
                labels = torch.where(cond_drop.to(labels.device), self.null_cond(len(labels)), labels)
            null = labels == self.config.num_classes
            emb = self.class_emb(labels.clamp(max=self.config.num_classes - 1))
            parts.append(torch.where(null[:, None], self.fake_latent.to(emb.dtype), emb)[:, None])
        if tokens is not None:
            c = self.config.token_dim
            if not torch.is_tensor(tokens) or tokens.dim() != 3 or tokens.shape[-1] != c \
                    or not tokens.is_floating_point():
                shape = tuple(tokens.shape) if torch.is_tensor(tokens) else type(tokens).__name__
                raise InvalidInputError(f"tokens must be a float (B, T, {c}) tensor of continuous tokens; got {shape}")
            parts.append(self.z_proj(tokens.to(self.dtype)))
        if not parts:
            raise InvalidInputError("ContinuousAR.forward needs tokens, a class condition, or both")
        if len(parts) == 2 and parts[0].shape[0] != parts[1].shape[0]:
            raise InvalidInputError(f"cond has {parts[0].shape[0]} rows but tokens have {parts[1].shape[0]}")
        return torch.cat(parts, dim=1)

    def check_class_labels(self, labels: torch.Tensor, allow_null: bool = False) -> torch.Tensor:
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.dim() != 1 or labels.numel() == 0:
            raise InvalidInputError(f"class labels must be a non-empty 1-D integer tensor; got dtype {labels.dtype}, "
                                    f"shape {tuple(labels.shape)}")
        top = self.config.num_classes + int(allow_null)
        bad = (labels < 0) | (labels >= top)
        if bool(bad.any()):
            raise InvalidInputError(f"class label(s) {labels[bad].tolist()} out of range: valid labels are 0.."
                                    f"{self.config.num_classes - 1}")
        return labels

    def null_cond(self, batch: int) -> torch.Tensor:
        return torch.full((batch,), self.config.num_classes, dtype=torch.long, device=self.device)

    def sample_cond_drop(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.rand(batch, generator=generator, device=generator.device if generator else "cpu")
        return (u < self.config.class_dropout_prob).to(self.device)

    def _positions(self, input_pos, b: int, t: int, past: int, device) -> torch.Tensor:
        if input_pos is None:
            return (past + torch.arange(t, device=device)).expand(b, t)
        pos = torch.as_tensor(input_pos, device=device)
        pos = pos.expand(b, -1) if pos.dim() == 1 else pos
        if pos.shape != (b, t):
            raise InvalidInputError(f"input_pos must be (B, T) = ({b}, {t}) or (T,); got {tuple(pos.shape)}")
        if int(pos.max()) >= self.config.max_seq_len:
            raise ContextOverflowError(f"position {int(pos.max())} is past the image's last position "
                                       f"{self.config.max_seq_len - 1}")
        return pos

    def training_loss(self, tokens: torch.Tensor, labels: torch.Tensor, generator=None) -> torch.Tensor:
        """Teacher-forced diffusion loss of every token (B, L, C) given the class (with class dropout for CFG)."""
        drop = self.sample_cond_drop(len(labels), generator)
        z = self(tokens[:, :-1], labels, cond_drop=drop).hidden  # (B, L, dim): condition of token i at position i
        return self.diffloss.loss(z.reshape(-1, z.shape[-1]), tokens.reshape(-1, tokens.shape[-1]).float(),
                                  generator)

    # --- checkpoints --------------------------------------------------------------------------------------------
    def save_pretrained(self, directory) -> Path:
        """Write `config.json` + `model.safetensors` to directory."""
        return save_directory(self, directory, KIND)

    @classmethod
    def from_pretrained(cls, path, config: ContinuousARConfig | None = None, *, dtype=torch.float32,
                        **overrides) -> "ContinuousAR":
        """A directory from `save_pretrained`, or a checkpoint file (`.safetensors`, or `.pth/.pt` read with
        `torch.load(weights_only=True)`) holding our parameter names alone or under `model_ema` / `model` (MAR's
        training checkpoints keep both; the EMA weights are preferred). A file needs `config` (or overrides)."""
        path = Path(path)
        if path.is_dir():
            cfg = config or read_config(path / CONFIG_NAME, KIND, ContinuousARConfig, "ContinuousAR")
            state = read_state_dict(path / WEIGHTS_NAME)
        elif path.is_file():
            state = unwrap_mar_state(read_state_dict(path), path)
            if config is None and not overrides:
                raise CheckpointError(f"{str(path)!r} is a bare checkpoint: pass config=ContinuousARConfig(...)")
            cfg = config or ContinuousARConfig()
        else:
            raise CheckpointError(f"{str(path)!r} does not exist: expected a directory with {CONFIG_NAME} + "
                                  f"{WEIGHTS_NAME} or a checkpoint file")
        if overrides:
            unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ContinuousARConfig)})
            if unknown:
                raise InvalidInputError(f"unknown ContinuousARConfig field(s) {unknown}")
            cfg = dataclasses.replace(cfg, **overrides)
        if any(k.startswith(("encoder_blocks.", "decoder_blocks.")) for k in state):
            raise UnsupportedModelError(
                f"{str(path)!r} is a masked-order MAR (bidirectional encoder-decoder) checkpoint; mmspec implements "
                "the causal raster-order variant. Its diffusion head loads with load_mar_diffusion_head(path)")
        model = cls(cfg)
        load_checked(model, state, path)
        return model.to(dtype).eval()


def unwrap_mar_state(obj: dict, path) -> dict:
    """MAR training checkpoints: {'model': ..., 'model_ema': ..., 'optimizer': ..., 'epoch': ..., 'args': ...};
    take the EMA weights when present, strip DDP / torch.compile prefixes, keep tensors only."""
    for key in ("model_ema", "model", "state_dict"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {re.sub(r"^(module\.|_orig_mod\.)+", "", str(k)): v for k, v in obj.items()}
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{str(path)!r}: entries {bad[:5]} are not tensors; expected a state dict (alone or "
                              "under 'model_ema' / 'model')")
    return state


def load_mar_diffusion_head(path, *, sampling_steps: int = 100, noise_schedule: str = "cosine",
                            train_steps: int = 1000) -> TokenDiffusion:
    """The diffusion head (``diffloss.net.*``) of a MAR checkpoint (EMA weights preferred), sizes read off the
    weights: token channels from ``input_proj``, width, depth and the condition size."""
    state = unwrap_mar_state(read_state_dict(Path(path)), path)
    head = {k[len("diffloss."):]: v for k, v in state.items() if k.startswith("diffloss.net.")}
    if "net.input_proj.weight" not in head:
        raise CheckpointError(f"{str(path)!r} has no 'diffloss.net.*' weights (keys: {list(state)[:6]} ...)")
    width, token_dim = head["net.input_proj.weight"].shape
    z_channels = head["net.cond_embed.weight"].shape[1]
    depth = 1 + max(int(k.split(".")[2]) for k in head if k.startswith("net.res_blocks."))
    module = TokenDiffusion(int(token_dim), int(z_channels), int(width), depth, train_steps, sampling_steps,
                            noise_schedule)
    load_checked(module, head, path)
    return module.eval()


def guidance_scales(scale: float, schedule: str, positions: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Per-token CFG scale: constant, or MAR's linear ramp 1 + (s - 1) (i + 1) / L for token index i."""
    if schedule not in CFG_SCHEDULES:
        raise InvalidInputError(f"guidance_schedule={schedule!r}: expected one of {CFG_SCHEDULES}")
    pos = positions.float()
    if schedule == "constant":
        return torch.full_like(pos, float(scale))
    return 1 + (float(scale) - 1) * (pos + 1) / num_tokens


def draw_token_noise(generator: torch.Generator, steps: int, token_dim: int, device) -> torch.Tensor:
    """x_T and the per-step noise of one token, (S + 1, C), in the fixed order every sampler here uses."""
    return torch.randn(steps + 1, token_dim, generator=generator, device=device)


@torch.no_grad()
def generate_continuous(model: ContinuousAR, labels, *, num_tokens: int | None = None, guidance_scale: float = 1.0,
                        guidance_schedule: str = "constant", temperature: float = 1.0,
                        generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """Plain AR sampling on a KV cache (the target-only reference) -> tokens (B, num_tokens, C).

    Each token draws its x_T and per-step noise from its row's generator (:func:`draw_token_noise`), in order."""
    from mmspec.sampling import make_generators

    cfg = model.config
    n = cfg.num_image_tokens if num_tokens is None else int(num_tokens)
    if not 0 < n <= cfg.num_image_tokens:
        raise ContextOverflowError(f"num_tokens={n}: must be in [1, {cfg.num_image_tokens}]")
    labels = model.check_class_labels(torch.as_tensor(labels, device=model.device).reshape(-1))
    b, guided = len(labels), guidance_scale != 1.0
    gens = list(generator) if isinstance(generator, (list, tuple)) else (
        [generator] * b if generator is not None else make_generators(None, b, model.device))
    if len(gens) != b:
        raise InvalidInputError(f"got {len(gens)} generators for {b} rows: pass one per row or a single one")
    cond = torch.cat([labels, model.null_cond(b)]) if guided else labels
    cache = model.new_cache(1 + n)
    z = model(None, cond, cache=cache).hidden[:, -1]
    head, s = model.diffloss, model.diffloss.num_steps
    out = []
    for i in range(n):
        zz = pair_halves(z, guidance_scale)
        noise = torch.stack([draw_token_noise(g, s, cfg.token_dim, model.device) for g in gens])
        scale = guidance_scales(guidance_scale, guidance_schedule, torch.tensor(i), cfg.num_image_tokens)
        tok = head.sample(zz, noise[:, 0], noise[:, 1:], temperature, scale).tokens  # (B, C)
        out.append(tok)
        if i < n - 1:
            x = torch.cat([tok, tok]) if guided else tok
            z = model(x[:, None], input_pos=torch.full((len(x), 1), 1 + i, device=x.device), cache=cache).hidden[:, -1]
    return torch.stack(out, dim=1)

