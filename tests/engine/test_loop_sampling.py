"""Seeded Monte-Carlo: speculative sampling reproduces target-only sampling (temperature 1, top-k, top-p).

The reference is the exact joint distribution of the first tokens, enumerated with the target itself; the test is
a chi-square goodness-of-fit at alpha = 1e-4 (threshold from the sample count via the bins' degrees of freedom).
A deliberately wrong rule (accept every draft token) must fail the same test, so the test is not vacuous.
"""
from __future__ import annotations

import pytest
import torch

from mmspec import SpeculativeDecoder
from mmspec.drafters import NGramDrafter
from mmspec.kernels import Verdict
from mmspec.tree import DynamicTree, StaticTree
from stats_tools import chi_square, exact_joint

PROMPT = [5, 17, 5, 17, 5, 17, 5]  # repetitive, so the n-gram drafter proposes something
LENGTH = 4  # first token from prefill, then drafts of depth up to 2 and 1
N = 2000
SPEC = dict(temperature=1.0, top_k=4, top_p=0.9)


@pytest.fixture(scope="module")
def joint(target):
    from mmspec.sampling import SamplingSpec

    return exact_joint(target, PROMPT, SamplingSpec(**SPEC), LENGTH)


def sample(dec: SpeculativeDecoder, n: int = N, seed: int = 0) -> list[tuple[int, ...]]:
    out = []
    for start in range(0, n, 300):
        res = dec.generate([PROMPT] * 300, max_new_tokens=LENGTH, seed=seed + start, **SPEC)
        out.extend(tuple(s) for s in res.sequences)
    return out


def configs(drafters):
    return {
        "chain-speculative": SpeculativeDecoder(drafters["target"], drafters["noisy"], tree=3),
        "tree-without-replacement": SpeculativeDecoder(drafters["target"], drafters["noisy"],
                                                       tree=StaticTree.full((3, 2))),
        "dynamic-point-mass": SpeculativeDecoder(drafters["target"], drafters["noisy"],
                                                 tree=DynamicTree(topk=3, depth=3, total=8)),
        "ngram-point-mass": SpeculativeDecoder(drafters["target"], NGramDrafter(k=3, branches=2)),
        "plain": SpeculativeDecoder(drafters["target"], None),
    }


@pytest.mark.parametrize("name", ["chain-speculative", "tree-without-replacement", "dynamic-point-mass",
                                  "ngram-point-mass", "plain"])
def test_speculative_sampling_matches_target(target, drafters, joint, name):
    dec = configs({**drafters, "target": target})[name]
    samples = sample(dec)
    stat, threshold, outside = chi_square(samples, joint)
    assert outside == 0
    assert stat < threshold, (stat, threshold)
    if name != "plain":
        out = dec.generate([PROMPT] * 50, max_new_tokens=LENGTH, seed=99, **SPEC)
        assert out.stats.accepted_tokens > 0 and out.stats.lossless


def accept_everything(draft, p, *, generator=None, coin=None):
    """Broken on purpose: keeps the first draft path whatever p says."""
    path, node = [], -1
    while draft.children[node + 1]:
        node = draft.children[node + 1][0]
        path.append(node)
    nxt = int(torch.multinomial(p[node + 1].float(), 1, generator=generator))
    return Verdict(path, [draft.token_list[i] for i in path], p[node + 1], nxt, True)


def test_wrong_rule_is_detected(target, drafters, joint):
    dec = SpeculativeDecoder(target, drafters["noisy"], tree=3, acceptance=accept_everything)
    samples = sample(dec)
    stat, threshold, outside = chi_square(samples, joint)
    assert outside > 0 or stat > threshold
    assert not dec.generate([PROMPT], max_new_tokens=3, seed=0, **SPEC).stats.lossless


def test_repetition_penalty_sampling_matches_target(target, drafters):
    """Sampling with a repetition penalty: each node's p uses its own prefix, so the distribution is still exact."""
    from mmspec.sampling import SamplingSpec

    spec = dict(SPEC, repetition_penalty=1.5)
    joint = exact_joint(target, PROMPT, SamplingSpec(**spec), 3)
    dec = SpeculativeDecoder(target, drafters["noisy"], tree=StaticTree.full((2, 1)))
    samples = []
    for start in range(0, 1500, 300):
        res = dec.generate([PROMPT] * 300, max_new_tokens=3, seed=start, **spec)
        samples.extend(tuple(s) for s in res.sequences)
    stat, threshold, outside = chi_square(samples, joint)
    assert outside == 0 and stat < threshold, (stat, threshold)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["chain-speculative", "tree-without-replacement", "dynamic-point-mass"])
