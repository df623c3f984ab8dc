"""Bad inputs get a typed error from mmspec.errors that names the offending value, and leave the decoder usable.

After a refused call the same decoder (same target adapter, same drafter, same caches) must still produce exactly
the target-only greedy reference: errors are raised before any state is half-updated.
"""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import hf_greedy
from mmspec import SpeculativeDecoder
from mmspec.drafters.base import DrafterCounters
from mmspec.errors import (
    ContextOverflowError,
    DeviceMismatchError,
    DraftError,
    EmptyPromptError,
    GenerationConfigError,
    IncompatibleModelsError,
    InvalidInputError,
    MMSpecError,
    NonFiniteLogitsError,
    VocabularyMismatchError,
)
from mmspec.sampling import SamplingSpec, check_finite
from mmspec.target import CausalLMTarget
from mmspec.testing import tiny_llama
from mmspec.tree import Draft, DynamicTree, StaticTree

N_CHECK = 10  # tokens compared after each error (greedy prefixes of the 24-token reference)


@pytest.fixture(scope="module")
def dec(target, drafters):
    # A tree drafter that both accepts and rejects, so a broken cache would show.
    return SpeculativeDecoder(target, drafters["noisy"], tree=StaticTree.full((2, 2, 1)))


def assert_usable(dec, prompts, reference):
    """A normal batched request right after the error is exact (prompts of 8, 10 and 1 tokens)."""
    rows = (0, 3, 11)
    out = dec.generate([prompts[i] for i in rows], max_new_tokens=N_CHECK)
    assert out.sequences == [reference[i][:N_CHECK] for i in rows]


def raises(dec, err, *needles, call=None, **kwargs):
    """Run `call` (default: dec.generate(**kwargs)), expect `err`, check the message names every needle."""
    with pytest.raises(err) as info:
        if call is None:
            dec.generate(**kwargs)
        else:
            call()
    msg = str(info.value)
    for n in needles:
        assert n in msg, (n, msg)
    assert isinstance(info.value, MMSpecError)
    return info.value


# --- prompts -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, needle", [
    ([], "empty"),
    ([[]], "prompt 0"),
    ([[3, 4, 5], []], "prompt 1"),
    ([[3], [4, 5], [], [6]], "prompt 2"),
    (torch.zeros(1, 0, dtype=torch.long), "prompt 0"),
    (torch.zeros(0, dtype=torch.long), "prompt 0"),
])
def test_empty_prompt(dec, prompts, reference, bad, needle):
    e = raises(dec, EmptyPromptError, needle, input_ids=bad, max_new_tokens=4)
    assert isinstance(e, InvalidInputError) and isinstance(e, ValueError)
    assert_usable(dec, prompts, reference)


def test_empty_prompt_at_the_target(target):
    tgt = CausalLMTarget(target)
    with pytest.raises(EmptyPromptError):
        tgt.prefill([[1, 2], []])
    with pytest.raises(EmptyPromptError):
        tgt.prefill([])


# --- generation config -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, needle", [
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(max_new_tokens=-1), "max_new_tokens=-1"),
    (dict(max_new_tokens=1.5), "max_new_tokens=1.5"),
    (dict(max_new_tokens=True), "max_new_tokens=True"),
    (dict(max_new_tokens="8"), "max_new_tokens='8'"),
    (dict(temperature=-1), "temperature=-1"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(top_p=0), "top_p=0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_k=-1), "top_k=-1"),
    (dict(top_k=2.5), "top_k=2.5"),
    (dict(repetition_penalty=0), "repetition_penalty=0"),
    (dict(repetition_penalty=-1.0), "repetition_penalty=-1.0"),
])
def test_generation_config(dec, prompts, reference, kwargs, needle):
    kwargs = {"max_new_tokens": 4, **kwargs}
    e = raises(dec, GenerationConfigError, needle, input_ids=prompts[:2], **kwargs)
    assert isinstance(e, ValueError)
    assert_usable(dec, prompts, reference)


