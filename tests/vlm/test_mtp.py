"""The target's own MTP layers as a drafter (`vision.drafters.MtpHead`, driven by EagleDrafter): read from the
target's checkpoint in the serving layout (`mtp.*`, which transformers drops on load), lossless on a tiny Qwen3.5
(text: greedy equality with `generate` for chains, static and dynamic trees, batches, and a chi-square test of
sampling; VLM: with images, `drafter="mtp"` by name), and a checkpoint without MTP weights is a typed error."""
from __future__ import annotations

import inspect

import pytest
import torch
from safetensors.torch import save_file

from mmspec import SpeculativeDecoder
from mmspec.errors import CheckpointError
from mmspec.sampling import SamplingSpec
from mmspec.testing import tiny_qwen3_5
from mmspec.tree import DynamicTree, StaticTree
from stats_tools import chi_square, exact_joint, sampled_runs
from vision import SpeculativeVLM
from vision.drafters import EagleDrafter, MtpHead
from vlm_cases import MAX_NEW, family, hf_reference, image

PROMPTS = [[5, 9, 3, 7, 1, 2, 44, 12], [8, 8, 4], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Qwen3.5 saved with save_pretrained, plus its MTP layer in an extra safetensors file (`mtp.*`), loaded
    back by path as a user would: transformers ignores the mtp tensors, MtpHead reads them."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("qwen3_5")
    model = tiny_qwen3_5()
    model.save_pretrained(root)
    torch.manual_seed(5)
    head = MtpHead(model)
    save_file({k: v.contiguous() for k, v in head.state_for_checkpoint().items()}, str(root / "mtp.safetensors"))
    return root, AutoModelForCausalLM.from_pretrained(root).eval(), head


def refs(model, n=16):
    return [model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]


def test_mtp_weights_are_read_from_the_checkpoint(saved):
    root, model, written = saved
    head = MtpHead.from_checkpoint(model)  # the directory the target was loaded from
    assert {k for k in head.state_for_checkpoint()} == {k for k in written.state_for_checkpoint()}
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), written.state_dict().values()))
    assert any(k.startswith("mtp.layers.0.self_attn.") for k in head.state_for_checkpoint())  # the serving layout


@pytest.mark.parametrize("tree", [3, StaticTree.full((2, 2, 1)), DynamicTree(topk=3, depth=3, total=8)],
                         ids=["chain3", "tree221", "dynamic"])
def test_mtp_drafter_is_lossless(saved, tree):
    _, model, _ = saved
    expected = refs(model)
    dec = SpeculativeDecoder(model, EagleDrafter(MtpHead.from_checkpoint(model), tree))
    assert dec.generate(PROMPTS, max_new_tokens=16).sequences == expected
    assert [dec.generate([p], max_new_tokens=16).sequences[0] for p in PROMPTS] == expected


def test_mtp_sampling_matches_the_exact_distribution(saved):
    _, model, _ = saved
    prompt, length, spec = [5, 17, 5, 17, 5, 17, 5], 3, SamplingSpec(temperature=1.0, top_k=4, top_p=0.9)
    joint = exact_joint(model, prompt, spec, length)
    dec = SpeculativeDecoder(model, EagleDrafter(MtpHead.from_checkpoint(model), 2))
    samples = []
    for start in range(0, 1200, 300):
        res = dec.generate([prompt] * 300, max_new_tokens=length, seed=start, temperature=1.0, top_k=4, top_p=0.9)
        samples.extend(tuple(s) for s in res.sequences)
    stat, threshold, outside = chi_square(samples, joint)
    assert outside == 0 and stat < threshold, (stat, threshold)


