"""vision.train.sft: the target mask covers exactly the assistant turns, and training lowers the loss."""
from __future__ import annotations

import pytest

from mmspec.errors import InvalidInputError
from vision.scenes import Scene, Thing, render
from vision.train.sft import encode_conversation, train_conversations
from vision.zoo_models import llava_model, llava_processor, tokenizer_corpus, train_tokenizer


@pytest.fixture(scope="module")
def tiny():
    tok = train_tokenizer(400, tokenizer_corpus(scenes=50))
    proc = llava_processor(tok, 20, 10)
    model = llava_model(tok, image_size=20, patch=10, vision_hidden=32, vision_layers=1, hidden=64, layers=1,
                        heads=2, kv_heads=1, intermediate=128, seed=0)
    return tok, proc, model


def _conv():
    img = render(Scene("white", (Thing("star", "red", "large", 4),)), 20)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A red star."}]},
            {"role": "user", "content": [{"type": "text", "text": "Where?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "In the center."}]}]
    return [img], msgs


def test_target_mask_is_exactly_the_assistant_turns(tiny):
    tok, proc, _ = tiny
    images, msgs = _conv()
    enc = encode_conversation(proc, images, msgs)
    picked = [i for i, t in zip(enc.input_ids, enc.targets) if t]
    text = tok.decode(picked)
    assert text.replace(" ", "") == "Ared star.</s>Inthecenter.</s>".replace(" ", "")
    assert enc.input_ids.count(tok.image_token_id) == 4 and "pixel_values" in enc.inputs
    with pytest.raises(InvalidInputError, match="no assistant turn"):
        encode_conversation(proc, images, msgs[:1])


def test_training_lowers_the_loss(tiny):
    _, proc, model = tiny
    report = train_conversations(model, proc, lambda i: _conv(), steps=30, batch_size=2, lr=3e-3, warmup=2,
                                 progress=False, window=3)
    assert report["losses"][-1] < 0.5 * report["losses"][0] and report["tokens"] > 0
