"""VQ image tokenizers behind one small interface, all on diffusers' `VQModel` (LlamaGen's included).

Interface (`VQTokenizer`): `codebook_size`, `embed_dim`, `downsample_factor`, `image_size`, `grid_size`,
`codebook_embeddings()` (V, D) in the geometry the quantiser's lookup uses, `quantize(latents)`, `encode(images)`,
`decode_codes(codes)` -> images in [-1, 1], and `to_pil(images)`.

LlamaGen's tokenizers (Sun et al. 2024, "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation",
reference `tokenizer/tokenizer_image/vq_model.py`; VQ-16 = ch 128, ch_mult (1, 1, 2, 2, 4), 2 res blocks, z_channels
256, codebook 16384 x 8, `codebook_l2_norm=True`) are the taming-transformers VQGAN layout, which diffusers' VQModel
expresses exactly when its lowest-resolution level uses attention blocks (`AttnDownEncoderBlock2D` /
`AttnUpDecoderBlock2D`): same GroupNorm(32, eps 1e-6) + SiLU ResNet blocks, single-head attention with scale
c^-1/2, asymmetric (0, 1, 0, 1) padding before the stride-2 conv, nearest-neighbour upsampling + conv. So there is
no own conv net here: `convert_reference_state_dict` renames the reference keys (`conv_blocks.i.res.j` ->
`down_blocks.i.resnets.j` / `up_blocks.i.resnets.j`, `mid.0/1/2` -> `mid_block.resnets.0 / attentions.0 /
resnets.1`, the attention's 1x1 convs q/k/v/proj_out -> linear `to_q/to_k/to_v/to_out.0`, `nin_shortcut` ->
`conv_shortcut`, `norm_out` -> `conv_norm_out`) and the tokenizer keeps `l2_norm=True`: the codebook is stored and
used l2-normalised, and latents are normalised before the nearest-code search, as the reference's quantiser does.
(For unit-norm codes the argmin is the same with or without normalising z: |z - e|^2 = |z|^2 + 1 - 2 z.e.)
diffusers' own VQModels (raw codebook, plain Euclidean lookup) are wrapped with `l2_norm=False`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmspec.errors import CheckpointError, ImageError, InvalidInputError, UnsupportedModelError

from .llamagen import load_checked, read_state_dict

SIDECAR, KIND = "mmspec_vq.json", "mmspec.vq"
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_INV = {v: k for k, v in _ATTN.items()}


class VQTokenizer(nn.Module):
    """A diffusers VQModel plus the codebook geometry of its quantiser (l2_norm: LlamaGen's cosine lookup)."""

    def __init__(self, vq, l2_norm: bool = False):
        super().__init__()
        self.vq = vq
        self.l2_norm = bool(l2_norm)
        if self.l2_norm:
            with torch.no_grad():
                w = vq.quantize.embedding.weight
                w.copy_(F.normalize(w, dim=-1))  # stored normalised, so vq.decode / vq.quantize agree too

    # --- geometry --------------------------------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self.vq.quantize.embedding.weight.shape[0]

    @property
    def embed_dim(self) -> int:
        return self.vq.quantize.embedding.weight.shape[1]

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.vq.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        size = self.vq.config.sample_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def grid_size(self) -> int:
        """Tokens per side for `image_size` images."""
        return self.image_size // self.downsample_factor

    def codebook_embeddings(self) -> torch.Tensor:
        """(V, D): the codes as the lookup compares them (l2-normalised rows for LlamaGen's tokenizers)."""
        w = self.vq.quantize.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    # --- codes <-> latents <-> images ------------------------------------------------------------------------------
    def quantize(self, latents: torch.Tensor) -> torch.Tensor:
        """Nearest code of every latent vector: (B, D, h, w) -> (B, h, w) long."""
        b, d, h, w = latents.shape
        z = latents.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
        e = self.codebook_embeddings()  # (V, D)
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        dist = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()  # (B*h*w, V)
        return dist.argmin(1).view(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes -> (B, D, h, w) quantised latents."""
        return self.codebook_embeddings()[codes].permute(0, 3, 1, 2)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> codes (B, H/f, W/f) long."""
        if not (torch.is_tensor(images) and images.dim() == 4 and images.shape[1] == 3):
            raise ImageError(f"expected images (B, 3, H, W); got {getattr(images, 'shape', type(images).__name__)}")
        f = self.downsample_factor
        if images.shape[2] % f or images.shape[3] % f:
            raise ImageError(f"image size {tuple(images.shape[2:])} is not a multiple of the downsample factor {f}")
        w = self.vq.quant_conv.weight
        return self.quantize(self.vq.quant_conv(self.vq.encoder(images.to(w))))

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor, grid: int | tuple[int, int] | None = None) -> torch.Tensor:
        """Codes (B, h, w), or (B, N) with grid (h, w) / h (None: square) -> images (B, 3, h*f, w*f) in [-1, 1]."""
        codes = self._grid_codes(torch.as_tensor(codes, device=self.vq.post_quant_conv.weight.device), grid)
        quant = self.lookup(codes).to(self.vq.post_quant_conv.weight.dtype)  # (B, D, h, w)
        spatial = self.vq.config.norm_type == "spatial"  # MoVQ-style decoders condition their norms on the codes
        images = self.vq.decoder(self.vq.post_quant_conv(quant), quant if spatial else None)
        return images.clamp(-1, 1)

    def _grid_codes(self, codes: torch.Tensor, grid) -> torch.Tensor:
        if codes.is_floating_point() or codes.dim() not in (2, 3):
            raise InvalidInputError(f"codes must be an integer (B, h, w) or (B, N) tensor; got {codes.dtype} "
                                    f"{tuple(codes.shape)}")
        if codes.dim() == 2:
            n = codes.shape[1]
            h, w = (grid, grid) if isinstance(grid, int) else tuple(grid) if grid else (int(n ** 0.5),) * 2
            if h * w != n:
                raise InvalidInputError(f"{n} codes per image do not fill a {h}x{w} grid; pass grid=(h, w)")
            codes = codes.reshape(-1, h, w)
        bad = (codes < 0) | (codes >= self.codebook_size)
        if bool(bad.any()):
            raise InvalidInputError(f"code(s) {codes[bad].unique().tolist()[:8]} out of the codebook range "
                                    f"[0, {self.codebook_size})")
        return codes.long()

    # --- checkpoints -------------------------------------------------------------------------------------------------
    def save_pretrained(self, directory) -> Path:
        """diffusers' VQModel files (config.json + safetensors) plus mmspec_vq.json (the lookup geometry)."""
        out = Path(directory)
        self.vq.save_pretrained(str(out), safe_serialization=True)
        (out / SIDECAR).write_text(json.dumps({"kind": KIND, "l2_norm": self.l2_norm}, indent=2))
        return out

    @classmethod
    def from_pretrained(cls, directory, l2_norm: bool | None = None) -> "VQTokenizer":
        """A directory written by `save_pretrained` or by diffusers' VQModel (raw-codebook geometry unless said)."""
        from diffusers import VQModel

        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise CheckpointError(f"{str(directory)!r} has no config.json: expected a diffusers VQModel directory")
        try:
            vq = VQModel.from_pretrained(str(directory), local_files_only=True)
        except Exception as e:  # diffusers raises OSError / ValueError / safetensors errors for bad files
            raise CheckpointError(f"{str(directory)!r}: cannot load the VQModel ({type(e).__name__}: {e}); the "
                                  "checkpoint is corrupt, truncated or made for another model") from e
        side = directory / SIDECAR
        if l2_norm is None and side.is_file():
            try:
                l2_norm = bool(json.loads(side.read_text())["l2_norm"])
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{str(side)!r} is not a valid {KIND} file ({e!r})") from e
        return cls(vq.eval(), l2_norm=bool(l2_norm))

    def reference_state_dict(self) -> dict:
        """The weights in LlamaGen's reference layout (inverse of `convert_reference_state_dict`)."""
        out = {}
        for k, v in self.vq.state_dict().items():
            rk = _to_reference_key(k)
            out[rk] = v.reshape(*v.shape, 1, 1) if _is_attn_matrix(rk) else v
        return out


def to_pil(images: torch.Tensor) -> list:
    """Images (B, 3, H, W) or (3, H, W) in [-1, 1] -> list of RGB PIL images."""
    from PIL import Image

    if images.dim() == 3:
        images = images[None]
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, H, W)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


