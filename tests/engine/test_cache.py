"""Cache bookkeeping and tree verification against plain, sequential model runs (ALGORITHMS.md §2).

* RaggedCache.compact / select_rows on synthetic caches whose every slot is identifiable: exactly the kept slots
  move, nothing else is touched, and the width falls back to max(length).
* The causal-LM target on a real tiny model: after verify + commit, each row's cache equals the cache of a fresh
  run that feeds only the committed tokens one by one; and the logits of a tree verification equal plain forwards
  over every root-to-node path (B = 1 and ragged B = 3, dynamic and static caches).
* Sliding-window models are refused; memory after generation equals plain decoding's.
"""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, StaticCache

from mmspec import SpeculativeDecoder
from mmspec.compat import cache_kwargs
from mmspec.cache import RaggedCache, kv_layers
from conftest import DEVICE
from mmspec.errors import UnsupportedModelError
from mmspec.target import CausalLMTarget
from mmspec.testing import widen_
from mmspec.tree import Draft

# fp32 logits of a verify block vs plain forwards. CUDA's fp32 attention kernels sum in a different order with an
# explicit mask than without (measured on an H100: 1.1e-5 on logits of order 1), so the GPU bound is looser.
ATOL = 1e-5 if DEVICE.type == "cpu" else 1e-4
H, D = 2, 4  # synthetic cache: heads, head dim


# --- synthetic caches: exact slot bookkeeping ------------------------------------------------------------------
def slot_values(b: int, t0: int, t1: int, tag: float) -> torch.Tensor:
    """(b, H, t1 - t0, D) values that identify (row, slot, tag) uniquely."""
    row = torch.arange(b, dtype=torch.float32)[:, None, None, None] * 1000
    slot = torch.arange(t0, t1, dtype=torch.float32)[None, None, :, None]
    head = torch.arange(H, dtype=torch.float32)[None, :, None, None] * 0.1
    dim = torch.arange(D, dtype=torch.float32)[None, None, None, :] * 0.01
    return row + slot + head + dim + tag


def synthetic(kind: str, config, length: list[int], width: int, block: int) -> RaggedCache:
    """A RaggedCache of len(length) rows with `width` committed-or-hole slots and a verify block of `block` slots."""
    b = len(length)
    if kind == "dynamic":
        cache = DynamicCache(config=config)
    else:
        cache = StaticCache(config=config, max_cache_len=width + block + 4)
    rc = RaggedCache(cache, torch.tensor(length), 0, kind == "static")
    n_layers = len(kv_layers(cache))
    for start, stop in ((0, width), (width, width + block)):
        for layer in range(n_layers):
            cache.update(slot_values(b, start, stop, layer), -slot_values(b, start, stop, layer), layer)
        rc.appended(stop - start)
    return rc


