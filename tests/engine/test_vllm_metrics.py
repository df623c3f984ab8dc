"""Acceptance metrics under vLLM's names (`mmspec.stats`, after vllm/v1/spec_decode/metrics.py): the loop's counts
against an independent count from the drafts it was given and the tokens it committed, the definitions against a
re-statement of vLLM's SpecDecodingStats.observe_draft, steps without a draft (which vLLM does not count), and a
benchmark's JSON rows."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import hf_greedy
from mmspec import SpeculativeDecoder
from mmspec.stats import GenerationStats, vllm_metrics, vllm_metrics_of
from mmspec.tree import Draft, StaticTree
from oracle import OracleDrafter

MAX_NEW = 17  # 1 (prefill) + 4 steps of 4 tokens: a chain of 3 always fits the budget
VLLM_RATIOS = ("mean_acceptance_length", "draft_acceptance_rate", "acceptance_rate_per_position")


class Recorder:
    """Wraps a drafter and keeps, for every row-step, (request, tokens generated so far, tokens, parents); every
    `blank`-th propose call (0 = none) hands back empty drafts instead (a step without a draft)."""

    def __init__(self, inner, prompts, blank: int = 0):
        self.inner, self.prompts, self.blank = inner, prompts, blank
        self.needs_hidden, self.trusted, self.counters = inner.needs_hidden, False, inner.counters
        self.log, self.calls = [], 0

    def __getattr__(self, name):  # everything else the loop may read (max_nodes, max_depth, ...) is the inner one's
        return getattr(self.inner, name)

    def check_target(self, target):
        return self.inner.check_target(target)

    def begin(self, ctx, prefill):
        self.ctx, self.rows = ctx, list(range(len(ctx.history)))
        self.inner.begin(ctx, prefill)

    def propose(self, budgets):
        drafts = self.inner.propose(budgets)
        self.calls += 1
        if self.blank and self.calls % self.blank == 0:
            drafts = [Draft.empty() for _ in drafts]
        for row, h, d in zip(self.rows, self.ctx.history, drafts):
            self.log.append((row, len(h) - len(self.prompts[row]), d.token_list, d.parent_list))
        return drafts

    def commit(self, updates, verify_out):
        return self.inner.commit(updates, verify_out)

    def select_rows(self, rows):
        self.rows = [self.rows[r] for r in rows]
        self.inner.select_rows(rows)


def _greedy_accepted(tokens, parents, out, done) -> int:
    """Depth of the path greedy verification accepts: from the root, a child whose token is the committed token."""
    node, depth = -1, 0
    while True:
        nxt = [j for j, (t, p) in enumerate(zip(tokens, parents)) if p == node and done + depth < len(out)
               and t == out[done + depth]]
        if not nxt:
            return depth
        node, depth = nxt[0], depth + 1


def _depths(parents) -> list[int]:
    out = []
    for p in parents:
        out.append(1 if p < 0 else out[p] + 1)
    return out


def _independent(log, sequences) -> dict:
    """vLLM's counts from the recorded drafts and the committed sequences alone (no GenerationStats involved)."""
    drafted = [(t, p, _greedy_accepted(t, p, sequences[row], done)) for row, done, t, p in log if t]
    width = max((max(_depths(p)) for t, p, _ in drafted), default=0)
    return dict(num_drafts=len(drafted), num_draft_tokens=sum(len(t) for t, _, _ in drafted),
                num_accepted_tokens=sum(a for _, _, a in drafted),
                num_accepted_tokens_per_pos=[sum(a > i for _, _, a in drafted) for i in range(width)],
                num_draft_tokens_per_pos=[sum(d == i + 1 for _, p, _ in drafted for d in _depths(p))
                                          for i in range(width)])


@pytest.fixture(scope="module")
def refs(target, prompts):
    return [hf_greedy(target, p, MAX_NEW) for p in prompts[:4]]


