"""Multi-turn chat: each answer equals re-running the whole conversation, and text-only follow-ups reuse the cache."""
from __future__ import annotations

import pytest

from mmspec.errors import ImageError
from vision import SpeculativeVLM
from vlm_cases import ALL, MAX_NEW, family, hf_reference, image, noisy_vlm


def rerun(svlm: SpeculativeVLM, messages, images) -> list[int]:
    fresh = SpeculativeVLM(svlm.model, svlm.processor, None)  # target alone, from scratch
    return fresh.generate(messages=messages, images=images, max_new_tokens=MAX_NEW).token_ids


@pytest.mark.parametrize("name", ALL)
def test_chat_equals_rerunning_the_conversation(name):
    t = family(name)
    svlm = SpeculativeVLM(t.model, t.processor, noisy_vlm(name), tree=3)
    chat = svlm.chat(max_new_tokens=MAX_NEW)
    img = image(21, name)
    first = chat.send("describe the image", images=[img])
    assert first.token_ids == hf_reference(name, {"prompt": "describe the image", "images": [img]})
    second = chat.send("what color is it")
    history = chat.messages[:-1]  # the conversation up to the second question
    assert second.token_ids == rerun(svlm, history, [img])
    assert second.token_ids == hf_reference(name, {"messages": history, "images": [img]})
    prefill = svlm.target.last_prefill
    if name == "paligemma":  # prefix-LM: the whole prompt attends bidirectionally, so each turn is re-run
        assert not prefill["resumed"]
    else:  # only the new turn's tokens went through the model
        assert prefill["resumed"] and prefill["tokens"] < len(svlm.target.row_ids[0]) // 2, prefill
    third = chat.send("and this one", images=[image(22, name)])  # a new image: the prompt is prefilled again
    assert third.token_ids == rerun(svlm, chat.messages[:-1], [img, image(22, name)])


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "gemma3"])
def test_chat_continues_after_an_error(name, tmp_path):
    t = family(name)
    svlm = SpeculativeVLM(t.model, t.processor, "ngram")
    chat = svlm.chat(max_new_tokens=MAX_NEW)
    img = image(23, name)
    chat.send("describe the image", images=[img])
    before = [dict(m) for m in chat.messages]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(ImageError, match="broken.png"):
        chat.send("and this one?", images=[bad])
    assert chat.messages == before  # the failed turn left no trace
    # Interrupt a turn half-way: the cache then holds a partial answer and must not be resumed from.
    stream = chat.stream("what color is it")
    next(stream)
    stream.close()
    assert chat.messages == before
    out = chat.send("what color is it")
    assert out.token_ids == rerun(svlm, chat.messages[:-1], [img])