def snapshot(rc: RaggedCache):
    return [(layer.keys.clone(), layer.values.clone()) for layer in kv_layers(rc.cache)]


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_compact_moves_exactly_the_kept_slots(target, kind):
    length, width, block = [5, 3, 4], 5, 4
    rc = synthetic(kind, target.config, length, width, block)
    before = snapshot(rc)
    ptrs = [layer.keys.data_ptr() for layer in kv_layers(rc.cache)]
    keep = [[5, 7, 8],   # row 0 (longest): slot 5 is already in place, 7 and 8 move down by one
            [5, 6],      # row 1: block slots 5, 6 go to its holes 3, 4
            []]          # row 2 keeps nothing
    rc.compact(keep)
    assert rc.length.tolist() == [8, 5, 4]
    assert rc.width == 8
    moved = {(0, 6): 7, (0, 7): 8, (1, 3): 5, (1, 4): 6}  # (row, destination) -> source
    for li, (layer, (k0, v0)) in enumerate(zip(kv_layers(rc.cache), before)):
        keys, values = layer.keys, layer.values
        if kind == "dynamic":
            assert keys.shape[2] == rc.width == max(rc.length.tolist())  # dropped slots are gone
            assert keys.data_ptr() == ptrs[li]  # cropped in place: no copy of the whole cache
        else:
            assert keys.shape[2] == width + block + 4  # the static buffer keeps its size ...
            assert int(layer.cumulative_length) == rc.width  # ... and its write pointer falls back to the width
        for b in range(3):
            for s in range(rc.width):
                src = moved.get((b, s), s)  # every other slot must be untouched
                assert torch.equal(keys[b, :, s], k0[b, :, src]), (li, b, s)
                assert torch.equal(values[b, :, s], v0[b, :, src]), (li, b, s)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_compact_then_append_lands_at_the_width(target, kind):
    rc = synthetic(kind, target.config, [6, 2], 6, 3)
    rc.compact([[6, 8], [7]])
    assert rc.length.tolist() == [8, 3] and rc.width == 8
    new = slot_values(2, 100, 101, 0.5)
    for li in range(len(kv_layers(rc.cache))):
        rc.cache.update(new, -new, li)
    rc.appended(1)
    for li, layer in enumerate(kv_layers(rc.cache)):
        assert torch.equal(layer.keys[:, :, 8], new[:, :, 0])  # the next write lands right after the width
        assert torch.equal(layer.keys[0, :, 7], slot_values(2, 8, 9, li)[0, :, 0])  # row 0: 8 -> 7
        assert torch.equal(layer.keys[1, :, 2], slot_values(2, 7, 8, li)[1, :, 0])  # row 1: 7 -> its length 2
        assert torch.equal(layer.values[1, :, 2], -slot_values(2, 7, 8, li)[1, :, 0])


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_compact_with_nothing_to_move_only_truncates(target, kind):
    rc = synthetic(kind, target.config, [4, 4], 4, 3)
    before = snapshot(rc)
    rc.compact([[4, 5], [4]])  # both in place
    assert rc.length.tolist() == [6, 5] and rc.width == 6
    for layer, (k0, _) in zip(kv_layers(rc.cache), before):
        assert torch.equal(layer.keys[:, :, :6], k0[:, :, :6])


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_select_rows_keeps_the_right_rows(target, kind):
    rc = synthetic(kind, target.config, [5, 2, 3], 5, 0)
    before = snapshot(rc)
    rc.select_rows([2, 0])
    assert rc.length.tolist() == [3, 5] and rc.width == 5
    for layer, (k0, v0) in zip(kv_layers(rc.cache), before):
        assert layer.keys.shape[0] == 2
        assert torch.equal(layer.keys[0, :, :3], k0[2, :, :3]) and torch.equal(layer.values[0, :, :3], v0[2, :, :3])
        assert torch.equal(layer.keys[1, :, :5], k0[0, :, :5]) and torch.equal(layer.values[1, :, :5], v0[0, :, :5])
    rc.select_rows([0])  # only the short row is left: the width shrinks to its length
    assert rc.length.tolist() == [3] and rc.width == 3
    for layer, (k0, _) in zip(kv_layers(rc.cache), before):
        assert torch.equal(layer.keys[0, :, :3], k0[2, :, :3])
        if kind == "dynamic":
            assert layer.keys.shape[2] == 3


# --- real model: verify + commit equals sequential decoding ----------------------------------------------------
class SequentialRun:
    """A fresh DynamicCache fed one token at a time (plain incremental decoding of one row)."""

    def __init__(self, model):
        self.model, self.cache, self.n = model, DynamicCache(config=model.config), 0

    @torch.inference_mode()
    def feed(self, tokens: list[int]) -> None:
        for t in tokens:
            self.model(input_ids=torch.tensor([[t]], device=self.model.device),
                       position_ids=torch.tensor([[self.n]], device=self.model.device),
                       **cache_kwargs(self.model, self.cache), use_cache=True)
            self.n += 1

    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys[0], layer.values[0]) for layer in self.cache.layers]


@torch.inference_mode()
def plain_logits(model, tokens: list[int]) -> torch.Tensor:
    """Logits (T, V) of one plain causal forward over `tokens`, no cache."""
    return model(input_ids=torch.tensor([tokens], device=model.device)).logits[0]


