"""The KL-VAE latent codec of MAR-style continuous-token image generation, on diffusers' `AutoencoderKL`.

MAR (Li et al. 2024, "Autoregressive Image Generation without Vector Quantization", reference LTH14/mar) generates
continuous tokens: the latents of LDM's KL-16 VAE (Rombach et al. 2022; reference `models/vae.py`: ch 128,
ch_mult (1, 1, 2, 2, 4), 2 res blocks, z_channels = embed_dim = 16), scaled by 0.2325 and patchified
(`MAR.patchify`: (B, C, H, W) -> (B, h*w, C*p*p), channel-major inside a token). A 256px image is 16x16x16 latents.

diffusers' AutoencoderKL is the same network, with one detail to get right: the reference *encoder* keeps LDM's
default `attn_resolutions=(16,)`, so its lowest level (16x16 for 256px) has an attention block after each res
block (`encoder.down.4.attn.{0,1}`), while the *decoder* is built with `attn_resolutions=()` and has none. In
diffusers terms: `AttnDownEncoderBlock2D` as the last down block, plain `UpDecoderBlock2D` everywhere up.
diffusers' `convert_ldm_vae_checkpoint` renames LDM keys but only knows the mid-block attention, so the per-level
attention keys are renamed here with its own `update_vae_attentions_ldm_to_diffusers` (1x1 convs -> linear).

Checkpoints load with `torch.load(weights_only=True)` or safetensors only; the posterior is diffusers'
DiagonalGaussianDistribution (logvar clamped to [-30, 20], as the reference).
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from einops import rearrange

from mmspec.errors import CheckpointError, ImageError, InvalidInputError

from .llamagen import load_checked, read_state_dict
from .vq import to_pil

__all__ = ["KL16_CONFIG", "MAR_SCALING_FACTOR", "kl16_vae", "tiny_kl_vae", "load_kl_vae", "infer_kl_config",
           "convert_ldm_kl_state_dict", "latents_to_tokens", "tokens_to_latents", "token_grid", "encode_images",
           "decode_tokens", "to_pil"]

MAR_SCALING_FACTOR = 0.2325  # MAR's `vae_scale`: latents * 0.2325 have roughly unit variance
KL16_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",),  # encoder attn at 16x16
    "up_block_types": ("UpDecoderBlock2D",) * 5,  # decoder attn_resolutions=()
    "block_out_channels": (128, 128, 256, 256, 512),  # ch 128 x ch_mult (1, 1, 2, 2, 4)
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": MAR_SCALING_FACTOR,
}
_WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")
_LDM_PREFIXES = ("first_stage_model.", "vae.")  # diffusers' LDM_VAE_KEYS: the VAE inside a full LDM checkpoint


# --- models -----------------------------------------------------------------------------------------------------------
def kl16_vae(**overrides):
    """An (untrained) AutoencoderKL with MAR's KL-16 layout (`vae/kl16.ckpt`); overrides replace config entries."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**{**KL16_CONFIG, **overrides})