# --- LlamaGen reference layout ---------------------------------------------------------------------------------------
def _to_diffusers_key(k: str) -> str:
    m = re.match(r"(encoder|decoder)\.(.*)", k)
    if not m:
        return k  # quant_conv, post_quant_conv, quantize.embedding
    part, rest = m.groups()
    blocks = "down_blocks" if part == "encoder" else "up_blocks"
    for pat, rep in ((r"^mid\.0\.", "mid_block.resnets.0."), (r"^mid\.1\.", "mid_block.attentions.0."),
                     (r"^mid\.2\.", "mid_block.resnets.1."), (r"^norm_out\.", "conv_norm_out."),
                     (r"^conv_blocks\.(\d+)\.res\.", rf"{blocks}.\1.resnets."),
                     (r"^conv_blocks\.(\d+)\.attn\.", rf"{blocks}.\1.attentions."),
                     (r"^conv_blocks\.(\d+)\.(down|up)sample\.conv\.", r"%s.\1.\2samplers.0.conv." % blocks),
                     (r"\.nin_shortcut\.", ".conv_shortcut.")):
        rest = re.sub(pat, rep, rest)
    rest = re.sub(r"(attentions\.\d+\.)(norm|q|k|v|proj_out)\.", lambda a: a.group(1) + _ATTN[a.group(2)] + ".", rest)
    return f"{part}.{rest}"


