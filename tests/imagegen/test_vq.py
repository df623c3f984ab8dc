"""VQ tokenizers: decode / encode shapes and ranges, lookup geometry, PIL conversion, checkpoints (tiny, CPU)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from image_ar.models import VQTokenizer, load_vq, to_pil
from image_ar.models.vq import convert_reference_state_dict
from image_ar.testing import tiny_vq
from mmspec.errors import CheckpointError, ImageError, InvalidInputError

KINDS = ["llamagen", "diffusers"]


@pytest.fixture(scope="module")
def vqs():
    return {kind: tiny_vq(kind) for kind in KINDS}


def random_codes(vq, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vq.codebook_size, (b, vq.grid_size, vq.grid_size), generator=g)


@pytest.mark.parametrize("kind", KINDS)
def test_geometry_and_decode_shapes(kind, vqs):
    vq = vqs[kind]
    assert (vq.codebook_size, vq.embed_dim, vq.downsample_factor, vq.image_size, vq.grid_size) == (64, 8, 2, 8, 4)
    codes = random_codes(vq)
    images = vq.decode_codes(codes)
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0
    assert torch.equal(vq.decode_codes(codes.flatten(1)), images)  # (B, N): square grid by default
    assert torch.equal(vq.decode_codes(codes.flatten(1), grid=(4, 4)), images)
    wide = vq.decode_codes(torch.zeros(1, 2, 8, dtype=torch.long))  # non-square grids decode too
    assert wide.shape == (1, 3, 4, 16)


@pytest.mark.parametrize("kind", KINDS)
def test_encode_decode_round_trip_shapes(kind, vqs):
    vq = vqs[kind]
    codes = vq.encode(vq.decode_codes(random_codes(vq)))
    assert codes.shape == (2, 4, 4) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < vq.codebook_size
    assert vq.encode(torch.rand(1, 3, 16, 8) * 2 - 1).shape == (1, 8, 4)


def test_codebook_geometry_and_self_lookup(vqs):
    llamagen, plain = vqs["llamagen"], vqs["diffusers"]
    emb = llamagen.codebook_embeddings()
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(64))
    assert not torch.allclose(plain.codebook_embeddings().norm(dim=-1), torch.ones(64))
    assert torch.equal(plain.codebook_embeddings(), plain.vq.quantize.embedding.weight)
    codes = random_codes(llamagen)
    # l2 lookup is scale-free: a codebook vector, scaled, quantises to its own index
    assert torch.equal(llamagen.quantize(3.0 * llamagen.lookup(codes)), codes)
    assert torch.equal(plain.quantize(plain.lookup(codes)), codes)
    # and it is the cosine nearest neighbour, not the Euclidean one, for the LlamaGen geometry
    z = torch.randn(50, 8)
    cos = (torch.nn.functional.normalize(z, dim=-1) @ emb.t()).argmax(-1)
    assert torch.equal(llamagen.quantize(z.t().reshape(1, 8, 5, 10)).flatten(), cos)


def test_to_pil():
    images = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2).expand(2, 3, 2, 2)
    pil = to_pil(images)
    assert len(pil) == 2 and all(isinstance(p, Image.Image) and p.mode == "RGB" and p.size == (2, 2) for p in pil)
    assert [pil[0].getpixel(xy)[0] for xy in ((0, 0), (1, 0), (0, 1), (1, 1))] == [0, 128, 255, 255]
    assert len(to_pil(images[0])) == 1


def test_bad_codes_and_images(vqs):
    vq = vqs["llamagen"]
    with pytest.raises(InvalidInputError, match="codebook"):
        vq.decode_codes(torch.full((1, 4, 4), 64))
    with pytest.raises(InvalidInputError, match="grid"):
        vq.decode_codes(torch.zeros(1, 15, dtype=torch.long))
    with pytest.raises(InvalidInputError):
        vq.decode_codes(torch.zeros(1, 4, 4))  # float codes
    with pytest.raises(ImageError):
        vq.encode(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ImageError, match="multiple"):
        vq.encode(torch.zeros(1, 3, 7, 8))


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_round_trip(kind, vqs, tmp_path):
    vq = vqs[kind]
    vq.save_pretrained(tmp_path / "vq")
    for loaded in (VQTokenizer.from_pretrained(tmp_path / "vq"), load_vq(tmp_path / "vq")):
        assert loaded.l2_norm == vq.l2_norm
        codes = random_codes(vq)
        assert torch.equal(loaded.decode_codes(codes), vq.decode_codes(codes))


@pytest.mark.parametrize("wrap", ["model", "state_dict", None])
def test_reference_checkpoint_loads_to_identical_outputs(wrap, vqs, tmp_path):
    vq = vqs["llamagen"]
    state = vq.reference_state_dict()
    assert "encoder.conv_blocks.1.attn.0.q.weight" in state and "decoder.mid.1.proj_out.weight" in state
    assert state["encoder.conv_blocks.1.attn.0.q.weight"].dim() == 4  # 1x1 convs, as in the reference
    assert not any(k.startswith(("encoder.down_blocks", "decoder.up_blocks")) for k in state)
    state["quantize.codebook_used"] = torch.zeros(65536)  # a reference training buffer: ignored
    path = tmp_path / "vq_ds2.pt"
    torch.save(state if wrap is None else {wrap: state, "steps": 3}, path)
    loaded = load_vq(path, image_size=8)
    assert loaded.l2_norm and loaded.grid_size == 4
    codes = random_codes(vq)
    assert torch.equal(loaded.decode_codes(codes), vq.decode_codes(codes))
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(loaded.encode(images), vq.encode(images))
    converted = convert_reference_state_dict(state)
    assert all(torch.equal(converted[k], v) for k, v in vq.vq.state_dict().items())


def test_reference_safetensors_file(vqs, tmp_path):
    from safetensors.torch import save_file

    vq = vqs["llamagen"]
    path = tmp_path / "vq.safetensors"
    save_file({k: v.contiguous() for k, v in vq.reference_state_dict().items()}, str(path))
    codes = random_codes(vq)
    assert torch.equal(load_vq(path, image_size=8).decode_codes(codes), vq.decode_codes(codes))


def test_load_vq_passthrough_and_wrapping(vqs):
    vq = vqs["diffusers"]
    assert load_vq(vq) is vq
    wrapped = load_vq(vq.vq)
    assert isinstance(wrapped, VQTokenizer) and not wrapped.l2_norm
    with pytest.raises(InvalidInputError):
        load_vq(42)


def test_checkpoint_errors(vqs, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_vq(tmp_path / "missing.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"garbage bytes, not a zip or a pickle")
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        load_vq(bad)
    unknown = tmp_path / "unknown.pt"
    torch.save({"model": {"foo.weight": torch.zeros(2)}}, unknown)
    with pytest.raises(CheckpointError, match="unknown VQ checkpoint layout"):
        load_vq(unknown)
    diffusers_layout = tmp_path / "diffusers_state.pt"
    torch.save(vqs["diffusers"].vq.state_dict(), diffusers_layout)
    with pytest.raises(CheckpointError, match="config.json"):
        load_vq(diffusers_layout)
    state = vqs["llamagen"].reference_state_dict()
    del state["decoder.conv_out.bias"]
    partial = tmp_path / "partial.pt"
    torch.save({"model": state}, partial)
    with pytest.raises(CheckpointError, match="decoder.conv_out.bias"):
        load_vq(partial)
    state = vqs["llamagen"].reference_state_dict()
    state["post_quant_conv.weight"] = torch.zeros(32, 4, 1, 1)
    wrong = tmp_path / "wrong.pt"
    torch.save({"model": state}, wrong)
    with pytest.raises(CheckpointError, match=r"post_quant_conv.weight.*\(32, 4, 1, 1\).*\(32, 8, 1, 1\)"):
        load_vq(wrong)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_vq(tmp_path / "empty_dir")
    vqs["diffusers"].save_pretrained(tmp_path / "d")
    weights = next((tmp_path / "d").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_vq(tmp_path / "d")
