"""The train-free n-gram (prompt lookup) drafter on hand-made histories, and the trie that merges its branches."""
from __future__ import annotations

import pytest
import torch

from mmspec import SpeculativeDecoder
from mmspec.drafters import NGramDrafter
from mmspec.drafters.base import DraftContext
from mmspec.drafters.ngram import trie_draft
from mmspec.errors import DraftError
from mmspec.sampling import SamplingSpec


def conts(hist, depth=4, **kw):
    return NGramDrafter(**kw).continuations(hist, depth)


# --- continuations ---------------------------------------------------------------------------------------------
def test_most_recent_match_first():
    #       0  1  2  3  4  5  6  7  8  9  10
    hist = [1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3]
    assert conts(hist, 4) == [[7, 1, 2, 3]]  # the 3-gram [1, 2, 3] last seen at 4, followed by 7 ...
    assert conts(hist, 4, branches=2) == [[7, 1, 2, 3], [9, 1, 2, 3]]
    assert conts(hist, 2, branches=5) == [[7, 1], [9, 1]]  # only two distinct 3-gram matches ...
    # ... and shorter n-grams only add continuations that are new: [2, 3] and [3] lead to the same places.
    assert conts(hist, 2, branches=5, max_ngram=1) == [[7, 1], [9, 1]]


def test_longest_ngram_first():
    #       0  1  2  3  4  5  6  7
    hist = [5, 6, 8, 4, 6, 9, 5, 6]
    # The 2-gram [5, 6] matches at 0 (older); the 1-gram [6] matches at 4 (more recent): the longer match wins.
    assert conts(hist, 3) == [[8, 4, 6]]
    assert conts(hist, 3, branches=3) == [[8, 4, 6], [9, 5, 6]]
    assert conts(hist, 3, max_ngram=1, branches=3) == [[9, 5, 6], [8, 4, 6]]  # 1-grams only: most recent first
    assert conts(hist, 3, min_ngram=2, branches=3) == [[8, 4, 6]]  # the 1-gram match is below min_ngram


def test_falls_back_to_shorter_ngrams():
    #       0  1  2  3  4  5  6  7  8
    hist = [7, 5, 6, 1, 3, 5, 6, 2, 7, 5, 6][-9:]  # = [6, 1, 3, 5, 6, 2, 7, 5, 6]
    # Suffix [7, 5, 6] never occurred before; [5, 6] did (at 3), so max_ngram=3 falls back to the 2-gram.
    assert conts(hist, 2) == [[2, 7]]
    assert conts(hist, 2, max_ngram=1, branches=3) == [[2, 7], [1, 3]]


def test_no_continuation_when_nothing_matches():
    assert conts([1, 2, 3, 4, 5], 4) == []
    assert conts([4], 4) == []
    assert conts([], 4) == []
    assert conts([1, 2, 3, 1, 2, 3], 4, min_ngram=3, max_ngram=3) == [[1, 2, 3]]
    assert conts([1, 2, 3, 4, 2, 3], 4, min_ngram=3, max_ngram=3) == []


def test_depth_truncation_and_history_end():
    hist = [1, 2, 3, 4, 5, 6, 1, 2]
    assert conts(hist, 1) == [[3]]
    assert conts(hist, 3) == [[3, 4, 5]]
    assert conts(hist, 100) == [[3, 4, 5, 6, 1, 2]]  # stops at the end of the history
    assert conts(hist, 0) == []
    # A match right before the suffix continues into the suffix itself (self-overlap is allowed).
    assert conts([9, 9, 9, 9], 5) == [[9]]


def test_branches_are_distinct():
    hist = [1, 2, 5, 1, 2, 5, 1, 2, 6, 1, 2]
    out = conts(hist, 3, branches=3)
    assert out == [[6, 1, 2], [5, 1, 2]]  # two matches share the continuation [5, 1, 2]: listed once
    assert len({tuple(c) for c in out}) == len(out)
    out = conts([3, 1, 3, 2, 3, 4, 3, 1, 3], 1, branches=4, max_ngram=1)
    assert out == [[1], [4], [2]]  # all distinct, most recent first, capped by what exists