def test_long_monte_carlo(target, drafters, joint, name):
    """Slow tier: 10x the samples, so a smaller deviation would be caught."""
    dec = configs({**drafters, "target": target})[name]
    stat, threshold, outside = chi_square(sample(dec, n=21000, seed=12345), joint)
    assert outside == 0 and stat < threshold, (stat, threshold)


def test_acceptance_is_a_per_call_setting(target, drafters, prompts):
    """stream(acceptance=...) applies to that call only: the decoder's own rule comes back on the next call."""
    kw = dict(max_new_tokens=12, temperature=1.0, seed=5)
    ids = prompts[:3]
    fresh = SpeculativeDecoder(target, drafters["noisy"]).generate(ids, **kw)
    dec = SpeculativeDecoder(target, drafters["noisy"])
    lossy = dec.generate(ids, acceptance="typical", **kw)
    assert lossy.stats.acceptance == "typical" and not lossy.stats.lossless
    again = dec.generate(ids, **kw)
    assert again.sequences == fresh.sequences and again.stats.lossless and again.stats.acceptance != "typical"
    from mmspec.errors import GenerationConfigError

    with pytest.raises(GenerationConfigError, match="'bogus'"):
        dec.stream(ids, acceptance="bogus", **kw)
    assert dec.generate(ids, **kw).sequences == fresh.sequences


@pytest.mark.parametrize("name", ["chain-speculative", "ngram-chain"])
def test_batched_acceptance_matches_target_and_draws_what_the_walk_draws(target, drafters, joint, prompts, name):
    """The batched flat kernel (forced on, as on accelerators) samples the target's distribution, draws exactly
    what the per-request walk draws with the same seeds, and gives each request the same draws alone and in a batch
    of 8."""
    def make(batched):
        drafter = drafters["noisy"] if name == "chain-speculative" else NGramDrafter(k=3, branches=1)
        return SpeculativeDecoder(target, drafter, tree=3, batched_acceptance=batched)

    batched = make(True)
    stat, threshold, outside = chi_square(sample(batched, n=1200), joint)
    assert outside == 0 and stat < threshold, (stat, threshold)
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=20)
    gens = [torch.Generator().manual_seed(40 + i) for i in range(8)]
    together = batched.generate(prompts[:8], generator=gens, **kw)
    walked = make(False).generate(prompts[:8], generator=[torch.Generator().manual_seed(40 + i) for i in range(8)],
                                  **kw)
    assert together.sequences == walked.sequences and together.stats.accepted_tokens > 0
    for i in (0, 5):
        alone = batched.generate(prompts[i: i + 1], generator=torch.Generator().manual_seed(40 + i), **kw)
        assert alone.sequences[0] == together.sequences[i]
    with pytest.raises(Exception, match="batched_acceptance"):
        SpeculativeDecoder(target, None, batched_acceptance="yes")


MIXED = [dict(), dict(temperature=1.0, top_k=20), dict(temperature=0.7, top_p=0.9), dict(temperature=1.3)]


@pytest.mark.parametrize("tree", ["chain", "static", "dynamic", "ngram"])
@pytest.mark.parametrize("batched", [True, False])
def test_requests_with_their_own_settings_draw_alone_what_they_draw_in_a_batch(target, drafters, prompts, tree,
                                                                                batched):
    """A batch of 8 requests whose sampling settings differ (greedy, top-k, top-p, temperatures): each request
    gives what it gives alone under its settings and generator, on every proposal path."""
    from mmspec import Request
    from mmspec.sampling import SamplingSpec

    shape = {"chain": 3, "static": StaticTree.full((2, 2)), "dynamic": DynamicTree(topk=3, depth=3, total=8),
             "ngram": 3}[tree]
    dec = SpeculativeDecoder(target, "ngram" if tree == "ngram" else drafters["noisy"], tree=shape,
                             batched_acceptance=batched)
    specs = [SamplingSpec(**MIXED[i % len(MIXED)]) for i in range(8)]
    reqs = [Request(list(p), sampling=s, generator=torch.Generator().manual_seed(70 + i))
            for i, (p, s) in enumerate(zip(prompts[:8], specs))]
    together = dec.generate(reqs, max_new_tokens=16)
    for i in range(8):
        alone = dec.generate([Request(list(prompts[i]), sampling=specs[i],
                                      generator=torch.Generator().manual_seed(70 + i))], max_new_tokens=16)
        assert alone.sequences[0] == together.sequences[i], (tree, i, specs[i])
    greedy = SpeculativeDecoder(target, None).generate(prompts[:1], max_new_tokens=16)  # row 0 is greedy
    assert together.sequences[0] == greedy.sequences[0]
    with pytest.raises(Exception, match="SamplingSpec"):
        dec.generate([Request([1, 2, 3], sampling={"temperature": 1.0})], max_new_tokens=2)
