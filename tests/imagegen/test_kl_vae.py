"""KL-VAE latent codec (MAR): patchify layout, encode / decode, checkpoints in diffusers and LDM layouts (tiny, CPU)."""
from __future__ import annotations

import argparse
import re

import pytest
import torch
from safetensors.torch import save_file

from image_ar.models.kl_vae import (
    KL16_CONFIG,
    convert_ldm_kl_state_dict,
    decode_tokens,
    encode_images,
    infer_kl_config,
    kl16_vae,
    latents_to_tokens,
    load_kl_vae,
    tiny_kl_vae,
    token_grid,
    to_pil,
    tokens_to_latents,
)
from mmspec.errors import CheckpointError, ImageError, InvalidInputError


class NotATensor:  # a class torch.load(weights_only=True) must refuse
    pass


@pytest.fixture(scope="module")
def vae():
    return tiny_kl_vae()


def random_tokens(vae, b=2, grid=8, patch_size=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, grid * grid, vae.config.latent_channels * patch_size ** 2, generator=g)


def to_ldm(state: dict, n_up: int) -> dict:
    """Test-only inverse of the LDM -> diffusers renaming: diffusers AutoencoderKL keys -> LDM / MAR keys."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in state.items():
        k = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m.group(1)) + 1}", k)
        k = k.replace("mid_block.attentions.0", "mid.attn_1").replace("conv_norm_out", "norm_out")
        k = k.replace("conv_shortcut", "nin_shortcut").replace("downsamplers.0", "downsample")
        k = k.replace("upsamplers.0", "upsample").replace("down_blocks.", "down.")
        k = re.sub(r"up_blocks\.(\d+)", lambda m: f"up.{n_up - 1 - int(m.group(1))}", k)
        k = re.sub(r"\.resnets\.", ".block.", k)
        k = re.sub(r"attentions\.(\d+)\.", r"attn.\1.", k)
        for new, old in attn.items():  # names used only inside attention blocks
            k = k.replace(f".{new}.", f".{old}.")
        is_attn_linear = re.search(r"(attn\.\d+|attn_1)\.(q|k|v|proj_out)\.weight$", k)
        out[k] = v[:, :, None, None] if is_attn_linear else v  # LDM's attention projections are 1x1 convs
    return out


# --- tokens <-> latents --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch_size", [1, 2])
def test_patchify_round_trip(patch_size):
    latents = torch.randn(2, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    tokens = latents_to_tokens(latents, patch_size)
    h, w = 4 // patch_size, 6 // patch_size
    assert tokens.shape == (2, h * w, 3 * patch_size ** 2)
    assert torch.equal(tokens_to_latents(tokens, (h, w), patch_size), latents)
    assert torch.equal(tokens_to_latents(tokens, (h, w), patch_size, channels=3), latents)


def test_patchify_element_positions_follow_mar():
    # MAR: reshape (B, C, h, p, w, p) -> 'nchpwq->nhwcpq' -> (B, h*w, C*p*p): grid row-major, then c, p, q
    latents = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)  # C=2, H=4, W=6, p=2 -> 2x3 grid
    tokens = latents_to_tokens(latents, 2)  # (1, 6, 8)
    for c, y, x in [(1, 3, 4), (0, 2, 1), (1, 0, 5)]:
        token = (y // 2) * 3 + x // 2
        inner = c * 4 + (y % 2) * 2 + x % 2
        assert tokens[0, token, inner] == latents[0, c, y, x]
    assert tokens[0, 5].tolist() == [16, 17, 22, 23, 40, 41, 46, 47]  # token (1, 2): c0 rows 2-3 cols 4-5, then c1


def test_square_grid_from_int():
    tokens = random_tokens(tiny_kl_vae(), b=1, grid=3)
    assert torch.equal(tokens_to_latents(tokens, 3), tokens_to_latents(tokens, (3, 3)))


# --- encode / decode -----------------------------------------------------------------------------------------------
def test_decode_shapes_range_and_diversity(vae):
    tokens = random_tokens(vae)
    images = decode_tokens(vae, tokens, 8)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert images.std(dim=(2, 3)).min() > 0  # not a flat image per channel
    assert not torch.allclose(images[0], images[1])  # different tokens, different images
    pils = to_pil(images)
    assert len(pils) == 2 and pils[0].size == (16, 16) and pils[0].mode == "RGB"


def test_decode_divides_by_scaling_factor(vae):
    tokens = random_tokens(vae)
    z = tokens_to_latents(tokens, 8) / vae.config.scaling_factor
    with torch.no_grad():
        expected = vae.decode(z).sample.clamp(-1, 1)
    torch.testing.assert_close(decode_tokens(vae, tokens, (8, 8)), expected)


def test_encode_mode_and_sample(vae):
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    tokens = encode_images(vae, images)
    assert tokens.shape == (2, 64, 4)
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mode()
    torch.testing.assert_close(tokens, latents_to_tokens(mean * vae.config.scaling_factor))
    assert encode_images(vae, images, patch_size=2).shape == (2, 16, 16)
    s1 = encode_images(vae, images, sample=True, generator=torch.Generator().manual_seed(0))
    s2 = encode_images(vae, images, sample=True, generator=torch.Generator().manual_seed(0))
    s3 = encode_images(vae, images, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2) and not torch.equal(s1, s3) and not torch.equal(s1, tokens)
    assert decode_tokens(vae, tokens, 8).shape == images.shape


def test_token_grid():
    assert token_grid(kl16_vae_meta(), 256) == (16, 16)  # MAR: 256px -> 16x16 tokens
    assert token_grid(kl16_vae_meta(), 256, 512, patch_size=2) == (8, 16)
    with pytest.raises(InvalidInputError, match="multiple of"):
        token_grid(kl16_vae_meta(), 200)


def test_tiny_vae_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = tiny_kl_vae(seed=0), tiny_kl_vae(seed=0), tiny_kl_vae(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    w = "decoder.conv_in.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w]) and not torch.equal(a.state_dict()[w], c.state_dict()[w])


# --- bad inputs ------------------------------------------------------------------------------------------------------
def test_bad_token_shapes_raise(vae):
    tokens = random_tokens(vae)  # (2, 64, 4)
    with pytest.raises(InvalidInputError, match=r"64 tokens .* 7x7 grid"):
        decode_tokens(vae, tokens, 7)
    with pytest.raises(InvalidInputError, match=r"token width 4 .* 16"):
        decode_tokens(vae, tokens[:, :16], (4, 4), patch_size=2)  # p=2 needs 4 channels x 2^2
    with pytest.raises(InvalidInputError, match=r"token width 5 .* 4 x 1\^2 = 4"):
        decode_tokens(vae, torch.randn(1, 64, 5), 8)  # wrong latent channel count for this VAE
    with pytest.raises(InvalidInputError, match=r"\(B, N, D\)"):
        decode_tokens(vae, torch.randn(64, 4), 8)
    with pytest.raises(InvalidInputError, match="grid must be"):
        tokens_to_latents(tokens, (8, 0))
    with pytest.raises(InvalidInputError, match="patch_size must be"):
        latents_to_tokens(torch.randn(1, 4, 8, 8), 0)
    with pytest.raises(InvalidInputError, match="not a multiple of patch_size 3"):
        latents_to_tokens(torch.randn(1, 4, 8, 8), 3)


def test_bad_images_raise(vae):
    with pytest.raises(ImageError, match=r"\(B, 3, H, W\)"):
        encode_images(vae, torch.zeros(1, 1, 16, 16))
    with pytest.raises(InvalidInputError, match="multiple of"):
        encode_images(vae, torch.zeros(1, 3, 15, 16))


# --- checkpoints -----------------------------------------------------------------------------------------------------
def test_save_pretrained_round_trip(vae, tmp_path):
    vae.save_pretrained(tmp_path / "kl")
    loaded = load_kl_vae(tmp_path / "kl")
    tokens = random_tokens(vae)
    assert torch.equal(decode_tokens(loaded, tokens, 8), decode_tokens(vae, tokens, 8))
    assert load_kl_vae(tmp_path / "kl", dtype=torch.float64).decoder.conv_in.weight.dtype == torch.float64


def test_pipeline_directory_with_vae_subfolder(vae, tmp_path):
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    tokens = random_tokens(vae)
    assert torch.equal(decode_tokens(load_kl_vae(tmp_path / "pipe"), tokens, 8), decode_tokens(vae, tokens, 8))


def test_diffusers_safetensors_file(vae, tmp_path):
    save_file(vae.state_dict(), tmp_path / "kl.safetensors")
    loaded = load_kl_vae(tmp_path / "kl.safetensors", config={"norm_num_groups": 4, "sample_size": 16})
    assert loaded.config.down_block_types == vae.config.down_block_types
    assert loaded.config.scaling_factor == KL16_CONFIG["scaling_factor"]
    tokens = random_tokens(vae)
    assert torch.equal(decode_tokens(loaded, tokens, 8), decode_tokens(vae, tokens, 8))


@pytest.mark.parametrize("layout", ["ckpt_model", "ckpt_state_dict_prefixed", "safetensors"])
def test_ldm_checkpoint_reproduces_decode(vae, tmp_path, layout):
    ldm = to_ldm(vae.state_dict(), n_up=2)
    assert "encoder.down.1.attn.0.q.weight" in ldm and ldm["encoder.down.1.attn.0.q.weight"].dim() == 4
    if layout == "ckpt_model":  # MAR's vae/kl16.ckpt: {"model": weights}
        path = tmp_path / "kl16.ckpt"
        torch.save({"model": ldm, "args": argparse.Namespace(vae_embed_dim=4), "epoch": 3}, path)
    elif layout == "ckpt_state_dict_prefixed":  # a Lightning LDM checkpoint: the VAE inside, loss weights beside
        path = tmp_path / "ldm.ckpt"
        sd = {"first_stage_model." + k: v for k, v in ldm.items()} | {"loss.logvar": torch.zeros(())}
        torch.save({"state_dict": sd, "global_step": 10}, path)
    else:
        path = tmp_path / "kl16.safetensors"
        save_file(ldm, path)
    loaded = load_kl_vae(path, config={"norm_num_groups": 4, "sample_size": 16})
    assert loaded.config.latent_channels == 4 and tuple(loaded.config.block_out_channels) == (8, 16)
    tokens = random_tokens(vae)
    assert torch.equal(decode_tokens(loaded, tokens, 8), decode_tokens(vae, tokens, 8))
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    assert torch.equal(encode_images(loaded, images), encode_images(vae, images))  # encoder attention mapped too


def test_ldm_decoder_level_attention_is_renumbered(tmp_path):
    # LDM numbers decoder levels from the highest resolution; attention only in diffusers' up_blocks.0 -> LDM up.1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        vae = kl16_vae(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                       down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"))
    ldm = to_ldm(vae.state_dict(), n_up=2)
    assert "decoder.up.1.attn.1.k.weight" in ldm and not any("decoder.up.0.attn" in k for k in ldm)
    save_file(ldm, tmp_path / "kl.safetensors")
    loaded = load_kl_vae(tmp_path / "kl.safetensors", config={"norm_num_groups": 4})
    assert tuple(loaded.config.up_block_types) == ("AttnUpDecoderBlock2D", "UpDecoderBlock2D")
    tokens = random_tokens(vae)
    assert torch.equal(decode_tokens(loaded, tokens, 8), decode_tokens(vae.eval(), tokens, 8))


def kl16_vae_meta():
    with torch.device("meta"):
        return kl16_vae()


def test_kl16_layout_matches_mar_checkpoint_keys():
    model = kl16_vae_meta()
    ldm = to_ldm(model.state_dict(), n_up=5)
    # MAR's KL-16: encoder attention after both res blocks at 16x16 only, none in the decoder levels
    assert {k.split(".attn.")[0] for k in ldm if ".attn." in k} == {"encoder.down.4"}
    assert ldm["encoder.down.4.attn.1.q.weight"].shape == (512, 512, 1, 1)
    assert ldm["quant_conv.weight"].shape == (32, 32, 1, 1) and ldm["post_quant_conv.weight"].shape == (16, 16, 1, 1)
    assert ldm["decoder.up.0.block.2.conv2.weight"].shape == (128, 128, 3, 3)  # 3 res blocks per decoder level
    assert ldm["encoder.down.2.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    assert ldm["encoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)
    assert "decoder.mid.block_2.norm1.weight" in ldm and "decoder.norm_out.weight" in ldm
    assert "decoder.up.4.upsample.conv.weight" in ldm and "decoder.up.0.upsample.conv.weight" not in ldm
    assert "encoder.down.3.downsample.conv.weight" in ldm and "encoder.down.4.downsample.conv.weight" not in ldm
    new = convert_ldm_kl_state_dict(ldm)
    own = model.state_dict()
    assert set(new) == set(own) and all(new[k].shape == own[k].shape for k in own)
    cfg, keys = infer_kl_config(new), ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                                       "latent_channels", "in_channels", "out_channels")
    assert {k: cfg[k] for k in keys} == {k: KL16_CONFIG[k] for k in keys}
    assert KL16_CONFIG["scaling_factor"] == 0.2325


@pytest.mark.parametrize("payload", [NotATensor(), argparse.ArgumentParser])
def test_ckpt_with_objects_raises(tmp_path, payload):
    path = tmp_path / "unsafe.ckpt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": payload}, path)
    with pytest.raises(CheckpointError, match=r"non-tensor object .*save_file"):
        load_kl_vae(path)


def test_bad_checkpoints_raise(vae, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_kl_vae(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.ckpt"):
        load_kl_vae(tmp_path / "junk.ckpt")
    save_file({"w": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="no KL-VAE encoder weights"):
        load_kl_vae(tmp_path / "other.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_kl_vae(tmp_path / "empty")
    save_file(vae.state_dict(), tmp_path / "kl.safetensors")
    with pytest.raises(CheckpointError, match="shape"):  # another latent width than the config asks for
        load_kl_vae(tmp_path / "kl.safetensors", config={"norm_num_groups": 4, "latent_channels": 8})