def _to_reference_key(k: str) -> str:
    m = re.match(r"(encoder|decoder)\.(.*)", k)
    if not m:
        return k
    part, rest = m.groups()
    rest = re.sub(r"(attentions\.\d+\.)(group_norm|to_q|to_k|to_v|to_out\.0)\.",
                  lambda a: a.group(1) + _ATTN_INV[a.group(2)] + ".", rest)
    for pat, rep in ((r"^mid_block\.resnets\.0\.", "mid.0."), (r"^mid_block\.attentions\.0\.", "mid.1."),
                     (r"^mid_block\.resnets\.1\.", "mid.2."), (r"^conv_norm_out\.", "norm_out."),
                     (r"^(?:down|up)_blocks\.(\d+)\.resnets\.", r"conv_blocks.\1.res."),
                     (r"^(?:down|up)_blocks\.(\d+)\.attentions\.", r"conv_blocks.\1.attn."),
                     (r"^(?:down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv\.", r"conv_blocks.\1.\2sample.conv."),
                     (r"\.conv_shortcut\.", ".nin_shortcut.")):
        rest = re.sub(pat, rep, rest)
    return f"{part}.{rest}"


def _is_attn_matrix(reference_key: str) -> bool:
    return bool(re.search(r"\.(attn\.\d+|mid\.1)\.(q|k|v|proj_out)\.weight$", reference_key))


def convert_reference_state_dict(state: dict) -> dict:
    """LlamaGen vq_model.py names -> diffusers VQModel names (1x1 attention convs become linear weights)."""
    out = {}
    for k, v in state.items():
        if k == "quantize.codebook_used":  # training statistic of the reference, not a weight
            continue
        out[_to_diffusers_key(k)] = v.reshape(v.shape[0], v.shape[1]) if _is_attn_matrix(k) else v
    return out