def test_sampling_spec_validates_on_its_own():
    for bad in (dict(temperature=-0.5), dict(top_p=0.0), dict(top_k=-2), dict(repetition_penalty=0.0)):
        with pytest.raises(GenerationConfigError):
            SamplingSpec(**bad)
    SamplingSpec(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.2)  # in range: no error


def test_wrong_number_of_generators(dec, prompts, reference):
    gens = [torch.Generator().manual_seed(0)]
    raises(dec, GenerationConfigError, "1 generator", "2 request", input_ids=prompts[:2], max_new_tokens=4,
           temperature=1.0, generator=gens)
    raises(dec, GenerationConfigError, "3 generator", "1 request", input_ids=prompts[:1], max_new_tokens=4,
           temperature=1.0, generator=[torch.Generator() for _ in range(3)])
    assert_usable(dec, prompts, reference)


# --- token ids -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, needles", [
    ([[3, 4, 96]], ("96", "[0, 96)")),
    ([[3, 4], [5, 1000]], ("prompt 1", "1000")),
    ([[-1, 4]], ("-1", "[0, 96)")),
    (torch.tensor([[3.0, 4.0]]), ("dtype", "float")),
    (torch.tensor([[True, False]]), ("dtype", "bool")),
    (torch.ones(1, 2, 3, dtype=torch.long), ("shape", "(1, 2, 3)")),
    ("hello", ("str",)),
    ([[3, 4.5]], ("prompt 0",)),
    ([[3, 4], "ab"], ("prompt 1", "str")),
])
def test_invalid_token_ids(dec, prompts, reference, bad, needles):
    raises(dec, InvalidInputError, *needles, input_ids=bad, max_new_tokens=4)
    assert_usable(dec, prompts, reference)


# --- models that do not fit together ---------------------------------------------------------------------------
def test_vocabulary_mismatch(target):
    small = tiny_llama(seed=3, vocab=80, hidden=32, layers=1, heads=2, kv_heads=1)
    e = raises(None, VocabularyMismatchError, "80", "96", call=lambda: SpeculativeDecoder(target, small))
    assert isinstance(e, IncompatibleModelsError) and isinstance(e, ValueError)


def test_device_mismatch(target, prompts, reference):
    with torch.device("meta"):
        meta = tiny_llama(seed=3, hidden=32, layers=1, heads=2, kv_heads=1)
    assert next(meta.parameters()).device.type == "meta"
    e = raises(None, DeviceMismatchError, "meta", target.device.type, call=lambda: SpeculativeDecoder(target, meta))
    assert isinstance(e, IncompatibleModelsError)
    moved = tiny_llama(seed=3, hidden=32, layers=1, heads=2, kv_heads=1).to("meta")
    raises(None, DeviceMismatchError, "meta", call=lambda: SpeculativeDecoder(target, moved))


def test_unknown_acceptance_and_drafter(target):
    raises(None, GenerationConfigError, "'bogus'", "typical",
           call=lambda: SpeculativeDecoder(target, "ngram", acceptance="bogus"))
    raises(None, InvalidInputError, "'nonsense'", call=lambda: SpeculativeDecoder(target, "nonsense"))


# --- non-finite numbers ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nan_target(target):
    bad = copy.deepcopy(target)
    with torch.no_grad():
        bad.lm_head.weight[7] = float("nan")  # one vocabulary row: every position gets a NaN logit
    return bad


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.0, seed=0), dict(temperature=0.8, top_k=5)])
def test_nan_logits_from_the_target(nan_target, drafters, prompts, reference, dec, sampling):
    for drafter in (None, "ngram", drafters["copy"]):
        bad = SpeculativeDecoder(nan_target, drafter, tree=3)
        e = raises(bad, NonFiniteLogitsError, "NaN", input_ids=prompts[:2], max_new_tokens=6, **sampling)
        assert isinstance(e, FloatingPointError)
    assert_usable(dec, prompts, reference)  # another decoder on the healthy target is unaffected