def check_tree_logits(model, logits: torch.Tensor, base: list[int], d: Draft, where: str) -> None:
    """logits (M, V) of a verify block [pending, nodes...] against plain forwards over every root-to-node path.

    One plain forward per leaf covers all of the leaf's ancestors (causal logits at each position)."""
    seen = set()
    leaves = [i for i in range(len(d)) if not d.children[i + 1]] or [None]
    for leaf in leaves:
        path = [] if leaf is None else d.path_to(leaf)
        ref = plain_logits(model, base + [d.token_list[j] for j in path])  # (len(base) + depth, V)
        torch.testing.assert_close(logits[0], ref[len(base) - 1], atol=ATOL, rtol=0,
                                   msg=lambda m: f"{where} root: {m}")
        for depth, node in enumerate(path, start=1):
            torch.testing.assert_close(logits[1 + node], ref[len(base) - 1 + depth], atol=ATOL, rtol=0,
                                       msg=lambda m, node=node: f"{where} node {node}: {m}")
            seen.add(node)
    assert seen == set(range(len(d)))


def draft(tokens, parent) -> Draft:
    return Draft(torch.tensor(tokens, dtype=torch.long), torch.tensor(parent, dtype=torch.long))


# Per step, per row: (draft tokens, parents, accepted node to end the path at (-1: nothing accepted), next pending).
TREE7 = ([11, 12, 13, 14, 15, 16, 17], [-1, 0, 0, 1, -1, 4, 3])
STEPS_B1 = [
    [(TREE7, 6, 40)],                              # deepest path 0 -> 1 -> 3 -> 6
    [(([21, 22, 23], [-1, 0, 1]), 1, 41)],           # a chain (no mask), accepted half-way
    [(TREE7, -1, 42)],                             # everything rejected
    [(TREE7, 5, 43)],                              # second root branch 4 -> 5
    [(([], []), -1, 44)],                          # an empty draft: plain decoding step
]
STEPS_B3 = [
    [(TREE7, 6, 40), (([21, 22], [-1, 0]), 1, 50), (([], []), -1, 60)],
    [(([31, 32, 33, 34], [-1, -1, 1, 2]), 3, 41), (TREE7, -1, 51), (TREE7, 2, 61)],
    [(([], []), -1, 42), (([5], [-1]), 0, 52), (TREE7, 5, 62)],
    [(TREE7, 4, 43), (TREE7, 6, 53), (([7, 8, 9], [-1, 0, 1]), 2, 63)],
]


