"""EAGLE-3 drafters to and from the layouts vLLM (speculators) and SGLang load (`vision.export`): train -> export
-> import gives bit-identical drafts and identical acceptance for LLaVA and Qwen2-VL targets in both layouts; the files
carry the key set and config fields each engine reads (SGLang's from its published loader: `midlayer.*`, `fc`,
`norm`, `lm_head`, `d2t`, `t2d`); what a layout cannot hold, broken directories and oversized draft vocabularies
are typed errors. (speculators' own loader checks the export in the slow tier: tests/vlm/test_serving_check.py.)"""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmspec.errors import CheckpointError, InvalidInputError, UnsupportedModelError
from vision import SpeculativeVLM
from vision.drafters import Eagle3Head, EagleDrafter, EagleHead, load_feature_drafter
from vision.export import FORMATS, export_drafter, serving_layout
from vision.testing import tiny_vlm
from vlm_cases import MAX_NEW, hf_reference, image

FAMILIES = ("llava", "qwen2_vl")
# What SGLang's LlamaForCausalLMEagle3.load_weights maps for a one-layer draft (python/sglang/srt/models/
# llama_eagle3.py): the midlayer's projections, norms and MLP, fc, the final norm, the draft lm_head, d2t / t2d.
SGLANG_KEYS = {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d", "embed_tokens.weight"} | {
    f"midlayer.{k}.weight" for k in ("input_layernorm", "hidden_norm", "post_attention_layernorm",
                                     "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tmp_path_factory):
    """(family, target loaded from disk, processor, an EAGLE-3 head trained on it with half the vocabulary (chosen
    from the data), the root directory: target/, head/)."""
    from transformers import AutoModelForImageTextToText

    from vision.testing import test_image
    from vision.train import self_distill, train_eagle

    t = tiny_vlm(request.param)
    root = tmp_path_factory.mktemp(request.param)
    t.model.save_pretrained(root / "target")
    target = AutoModelForImageTextToText.from_pretrained(root / "target").eval()
    vocab = target.get_output_embeddings().weight.shape[0]
    records = self_distill(target, t.processor, [test_image(300 + i, t.image_size) for i in range(6)],
                           ["describe the image", "what is in the picture"] * 3, root / "data", max_new_tokens=8,
                           progress=False)
    torch.manual_seed(4)
    head = Eagle3Head(target, taps=(2, 0, 1), draft_vocab=vocab // 2)
    train_eagle(head, target, t.processor, records, steps=8, lr=3e-3, batch_size=2, unroll=2, progress=False,
                out_dir=root / "head")
    assert head.vocab_chosen
    return request.param, target, t.processor, head, root


def rows(family):
    return [{"prompt": "describe the image", "images": [image(60, family)]},
            {"prompt": "what is in the picture, and where", "images": [image(61, family)]}]


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_gives_bit_identical_drafts_and_acceptance(setup, fmt, tmp_path):
    family, target, processor, head, _ = setup
    assert head.taps == (0, 1, 2)  # ascending, as the engines concatenate them
    out = export_drafter(head, target, fmt, tmp_path / fmt, speculative_tokens=4)
    assert serving_layout(out) == fmt
    back = EagleDrafter.from_pretrained(out, target, tree=3).head
    assert isinstance(back, Eagle3Head) and back.source_layout == fmt and back.taps == head.taps
    assert torch.equal(back.d2t, head.d2t) and torch.equal(back.t2d, head.t2d)
    ids, feats = torch.randint(0, head.target_vocab, (2, 7)), torch.randn(2, 7, 3 * head.config.hidden_size)
    a, b = head(ids, feats, use_cache=False), back(ids, feats, use_cache=False)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.hidden_states[0], b.hidden_states[0])
    batch = rows(family)
    runs = [SpeculativeVLM(target, processor, EagleDrafter(h, 3)).generate(
        prompt=[r["prompt"] for r in batch], images=[r["images"] for r in batch], max_new_tokens=MAX_NEW)
        for h in (head, back)]
    assert runs[0].sequences == runs[1].sequences == [hf_reference(family, r) for r in batch]  # lossless too
    assert runs[0].stats.accepted_tokens == runs[1].stats.accepted_tokens
    assert runs[0].stats.alpha == runs[1].stats.alpha


def test_sglang_export_carries_sglang_keys_and_config(setup, tmp_path):
    _, target, _, head, _ = setup
    out = export_drafter(head, target, "sglang", tmp_path / "sg")
    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == SGLANG_KEYS
    h, n, v = head.config.hidden_size, head.draft_vocab_size, head.target_vocab
    assert weights["fc.weight"].shape == (h, 3 * h) and weights["lm_head.weight"].shape == (n, h)
    assert weights["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * h
    assert weights["d2t"].dtype == torch.int64 and weights["t2d"].dtype == torch.bool and weights["t2d"].shape == (v,)
    assert (torch.arange(n) + weights["d2t"]).tolist() == weights["t2d"].nonzero().flatten().tolist()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["draft_vocab_size"] == n
    assert cfg["vocab_size"] == v and cfg["num_hidden_layers"] == 1 and cfg["model_type"] == "llama"
    # SGLang captures the input of layer i for explicit id i - 1 (it adds one): hidden states 0, 1, 2 -> -1, 0, 1
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [-1, 0, 1]
    mrope = target.config.get_text_config().rope_parameters.get("mrope_section")  # Qwen2-VL: the target's sections
    assert (cfg["rope_scaling"] or {}).get("mrope_section") == mrope and (head.mrope is not None) == bool(mrope)


def test_speculators_export_carries_its_config(setup, tmp_path):
    _, target, _, head, root = setup
    out = export_drafter(head, target, "speculators", tmp_path / "sp", speculative_tokens=5)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["speculators_model_type"] == "eagle3" and cfg["architectures"] == ["Eagle3Speculator"]
    assert cfg["draft_vocab_size"] == head.draft_vocab_size and cfg["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    assert cfg["norm_before_residual"] is False and cfg["transformer_layer_config"]["model_type"] == "llama"
    assert cfg["transformer_layer_config"]["vocab_size"] == head.target_vocab
    proposal = cfg["speculators_config"]["proposal_methods"][0]
    assert proposal["speculative_tokens"] == 5 and proposal["proposal_type"] == "greedy"
    assert cfg["speculators_config"]["verifier"]["name_or_path"] == str(root / "target")
    keys = set(load_file(str(out / "model.safetensors")))
    assert keys == {k.replace("midlayer.", "layers.0.") for k in SGLANG_KEYS}


def test_the_cli_exports_a_trained_head(setup, tmp_path, capsys):
    from mmspec.cli import build_parser

    _, target, _, head, root = setup
    args = build_parser().parse_args(["export-drafter", str(root / "head"), "--format", "sglang", "--out",
                                      str(tmp_path / "cli")])  # the target's path comes from the head's config
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["draft_vocab_size"] == head.draft_vocab_size
    back = load_feature_drafter(tmp_path / "cli", target).head
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), head.state_dict().values()))


def test_what_a_layout_cannot_hold_and_broken_directories_are_typed(setup, tmp_path):
    _, target, _, head, _ = setup
    with pytest.raises(UnsupportedModelError, match="EAGLE-1 fusion"):
        export_drafter(EagleHead(target), target, "speculators", tmp_path / "e1")
    from vision.drafters import DreamHead

    with pytest.raises(UnsupportedModelError, match="cross-attention"):
        export_drafter(DreamHead(target, taps=(1, -1)), target, "sglang", tmp_path / "dream")
    with pytest.raises(InvalidInputError, match="valid formats"):
        export_drafter(head, target, "onnx", tmp_path / "x")
    out = export_drafter(head, target, "sglang", tmp_path / "sg")
    weights = load_file(str(out / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if k != "midlayer.hidden_norm.weight"}, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="midlayer.hidden_norm.weight"):
        load_feature_drafter(out, target)
    big = {**weights, "d2t": torch.zeros(head.target_vocab + 5, dtype=torch.long)}
    save_file(big, str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "draft_vocab_size": head.target_vocab + 5}))
    with pytest.raises(CheckpointError, match="larger than the target's vocabulary"):
        load_feature_drafter(out, target)
    (out / "model.safetensors").unlink()
    (out / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickles, which mmspec never loads"):
        load_feature_drafter(out, target)


def mrope_reference(pos: torch.Tensor, head_dim: int, theta: float, section: list[int], interleaved: bool):
    """cos of M-RoPE from its definition: frequency j (of head_dim / 2) rotates by the temporal, height or width
    position: by contiguous sections (Qwen2-VL), or interleaved t, h, w, t, ... (Qwen3-VL)."""
    j = torch.arange(head_dim // 2)
    if interleaved:
        row = torch.where((j % 3 == 1) & (j < 3 * section[1]), 1, torch.where((j % 3 == 2) & (j < 3 * section[2]),
                                                                            2, 0))
    else:
        row = (j >= section[0]).long() + (j >= section[0] + section[1]).long()
    inv_freq = 1.0 / theta ** (2 * j.double() / head_dim)
    angle = pos[row].permute(1, 2, 0).double() * inv_freq  # (B, L, D/2): each frequency at its row's position
    return torch.cat([angle, angle], dim=-1).cos().float()


def test_an_mrope_head_rotates_as_m_rope_is_defined():
    for family in ("qwen2_vl", "qwen3_vl"):
        target = tiny_vlm(family).model
        head = Eagle3Head(target, taps=(0, 1, 2))
        pos = torch.stack([torch.arange(9), torch.arange(9) % 3, torch.arange(9) // 3])[:, None].expand(3, 2, 9)
        x = torch.randn(2, 9, head.config.hidden_size)
        cos, _ = head.rope(x, pos)
        ref = mrope_reference(pos, head.config.head_dim, 10000.0, head.mrope["mrope_section"],
                              head.mrope["mrope_interleaved"])
        assert torch.allclose(cos, ref, atol=1e-5), family
        flat, _ = head.rope(x, torch.arange(9).expand(2, 9))  # text only: every row at the same position
        assert not torch.allclose(flat, cos) and torch.allclose(flat, mrope_reference(
            torch.arange(9).expand(3, 2, 9), head.config.head_dim, 10000.0, [8, 0, 0], False), atol=1e-5)


def test_an_mrope_head_is_fed_the_targets_positions_after_an_image():
    t = tiny_vlm("qwen2_vl")
    head = Eagle3Head(t.model, taps=(0, 1, 2))
    seen = []
    hook = head.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True)
    try:
        row = rows("qwen2_vl")[0]
        out = SpeculativeVLM(t.model, t.processor, EagleDrafter(head, 3)).generate(**row, max_new_tokens=MAX_NEW)
    finally:
        hook.remove()
    assert out.token_ids == hf_reference("qwen2_vl", row)
    first = seen[0]  # the prompt's pairs: (3, 1, T), the rows differ over the image
    assert first.shape[0] == 3 and not torch.equal(first[0], first[1])