def llamagen_vq_config(block_out_channels, layers_per_block: int = 2, attn_levels=None, z_channels: int = 256,
                       embed_dim: int = 8, codebook_size: int = 16384, image_size: int = 256,
                       norm_num_groups: int = 32) -> dict:
    """VQModel kwargs for LlamaGen's architecture (VQ-16: block_out_channels 128 * (1, 1, 2, 2, 4)). attn_levels:
    encoder levels with attention blocks (default: the last one, as in the reference); the decoder mirrors them."""
    n = len(block_out_channels)
    attn = {n - 1} if attn_levels is None else set(attn_levels)
    return dict(block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                down_block_types=tuple("AttnDownEncoderBlock2D" if i in attn else "DownEncoderBlock2D"
                                       for i in range(n)),
                up_block_types=tuple("AttnUpDecoderBlock2D" if n - 1 - i in attn else "UpDecoderBlock2D"
                                     for i in range(n)),
                latent_channels=z_channels, vq_embed_dim=embed_dim, num_vq_embeddings=codebook_size,
                sample_size=image_size, norm_num_groups=norm_num_groups)


def _reference_config(state: dict, path, image_size: int) -> dict:
    """Read the architecture off the reference weights' shapes (encoder and decoder must mirror each other)."""
    def count(prefix):
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

    try:
        n = count("encoder.conv_blocks.")
        chans = [int(state[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0]) for i in range(n)]
        dec = [int(state[f"decoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0]) for i in range(n)]
        attn = [i for i in range(n) if count(f"encoder.conv_blocks.{i}.attn.")]
        kw = dict(layers_per_block=count("encoder.conv_blocks.0.res."), attn_levels=attn,
                  z_channels=int(state["encoder.conv_out.weight"].shape[0]),
                  embed_dim=int(state["quant_conv.weight"].shape[0]),
                  codebook_size=int(state["quantize.embedding.weight"].shape[0]))
    except KeyError as e:
        raise CheckpointError(f"{str(path)!r}: incomplete LlamaGen VQ weights, missing {e}") from e
    if dec != chans[::-1]:
        raise UnsupportedModelError(f"{str(path)!r}: decoder channels {dec} do not mirror the encoder's {chans}; "
                                    "only tokenizers with encoder_ch_mult == decoder_ch_mult are supported")
    return llamagen_vq_config(chans, image_size=image_size, **kw)


def load_vq(source, *, l2_norm: bool | None = None, image_size: int = 256) -> VQTokenizer:
    """A VQTokenizer from: a VQTokenizer (returned as is), a diffusers VQModel (raw-codebook geometry unless l2_norm),
    a directory (`VQTokenizer.save_pretrained` or diffusers), or a LlamaGen reference checkpoint file (.pt/.pth/
    .bin read with weights_only=True, or .safetensors; weights alone or under model/module/state_dict/ema; the
    architecture is read off the shapes; l2_norm defaults to True, image_size to 256)."""
    from diffusers import VQModel

    if isinstance(source, VQTokenizer):
        return source
    if isinstance(source, VQModel):
        return VQTokenizer(source, l2_norm=bool(l2_norm))
    if not isinstance(source, (str, Path)):
        raise InvalidInputError(f"load_vq: expected a path, a VQTokenizer or a diffusers VQModel; got "
                                f"{type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        return VQTokenizer.from_pretrained(path, l2_norm=l2_norm)
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} does not exist: expected a VQ checkpoint file or directory")
    state = _unwrap(read_state_dict(path), path)
    vq = VQModel(**_reference_config(state, path, image_size))
    load_checked(vq, convert_reference_state_dict(state), path)
    return VQTokenizer(vq.eval(), l2_norm=True if l2_norm is None else l2_norm)


def _unwrap(obj: dict, path) -> dict:
    for key in ("model", "module", "state_dict", "ema"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {re.sub(r"^(module\.|_orig_mod\.)+", "", str(k)): v for k, v in obj.items()}
    if "encoder.conv_blocks.0.res.0.conv1.weight" not in state:
        hint = (" (a diffusers VQModel state dict: load its directory, with config.json)"
                if any(k.startswith("encoder.down_blocks.") for k in state) else "")
        raise CheckpointError(f"{str(path)!r}: unknown VQ checkpoint layout{hint}; expected LlamaGen vq_model.py "
                              f"weights (encoder.conv_blocks...), top-level keys {list(obj)[:8]}")
    return state
