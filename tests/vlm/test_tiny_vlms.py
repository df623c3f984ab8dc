"""The tiny offline VLM zoo (vision.testing): every family builds, is deterministic, runs the canonical HF path, and
is non-degenerate (diverse greedy output that depends on the image), so equality tests built on it mean something."""
from __future__ import annotations

import functools

import pytest
import torch

from vision.testing import FAMILIES, TEXT_ONLY_FAMILIES, draft_vlm, test_image, text_drafter, tiny_vlm

# The placeholder(s) each family's chat template writes for one image, before the processor expands them.
PLACEHOLDER = {
    "llava": "<image>", "llava_next": "<image>", "llava_onevision": "<image>", "paligemma": "<image>",
    "idefics3": "<image>", "smolvlm": "<image>", "internvl": "<IMG_CONTEXT>", "gemma3": "<start_of_image>",
    "gemma4": "<|image|>",
    **dict.fromkeys(["qwen2_vl", "qwen2_5_vl", "qwen3_vl"], "<|vision_start|><|image_pad|><|vision_end|>"),
}
PROMPTS = ["What is this?", "Describe the picture in detail."]
families = pytest.mark.parametrize("family", list(FAMILIES))


@functools.lru_cache(maxsize=None)
def target(family):
    return tiny_vlm(family)


def own_layers(text_config) -> int:
    """Text layers computing keys of their own (Gemma 4 adds as many layers reading them: KV sharing)."""
    return text_config.num_hidden_layers - (getattr(text_config, "num_kv_shared_layers", None) or 0)


def user(text: str, images: int = 1) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def encode(vlm, messages, images):
    prompt = vlm.processor.apply_chat_template(messages, add_generation_prompt=True)
    return vlm.processor(images=images or None, text=[prompt], return_tensors="pt")


def image_token_id(config) -> int:
    return config.image_token_id if getattr(config, "image_token_id", None) is not None else config.image_token_index


@torch.no_grad()
def greedy(model, inputs, n: int = 16) -> list[int]:
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_every_requested_family_is_built():
    assert set(FAMILIES) == set(PLACEHOLDER)


@families
def test_deterministic_in_seed(family):
    a, b, c = tiny_vlm(family, seed=3), tiny_vlm(family, seed=3), tiny_vlm(family, seed=4)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert a.processor.tokenizer.get_vocab() == c.processor.tokenizer.get_vocab()
    assert test_image(5, 40).tobytes() == test_image(5, 40).tobytes() != test_image(6, 40).tobytes()
    assert test_image(0).size == (32, 32)


@families
def test_tiny_and_consistent_ids(family):
    vlm = target(family)
    model, tok = vlm.model, vlm.processor.tokenizer
    text = model.config.get_text_config()
    assert (text.hidden_size, own_layers(text)) == (64, 2)
    assert text.vocab_size == len(tok) == model.get_output_embeddings().out_features
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    inputs = encode(vlm, [user("What is this?")], [test_image(0, vlm.image_size)])
    n_image = int((inputs["input_ids"] == image_token_id(model.config)).sum())
    assert 4 <= n_image <= 64, n_image  # config id == the tokenizer's placeholder id, expanded to the feature count
    # (Gemma 4's image processor fills a budget of >= 70 soft tokens: 64 for a square image, whatever its size)


