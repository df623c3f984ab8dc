"""Every drafter shape runs in fp32 and bf16 on the test device (MMSPEC_TEST_DEVICE; CPU in CI, CUDA on a GPU box).

Greedy equality is asserted only in fp32 (elsewhere). In bf16 a verify block and a one-token forward round
differently, so argmax ties may flip and outputs need not match target-only decoding token for token; what must
hold is the bookkeeping: exact lengths, ids in the vocabulary, an exact-copy drafter accepting nearly everything,
and the verify/commit path keeping the cache consistent with what was emitted.
"""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, hf_greedy
from mmspec import SpeculativeDecoder
from mmspec.testing import noisy_copy, tiny_llama
from mmspec.tree import DynamicTree, StaticTree

SHAPES = {"chain4": 4, "tree221": StaticTree.full((2, 2, 1)), "eagle2": DynamicTree(topk=3, depth=3, total=8)}


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def pair(request):
    target = tiny_llama(seed=0).to(device=DEVICE, dtype=request.param)
    return target, noisy_copy(target, 0.0)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_runs_on_device_with_exact_lengths(pair, prompts, shape):
    target, drafter = pair
    out = SpeculativeDecoder(target, drafter, tree=SHAPES[shape]).generate(prompts[:4], max_new_tokens=12)
    assert [len(s) for s in out.sequences] == [12] * 4
    assert all(0 <= t < target.config.vocab_size for s in out.sequences for t in s)
    # An exact copy: every drafted token is accepted unless the dtype's rounding flips a near-tie.
    assert out.stats.alpha and out.stats.alpha[0] > 0.8, out.stats.summary()


def test_plain_decoding_on_device_matches_transformers_in_fp32_and_runs_in_bf16(pair, prompts):
    target, _ = pair
    plain = SpeculativeDecoder(target, None).generate(prompts[:3], max_new_tokens=10)
    ref = [hf_greedy(target, p, 10) for p in prompts[:3]]
    if target.dtype == torch.float32:
        assert plain.sequences == ref
    else:  # bf16: one token per forward on both sides, so the first token is computed identically
        assert [s[0] for s in plain.sequences] == [r[0] for r in ref]


def test_sampling_on_device(pair, prompts):
    target, drafter = pair
    dec = SpeculativeDecoder(target, noisy_copy(target, 0.5, seed=1), tree=3)
    a = dec.generate(prompts[:2], max_new_tokens=8, temperature=1.0, top_k=8, top_p=0.95, seed=3)
    b = dec.generate(prompts[:2], max_new_tokens=8, temperature=1.0, top_k=8, top_p=0.95, seed=3)
    assert a.sequences == b.sequences  # per-request generators on the device: seeded runs repeat
    assert [len(s) for s in a.sequences] == [8, 8]
