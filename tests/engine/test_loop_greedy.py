"""Greedy speculative decoding equals target-only greedy decoding (fp32), for every drafter and draft shape."""
from __future__ import annotations

import pytest
import torch

from conftest import hf_greedy
from mmspec import SpeculativeDecoder
from mmspec.tree import DynamicTree, StaticTree

MAX_NEW = 24
SHAPES = {
    "chain4": 4,
    "tree221": StaticTree.full((2, 2, 1)),
    "dynamic": DynamicTree(topk=3, depth=4, total=10),
}


def test_reference_is_diverse(reference):
    # A tiny model stuck on one token would make every equality below vacuous.
    for seq in reference:
        assert len(set(seq)) >= 6, seq
    assert len({tuple(s) for s in reference}) == len(reference)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", ["copy", "noisy", "unrelated"])
def test_model_drafter_matches_target(target, drafters, prompts, reference, kind, shape):
    dec = SpeculativeDecoder(target, drafters[kind], tree=SHAPES[shape])
    single = [dec.generate([p], max_new_tokens=MAX_NEW).sequences[0] for p in prompts]
    assert single == reference
    for start in range(0, len(prompts), 4):  # batches of 4 prompts of different lengths
        out = dec.generate(prompts[start: start + 4], max_new_tokens=MAX_NEW)
        assert out.sequences == reference[start: start + 4]


@pytest.mark.parametrize("branches", [1, 3])
def test_ngram_drafter_matches_target(target, prompts, reference, branches):
    from mmspec.drafters import NGramDrafter

    dec = SpeculativeDecoder(target, NGramDrafter(k=4, branches=branches))
    single = [dec.generate([p], max_new_tokens=MAX_NEW) for p in prompts]
    assert [o.sequences[0] for o in single] == reference
    assert sum(o.stats.accepted_tokens for o in single) > 0  # the n-gram path was really exercised
    out = dec.generate(prompts[:4], max_new_tokens=MAX_NEW)
    assert out.sequences == reference[:4]


def test_noisy_drafter_exercises_accept_and_reject(target, drafters, prompts):
    out = SpeculativeDecoder(target, drafters["noisy"], tree=4).generate(prompts, max_new_tokens=MAX_NEW)
    s = out.stats
    assert 0 < s.accepted_tokens < s.draft_tokens  # both paths taken
    assert 1.0 < s.tau < 5.0


@pytest.mark.parametrize("k", [1, 3, 5])
def test_copy_drafter_accepts_everything(target, drafters, prompts, k):
    """Draft = target at temperature 0: every step commits k + 1 tokens (no token lost in the bookkeeping)."""
    steps = 4
    out = SpeculativeDecoder(target, drafters["copy"], tree=k).generate(
        prompts[:6], max_new_tokens=1 + steps * (k + 1))
    s = out.stats
    assert s.steps == 6 * steps
    assert s.tau == k + 1
    assert s.alpha == [1.0] * k
    assert s.target_forwards == 1 + steps


def test_eos_and_max_new_tokens_exact(target, drafters, prompts, reference):
    # Pick an EOS id that appears mid-way through a reference continuation.
    eos = reference[0][7]
    dec = SpeculativeDecoder(target, drafters["copy"], tree=4)
    out = dec.generate(prompts, max_new_tokens=MAX_NEW, eos_token_id=eos)
    for seq, ref, p, reason in zip(out.sequences, reference, prompts, out.finish_reasons):
        expect = hf_greedy(target, p, MAX_NEW, eos_token_id=eos)
        assert seq == expect
        assert (reason == "eos") == (eos in ref)
    for n in (1, 2, 5, 7):
        out = dec.generate(prompts[:4], max_new_tokens=n)
        assert [len(s) for s in out.sequences] == [n] * 4
        assert out.sequences == [r[:n] for r in reference[:4]]


@pytest.mark.parametrize("tree", [4, StaticTree.full((2, 2, 1))], ids=["chain4", "tree221"])
def test_static_cache_matches(target, drafters, prompts, reference, tree):
    dec = SpeculativeDecoder(target, drafters["noisy"], tree=tree, cache="static")
    out = dec.generate(prompts[:8], max_new_tokens=MAX_NEW)
    assert out.sequences == reference[:8]