@pytest.mark.parametrize("batched", [True, False])
def test_nan_logits_in_a_verification_step(target, drafters, prompts, reference, dec, batched):
    """NaN that appears only in a verification forward is reported, also by the batched sampling path, which reads
    its finiteness check together with the tokens (no extra host sync)."""
    class Flaky(CausalLMTarget):
        def verify(self, pending, drafts, want_hidden=False):
            out = super().verify(pending, drafts, want_hidden)
            out.logits[..., 7] = float("nan")
            return out

    bad = SpeculativeDecoder(Flaky(target), drafters["noisy"], tree=3, batched_acceptance=batched)
    raises(bad, NonFiniteLogitsError, "NaN", input_ids=prompts[:2], max_new_tokens=6, temperature=1.0, seed=0)
    assert_usable(dec, prompts, reference)


def test_nan_in_every_weight(target):
    bad = copy.deepcopy(target)
    with torch.no_grad():
        for p in bad.parameters():
            p.fill_(float("nan"))
    raises(SpeculativeDecoder(bad), NonFiniteLogitsError, "NaN", input_ids=[[3, 4, 5]], max_new_tokens=3)


def test_sampling_spec_on_non_finite_logits():
    logits = torch.randn(3, 10)
    logits[1, 4] = float("nan")
    for spec in (SamplingSpec(), SamplingSpec(temperature=1.0), SamplingSpec(temperature=0.5, top_p=0.8)):
        with pytest.raises(NonFiniteLogitsError, match="1 NaN"):
            spec.probs(logits)
    plus_inf = torch.randn(2, 10)
    plus_inf[0, 0] = float("inf")
    with pytest.raises(NonFiniteLogitsError, match=r"\(2, 10\)"):
        SamplingSpec(temperature=1.0).probs(plus_inf)
    both = torch.randn(2, 10)
    both[0, 0], both[1, 1] = float("inf"), float("-inf")  # sums to NaN; the +inf must still be reported
    with pytest.raises(NonFiniteLogitsError):
        check_finite(both)
    # -inf alone is a legitimate masked logit.
    masked = torch.randn(2, 10)
    masked[:, :3] = float("-inf")
    p = SamplingSpec(temperature=1.0).probs(masked)
    assert torch.allclose(p.sum(-1), torch.ones(2)) and (p[:, :3] == 0).all()


# --- context length --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_model():
    return tiny_llama(seed=5, max_positions=32)


def test_context_overflow(short_model):
    dec = SpeculativeDecoder(short_model, "ngram")
    prompt = list(range(3, 23))  # 20 tokens
    raises(dec, ContextOverflowError, "20", "max_new_tokens=13", "32", input_ids=[prompt], max_new_tokens=13)
    raises(dec, ContextOverflowError, "40", "32", input_ids=[list(range(3, 43))], max_new_tokens=1)
    raises(dec, ContextOverflowError, "20", input_ids=[[3, 4], prompt], max_new_tokens=13)  # the longest counts
    # Exactly at the limit is allowed, and the decoder still matches transformers afterwards.
    out = dec.generate([prompt], max_new_tokens=12)
    ref = short_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                               eos_token_id=None)[0, 20:].tolist()
    assert out.sequences[0] == ref


def test_context_overflow_at_the_target(short_model):
    with pytest.raises(ContextOverflowError, match="33"):
        CausalLMTarget(short_model).prefill([list(range(3, 36))])