# --- trie_draft ------------------------------------------------------------------------------------------------
def test_trie_merges_shared_prefixes():
    d = trie_draft([[1, 2, 3], [1, 2, 4], [1, 5], [6], [1, 2, 3]])
    assert d.tokens.tolist() == [1, 2, 3, 4, 5, 6]
    assert d.parent.tolist() == [-1, 0, 1, 1, 0, -1]
    assert d.tokens.dtype == torch.long and d.parent.dtype == torch.long and d.q is None
    d.validate(10)
    # Every input sequence is a root-to-node path of the trie.
    paths = {tuple(d.token_list[j] for j in d.path_to(i)) for i in range(len(d))}
    for seq in ([1, 2, 3], [1, 2, 4], [1, 5], [6]):
        assert tuple(seq) in paths


def test_trie_same_token_under_different_parents_is_not_merged():
    d = trie_draft([[1, 2], [2, 2], [1, 3, 2]])
    assert d.tokens.tolist() == [1, 2, 2, 2, 3, 2]
    assert d.parent.tolist() == [-1, 0, -1, 2, 0, 4]


def test_trie_single_chain_and_empty():
    d = trie_draft([[4, 5, 6]])
    assert d.is_chain and d.token_list == [4, 5, 6]
    assert len(trie_draft([])) == 0
    assert len(trie_draft([[]])) == 0
    d = trie_draft([[4, 5], [4, 5, 6]])  # a prefix of another sequence adds no node of its own
    assert d.token_list == [4, 5, 6] and d.is_chain


# --- propose ---------------------------------------------------------------------------------------------------
def make_ctx(histories):
    return DraftContext(SamplingSpec(), [torch.Generator() for _ in histories], [list(h) for h in histories])


def test_propose_respects_budgets_and_k():
    rep = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]
    d = NGramDrafter(k=4)
    d.begin(make_ctx([rep, rep, rep, [1, 2, 3]]), None)
    drafts = d.propose([0, 2, 10, 10])
    assert len(drafts) == 4
    assert len(drafts[0]) == 0  # a zero budget gives an empty draft
    assert drafts[1].token_list == [3, 4] and drafts[1].is_chain
    assert drafts[2].token_list == [3, 4, 5, 6]  # capped by k
    assert len(drafts[3]) == 0  # nothing to look up
    for dr in drafts:
        dr.validate(10)
        assert dr.q is None


def test_propose_tree_with_branches():
    hist = [1, 2, 5, 6, 1, 2, 5, 7, 1, 2]
    d = NGramDrafter(k=3, branches=2)
    d.begin(make_ctx([hist]), None)
    (draft,) = d.propose([5])
    # Continuations [5, 7, 1] (most recent) and [5, 6, 1] share the first token.
    assert draft.token_list == [5, 7, 1, 6, 1]
    assert draft.parent_list == [-1, 0, 1, 0, 3]
    assert len(d.propose([0])[0]) == 0


def test_propose_follows_the_shared_history():
    ctx = make_ctx([[1, 2, 3, 1, 2]])
    d = NGramDrafter(k=2)
    d.begin(ctx, None)
    assert d.propose([5])[0].token_list == [3, 1]
    ctx.history[0].extend([3, 4, 1, 2, 3])  # the loop extends the shared history; the drafter must see it
    assert d.propose([5])[0].token_list == [4, 1]


@pytest.mark.parametrize("kwargs", [dict(k=0), dict(k=-1), dict(min_ngram=0), dict(max_ngram=1, min_ngram=2),
                                    dict(branches=0),
                                    dict(k=2.5)])  # accepted today, then a TypeError (slice index) on first use
def test_bad_constructor_args(kwargs):
    with pytest.raises(DraftError) as err:
        NGramDrafter(**kwargs)
    name, value = next(iter(kwargs.items()))
    assert f"{name}={value}" in str(err.value)


def test_ngram_drafter_in_the_loop_accepts_repeats(target):
    # A repeated pattern the target continues greedily: the n-gram path must be taken and stay exact.
    prompt = [5, 17, 33, 5, 17, 33, 5, 17]
    plain = SpeculativeDecoder(target).generate([prompt], max_new_tokens=20).sequences[0]
    out = SpeculativeDecoder(target, "ngram", tree=3).generate([prompt], max_new_tokens=20)
    assert out.sequences[0] == plain
    assert out.stats.draft_tokens > 0
