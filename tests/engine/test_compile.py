"""The compiled decode path (`mmspec.compile`): a static cache, blocks padded to bucket lengths, forwards under
torch.compile. Outputs equal target-only greedy decoding (fp32) for chains, static and dynamic trees, one request and
ragged batches; sampling draws exactly what the eager path draws; compile time is kept out of the decode time.

The target adapter and drafter runner are shared by every test here, so each model compiles its shapes once.
"""
from __future__ import annotations

import pytest
import torch

from conftest import hf_greedy
from mmspec import SpeculativeDecoder
from mmspec.compile import bucket, pad_block, resolve_compile
from mmspec.drafters import ModelDrafter
from mmspec.errors import InvalidInputError, UnsupportedModelError
from mmspec.target import CausalLMRunner, CausalLMTarget
from mmspec.tree import DynamicTree, StaticTree

MAX_NEW = 20
SHAPES = {"chain4": 4, "tree221": StaticTree.full((2, 2, 1)), "dynamic": DynamicTree(topk=3, depth=4, total=10)}


@pytest.fixture(scope="module")
def compiled(target, drafters):
    """(target adapter, drafter runner) shared by every compiled decoder of this module."""
    return CausalLMTarget(target), CausalLMRunner(drafters["noisy"])


def decoder(compiled, tree, compile=True):
    tgt, runner = compiled
    return SpeculativeDecoder(tgt, None if tree is None else ModelDrafter(runner=runner, tree=tree), compile=compile)


@pytest.mark.parametrize("shape", [None, *SHAPES])
def test_compiled_greedy_equals_target(compiled, prompts, reference, shape):
    dec = decoder(compiled, None if shape is None else SHAPES[shape])
    assert dec.compile
    one = dec.generate([prompts[0]], max_new_tokens=MAX_NEW)
    assert one.sequences[0] == reference[0][:MAX_NEW]
    batch = dec.generate(prompts[:3], max_new_tokens=MAX_NEW)  # ragged prompts: holes in the static cache
    assert batch.sequences == [r[:MAX_NEW] for r in reference[:3]]
    assert compiled[0].kv.compiled and compiled[0].kv.static  # the steps really ran on the compiled path
    if shape is not None:
        assert batch.stats.accepted_tokens > 0 and compiled[1].kv.compiled


def test_compile_time_is_reported_apart(compiled, prompts):
    dec = decoder(compiled, 4)
    first = dec.generate([prompts[1]], max_new_tokens=MAX_NEW).stats
    again = dec.generate([prompts[1]], max_new_tokens=MAX_NEW).stats
    assert again.time_compile == 0.0  # every shape of this decode was compiled before
    assert again.time_total > 0 and again.time_target_model > 0
    runner = compiled[0]
    assert runner.compile_time >= first.time_compile
    assert "compile" not in again.summary()


def test_compiled_sampling_draws_what_eager_draws(compiled, target, drafters, prompts):
    """Same seeds, same draws: compilation changes how a forward runs, not the coins (fp32 logits agree to
    rounding, far below the gaps that decide these draws)."""
    kw = dict(max_new_tokens=MAX_NEW, temperature=0.8, top_k=40, seed=7)
    eager = SpeculativeDecoder(target, drafters["noisy"], tree=SHAPES["tree221"]).generate(prompts[:2], **kw)
    comp = decoder(compiled, SHAPES["tree221"]).generate(prompts[:2], **kw)
    assert comp.sequences == eager.sequences
    assert comp.stats.accepted_tokens == eager.stats.accepted_tokens


def test_static_cache_holds_long_generations(compiled, target, prompts):
    """The reserve covers the padding: a long decode never overflows, and stays equal to target-only decoding."""
    out = decoder(compiled, SHAPES["dynamic"]).generate([prompts[2]], max_new_tokens=48)
    assert out.sequences[0] == hf_greedy(target, prompts[2], 48)


def test_bucket_lengths():
    assert [bucket(m) for m in (1, 2, 3, 5, 8, 9, 200, 257, 600)] == [1, 2, 4, 8, 8, 16, 256, 512, 768]


def test_pad_block_padding_sees_only_itself():
    b, m, k, width = 2, 3, 16, 5
    mask = torch.zeros(b, 1, m, k)
    inputs = {"input_ids": torch.ones(b, m, dtype=torch.long), "attention_mask": mask,
              "position_ids": torch.arange(m).expand(b, m) + 5, "features": torch.ones(b, m, 4), "flag": True}
    out = pad_block(inputs, width, 4)
    assert out["input_ids"].shape == (b, 4) and out["input_ids"][:, 3].eq(0).all()
    assert out["features"].shape == (b, 4, 4) and out["features"][:, 3].eq(0).all()
    assert out["position_ids"][:, 3].tolist() == [7, 7]
    assert torch.equal(out["attention_mask"][:, :, :m], mask)  # real rows untouched
    pad_row = out["attention_mask"][0, 0, 3]
    assert (pad_row == 0).nonzero().flatten().tolist() == [width + m]  # its own slot only
    assert out["flag"] is True
    mrope = pad_block({**inputs, "position_ids": torch.arange(m).expand(3, b, m)}, width, 8)
    assert mrope["position_ids"].shape == (3, b, 8)


def test_compile_setting_is_checked():
    assert resolve_compile(None, "cpu") is False and resolve_compile(None, "cuda") is True
    with pytest.raises(InvalidInputError, match="compile='yes'"):
        resolve_compile("yes", "cpu")


def test_compile_refused_where_a_component_cannot(target):
    class Eager(CausalLMTarget):
        def cannot_compile(self):
            return "this adapter builds windowed masks"

    with pytest.raises(UnsupportedModelError, match="windowed masks"):
        SpeculativeDecoder(Eager(target), None, compile=True)
    assert SpeculativeDecoder(Eager(target), None, compile=None).compile is False