@pytest.mark.parametrize("shape", [StaticTree.chain(3), StaticTree.full((2, 2, 1))], ids=["chain3", "tree221"])
def test_counts_match_an_independent_count(target, prompts, refs, shape):
    ps = prompts[:4]
    rec = Recorder(OracleDrafter(refs, shape, p=0.6, seed=3), ps)
    stream = SpeculativeDecoder(target, rec).stream(ps, max_new_tokens=MAX_NEW)
    events = list(stream)
    st = stream.output.stats
    assert stream.output.sequences == refs  # greedy: lossless, so the committed tokens are the target's
    ind = _independent(rec.log, refs)
    got = st.vllm_metrics()
    for key, value in ind.items():
        assert got[key] == value, key
    assert 0 < st.num_accepted_tokens < st.num_draft_tokens  # some drafts rejected, some accepted
    # no EOS and the budget always fits: every accepted draft token is one the stream reports as accepted
    assert sum(e.accepted for e in events) == st.num_accepted_tokens
    # a step whose budget is spent (one token left) has no draft: a step for tau, not a draft for vLLM
    assert st.steps - st.num_drafts == sum(not t for _, _, t, _ in rec.log)
    n, acc = ind["num_drafts"], ind["num_accepted_tokens"]
    assert st.mean_acceptance_length == pytest.approx(1 + acc / n)
    assert st.tau == pytest.approx(1 + acc / st.steps)  # nothing cut: tau differs only in the denominator
    assert st.draft_acceptance_rate == pytest.approx(acc / ind["num_draft_tokens"])
    rates = st.acceptance_rate_per_position
    assert rates == pytest.approx([a / n for a in ind["num_accepted_tokens_per_pos"]])
    assert all(a >= b for a, b in zip(rates, rates[1:])) and len(rates) == 3
    assert st.mean_acceptance_length == pytest.approx(1 + sum(rates))
    assert sum(st.num_draft_tokens_per_pos) == st.num_draft_tokens
    if len(shape) > shape.depth:  # a tree: the rate divides by every node, so it is below the chain-equivalent
        assert st.num_draft_tokens > 3 * n and st.draft_acceptance_rate < acc / (3 * n)
    d = json.loads(json.dumps(st.as_dict()))
    for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "num_accepted_tokens_per_pos",
                "num_draft_tokens_per_pos", *VLLM_RATIOS):
        assert d[key] == pytest.approx(getattr(st, key)), key
    assert d["tau"] == pytest.approx(st.tau) and d["alpha"] == pytest.approx(st.alpha)  # the old names stay


def test_a_drafter_that_is_always_right(target, prompts, refs):
    ps = prompts[:4]
    dec = SpeculativeDecoder(target, OracleDrafter(refs, StaticTree.chain(3), p=1.0))
    out = dec.generate(ps, max_new_tokens=MAX_NEW)
    st = out.stats
    assert out.sequences == refs
    assert st.num_drafts == 4 * len(ps) and st.num_draft_tokens == 3 * st.num_drafts
    assert st.mean_acceptance_length == 4.0 and st.draft_acceptance_rate == 1.0
    assert st.acceptance_rate_per_position == [1.0, 1.0, 1.0] and st.num_accepted_tokens_per_pos == [16] * 3


def test_steps_without_a_draft_are_not_drafts(target, prompts, refs):
    """vLLM observes a request's step only when it had draft tokens; tau counts every step."""
    ps = prompts[:4]
    rec = Recorder(OracleDrafter(refs, StaticTree.chain(3), p=0.8, seed=5), ps, blank=2)
    st = SpeculativeDecoder(target, rec).generate(ps, max_new_tokens=MAX_NEW).stats
    ind = _independent(rec.log, refs)
    empty = sum(not t for _, _, t, _ in rec.log)
    assert empty > 0 and st.steps == len(rec.log)
    assert st.num_drafts == ind["num_drafts"] == st.steps - empty
    assert st.num_accepted_tokens == ind["num_accepted_tokens"] > 0
    assert st.mean_acceptance_length == pytest.approx(1 + st.num_accepted_tokens / st.num_drafts)
    assert st.mean_acceptance_length > 1 + st.tau_minus_1  # per draft, not per step
    assert st.tau < st.mean_acceptance_length
    assert st.acceptance_rate_per_position == pytest.approx([a / st.num_drafts for a in
                                                             ind["num_accepted_tokens_per_pos"]])


