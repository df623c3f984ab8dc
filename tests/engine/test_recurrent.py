"""Hybrid linear-attention targets (`mmspec.recurrent`): a tiny random Qwen3.5 (Gated DeltaNet layers between full
attention ones). Greedy output equals the model's own `generate` (fp32) for chains, static and dynamic trees, one
request and ragged batches, with drafts that are partly accepted so every step rolls a recurrent state back to the
last accepted node; sampling matches the exact target distribution (chi-square, alpha 1e-4)."""
from __future__ import annotations

import pytest
import torch

from mmspec import SpeculativeDecoder
from mmspec.drafters import ModelDrafter, NGramDrafter
from mmspec.drafters.base import DrafterCounters
from oracle import OracleDrafter
from mmspec.errors import UnsupportedModelError
from mmspec.sampling import SamplingSpec
from mmspec.testing import tiny_qwen3_5
from mmspec.tree import Draft, StaticTree
from stats_tools import chi_square, exact_joint, sampled_runs

PROMPTS = [[5, 9, 3, 7, 1, 2, 44, 12], [8, 8, 4], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [60, 61, 62, 63, 64]]
MAX_NEW = 16


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3_5()


@pytest.fixture(scope="module")
def refs(model):
    out = []
    for p in PROMPTS:
        seq = model.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        out.append(seq[0, len(p):].tolist())
    return out


SHAPES = {"chain4": StaticTree.chain(4), "tree221": StaticTree.full((2, 2, 1)), "tree32": StaticTree.full((3, 2))}


def test_reference_is_diverse(refs):
    assert all(len(set(r)) >= 8 for r in refs) and len({tuple(r) for r in refs}) == len(refs)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_greedy_equals_generate_with_rollbacks(model, refs, shape):
    dec = SpeculativeDecoder(model, OracleDrafter(refs, SHAPES[shape], p=0.7))
    single = [SpeculativeDecoder(model, OracleDrafter([r], SHAPES[shape], p=0.7)).generate(
        [p], max_new_tokens=MAX_NEW).sequences[0] for p, r in zip(PROMPTS, refs)]
    assert single == refs
    out = dec.generate(PROMPTS, max_new_tokens=MAX_NEW)
    assert out.sequences == refs
    s = out.stats
    assert 0 < s.accepted_tokens < s.draft_tokens, s.summary()  # accepted paths and rolled-back states both ran


def test_plain_and_ngram_and_dynamic_tree(model, refs):
    from mmspec.tree import DynamicTree

    assert SpeculativeDecoder(model, None).generate(PROMPTS, max_new_tokens=MAX_NEW).sequences == refs
    assert SpeculativeDecoder(model, NGramDrafter(k=3, branches=2)).generate(
        PROMPTS, max_new_tokens=MAX_NEW).sequences == refs
    eagle2 = SpeculativeDecoder(model, ModelDrafter(_llama_drafter(), DynamicTree(topk=3, depth=3, total=8)))
    assert eagle2.generate(PROMPTS, max_new_tokens=MAX_NEW).sequences == refs


def _llama_drafter():
    from mmspec.testing import tiny_llama

    return tiny_llama(seed=3, vocab=96, hidden=32, layers=1)


def test_model_is_left_as_it_was(model, refs):
    """The per-node state steps replace the layers' forwards only during the engine's forwards."""
    SpeculativeDecoder(model, OracleDrafter(refs, SHAPES["tree221"], p=0.5)).generate(PROMPTS[:2], max_new_tokens=6)
    assert all("forward" not in vars(m) for m in model.modules())
    again = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    assert again[0, len(PROMPTS[0]):].tolist() == refs[0]


def test_recurrent_draft_model_and_compile_are_refused(model):
    with pytest.raises(UnsupportedModelError, match="linear-attention"):
        ModelDrafter(model, 3)
    with pytest.raises(UnsupportedModelError, match="linear-attention"):
        SpeculativeDecoder(model, None, compile=True)
    assert SpeculativeDecoder(model, None, compile=None).compile is False


class EchoDrafter:
    """Samples a chain of 2 from q = 0.6 p + 0.4 uniform over p's support, p the target's own (warped) distribution
    at each depth (computed by running the target on the whole history, as a test may): most drafts are accepted,
    some rejected, so both the accept path and the residual path after a state rollback run."""

    needs_hidden, trusted = False, False
    max_nodes = max_depth = 2

    def __init__(self, model, spec: SamplingSpec):
        self.model, self.spec, self.counters = model, spec, DrafterCounters()

    def check_target(self, target):
        return None

    def begin(self, ctx, prefill):
        self.ctx = ctx

    @torch.no_grad()
    def propose(self, budgets):
        drafts = []
        for h, budget, g in zip(self.ctx.history, budgets, self.ctx.generators):
            tokens, qs = [], []
            for _ in range(min(2, budget)):
                p = self.spec.probs(self.model(torch.tensor([h + tokens])).logits[0, -1])
                support = (p > 0).float()
                q = 0.6 * p + 0.4 * support / support.sum()
                tokens.append(int(torch.multinomial(q, 1, generator=g)))
                qs.append(q)
            drafts.append(Draft.chain(tokens, torch.stack(qs)) if tokens else Draft.empty())
        return drafts

    def commit(self, updates, verify_out):
        return None

    def select_rows(self, rows):
        return None


def test_sampling_matches_the_exact_distribution(model):
    """Sampled chains from a drafter close to the target: rejections roll the recurrent state back to the last
    accepted node and resample from the residual; the output follows the exact target distribution."""
    prompt, length, spec = [5, 17, 5, 17, 5, 17, 5], 4, SamplingSpec(temperature=1.0, top_k=4, top_p=0.9)
    joint = exact_joint(model, prompt, spec, length)
    dec = SpeculativeDecoder(model, EchoDrafter(model, spec))
    samples, accepted, drafted = sampled_runs(dec, prompt, length, 1500, temperature=1.0, top_k=4, top_p=0.9)
    stat, threshold, outside = chi_square(samples, joint)
    assert outside == 0 and stat < threshold, (stat, threshold)
    assert 0.3 * drafted < accepted < 0.95 * drafted  # both paths ran often