def run_and_check(model, tgt: CausalLMTarget, prompts: list[list[int]], steps, check_logits: bool = True):
    b = len(prompts)
    tgt.prefill(prompts, reserve=40)
    committed = [list(p) for p in prompts]  # tokens whose keys are cached, per row
    runs = [SequentialRun(model) for _ in prompts]
    for run, p in zip(runs, prompts):
        run.feed(p)
    pending = [30 + i for i in range(b)]
    for n_step, step in enumerate(steps):
        drafts = [draft(*spec) for spec, _, _ in step]
        out = tgt.verify(pending, drafts)
        assert out.logits.shape[:2] == (b, 1 + max(len(d) for d in drafts))
        if check_logits:  # the core tree-attention check: every node equals a plain forward over its path
            for r, d in enumerate(drafts):
                check_tree_logits(model, out.logits[r], committed[r] + [pending[r]], d, f"step {n_step} row {r}")
        paths = [[] if end < 0 else d.path_to(end) for d, (_, end, _) in zip(drafts, step)]
        tgt.commit(paths)
        for r, (d, path, (_, _, nxt)) in enumerate(zip(drafts, paths, step)):
            new = [pending[r]] + [d.token_list[j] for j in path]
            committed[r] += new
            runs[r].feed(new)
            pending[r] = nxt
        kv = tgt.kv
        assert kv.length.tolist() == [len(c) for c in committed]
        assert kv.width == max(kv.length.tolist())
        assert tgt.next_pos.tolist() == [len(c) for c in committed]
        # The compacted cache equals feeding only the committed tokens, one by one, through a fresh run.
        for r in range(b):
            n = len(committed[r])
            for li, (layer, (k_ref, v_ref)) in enumerate(zip(kv_layers(kv.cache), runs[r].kv())):
                torch.testing.assert_close(layer.keys[r, :, :n], k_ref, atol=ATOL, rtol=0)
                torch.testing.assert_close(layer.values[r, :, :n], v_ref, atol=ATOL, rtol=0)
    return committed


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_tree_verify_and_commit_single_row(target, cache):
    tgt = CausalLMTarget(target, cache=cache)
    committed = run_and_check(target, tgt, [[3, 9, 27, 81, 50, 20]], STEPS_B1)
    assert len(committed[0]) == 6 + (1 + 4) + (1 + 2) + 1 + (1 + 2) + 1


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_tree_verify_and_commit_ragged_rows(target, cache):
    # Different prompt lengths leave holes in the shorter rows; padding and holes must never leak into logits.
    tgt = CausalLMTarget(target, cache=cache)
    prompts = [[3, 9, 27], [5, 6, 7, 8, 9, 10, 11, 12, 13], [70]]
    run_and_check(target, tgt, prompts, STEPS_B3)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_select_rows_then_continue(target, cache):
    """A request leaves the batch: the remaining rows go on exactly as if they had been alone."""
    tgt = CausalLMTarget(target, cache=cache)
    prompts = [[3, 9, 27], [5, 6, 7, 8, 9, 10, 11, 12, 13], [70, 71]]
    committed = run_and_check(target, tgt, prompts, STEPS_B3[:2], check_logits=False)
    tgt.select_rows([2, 0])
    assert tgt.kv.length.tolist() == [len(committed[2]), len(committed[0])]
    assert tgt.kv.width == max(len(committed[2]), len(committed[0]))
    pending = [61, 41]  # the rows' pending tokens after STEPS_B3[:2]
    d = [draft(*TREE7), draft([1, 2], [-1, 0])]
    out = tgt.verify(pending, d)
    for r, (rows_committed, dr) in enumerate(zip([committed[2], committed[0]], d)):
        check_tree_logits(target, out.logits[r], rows_committed + [pending[r]], dr, f"row {r}")
    tgt.commit([d[0].path_to(3), [0]])  # TREE7 path 0 -> 1 -> 3 for the old row 2; one token for the old row 0
    final = [committed[2] + [61, 11, 12, 14], committed[0] + [41, 1]]
    assert tgt.kv.length.tolist() == [len(f) for f in final]
    for r, tokens in enumerate(final):
        run = SequentialRun(target)
        run.feed(tokens)
        for layer, (k_ref, v_ref) in zip(kv_layers(tgt.kv.cache), run.kv()):
            torch.testing.assert_close(layer.keys[r, :, :len(tokens)], k_ref, atol=ATOL, rtol=0)
            torch.testing.assert_close(layer.values[r, :, :len(tokens)], v_ref, atol=ATOL, rtol=0)


def test_static_cache_sized_by_the_decoder_fits_ngram_trees(target, prompts, reference):
    # Without max_cache_len the decoder sizes the static cache itself (prompt + new tokens + the drafter's largest
    # block). An n-gram drafter with branches makes trees of up to k * branches nodes, which must fit too.
    from mmspec.drafters import NGramDrafter

    dec = SpeculativeDecoder(target, NGramDrafter(k=4, branches=3), cache="static")
    for i in (1, 5, 22):
        out = dec.generate([prompts[i]], max_new_tokens=24)
        assert out.sequences == [reference[i]]


# --- models the adapter cannot drive -----------------------------------------------------------------------------
COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)


def sliding_models():
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    return {
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8,
                                                      max_window_layers=0)),
        "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**COMMON, sliding_window=8, head_dim=8)),
        "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(**COMMON, sliding_window=8, head_dim=8)),
        # Mistral has no `layer_types`: transformers infers sliding layers from `sliding_window` alone.
        "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=8)),
    }


def test_models_sliding_every_layer_are_refused(target):
    """Mistral slides every layer without typing them: a sliding cache would evict what a rejected draft needs."""
    model = sliding_models()["mistral"]().eval()
    with pytest.raises(UnsupportedModelError, match="sliding"):
        CausalLMTarget(model)  # at construction, before any cache exists
    with pytest.raises(UnsupportedModelError, match="sliding"):
        SpeculativeDecoder(target, model)  # as a drafter too
    with pytest.raises(UnsupportedModelError, match="static"):
        CausalLMTarget(sliding_models()["gemma3"]().eval(), cache="static")


SLIDING_PROMPTS = [[5, 9, 3, 7, 1, 2, 44, 12, 5, 9, 3, 7, 1, 2, 44, 12, 5, 9], [8, 8, 4],
                   [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8]]