@families
def test_chat_template(family):
    vlm = target(family)
    system = {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    conversation = [system, user("What is this?"), {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
                    user("And the colour?", images=0)]
    for owner in (vlm.processor, vlm.processor.tokenizer):
        assert owner.chat_template
        one = owner.apply_chat_template([user("What is this?")], add_generation_prompt=True, tokenize=False)
        assert one.count(PLACEHOLDER[family]) == 1 and "What is this?" in one
        multi = owner.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        assert multi.count(PLACEHOLDER[family]) == 1
        assert all(text in multi for text in ("Be brief.", "a cat", "And the colour?"))
    two = vlm.processor.apply_chat_template([user("Compare.", images=2)], add_generation_prompt=True)
    assert two.count(PLACEHOLDER[family]) == 2


@families
def test_greedy_output_is_diverse_and_depends_on_the_image(family):
    vlm = target(family)
    images = [test_image(k, vlm.image_size) for k in range(2)]
    outs = {(q, k): greedy(vlm.model, encode(vlm, [user(q)], [im])) for q in PROMPTS for k, im in enumerate(images)}
    diverse = [len(set(o)) >= 5 for o in outs.values()]
    assert sum(diverse) >= len(diverse) - 1, outs
    assert all(outs[q, 0] != outs[q, 1] for q in PROMPTS), outs


@families
def test_other_image_sizes(family):
    vlm = target(family)
    for image in (test_image(4).resize((48, 24)), test_image(5, 2 * vlm.image_size)):
        inputs = encode(vlm, [user("What is this?")], [image])
        n_image = int((inputs["input_ids"] == image_token_id(vlm.model.config)).sum())
        with torch.no_grad():
            logits = vlm.model(**inputs).logits
        assert 4 <= n_image <= 64 and logits.shape[1] == inputs["input_ids"].shape[1]


@families
def test_two_images_and_multi_turn(family):
    vlm = target(family)
    images = [test_image(1, vlm.image_size), test_image(2, vlm.image_size)]
    conversation = [user("Compare them.", images=2), {"role": "assistant", "content": [{"type": "text", "text": "no"}]},
                    user("Why?", images=0)]
    inputs = encode(vlm, conversation, images)
    with torch.no_grad():
        logits = vlm.model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(vlm.processor.tokenizer))
    assert len(greedy(vlm.model, inputs)) >= 1


@pytest.mark.parametrize("family", list(TEXT_ONLY_FAMILIES))
def test_text_only_prompt(family):
    vlm = target(family)
    inputs = encode(vlm, [{"role": "user", "content": [{"type": "text", "text": "Tell me a story."}]}], None)
    assert not (inputs["input_ids"] == image_token_id(vlm.model.config)).any()
    out = greedy(vlm.model, inputs)
    assert len(out) >= 1 and (len(out) < 16 or len(set(out)) >= 3)


def test_paligemma_requires_an_image():
    vlm = target("paligemma")
    with pytest.raises(ValueError):
        vlm.processor(text=["caption en"], return_tensors="pt")


@families
def test_draft_vlm_shares_the_processor(family):
    vlm, draft = target(family), draft_vlm(family)
    assert own_layers(draft.model.config.get_text_config()) == 1
    assert draft.processor.tokenizer.get_vocab() == vlm.processor.tokenizer.get_vocab()
    assert image_token_id(draft.model.config) == image_token_id(vlm.model.config)
    images = [test_image(3, vlm.image_size)]
    inputs = encode(vlm, [user("What is this?")], images)
    again = encode(draft, [user("What is this?")], images)
    assert inputs.keys() == again.keys() and all(torch.equal(inputs[k], again[k]) for k in inputs)
    with torch.no_grad():
        assert draft.model(**inputs).logits.shape == vlm.model(**inputs).logits.shape


@families
def test_text_drafter_shares_the_vocabulary(family):
    vlm, drafter = target(family), text_drafter(family)
    assert drafter.config.vocab_size == vlm.model.config.get_text_config().vocab_size == len(vlm.processor.tokenizer)
    inputs = encode(vlm, [user("What is this?")], [test_image(0, vlm.image_size)])
    with torch.no_grad():
        logits = drafter(input_ids=inputs["input_ids"]).logits
    assert logits.shape[-1] == vlm.model.get_output_embeddings().out_features


def test_unknown_family_and_bad_width_are_refused():
    with pytest.raises(ValueError, match="valid families"):
        tiny_vlm("llava-9000")
    with pytest.raises(ValueError, match="hidden"):
        tiny_vlm("llava", hidden=40)