def test_checkpoint_without_mtp_weights_is_a_typed_error(tmp_path):
    model = tiny_qwen3_5()
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no MTP weights"):
        MtpHead.from_checkpoint(model, tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint directory"):
        MtpHead.from_checkpoint(tiny_qwen3_5())  # built in memory: no directory to read


def test_vlm_drafter_mtp_by_name(tmp_path):
    """SpeculativeVLM(drafter="mtp") on a Qwen3.5 VLM loaded from a directory whose checkpoint has MTP weights."""
    from transformers import AutoModelForImageTextToText

    t = family("qwen3_5")
    t.model.save_pretrained(tmp_path)
    torch.manual_seed(6)
    save_file({k: v.contiguous() for k, v in MtpHead(t.model).state_for_checkpoint().items()},
              str(tmp_path / "mtp.safetensors"))
    model = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    svlm = SpeculativeVLM(model, t.processor, "mtp", tree=3)
    row = {"prompt": "describe the image", "images": [image(51, "qwen2_vl")]}
    assert svlm.generate(**row, max_new_tokens=MAX_NEW).token_ids == hf_reference("qwen3_5", row)


# --- transformers' MtpModel (configs with num_mtp_layers) -------------------------------------------------------
@pytest.fixture(scope="module")
def deepseek():
    """A tiny DeepSeek-V3 and its MTP layer as transformers builds it (`MtpModel`; random weights: a tiny
    checkpoint cannot carry them where transformers' loader looks, its key patterns name layer 61)."""
    from transformers.modeling_layers import MtpModel

    from mmspec.testing import tiny_deepseek_v3
    from vision.drafters import MtpModelHead

    model = tiny_deepseek_v3()
    torch.manual_seed(7)
    mtp = MtpModel(model, 1)
    with torch.no_grad():
        for p in mtp.layers.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model, MtpModelHead(mtp.eval())


@pytest.mark.parametrize("tree", [3, StaticTree.full((2, 2, 1)), DynamicTree(topk=3, depth=3, total=8)],
                         ids=["chain3", "tree221", "dynamic"])
def test_transformers_mtp_model_drafter_is_lossless(deepseek, tree):
    model, head = deepseek
    expected = refs(model, 12)
    dec = SpeculativeDecoder(model, EagleDrafter(head, tree))
    assert dec.generate(PROMPTS, max_new_tokens=12).sequences == expected
    assert [dec.generate([p], max_new_tokens=12).sequences[0] for p in PROMPTS] == expected


def test_transformers_mtp_model_sampling_matches_the_exact_distribution(deepseek):
    model, head = deepseek
    prompt, length, spec = [5, 17, 5, 17, 5, 17, 5], 3, SamplingSpec(temperature=1.0, top_k=4, top_p=0.9)
    joint = exact_joint(model, prompt, spec, length)
    samples, _, _ = sampled_runs(SpeculativeDecoder(model, EagleDrafter(head, 2)), prompt, length, 1200,
                                 temperature=1.0, top_k=4, top_p=0.9)
    stat, threshold, outside = chi_square(samples, joint)
    assert outside == 0 and stat < threshold, (stat, threshold)


def test_mtp_model_head_needs_num_mtp_layers_and_its_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    from mmspec.errors import UnsupportedModelError
    from mmspec.testing import tiny_deepseek_v3, tiny_llama
    from vision.drafters import MtpModelHead

    with pytest.raises(UnsupportedModelError, match="no num_mtp_layers"):
        MtpModelHead.from_target(tiny_llama())
    tiny_deepseek_v3().save_pretrained(tmp_path)  # save_pretrained writes no MTP layer
    with pytest.raises(CheckpointError, match="could not be loaded"):
        MtpModelHead.from_target(AutoModelForCausalLM.from_pretrained(tmp_path))


def test_mtp_model_head_loads_what_transformers_loads_and_matches_use_mtp(tmp_path):
    """A checkpoint with its MTP layer in DeepSeek-V3's layout: MtpModelHead.from_target reads it through
    transformers (MtpModel.from_pretrained), mmspec's output equals generate(use_mtp=True) and plain generate, at
    any batch size (transformers: batch 1)."""
    from transformers import AutoModelForCausalLM

    from mmspec.testing import save_deepseek_v3_with_mtp
    from vision.drafters import MtpModelHead

    model = AutoModelForCausalLM.from_pretrained(save_deepseek_v3_with_mtp(tmp_path)).eval()
    head = MtpModelHead.from_target(model)
    assert float(head.mtp.layers[0].eh_proj.weight.detach().abs().sum()) > 0  # loaded, not left at zero
    kw = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    p = torch.tensor([PROMPTS[0]])
    ref = model.generate(p, **kw)
    assert torch.equal(model.generate(p, use_mtp=True, **kw), ref)
    out = SpeculativeDecoder(model, EagleDrafter(head, 2)).generate(PROMPTS, max_new_tokens=8)
    assert out.sequences[0] == ref[0, p.shape[1]:].tolist()
    assert out.sequences == refs(model, 8)


def test_vlm_mtp_head_runs_at_the_targets_mrope_positions():
    """After an image, Qwen3.5 lays the prompt out by M-RoPE (3 rows; text continues at len + delta). The MTP layer is
    the target's own, so the drafter feeds it the target's positions (transformers' `get_rope_index` here), per
    row of a batch mixing an image prompt and a text prompt, and continues the text where the target does; the
    decode stays lossless."""
    from vision.prompts import build_request

    t = family("qwen3_5")
    torch.manual_seed(6)
    head = MtpHead(t.model)
    seen = []
    hook = head.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True)
    svlm = SpeculativeVLM(t.model, t.processor, EagleDrafter(head, 3))
    batch = [{"prompt": "describe the image", "images": [image(51, "qwen2_vl")]}, {"prompt": "say hi", "images": []}]
    try:
        out = svlm.generate(prompt=[r["prompt"] for r in batch], images=[r["images"] for r in batch],
                            max_new_tokens=MAX_NEW)
    finally:
        hook.remove()
    assert out.sequences == [hf_reference("qwen3_5", r) for r in batch]
    req, _, _ = build_request(t.processor, images=batch[0]["images"], prompt=batch[0]["prompt"])
    ids = torch.tensor([req.input_ids])
    rope_index = t.model.model.get_rope_index
    kw = {k: v for k, v in req.inputs.items() if k in inspect.signature(rope_index).parameters}
    pos, delta = rope_index(ids, attention_mask=torch.ones_like(ids), **kw)
    n = ids.shape[1]
    assert pos.shape[0] == 3 and not torch.equal(pos[0, 0], pos[1, 0])  # the image really has 2-D positions
    first = seen[0]  # the prompt feed: (3, 2, T) for both rows, pair t at token t's position
    assert first.shape[0] == 3 and torch.equal(first[:, 0, :n], pos[:, 0])
    text = len(build_request(t.processor, prompt=batch[1]["prompt"])[0].input_ids)
    assert torch.equal(first[:, 1, :text], torch.arange(text).expand(3, text))
    later = seen[1]  # the first tree level: pair n sits where the target's token n does, in all three rows
    assert torch.equal(later[:, 0, 0], torch.full((3,), n + int(delta[0]))) and int(delta[0]) != 0
