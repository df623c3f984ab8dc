"""VLM pipeline in fp32 and bf16 on the test device (MMSPEC_TEST_DEVICE): runs, exact lengths, a copy drafter
accepts (nearly) everything. bf16 rounds verify blocks and one-token forwards differently, so no equality here."""
from __future__ import annotations

import copy

import pytest
import torch

from mmspec.tree import StaticTree
from vision import SpeculativeVLM
from vlm_cases import family, image


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "gemma3", "idefics3"])
def test_vlm_runs_on_device(name, dtype):
    t = family(name)
    model = copy.deepcopy(t.model).to(dtype)
    for tree in (3, StaticTree.full((2, 2, 1))):
        svlm = SpeculativeVLM(model, t.processor, copy.deepcopy(model), tree=tree)
        out = svlm.generate(prompt=["describe the image", "what color is it"],
                            images=[[image(70, name)], [image(71, name)]], max_new_tokens=10, eos_token_id=[])
        assert [len(s) for s in out.sequences] == [10, 10]
        assert out.stats.alpha[0] > 0.8, out.stats.summary()
        sampled = svlm.generate(prompt="describe the image", images=[image(72, name)], max_new_tokens=8,
                                temperature=1.0, top_p=0.9, seed=1, eos_token_id=[])
        again = svlm.generate(prompt="describe the image", images=[image(72, name)], max_new_tokens=8,
                              temperature=1.0, top_p=0.9, seed=1, eos_token_id=[])
        assert sampled.token_ids == again.token_ids and len(sampled.token_ids) == 8
