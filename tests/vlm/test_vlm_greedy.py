"""Greedy speculative VLM decoding equals transformers' own `generate`, for every family, drafter and draft shape.

Each family is a tiny random stock transformers VLM (vision.testing.tiny) with its own processor and chat template.
References come from `model.generate` on the same processor inputs. The requests have different images and prompt
lengths (one is text-only where the family allows it); batches of 4 must equal the single-request references.
"""
from __future__ import annotations

import pytest

from mmspec.tree import DynamicTree, StaticTree
from vision import SpeculativeVLM
from vlm_cases import ALL, MAX_NEW, copy_of, family, image, noisy_vlm, references, rows, small_vlm, text_lm

SHAPES = {"chain3": 3, "tree221": StaticTree.full((2, 2, 1))}


def drafter_for(name: str, kind: str):
    return {"small_vlm": lambda: small_vlm(name), "text_lm": lambda: text_lm(name), "ngram": lambda: "ngram",
            "copy": lambda: copy_of(name), "noisy_copy": lambda: noisy_vlm(name)}[kind]()


def run(svlm: SpeculativeVLM, batch: list[dict]):
    return svlm.generate(prompt=[r["prompt"] for r in batch], images=[r["images"] for r in batch],
                         max_new_tokens=MAX_NEW)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", ["small_vlm", "noisy_copy"])
@pytest.mark.parametrize("name", ALL)
def test_vlm_drafter_matches_generate(name, kind, shape):
    """A small VLM drafter (1 text layer, smaller vision tower) and a noisy copy of the target (accepts some,
    rejects some), both seeing the image, at bs=1 and in a batch of 4."""
    t = family(name)
    svlm = SpeculativeVLM(t.model, t.processor, drafter_for(name, kind), tree=SHAPES[shape])
    ref = [list(r) for r in references(name)]
    single = [run(svlm, [r]).token_ids for r in rows(name)]
    assert single == ref
    batched = run(svlm, rows(name))
    assert batched.sequences == ref
    if kind == "noisy_copy":  # both the accept and the reject paths ran
        s = batched.stats
        assert 0 < s.accepted_tokens < s.draft_tokens, s.summary()


@pytest.mark.parametrize("kind", ["text_lm", "ngram"])
@pytest.mark.parametrize("name", ALL)
def test_text_and_ngram_drafters_match_generate(name, kind):
    t = family(name)
    ref = [list(r) for r in references(name)]
    for shape in (SHAPES["chain3"], DynamicTree(topk=3, depth=3, total=8) if kind == "text_lm" else 3):
        svlm = SpeculativeVLM(t.model, t.processor, drafter_for(name, kind), tree=shape)
        assert run(svlm, rows(name)).sequences == ref
        assert [run(svlm, [r]).token_ids for r in rows(name)[:2]] == ref[:2]


@pytest.mark.parametrize("name", ALL)
def test_references_are_diverse_and_see_the_image(name):
    """Guards against vacuous equality: outputs vary, and the image changes the answer."""
    ref = references(name)
    assert sum(len(set(r)) >= 4 for r in ref) >= 3, ref  # (Gemma3 under transformers 5.17 repeats on one row)
    t = family(name)
    svlm = SpeculativeVLM(t.model, t.processor, None)
    a = svlm.generate(images=[image(1, name)], prompt="describe the image", max_new_tokens=MAX_NEW).token_ids
    b = svlm.generate(images=[image(2, name)], prompt="describe the image", max_new_tokens=MAX_NEW).token_ids
    assert a != b


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("name", ALL)
def test_copy_drafter_accepts_every_token(name, k):
    """Drafter = target (it sees the image through its own prefill): every drafted token is accepted, so each
    step commits k + 1 tokens, except where max_new_tokens or EOS cuts the last one."""
    t = family(name)
    svlm = SpeculativeVLM(t.model, t.processor, copy_of(name), tree=k)
    for row in rows(name):
        out = svlm.generate(prompt=row["prompt"], images=row["images"], max_new_tokens=20)
        s = out.stats
        assert s.alpha and all(a == 1.0 for a in s.alpha), s.summary()
        assert s.accepted_tokens == s.draft_tokens, s.summary()
        steps = s.target_forwards - 1
        assert steps == -(-(len(out.token_ids) - 1) // (k + 1)), s.summary()  # ceil((n - 1) / (k + 1))
