"""Qwen3.5 (`Qwen3_5ForConditionalGeneration`: Gated DeltaNet linear attention between full attention, M-RoPE) as a
VLM target: greedy output equals transformers' own `generate` with images, for chains, static and dynamic trees, one
request and a batch of 4 with different images and lengths, with drafts partly accepted so the recurrent states roll
back every step (`mmspec.recurrent`); a chat's turns equal re-running the conversation."""
from __future__ import annotations

import functools

import pytest
import torch

from mmspec.tree import DynamicTree, StaticTree
from oracle import OracleDrafter
from vision import SpeculativeVLM
from vision.drafters import EagleDrafter, EagleHead
from vlm_cases import MAX_NEW, QUESTIONS, family, hf_reference, image

NAME = "qwen3_5"


@functools.lru_cache(maxsize=None)
def batch() -> list[dict]:
    """Four requests: different images (one without), prompt lengths and answers."""
    return [{"prompt": QUESTIONS[i], "images": [] if i == 2 else [image(30 + i, "qwen2_vl")]} for i in range(4)]


@functools.lru_cache(maxsize=None)
def refs() -> list[list[int]]:
    return [hf_reference(NAME, r) for r in batch()]


def run(svlm, rows):
    return svlm.generate(prompt=[r["prompt"] for r in rows], images=[r["images"] for r in rows],
                         max_new_tokens=MAX_NEW)


def test_reference_sees_the_image_and_varies():
    got = refs()
    assert len({tuple(r) for r in got}) >= 3 and all(len(set(r)) >= 4 for r in got)


@pytest.mark.parametrize("tree", [StaticTree.chain(4), StaticTree.full((2, 2, 1)), StaticTree.full((3, 2))],
                         ids=["chain4", "tree221", "tree32"])
def test_greedy_equals_generate_with_rollbacks(tree):
    t = family(NAME)
    vocab = t.model.config.text_config.vocab_size
    single = [run(SpeculativeVLM(t.model, t.processor, OracleDrafter([r], tree, 0.7, vocab)), [row]).token_ids
              for row, r in zip(batch(), refs())]
    assert single == refs()
    out = run(SpeculativeVLM(t.model, t.processor, OracleDrafter(refs(), tree, 0.7, vocab)), batch())
    assert out.sequences == refs()
    assert 0 < out.stats.accepted_tokens < out.stats.draft_tokens, out.stats.summary()


def test_eagle_dynamic_tree_is_lossless():
    t = family(NAME)
    torch.manual_seed(0)
    svlm = SpeculativeVLM(t.model, t.processor, EagleDrafter(EagleHead(t.model), DynamicTree(topk=3, depth=3, total=8)))
    assert run(svlm, batch()).sequences == refs()


def test_chat_equals_rerunning_the_conversation():
    t = family(NAME)
    svlm = SpeculativeVLM(t.model, t.processor, "ngram", tree=3)
    chat = svlm.chat(max_new_tokens=MAX_NEW)
    img = image(41, "qwen2_vl")
    first = chat.send("describe the image", images=[img])
    assert first.token_ids == hf_reference(NAME, {"prompt": "describe the image", "images": [img]})
    second = chat.send("what color is it")
    assert second.token_ids == hf_reference(NAME, {"messages": chat.messages[:-1], "images": [img]})