def test_drafter_with_a_shorter_context(target):
    """A drafter whose context is shorter than prompt + max_new_tokens (GPT-2: learned absolute positions).

    Acceptable: a ContextOverflowError before generation that names the drafter's limit, or drafting only while the
    drafter has room and an exact output. Not acceptable: an untyped IndexError from inside the drafter."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                      bos_token_id=None, eos_token_id=None)).to(target.device).eval()
    short = [3, 9, 27, 81, 50]
    # Control: within its context this model works through the adapter (as a target and as a drafter).
    ref = gpt2.generate(torch.tensor([short], device=gpt2.device), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 5:].tolist()
    assert SpeculativeDecoder(gpt2).generate([short], max_new_tokens=8).sequences == [ref]
    dec = SpeculativeDecoder(target, gpt2, tree=3)
    short_ref = hf_greedy(target, short, 8)
    assert dec.generate([short], max_new_tokens=8).sequences == [short_ref]
    prompt = [3, 9, 27, 81, 50, 20, 3, 9, 27, 81]
    expect = [hf_greedy(target, prompt, 20)]
    try:
        out = dec.generate([prompt], max_new_tokens=20)  # drafter positions would reach 29 > 16
    except ContextOverflowError as e:
        assert "16" in str(e)
    else:
        assert out.sequences == expect
    assert dec.generate([short], max_new_tokens=8).sequences == [short_ref]


def test_static_cache_too_small(target, prompts, reference):
    tgt = CausalLMTarget(target, cache="static", max_cache_len=10)
    dec = SpeculativeDecoder(tgt, "ngram")
    raises(dec, ContextOverflowError, "max_cache_len", input_ids=[list(range(3, 15))], max_new_tokens=2)
    out = dec.generate([prompts[1][:4]], max_new_tokens=5)  # fits: 4 + 5 slots + at most one block
    assert out.sequences[0] == SpeculativeDecoder(target).generate([prompts[1][:4]], max_new_tokens=5).sequences[0]


def test_static_cache_too_small_is_refused_before_streaming(target):
    # 4 prompt tokens + 20 new tokens can never fit a 10-slot static cache: that is known before the first token,
    # like the max_positions check, so no partial output may be streamed before the error.
    tgt = CausalLMTarget(target, cache="static", max_cache_len=10)
    dec = SpeculativeDecoder(tgt, None)
    events = []
    with pytest.raises(ContextOverflowError, match="max_cache_len"):
        for event in dec.stream([[3, 4, 5, 6]], max_new_tokens=20):
            events.append(event)
    assert events == []


# --- drafts ------------------------------------------------------------------------------------------------------
class OracleDrafter:
    """A plug-in drafter (the Drafter protocol) that proposes the target's own next tokens.

    mode "good": at most `budget` tokens; "deep": one token more than the budget allows; "few": one draft too few;
    "float": float token ids; "range": a token outside the vocabulary; "parent": a node pointing at a later node.
    """

    needs_hidden = False

    def __init__(self, reference_of: dict, mode: str = "good", k: int = 3):
        self.reference_of, self.mode, self.k = reference_of, mode, k
        self.counters = DrafterCounters()
        self.proposed = 0

    def check_target(self, target) -> None:
        return None

    def begin(self, ctx, prefill) -> None:
        self.ctx = ctx

    def _next(self, hist: list[int], n: int) -> list[int]:
        for prompt, ref in self.reference_of.items():
            full = list(prompt) + ref
            if hist == full[: len(hist)]:
                return full[len(hist): len(hist) + n]
        return [5] * n

    def propose(self, budgets):
        drafts = []
        for hist, budget in zip(self.ctx.history, budgets):
            depth = min(self.k, budget)
            if self.mode == "deep":
                depth = budget + 1
            toks = self._next(hist, depth)
            d = Draft.chain(toks)
            if self.mode == "float" and len(toks):
                d = Draft(torch.tensor(toks, dtype=torch.float32) + 0.25, d.parent)
            if self.mode == "range" and len(toks):
                d = Draft.chain([96] + toks[1:])
            if self.mode == "parent" and len(toks) >= 2:
                d = Draft(d.tokens, torch.tensor([1] + d.parent_list[1:]))
            drafts.append(d)
        self.proposed += sum(len(d) for d in drafts)
        if self.mode == "few" and len(drafts) > 1:
            drafts = drafts[:-1]
        return drafts

    def commit(self, updates, verify_out) -> None:
        return None

    def select_rows(self, rows) -> None:
        return None


@pytest.fixture(scope="module")
def oracle(prompts, reference):
    return {tuple(p): r for p, r in zip(prompts, reference)}


def test_plugin_drafter_good(target, prompts, reference, oracle):
    dec = SpeculativeDecoder(target, OracleDrafter(oracle))
    out = dec.generate(prompts[:3], max_new_tokens=N_CHECK)
    assert out.sequences == [r[:N_CHECK] for r in reference[:3]]
    assert out.stats.accepted_tokens == out.stats.draft_tokens > 0  # the oracle is always right


@pytest.mark.parametrize("mode, needles", [
    ("deep", ("depth", "left")),
    ("range", ("96",)),
    ("parent", ("parent",)),
    ("float", ()),
    ("few", ("draft",)),
])
def test_bad_plugin_draft(target, prompts, reference, oracle, mode, needles):
    tgt = CausalLMTarget(target)  # one adapter shared by the failing and the healthy decoder
    drafter = OracleDrafter(oracle, mode)
    bad = SpeculativeDecoder(tgt, drafter)
    raises(bad, DraftError, *needles, input_ids=prompts[:2], max_new_tokens=N_CHECK)
    # The same decoder, once its drafter behaves, and a fresh decoder on the same target both still work.
    drafter.mode = "good"
    out = bad.generate(prompts[:3], max_new_tokens=N_CHECK)
    assert out.sequences == [r[:N_CHECK] for r in reference[:3]]
    assert out.stats.draft_tokens > 0
    good = SpeculativeDecoder(tgt, "ngram")
    assert good.generate(prompts[:3], max_new_tokens=N_CHECK).sequences == [r[:N_CHECK] for r in reference[:3]]


def test_bad_draft_after_partial_generation_keeps_the_stream_atomic(target, prompts, reference, oracle):
    # The drafter turns bad after the first steps: tokens streamed before the error were right, and the error
    # is raised before any cache is touched, so the next request is exact.
    tgt = CausalLMTarget(target)
    drafter = OracleDrafter(oracle)
    dec = SpeculativeDecoder(tgt, drafter)
    stream = dec.stream(prompts[:1], max_new_tokens=N_CHECK)
    got = []
    with pytest.raises(DraftError):
        for i, event in enumerate(stream):
            got.extend(event.tokens)
            if i == 1:
                drafter.mode = "deep"
    assert got == reference[0][: len(got)] and len(got) >= 2
    drafter.mode = "good"
    assert dec.generate(prompts[:2], max_new_tokens=N_CHECK).sequences == [r[:N_CHECK] for r in reference[:2]]


@pytest.mark.parametrize("drafter_vocab", [80, 120])
def test_shared_tokenizer_reconciles_vocabulary_sizes(target, prompts, reference, drafter_vocab):
    """A drafter whose tokenizer gives the target's ids but whose vocabulary is smaller (logits padded with -inf)
    or larger (cut) drafts for the target when the caller vouches for the tokenizer; otherwise it is refused."""
    from mmspec.drafters import ModelDrafter

    small = tiny_llama(seed=3, vocab=drafter_vocab, hidden=32, layers=1, heads=2, kv_heads=1).to(target.device)
    with pytest.raises(VocabularyMismatchError):
        SpeculativeDecoder(target, ModelDrafter(small, 3))
    for tree in (3, DynamicTree(topk=3, depth=3, total=8)):
        dec = SpeculativeDecoder(target, ModelDrafter(small, tree, shared_tokenizer=True))
        ps = [p for p in prompts if max(p) < drafter_vocab][:6]
        out = dec.generate(ps, max_new_tokens=24)
        assert out.sequences == [reference[prompts.index(p)] for p in ps]


def test_seed_and_generator_follow_one_rule(dec, prompts, reference):
    kw = dict(input_ids=prompts[:2], max_new_tokens=4, temperature=1.0)
    raises(dec, GenerationConfigError, "not both", seed=1, generator=torch.Generator(), **kw)
    raises(dec, GenerationConfigError, "seed='abc'", "int", seed="abc", **kw)
    one = dec.generate(generator=torch.Generator().manual_seed(3), **kw).sequences  # one generator seeds the batch
    assert one == dec.generate(generator=torch.Generator().manual_seed(3), **kw).sequences
    assert dec.generate(seed=3, **kw).sequences[0] == dec.generate(prompts[:1], max_new_tokens=4, temperature=1.0,
                                                                   seed=3).sequences[0]
    assert_usable(dec, prompts, reference)