def sliding_target(family):
    if family == "gemma4":
        from mmspec.testing import tiny_gemma4

        return tiny_gemma4(std=0.1)  # window 6, KV-shared layers
    return widen_(sliding_models()[family](), 0.02 if family.startswith("gemma") else 0.1).eval()


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gemma3", "gemma4"])
def test_models_typing_sliding_layers_match_generate(family):
    """Models whose config types their sliding layers run in the engine itself (every slot kept, masks cut to the
    window): greedy output equals transformers' generate over sliding caches, for prompts and generations past the
    window, with chains, trees and a batch; as a draft model too."""
    from mmspec.drafters import ModelDrafter, NGramDrafter
    from mmspec.tree import StaticTree

    model = sliding_target(family)
    ref = [model.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, pad_token_id=0,
                          eos_token_id=None)[0, len(p):].tolist() for p in SLIDING_PROMPTS]
    assert len({t for r in ref for t in r}) >= 6
    dec = SpeculativeDecoder(model, NGramDrafter(k=4, branches=2))
    assert dec.generate(SLIDING_PROMPTS, max_new_tokens=20).sequences == ref
    drafter = ModelDrafter(sliding_target(family), tree=StaticTree.full((2, 2, 1)))
    dec = SpeculativeDecoder(model, drafter)
    assert [dec.generate([p], max_new_tokens=20).sequences[0] for p in SLIDING_PROMPTS] == ref
    assert dec.generate(SLIDING_PROMPTS, max_new_tokens=20).sequences == ref


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_full_attention_variants_are_accepted(family):
    # Positive control: the same families without sliding windows work and match transformers' generate.
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**COMMON, use_sliding_window=False))
    else:
        model = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=None))
    model = widen_(model, 0.2).eval()
    prompt = [3, 9, 27, 81, 50]
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                         eos_token_id=None)[0, len(prompt):].tolist()
    assert len(set(ref)) >= 4
    out = SpeculativeDecoder(model, "ngram").generate([prompt], max_new_tokens=12)
    assert out.sequences[0] == ref


def test_cache_without_layers_is_refused():
    with pytest.raises(UnsupportedModelError, match="layers"):
        kv_layers(object())


# --- memory ------------------------------------------------------------------------------------------------------
def kv_state(dec: SpeculativeDecoder):
    kv = dec.target.kv
    return kv.length.tolist(), kv.width, [layer.keys.shape[2] for layer in kv_layers(kv.cache)]


@pytest.mark.parametrize("drafter", ["noisy", "copy", "ngram"])
def test_cache_after_generation_holds_exactly_the_committed_tokens(target, drafters, drafter):
    prompt = [3, 9, 27, 81, 50, 20, 3, 9]
    new = 40
    dec = SpeculativeDecoder(target, "ngram" if drafter == "ngram" else drafters[drafter], tree=4)
    out = dec.generate([prompt], max_new_tokens=new)
    assert len(out.sequences[0]) == new
    if drafter != "ngram":
        assert out.stats.accepted_tokens > 0
    plain = SpeculativeDecoder(target)
    assert plain.generate([prompt], max_new_tokens=new).sequences == out.sequences
    # Prompt + every generated token but the last (never fed): no rejected draft slot survives.
    expect = len(prompt) + new - 1
    assert kv_state(dec) == ([expect], expect, [expect] * target.config.num_hidden_layers)
    assert kv_state(dec) == kv_state(plain)
    # The verify blocks never held more than one block of draft slots beyond the committed tokens.
    assert dec.target.kv.peak_width <= expect + 1 + 4


def test_batched_cache_after_generation(target, drafters, prompts):
    dec = SpeculativeDecoder(target, drafters["noisy"], tree=4)
    batch = prompts[:3]
    new = 20
    out = dec.generate(batch, max_new_tokens=new)
    assert [len(s) for s in out.sequences] == [new] * 3
    lengths, width, key_widths = kv_state(dec)
    # Rows that finished earlier left the batch; the rows still held hold exactly prompt + new - 1 slots.
    remaining = sorted(lengths)
    assert all(n in [len(p) + new - 1 for p in batch] for n in remaining)
    assert width == max(lengths) and key_widths == [width] * target.config.num_hidden_layers