def tiny_kl_vae(latent_channels: int = 4, seed: int = 0):
    """A KL-16-shaped AutoencoderKL of ~45k weights for tests: 16px images -> 8x8 latents (factor 2),
    attention in the last encoder level as KL-16. The global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = kl16_vae(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                       up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                       latent_channels=latent_channels, sample_size=16)
    return vae.eval()


# --- checkpoints ------------------------------------------------------------------------------------------------------
def load_kl_vae(source, *, dtype=torch.float32, config: dict | None = None):
    """An AutoencoderKL from a diffusers directory (or a pipeline directory with `vae/`), a weights file, or a hub id.

    Files: `.safetensors` in diffusers or LDM layout (told apart by the keys), or an LDM `.ckpt`/`.pth`/`.pt` such as
    MAR's `vae/kl16.ckpt` (weights alone or under "model" / "state_dict"). For files the config is inferred from the
    weights (levels, widths, attention, latent channels); what weights do not say (norm_num_groups, sample_size,
    scaling_factor) comes from KL16_CONFIG unless given in `config`. A string that is no existing path and does not
    look like one goes to `AutoencoderKL.from_pretrained`, which raises its own errors.
    """
    path = Path(str(source)).expanduser()
    if path.is_dir():
        vae = _load_directory(path, dtype)
    elif path.is_file():
        vae = _load_file(path, config or {}).to(dtype)
    elif path.suffix in _WEIGHT_SUFFIXES or str(source).startswith(("/", ".", "~")):
        raise CheckpointError(f"{str(source)!r} does not exist: pass a diffusers AutoencoderKL directory or a "
                              f"weights file ({', '.join(_WEIGHT_SUFFIXES)}) on this machine")
    else:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(source), torch_dtype=dtype)
    return vae.eval()


def _load_directory(path: Path, dtype):
    from diffusers import AutoencoderKL

    sub = "vae" if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file() else None
    if sub is None and not (path / "config.json").is_file():
        raise CheckpointError(f"{str(path)!r} has no config.json (nor vae/config.json): expected a diffusers "
                              "AutoencoderKL directory, or pass the weights file itself")
    try:
        return AutoencoderKL.from_pretrained(str(path), subfolder=sub, torch_dtype=dtype, local_files_only=True)
    except Exception as e:  # diffusers raises OSError / ValueError / safetensors errors for bad directories
        raise CheckpointError(f"{str(path)!r}: cannot load the AutoencoderKL ({type(e).__name__}: {e}); expected "
                              "the output of AutoencoderKL.save_pretrained") from e


def _load_file(path: Path, config: dict):
    if path.suffix not in _WEIGHT_SUFFIXES:
        raise CheckpointError(f"{str(path)!r}: unknown weights file type {path.suffix!r}; expected one of "
                              f"{', '.join(_WEIGHT_SUFFIXES)} or a diffusers directory")
    state = _unwrap(_read_weights(path), path)
    if any(k.startswith("encoder.down.") for k in state):
        state = convert_ldm_kl_state_dict(state)
    elif not any(k.startswith("encoder.down_blocks.") for k in state):
        raise CheckpointError(f"{str(path)!r}: no KL-VAE encoder weights (first keys: {list(state)[:6]}); expected "
                              "LDM keys 'encoder.down.*' or diffusers keys 'encoder.down_blocks.*'")
    try:
        inferred = infer_kl_config(state)
    except KeyError as e:
        raise CheckpointError(f"{str(path)!r}: incomplete KL-VAE weights, no {e.args[0]!r}; expected a whole "
                              "AutoencoderKL (encoder, decoder, quant convs)") from e
    vae = kl16_vae(**{**inferred, **config})
    load_checked(vae, state, path)
    return vae


def _read_weights(path: Path) -> dict:
    """read_state_dict (safetensors, or torch.load(weights_only=True)), with a way out for pickled objects."""
    try:
        return read_state_dict(path)
    except CheckpointError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e.__cause__))
        if not isinstance(e.__cause__, pickle.UnpicklingError) or not found:
            raise
        raise CheckpointError(
            f"{str(path)!r} holds a non-tensor object ({found.group(1)}), and only tensors are loaded "
            "(torch.load(weights_only=True)). If you trust that class, allow it for this one read and keep only the "
            "weights as safetensors: with torch.serialization.safe_globals([<the class>]): sd = torch.load(path, "
            "weights_only=True)['model']; then safetensors.torch.save_file(sd, 'kl16.safetensors') and load that "
            "file") from e.__cause__


def _unwrap(obj: dict, path: Path) -> dict:
    """The weights dict: under "model" (MAR), "state_dict" (Lightning/LDM) or top level; VAE prefixes stripped."""
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    for prefix in _LDM_PREFIXES:
        if any(k.startswith(prefix + "encoder.") for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
            break
    bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{str(path)!r}: entries {bad[:5]} are not tensors; expected a dict of weights "
                              "(alone or under 'model' / 'state_dict')")
    return obj


def convert_ldm_kl_state_dict(state: dict) -> dict:
    """LDM / MAR AutoencoderKL keys -> diffusers keys, by diffusers' `convert_ldm_vae_checkpoint`; the attention
    blocks inside the levels (KL-16's encoder at 16x16), which that function leaves as they are, are renamed with
    its `update_vae_attentions_ldm_to_diffusers` (which also turns the 1x1 convs into linear weights)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, update_vae_attentions_ldm_to_diffusers

    n_down, n_up = _levels(state, "encoder.down"), _levels(state, "decoder.up")
    attn = {k for k in state if re.match(r"(encoder\.down|decoder\.up)\.\d+\.attn\.", k)}
    layout = {"down_block_types": [None] * n_down, "up_block_types": [None] * n_up}  # only the counts are read
    new = convert_ldm_vae_checkpoint({k: v for k, v in state.items() if k not in attn}, layout)
    for i in range(n_down):
        keys = [k for k in attn if k.startswith(f"encoder.down.{i}.")]
        update_vae_attentions_ldm_to_diffusers(keys, new, state, {"old": f"down.{i}.attn",
                                                                  "new": f"down_blocks.{i}.attentions"})
    for i in range(n_up):  # LDM numbers decoder levels from the highest resolution, diffusers from the lowest
        keys = [k for k in attn if k.startswith(f"decoder.up.{i}.")]
        update_vae_attentions_ldm_to_diffusers(keys, new, state, {"old": f"up.{i}.attn",
                                                                  "new": f"up_blocks.{n_up - 1 - i}.attentions"})
    return new


def _has(state: dict, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in state)


def _attn(state: dict, level: str) -> str:
    return "Attn" if _has(state, level + "attentions.") else ""


def _levels(state: dict, prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def infer_kl_config(state: dict) -> dict:
    """The AutoencoderKL config entries that diffusers-layout weights determine (not norm groups or scaling)."""
    n = _levels(state, "encoder.down_blocks")
    enc = [f"encoder.down_blocks.{i}." for i in range(n)]
    dec = [f"decoder.up_blocks.{i}." for i in range(_levels(state, "decoder.up_blocks"))]
    return {
        "in_channels": state["encoder.conv_in.weight"].shape[1],
        "out_channels": state["decoder.conv_out.weight"].shape[0],
        "block_out_channels": tuple(state[p + "resnets.0.conv1.weight"].shape[0] for p in enc),
        "layers_per_block": _levels(state, "encoder.down_blocks.0.resnets"),
        "down_block_types": tuple(_attn(state, p) + "DownEncoderBlock2D" for p in enc),
        "up_block_types": tuple(_attn(state, p) + "UpDecoderBlock2D" for p in dec),
        "latent_channels": state["decoder.conv_in.weight"].shape[1],
        "use_quant_conv": "quant_conv.weight" in state,
        "use_post_quant_conv": "post_quant_conv.weight" in state,
        "mid_block_add_attention": _has(state, "encoder.mid_block.attentions."),
    }


# --- tokens <-> latents <-> images ------------------------------------------------------------------------------------
def latents_to_tokens(latents: torch.Tensor, patch_size: int = 1) -> torch.Tensor:
    """MAR's patchify: latents (B, C, H, W) -> tokens (B, h*w, C*p*p), row-major grid, (c, p, q) inside a token."""
    p = _patch(patch_size)
    if not torch.is_tensor(latents) or latents.dim() != 4:
        raise InvalidInputError(f"latents must be a (B, C, H, W) tensor; got {_shape(latents)}")
    if latents.shape[2] % p or latents.shape[3] % p:
        raise InvalidInputError(f"latent size {tuple(latents.shape[2:])} is not a multiple of patch_size {p}")
    return rearrange(latents, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p)


def tokens_to_latents(tokens: torch.Tensor, grid: int | tuple[int, int], patch_size: int = 1,
                      channels: int | None = None) -> torch.Tensor:
    """MAR's unpatchify: tokens (B, h*w, C*p*p) on a grid (h, w) (an int: square) -> latents (B, C, h*p, w*p)."""
    p = _patch(patch_size)
    h, w = _grid(grid)
    if not torch.is_tensor(tokens) or tokens.dim() != 3:
        raise InvalidInputError(f"tokens must be a (B, N, D) tensor; got {_shape(tokens)}")
    n, d = tokens.shape[1:]
    if n != h * w:
        raise InvalidInputError(f"{n} tokens per image do not fill the {h}x{w} grid; expected {h * w} tokens, or "
                                "pass the grid (h, w) they were made on")
    c = d // (p * p) if channels is None else channels
    if c * p * p != d:
        raise InvalidInputError(f"token width {d} is not channels x patch_size^2 = {c} x {p}^2 = {c * p * p}; the "
                                "tokens were made with another latent channel count or patch_size")
    return rearrange(tokens, "b (h w) (c p q) -> b c (h p) (w q)", h=h, w=w, c=c, p=p, q=p)


def token_grid(vae, height: int, width: int | None = None, patch_size: int = 1) -> tuple[int, int]:
    """Tokens per side (h, w) for images of height x width (default square): 256px, KL-16, p=1 -> (16, 16)."""
    f = 2 ** (len(vae.config.block_out_channels) - 1) * _patch(patch_size)
    width = height if width is None else width
    if height % f or width % f:
        raise InvalidInputError(f"image size ({height}, {width}) is not a multiple of the VAE's downsample factor "
                                f"times patch_size = {f}")
    return height // f, width // f


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, patch_size: int = 1, sample: bool = False,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> tokens (B, h*w, C*p*p): posterior mode (or a sample drawn with `generator`,
    as MAR's training does) times the scaling factor (MAR: `posterior.sample().mul_(0.2325)`)."""
    if not (torch.is_tensor(images) and images.dim() == 4 and images.shape[1] == vae.config.in_channels):
        raise ImageError(f"expected images (B, {vae.config.in_channels}, H, W) in [-1, 1]; got {_shape(images)}")
    token_grid(vae, images.shape[2], images.shape[3], patch_size)  # size check, before any compute
    w = vae.encoder.conv_in.weight
    posterior = vae.encode(images.to(device=w.device, dtype=w.dtype)).latent_dist
    z = posterior.sample(generator=generator) if sample else posterior.mode()  # (B, C, H/f, W/f)
    shift = vae.config.shift_factor or 0.0
    return latents_to_tokens((z - shift) * vae.config.scaling_factor, patch_size)


@torch.no_grad()
def decode_tokens(vae, tokens: torch.Tensor, grid: int | tuple[int, int], patch_size: int = 1) -> torch.Tensor:
    """Tokens (B, h*w, C*p*p) on a grid (h, w) -> images (B, 3, H, W) clamped to [-1, 1] (MAR: `vae.decode(z /
    0.2325)`)."""
    z = tokens_to_latents(tokens, grid, patch_size, channels=vae.config.latent_channels)  # (B, C, h*p, w*p)
    w = vae.decoder.conv_in.weight
    z = z.to(device=w.device, dtype=w.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    return vae.decode(z).sample.clamp(-1, 1)


def _patch(patch_size) -> int:
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise InvalidInputError(f"patch_size must be a positive int; got {patch_size!r}")
    return patch_size


def _grid(grid) -> tuple[int, int]:
    hw = (grid, grid) if isinstance(grid, int) else tuple(grid) if isinstance(grid, (tuple, list)) else ()
    if len(hw) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in hw):
        raise InvalidInputError(f"grid must be a positive int or a pair (h, w) of them; got {grid!r}")
    return hw


def _shape(x) -> str:
    return str(tuple(x.shape)) if torch.is_tensor(x) else type(x).__name__