def _observe_draft(counts: dict, num_draft_tokens: int, num_accepted_tokens: int) -> None:
    """vLLM's SpecDecodingStats.observe_draft and its scheduler's guard, restated (vllm/v1/spec_decode/metrics.py)."""
    if not num_draft_tokens:
        return
    counts["drafts"] += 1
    counts["draft"] += num_draft_tokens
    counts["acc"] += num_accepted_tokens
    for i in range(num_accepted_tokens):
        counts["per_pos"][i] += 1


def test_definitions_follow_vllm():
    steps = [(3, 2), (3, 0), (0, 0), (2, 2), (3, 3), (1, 0)]  # (draft tokens, accepted) of chain drafts
    st, counts = GenerationStats(), dict(drafts=0, draft=0, acc=0, per_pos=[0, 0, 0])
    for n, a in steps:
        st.record_step(list(range(1, n + 1)), a, a + 1, n)
        _observe_draft(counts, n, a)
    assert (st.num_drafts, st.num_draft_tokens, st.num_accepted_tokens) == (5, 12, 7)
    assert (st.num_drafts, st.num_draft_tokens, st.num_accepted_tokens) == (counts["drafts"], counts["draft"],
                                                                           counts["acc"])
    assert st.num_accepted_tokens_per_pos == counts["per_pos"] == [3, 3, 1]
    assert st.num_draft_tokens_per_pos == [5, 4, 3]
    assert st.mean_acceptance_length == pytest.approx(1 + 7 / 5)  # vLLM: 1 + accepted / drafts
    assert st.tau == pytest.approx(13 / 6)  # mmspec: per step, the draftless one included
    assert st.draft_acceptance_rate == pytest.approx(7 / 12)
    assert st.acceptance_rate_per_position == pytest.approx([3 / 5, 3 / 5, 1 / 5])
    assert st.alpha == pytest.approx([3 / 5, 3 / 3, 1 / 2])  # conditional, unlike the per-position rate
    # summed over generations the counts add first, as vLLM's logger sums its intervals
    other = GenerationStats()
    other.record_step([1, 2], 1, 2, 2)
    both = vllm_metrics_of([st, other])
    assert both["num_drafts"] == 6 and both["num_accepted_tokens_per_pos"] == [4, 3, 1]
    assert both["mean_acceptance_length"] == pytest.approx(1 + 8 / 6)
    assert both["draft_acceptance_rate"] == pytest.approx(8 / 14)
    none = vllm_metrics(0, 0, 0, [], undefined=None)
    assert all(none[k] in (None, []) for k in VLLM_RATIOS)
    assert GenerationStats().mean_acceptance_length == 0.0


def test_benchmark_rows_carry_vllms_names(tmp_path):
    from mmspec.bench_overhead import run_overhead_sweep

    result = run_overhead_sweep(tmp_path, quick=True, progress=False)
    rows = json.loads((tmp_path / "overhead.json").read_text())["rows"]
    assert rows == json.loads(json.dumps(result["rows"]))
    for r in rows:
        for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens", *VLLM_RATIOS):
            assert key in r, (r["method"], key)
        if r["method"] == "plain":
            assert r["num_drafts"] == 0 and r["mean_acceptance_length"] is None and r["draft_acceptance_rate"] is None
            continue
        assert r["num_drafts"] > 0, r["method"]
        assert r["mean_acceptance_length"] == pytest.approx(1 + r["num_accepted_tokens"] / r["num_drafts"])
        assert r["draft_acceptance_rate"] == pytest.approx(r["num_accepted_tokens"] / r["num_draft_tokens"])
        assert r["mean_acceptance_length"] == pytest.approx(1 + sum(r["acceptance_rate_per_position"]))
        assert 1.0 <= r["mean_acceptance_length"] <= 1 + len(r["acceptance_rate_per_position"])
        if r["method"] == "chain4":
            assert len(r["acceptance_rate_per_position"]) == 4
