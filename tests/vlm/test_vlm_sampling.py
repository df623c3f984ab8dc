"""Seeded Monte-Carlo: speculative VLM sampling reproduces target-only sampling (LLaVA and Qwen2-VL, with an image).

The reference is the exact joint distribution of the first LENGTH tokens, enumerated with the target itself on the
processor's inputs; the test is a chi-square goodness-of-fit at alpha = 1e-4 (tests/stats_tools.py). A drafter that
is a noisy copy of the target makes both acceptance and rejection (residual sampling) frequent. LENGTH = 4: the
prefill gives token 1, so the first verification step drafts depth 2 (tokens 2 and 3, the bonus or residual token
4), and the accept and residual paths at depth 2 are both exercised and counted.
"""
from __future__ import annotations

import copy
import inspect

import pytest
import torch

from conftest import DEVICE
from mmspec.compat import cache_kwargs, output_cache
from mmspec.sampling import SamplingSpec
from mmspec.tree import DynamicTree, StaticTree
from stats_tools import chi_square
from vision import SpeculativeVLM
from vision.prompts import build_request
from vision.target import rope_index_fn
from vlm_cases import family, image, near_oracle, noisy_vlm, on_device

LENGTH = 4
N = 1500
SPEC = dict(temperature=1.0, top_k=3, top_p=0.95)
PROMPT = "describe the image"


@torch.no_grad()
def exact_joint(name: str, img, t=None) -> dict[tuple[int, ...], float]:
    """Target-only P(first LENGTH tokens): the prompt (with its image) prefilled once, each continuation fed as text
    over a copy of that cache at the text positions after the prompt (M-RoPE: next_pos = len + rope delta), as
    `generate` does; a continuation may hold an image-placeholder id, which is then just a token."""
    t = t or family(name)
    req, _, _ = build_request(t.processor, images=[img], prompt=PROMPT)
    dev, n = t.model.device, len(req.input_ids)
    ids = torch.tensor([req.input_ids], device=dev)
    pre = t.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **on_device(req.inputs))
    rope, start = rope_index_fn(t.model), n
    if rope is not None:
        params = inspect.signature(rope).parameters
        kw = {k: v.to(dev) for k, v in req.inputs.items() if k in params and torch.is_tensor(v)}
        start = n + int(rope(ids, attention_mask=torch.ones_like(ids), **kw)[1].reshape(-1)[0])
    spec, joint = SamplingSpec(**SPEC), {(): 1.0}
    for _ in range(LENGTH):
        nxt = {}
        for seq, pr in joint.items():
            if seq:
                pos = torch.arange(start, start + len(seq), device=dev)[None]  # (1, L)
                pos = pos.expand(3, 1, len(seq)) if rope is not None else pos  # (3, 1, L) for M-RoPE
                cache = copy.deepcopy(output_cache(pre))
                out = t.model(input_ids=torch.tensor([seq], device=dev), **cache_kwargs(t.model, cache), attention_mask=torch.ones(1, n + len(seq), dtype=torch.long, device=dev),
                    position_ids=pos, use_cache=True)
            else:
                out = pre
            p = spec.probs(out.logits[0, -1].double().cpu())
            for tok in p.nonzero().flatten().tolist():
                nxt[seq + (tok,)] = pr * float(p[tok])
        joint = nxt
    return joint


CONFIGS = {
    "llava-chain": ("llava", 2),
    "llava-tree-without-replacement": ("llava", StaticTree.full((2, 1))),
    "qwen2_vl-chain": ("qwen2_vl", 2),
    "qwen2_vl-dynamic-point-mass": ("qwen2_vl", DynamicTree(topk=2, depth=2, total=4)),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_vlm_sampling_matches_target(config):
    name, tree = CONFIGS[config]
    img = image(5, name)
    joint = exact_joint(name, img)
    t = family(name)
    svlm = SpeculativeVLM(t.model, t.processor, noisy_vlm(name), tree=tree)
    samples, accepted, drafted, deep_tries, deep_accepts = [], 0, 0, 0, 0
    for start in range(0, N, 250):
        out = svlm.generate(prompt=[PROMPT] * 250, images=[[img]] * 250, max_new_tokens=LENGTH, seed=start, **SPEC)
        samples.extend(tuple(s) for s in out.sequences)
        accepted, drafted = accepted + out.stats.accepted_tokens, drafted + out.stats.draft_tokens
        deep_tries += sum(out.stats.depth_tries[1:])  # steps whose path reached depth 1 with a node at depth 2
        deep_accepts += sum(out.stats.depth_accepts[1:])
    stat, threshold, outside = chi_square(samples, joint)
    assert outside == 0
    assert stat < threshold, (stat, threshold)
    assert 0 < accepted < drafted  # both the accept and the residual paths were exercised
    assert 0 < deep_accepts < deep_tries  # ... at depth 2 too: accepted there, and rejected there (residual)


def test_feature_drafter_with_attention_pruned_image_samples_the_target():
    """EAGLE (near-oracle head on a 1-layer LLaVA) reading an image pruned to half by the target's attention:
    the sampled continuations follow the target's exact joint distribution."""
    from vision.compressors import AttentionPrune
    from vision.drafters import EagleDrafter
    from vision.testing import tiny_vlm

    t = tiny_vlm("llava", text_layers=1)
    t.model.to(DEVICE)
    img = image(6, "llava")
    joint = exact_joint("llava", img, t)
    drafter = EagleDrafter(near_oracle(t.model), 2, compressor=AttentionPrune(0.5))
    svlm = SpeculativeVLM(t.model, t.processor, drafter)
    samples, accepted, drafted = [], 0, 0
    for start in range(0, N, 250):
        out = svlm.generate(prompt=[PROMPT] * 250, images=[[img]] * 250, max_new_tokens=LENGTH, seed=start, **SPEC)
        samples.extend(tuple(s) for s in out.sequences)
        accepted, drafted = accepted + out.stats.accepted_tokens, drafted + out.stats.draft_tokens
    n_image = sum(1 for x in svlm.target.row_ids[0] if x == drafter.image_token_id)
    assert drafter.prompt_slots[0] == len(svlm.target.row_ids[0]) - LENGTH + 1 - n_image + n_image // 2
    stat, threshold, outside = chi_square(samples, joint)
    assert outside == 0
    assert stat < threshold, (stat, threshold)
    assert 0 < accepted < drafted


def test_dream_drafter_samples_the_target():
    """The DREAM drafter (gated cross-attention head, as in the zoo's vlm-dream) under sampling: the continuations
    follow the target's exact joint distribution (its drafts are verified by the point-mass rule)."""
    from vision.drafters import DreamDrafter, DreamHead
    from vision.testing import tiny_vlm

    t = tiny_vlm("llava", text_layers=1)
    t.model.to(DEVICE)
    img = image(7, "llava")
    joint = exact_joint("llava", img, t)
    torch.manual_seed(0)
    svlm = SpeculativeVLM(t.model, t.processor, DreamDrafter(DreamHead(t.model).to(DEVICE), 2))
    samples, drafted = [], 0
    for start in range(0, N, 250):
        out = svlm.generate(prompt=[PROMPT] * 250, images=[[img]] * 250, max_new_tokens=LENGTH, seed=start, **SPEC)
        samples.extend(tuple(s) for s in out.sequences)
        drafted += out.stats.draft_tokens
    stat, threshold, outside = chi_square(samples, joint)
    assert outside == 0 and drafted > 0
    assert stat < threshold, (stat, threshold)