def test_streaming_yields_the_same_tokens(target, drafters, prompts, reference):
    dec = SpeculativeDecoder(target, drafters["noisy"], tree=4)
    stream = dec.stream(prompts[:3], max_new_tokens=MAX_NEW)
    got = [[], [], []]
    for event in stream:
        # The caller's code between events runs outside inference mode (generate() alone keeps it on throughout).
        assert not torch.is_inference_mode_enabled()
        got[event.request].extend(event.tokens)
    assert got == reference[:3]
    assert stream.output.sequences == reference[:3]
    assert not torch.is_inference_mode_enabled()
    assert dec.generate(prompts[:3], max_new_tokens=MAX_NEW).sequences == reference[:3]
    assert not torch.is_inference_mode_enabled()  # generate() leaves the mode as it found it


@pytest.mark.parametrize("shape", ["chain4", "tree221"])
def test_repetition_penalty_uses_each_nodes_own_prefix(target, drafters, prompts, shape):
    """p for a draft node must penalise the node's own ancestors (ALGORITHMS.md §3.1), as plain decoding would."""
    import torch

    dec = SpeculativeDecoder(target, drafters["copy"], tree=SHAPES[shape])
    for p in prompts[:8]:
        ref = target.generate(torch.tensor([p], device=target.device), max_new_tokens=MAX_NEW, do_sample=False, repetition_penalty=1.8,
                              pad_token_id=0, eos_token_id=None)[0, len(p):].tolist()
        out = dec.generate([p], max_new_tokens=MAX_NEW, repetition_penalty=1.8)
        assert out.sequences[0] == ref
        # a copy drafter that ignores the penalty gets rejected somewhere: the penalty really changed p
    plain = [hf_greedy(target, p, MAX_NEW) for p in prompts[:8]]
    assert any(dec.generate([p], max_new_tokens=MAX_NEW, repetition_penalty=1.8).sequences[0] != r
               for p, r in zip(prompts[:8], plain))


def test_stats_carry_vllms_names(target, drafters, prompts):
    out = SpeculativeDecoder(target, drafters["noisy"], tree=3).generate(prompts[:4], max_new_tokens=16)
    st = out.stats
    assert 0 < st.num_drafts <= st.steps and st.num_accepted_tokens == st.accepted_tokens  # drafted steps only
    assert st.mean_acceptance_length == pytest.approx(1 + st.accepted_tokens / st.num_drafts)
    assert st.num_accepted_tokens_per_pos == st.depth_accepts and len(st.num_accepted_tokens_per_pos) == 3
    hist = st.acceptance_length_histogram
    assert sum(hist) == st.steps and sum(n * h for n, h in enumerate(hist)) == st.committed_tokens
    assert st.as_dict()["mean_acceptance_length"] == st.mean_acceptance_length


def _drain(stream) -> list[list[int]]:
    out = {}
    for e in stream:
        out.setdefault(e.request, []).extend(e.tokens)
    return [out[i] for i in sorted(out)]


@pytest.mark.parametrize("drafter", ["noisy", "ngram"])
def test_interleaved_streams_with_different_settings_equal_each_alone(target, drafters, prompts, drafter):
    """Two streams on one decoder, read alternately event by event, each with its own settings, give what each gives
    alone; a half-read stream resumed after a generate() on the same decoder goes on as if read straight through."""
    from interleave import read_alternately

    dec = SpeculativeDecoder(target, drafters[drafter] if drafter != "ngram" else "ngram", tree=3)
    kw_a = dict(max_new_tokens=16)
    kw_b = dict(max_new_tokens=12, temperature=1.0, top_k=20, seed=5)
    alone_a = dec.generate(prompts[0:2], **kw_a).sequences
    alone_b = dec.generate(prompts[2:3], **kw_b).sequences
    a, b = dec.stream(prompts[0:2], **kw_a), dec.stream(prompts[2:3], **kw_b)
    got_a, got_b = read_alternately(a, b)
    assert [got_a[0], got_a[1]] == alone_a and [got_b[0]] == alone_b
    assert a.output.sequences == alone_a and b.output.sequences == alone_b
    half = dec.stream(prompts[0:2], **kw_a)
    first = next(half)
    assert dec.generate(prompts[2:3], **kw_b).sequences == alone_b  # another call in between
    rest = _drain(half)
    rest[first.request] = first.tokens + rest[first.request]
    assert rest == alone_a == half.output.sequences
    done = dec.stream([prompts[3]], max_new_tokens=4)
    list(done)
    dec.generate([prompts[0]], max_new_tokens=4)
    with pytest.raises(StopIteration):  # a finished stream just stays finished
        next(done)
